"""`python -m export parity`: an ONNX file (and engine) that `python -m export` wrote, against its checkpoint.

    python -m export parity --weights best.pt --onnx runs/export/best/best.onnx [--engine E] [--bench 30]

The batch and precision come from the ONNX file's metadata, the image size too unless --imgsz names another
(a dynamic export); `--code` imports a fork's blocks as the main job does. The verdict is the main job's.
Prints the results as JSON.
"""

import ast
import json

import torch

import models
from export.checkpoint import kinds, load
from export.errors import EXIT_OK, EXIT_VERDICT_FAILED
from export.graph.rewrite import rewrite
from export.graph.to_onnx import onnx_metadata, onnx_precision
from export.inputs.images import parse_imgsz, read_images, tile
from export.verify.parity import compare, own_fp16_error, thresholds_for
from export.verify.runners import OrtRunner, TorchRunner, TrtRunner, engine_runtime
from export.verify.timing import interleaved


def run(args):
    """Print the results; exit code 0 when every backend passed, 4 otherwise."""
    results = check(args)
    print(json.dumps(results, indent=2))
    return EXIT_OK if all(r.get("pass", True) for r in results.values()) else EXIT_VERDICT_FAILED


def check(args):
    meta = onnx_metadata(args.onnx)
    batch, precision = int(meta.get("batch", 1)), onnx_precision(meta)
    loaded = load(args.weights, code=args.code)
    imgsz = parse_imgsz(args.imgsz if args.imgsz else ast.literal_eval(meta.get("imgsz", "[640, 640]")),
                        max(loaded.stride))
    images = tile(read_images(args.images, imgsz), batch)
    runners, results = {"onnxruntime": OrtRunner(args.onnx)}, {}
    if args.engine:
        trt, reason = engine_runtime()
        if trt:
            runners["tensorrt"] = TrtRunner(args.engine, trt)
        else:
            results["tensorrt"] = {"skipped": reason}
    kind = kinds.of(loaded, ast.literal_eval(meta.get("args", "{}")).get("layout", "native"))
    reference = TorchRunner(models.reference_at(loaded.model, *imgsz), to_layout=kind.reference_to_export)
    own = None
    if precision == "fp16":  # fp16 is held to what fp16 itself costs this model, as in the main job
        twin, _ = rewrite(loaded.model, imgsz, images=torch.from_numpy(images[:1]))
        own = own_fp16_error(reference, twin, images, batch)
    for backend, runner in runners.items():
        results[backend] = compare(reference, runner, images, precision, batch, kind.to_v8_layout,
                                   thresholds_for(precision, own))
        if own is not None:
            results[backend]["fp16_own_rel_max_abs"] = own
        results[backend].pop("abs_diff_sample")
        results[backend].pop("detections_sample")
    if args.bench:
        results["speed"] = interleaved({"torch": reference, **runners}, images[:batch], args.bench)
    return results
