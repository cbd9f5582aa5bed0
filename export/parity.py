"""Does the deployed model compute what PyTorch computes? Raw outputs, detected boxes and speed, per backend.

    python -m export parity --weights best.pt --onnx runs/export/best/best.onnx [--engine E] [--bench 30]

PyTorch (the loaded reference model) is the truth. Every backend sees the same letterboxed images
(ultralytics' preprocessing) and the same NMS (ultralytics'). Usable alone or from the main job.
"""

import argparse
import ast
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from ultralytics.utils.metrics import ap_per_class, box_iou
from ultralytics.utils.nms import non_max_suppression

import models
from export import kinds
from export.images import read_images, tile
from export.load import CheckpointError, load
from export.rewrite import watched_blocks
from export.to_onnx import trace
from models import fla

CONF, IOU_NMS, TOP_ANCHORS = 0.25, 0.7, 100
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
MAX_PICTURED = 8  # images drawn in detections.png


@dataclass(frozen=True)
class Thresholds:
    rel_max_abs: float  # max |backend - torch| / max |torch|
    cosine: float
    box_recall: float
    box_precision: float


# int8 is a sanity check on the sample images (finite, same picture): measured on the four demos, int8 ORT reached
# rel max abs 0.05-0.14, cosine 0.9998, box recall >= 0.875; what decides int8 is the labelled mAP drop (calib/).
THRESHOLDS = {"fp32": Thresholds(1e-4, 0.99999, 0.99, 0.99), "fp16": Thresholds(2e-2, 0.999, 0.95, 0.95),
              "int8": Thresholds(0.25, 0.999, 0.75, 0.75)}


# ---- runners: images (B,3,H,W) float32 numpy -> output0 as the model emits it, float32 numpy ----------
class TorchRunner:
    name = "torch"

    def __init__(self, model):
        self.model = model.eval()

    def __call__(self, images):
        with torch.no_grad():
            y = self.model(torch.from_numpy(images))
        return (y[0] if isinstance(y, (list, tuple)) else y).float().numpy()


class OrtRunner:
    name = "onnxruntime"

    def __init__(self, path, threads=None):
        self.path = path
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # same threads as torch
        available = ort.get_available_providers()
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), options, providers=providers + ["CPUExecutionProvider"])
        self.providers = self.session.get_providers()
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images):
        return self.session.run(None, {self.input: images})[0].astype(np.float32)


class TrtRunner:
    """A TensorRT engine run through the `tensorrt` (or `tensorrt_rtx`) runtime on a CUDA device."""

    name = "tensorrt"

    def __init__(self, path, trt):
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def __call__(self, images):
        x = torch.from_numpy(images).cuda().contiguous()
        self.context.set_input_shape("images", tuple(x.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape("output0")), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("images", x.data_ptr())
        self.context.set_tensor_address("output0", y.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return y.cpu().numpy()


def engine_runtime():
    """(trt module, None) when an engine can run here, else (None, reason)."""
    if not torch.cuda.is_available():
        return None, "no CUDA GPU on this machine: the engine was built but cannot be run here"
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            return __import__(name), None
        except ImportError:
            continue
    return None, "neither tensorrt nor tensorrt_rtx is installed"


# ---- metrics ---------------------------------------------------------------------------------------
def raw_metrics(ref, out):
    diff = np.abs(out.astype(np.float64) - ref)
    scale = float(np.abs(ref).max()) or 1.0
    a, b = ref.ravel().astype(np.float64), out.ravel().astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "rel_max_abs": float(diff.max()) / scale,
            "cosine": cosine, "finite": bool(np.isfinite(out).all())}


def _top_anchor_rel(ref, out):
    """Max relative error of box coordinates and best score over each image's top-scoring anchors."""
    worst = 0.0
    for r, o in zip(ref, out):  # (4+nc, anchors)
        scores = r[4:].max(0)
        top = np.argsort(-scores)[:TOP_ANCHORS]
        rv = np.concatenate([r[:4, top], scores[None, top]])
        ov = np.concatenate([o[:4, top], o[4:, top][r[4:, top].argmax(0), np.arange(len(top))][None]])
        worst = max(worst, float((np.abs(ov - rv) / np.maximum(np.abs(rv), 1e-3)).max()))
    return worst


def detections(pred):
    return [d.numpy() for d in non_max_suppression(torch.from_numpy(pred), CONF, IOU_NMS)]


def box_metrics(ref_dets, dets):
    """PyTorch's detections as ground truth: recall, precision, mean IoU of matches (same class, IoU >= 0.5), mAP50-95."""
    matched = n_ref = n_det = 0
    ious, tps, confs, pred_cls, target_cls = [], [], [], [], []
    for gt, det in zip(ref_dets, dets):
        n_ref, n_det = n_ref + len(gt), n_det + len(det)
        target_cls.append(gt[:, 5])
        if not len(det):
            continue
        iou = _iou(gt, det) * (gt[:, 5:6] == det[None, :, 5])  # matches need the same class
        tp = np.stack([_greedy_match(iou, t) for t in IOU_THRESHOLDS], 1)
        half = _greedy_match(iou, 0.5, return_ious=True)
        matched += len(half)
        ious.extend(half)
        tps.append(tp)
        confs.append(det[:, 4])
        pred_cls.append(det[:, 5])
    recall = matched / n_ref if n_ref else 1.0
    precision = matched / n_det if n_det else 1.0
    if n_ref and tps:
        ap = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pred_cls),
                          np.concatenate(target_cls))[5]
        map50_95 = float(ap.mean())
    else:
        map50_95 = 1.0 if n_ref == n_det == 0 else 0.0
    return {"detections_torch": n_ref, "detections": n_det, "box_recall": recall, "box_precision": precision,
            "mean_iou": float(np.mean(ious)) if ious else (1.0 if n_ref == n_det == 0 else 0.0), "map50_95": map50_95}


