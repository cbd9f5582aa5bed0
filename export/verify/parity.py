"""Does the deployed model compute what PyTorch computes? Raw outputs and detected boxes, per backend.

PyTorch (the loaded reference model) is the truth. Every backend sees the same letterboxed images
(ultralytics' preprocessing) and the same NMS (ultralytics'); `compare` gives the metrics and the verdict
for one backend at its precision (THRESHOLDS).
"""

from dataclasses import dataclass

import numpy as np
import torch
from ultralytics.utils.metrics import ap_per_class, box_iou
from ultralytics.utils.nms import non_max_suppression

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
    (B, 4+nc, anchors) score layout `to_v8_layout` gives (export.checkpoint.kinds: identity for ultralytics)."""
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
