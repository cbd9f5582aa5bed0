"""The INT8 stage: calibrate, quantize by the family rules, and, with labels, keep the accuracy.

    section = make_int8(job, evaluate=map50_95_of_onnx, reference_map=0.42)

Without `evaluate` (no labelled data) the QDQ model is built by the rules alone. With it, the
int8 mAP50-95 is measured; when it falls more than `tolerance` points below the fp32 model's, each
block (every attention block and the head) is measured left float one at a time, and the most
harmful are kept float, best gain first, until the drop is within tolerance (or no block helps).
Everything is built in a temp dir; only the final model is written, atomically.
"""

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from calib.quantize import Quantizer, qdq_summary
from calib.rules import blocks, float_nodes
from export.graph.to_onnx import save


@dataclass
class Int8Job:
    fp32_path: Path
    out_path: Path
    model: object  # the export-twin model (its module paths name the blocks)
    kind: object  # export.checkpoint.kinds.Kind
    files: list  # calibration images
    source: str  # where they came from, for the report
    imgsz: tuple
    batch: int = 1
    method: str = "max"
    forced: list = field(default_factory=list)  # --int8-exclude module paths
    tolerance: float = 1.0  # mAP50-95 points


def make_int8(job, evaluate=None, reference_map=None):
    """Write job.out_path; returns the report's `int8` section (plain data)."""
    rules = blocks(job.model, job.kind)
    fp32 = onnx.load(str(job.fp32_path))
    with tempfile.TemporaryDirectory(prefix="yolo-attn-int8-") as tmp:
        quantizer = Quantizer(job.fp32_path, job.files, job.imgsz, job.batch, job.method, tmp)
        excluded = list(job.forced)
        path = quantizer.quantize(float_nodes(fp32, rules, excluded))
        section = {"calibration": {"source": job.source, "images": len(job.files), "method": job.method,
                                   "batch": job.batch, "seconds": quantizer.calibration_s},
                   "rules": [{"block": b.path, "owner": b.owner, "int8_layers": list(b.int8_layers)} for b in rules],
                   "forced_float": list(job.forced), "tolerance_points": job.tolerance}
        if evaluate is not None:
            score = evaluate(path)
            section["first_map50_95"] = score
            if _drop(reference_map, score) > job.tolerance:
                path, score, excluded, section["sensitivity"] = _fallback(
                    quantizer, fp32, rules, excluded, evaluate, reference_map, job.tolerance, path, score)
            section.update({"map50_95_fp32": reference_map, "map50_95_int8": score,
                            "drop_points": _drop(reference_map, score),
                            "pass": _drop(reference_map, score) <= job.tolerance})
        proto = onnx.load(str(path))
    kept = float_nodes(fp32, rules, excluded)
    _stamp(proto, fp32, job, excluded)
    save(proto, job.out_path)
    section.update({"onnx": str(job.out_path), "float_blocks": excluded, "float_nodes": len(kept),
                    **qdq_summary(proto)})
    return section


def _drop(reference, score):
    return round((reference - score) * 100, 3)


def _fallback(quantizer, fp32, rules, excluded, evaluate, reference, tolerance, path, score):
    """Per-block sensitivity, then keep the most harmful blocks float until the drop is within tolerance."""
    table = []
    for block in (b for b in rules if b.path not in excluded):
        trial = evaluate(quantizer.quantize(float_nodes(fp32, rules, excluded + [block.path])))
        table.append({"block": block.path, "owner": block.owner, "map50_95_with_block_float": trial,
                      "gain_points": round((trial - score) * 100, 3)})
    table.sort(key=lambda row: -row["gain_points"])
    chosen = []
    for row in table:
        if _drop(reference, score) <= tolerance or row["gain_points"] <= 0:
            break
        chosen.append(row["block"])
        candidate = quantizer.quantize(float_nodes(fp32, rules, excluded + chosen))
        path, score = candidate, evaluate(candidate)
        row["kept_float"] = True
    return path, score, excluded + chosen, table


def _stamp(proto, fp32, job, excluded):
    """The fp32 export's metadata, plus how this model was quantized."""
    del proto.metadata_props[:]
    for entry in fp32.metadata_props:
        proto.metadata_props.add(key=entry.key, value=entry.value)
    info = {"scheme": "QDQ int8, symmetric, per-channel weights, per-tensor activations (TensorRT explicit)",
            "calibration": job.method, "images": len(job.files), "float_blocks": excluded}
    proto.metadata_props.add(key="quantization", value=json.dumps(info))