def _iou(gt, det):
    if not len(gt) or not len(det):
        return np.zeros((len(gt), len(det)))
    return box_iou(torch.from_numpy(gt[:, :4]), torch.from_numpy(det[:, :4])).numpy()


def disagreements(gt, det):
    """Where a backend's detections differ from PyTorch's on one image, by the box metrics' own matching (same
    class, IoU >= 0.5, best IoU first): {missed: PyTorch boxes left unmatched, extra: backend boxes left
    unmatched, flips: (PyTorch box, backend box) pairs among those that match at IoU >= 0.5 with another class}."""
    iou = _iou(gt, det)
    same = iou * (gt[:, 5:6] == det[None, :, 5]) if len(gt) and len(det) else iou
    pairs = _greedy_pairs(same, 0.5)
    missed = [g for g in range(len(gt)) if g not in {p[0] for p in pairs}]
    extra = [d for d in range(len(det)) if d not in {p[1] for p in pairs}]
    flips = _greedy_pairs(iou[np.ix_(missed, extra)], 0.5) if missed and extra else []
    flips = [(missed[g], extra[d]) for g, d in flips]
    return {"matched": len(pairs), "missed": [g for g in missed if g not in {f[0] for f in flips}],
            "extra": [d for d in extra if d not in {f[1] for f in flips}], "flips": flips}


def _greedy_pairs(iou, threshold):
    """(gt, det) index pairs: each ground truth matched to at most one detection, best IoU first."""
    used_gt, used_det, pairs = set(), set(), []
    for g, d in sorted(zip(*np.nonzero(iou >= threshold)), key=lambda gd: -iou[gd]):
        if g not in used_gt and d not in used_det:
            used_gt.add(g), used_det.add(d)
            pairs.append((int(g), int(d)))
    return pairs


def _greedy_match(iou, threshold, return_ious=False):
    """Tp flags per detection (or the matched IoUs) of the greedy matching."""
    pairs = _greedy_pairs(iou, threshold)
    if return_ious:
        return [float(iou[g, d]) for g, d in pairs]
    tp = np.zeros(iou.shape[1], bool)
    tp[[d for _, d in pairs]] = True
    return tp


def compare(reference, runner, images, precision, batch=1, to_v8_layout=None):
    """Parity of `runner` against `reference` (both runners) on images: metrics and pass/fail.
    Raw metrics compare the outputs as the model emits them; anchors and boxes are compared in the
    (B, 4+nc, anchors) score layout `to_v8_layout` gives (export.kinds: identity for ultralytics)."""
    ref, out = _run_all(reference, images, batch), _run_all(runner, images, batch)
    ref_v8, out_v8 = (to_v8_layout(ref), to_v8_layout(out)) if to_v8_layout else (ref, out)
    result = raw_metrics(ref, out)
    result["top_anchor_max_rel"] = _top_anchor_rel(ref_v8, out_v8)
    ref_dets, dets = detections(ref_v8), detections(out_v8)
    result.update(box_metrics(ref_dets, dets))
    limits = THRESHOLDS[precision]
    result["pass"] = bool(result["finite"] and result["rel_max_abs"] <= limits.rel_max_abs
                          and result["cosine"] >= limits.cosine and result["box_recall"] >= limits.box_recall
                          and result["box_precision"] >= limits.box_precision)
    result["thresholds"] = limits.__dict__
    result["abs_diff_sample"] = np.abs(out - ref).ravel()[:: max(1, out.size // 20000)].tolist()
    result["detections_sample"] = {"reference": ref_dets[:MAX_PICTURED], "backend": dets[:MAX_PICTURED]}
    return result


def _run_all(runner, images, batch):
    outs = [runner(images[i:i + batch]) for i in range(0, len(images) - batch + 1, batch)]
    return np.concatenate(outs)


# ---- localisation: which attention block diverges first ------------------------------------------------
def localize(reference_model, twin, images, half, tmpdir, precision):
    """Export the twin with every block that is not stock ultralytics (attention families, --code blocks) as an
    extra ONNX output; name the first whose ONNX Runtime output diverges from the PyTorch reference's.
    Returns (name or None, per-block rel errors)."""
    names = watched_blocks(reference_model)
    twin = copy.deepcopy(twin)
    probe = _BlockTap(twin.half() if half else twin.float(), names, half)
    proto = trace(probe, torch.from_numpy(images[:1]), input_names=["images"], output_names=["output0", *names])
    path = Path(tmpdir) / "localize.onnx"
    path.write_bytes(proto.SerializeToString())
    outs = OrtRunner(path).session.run(None, {"images": images[:1]})[1:]
    expected = _BlockTap(reference_model, names, False)(torch.from_numpy(images[:1]))[1:]
    limit = THRESHOLDS[precision].rel_max_abs
    errors = {}
    for name, got, exp in zip(names, outs, expected):
        exp = exp.detach().float().numpy()
        errors[name] = float(np.abs(got.astype(np.float64) - exp).max() / (np.abs(exp).max() or 1.0))
    first = next((n for n in names if not np.isfinite(errors[n]) or errors[n] > limit), None)
    return first, errors


class _BlockTap(torch.nn.Module):
    """The model, returning its output followed by each named block's output."""

    def __init__(self, model, names, half):
        super().__init__()
        self.model, self.names, self.half = model, names, half

    def forward(self, images):
        captured = {}

        def keep(name):
            def hook(module, args, out):  # returns None: a hook's return value would replace the output
                captured.setdefault(name, out)
            return hook

        hooks = [self.model.get_submodule(n).register_forward_hook(keep(n)) for n in self.names]
        try:
            with torch.no_grad():
                y = self.model(images.half() if self.half else images)
        finally:
            for h in hooks:
                h.remove()
        y = y[0] if isinstance(y, (list, tuple)) else y
        return (y.float(), *(captured[n].float() for n in self.names))


# ---- standalone entry: python -m export parity ---------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export parity", description="Compare ONNX/TensorRT with PyTorch.")
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--engine", type=Path, default=None)
    p.add_argument("--images", type=Path, default=models.DEMO_DIR / "images")
    p.add_argument("--bench", type=int, default=0, help="timed calls per backend per round, backends interleaved")
    args = p.parse_args(argv)
    try:
        results = _standalone(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(results, indent=2))
    return 0 if all(r.get("pass", True) for r in results.values()) else 4


def _standalone(args):
    meta = onnx_metadata(args.onnx)
    imgsz, batch = tuple(ast.literal_eval(meta.get("imgsz", "[640, 640]"))), int(meta.get("batch", 1))
    precision = onnx_precision(meta)
    loaded = load(args.weights)
    images = tile(read_images(args.images, imgsz), batch)
    runners, results = {"onnxruntime": OrtRunner(args.onnx)}, {}
    if args.engine:
        trt, reason = engine_runtime()
        if trt:
            runners["tensorrt"] = TrtRunner(args.engine, trt)
        else:
            results["tensorrt"] = {"skipped": reason}
    reference = TorchRunner(fla.defined_at(loaded.model, *imgsz))
    for backend, runner in runners.items():
        results[backend] = compare(reference, runner, images, precision, batch, kinds.of(loaded).to_v8_layout)
        results[backend].pop("abs_diff_sample")
        results[backend].pop("detections_sample")
    if args.bench:
        from export.bench import interleaved

        results["speed"] = interleaved({"torch": reference, **runners}, images[:batch], args.bench)
    return results


def onnx_precision(meta):
    """The precision of an ONNX file `python -m export` wrote, from its metadata."""
    return "int8" if "quantization" in meta else \
        "fp16" if ast.literal_eval(meta.get("args", "{}")).get("half") else "fp32"


def onnx_metadata(path):
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such ONNX file; pass the .onnx that `python -m export` wrote")
    try:
        return {e.key: e.value for e in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # a damaged or foreign file: one line, exit 2
        raise CheckpointError(f"{path} is not a readable ONNX model") from None
