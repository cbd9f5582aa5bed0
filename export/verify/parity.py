"""Does the deployed model compute what PyTorch computes? Raw outputs and detected boxes, per backend.

PyTorch (the loaded reference model) is the truth. Every backend sees the same letterboxed images
(ultralytics' preprocessing) and the same NMS (ultralytics'); `compare` gives the metrics and the verdict
for one backend at its precision (THRESHOLDS).

Boxes are compared where that is clean, at the anchor: a box one side keeps and the other drops is a real
disagreement only when the backend's own values at that anchor (its box and every class score) differ from
PyTorch's beyond the precision's tolerance (ANCHOR_TOLERANCE). Otherwise a decision flipped on equal values
dropped it: a best score at the confidence threshold, a near-tied class argmax, or NMS / the max-detections
cut among near-equal boxes. Untrained and saturated heads make hundreds of those, decided by differences of
1e-7; they are counted and reported as borderline, never failures.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch
from ultralytics.utils.metrics import ap_per_class, box_iou
from ultralytics.utils.nms import non_max_suppression

from export.verify.runners import TorchRunner

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


# fp16 is judged against what fp16 itself costs the model: PyTorch's own fp16 run of the twin, measured per model.
# Measured on the five demos, ONNX Runtime's fp16 file errs 0.55-1.06x as much as that run (rel max abs 5.7e-4 to
# 2.1e-3); 3x leaves room, 1e-3 keeps a model fp16 hardly touches from a limit below fp16's own rounding, and the
# fixed 2e-2 stays the ceiling for a model that fp16 itself hurts.
FP16_OWN_FACTOR, FP16_FLOOR = 3.0, 1e-3


def thresholds_for(precision, own_fp16=None):
    """The verdict's limits at `precision`; fp16's raw-output limit follows `own_fp16`, the rel max abs of the
    model's own PyTorch fp16 run from fp32 (own_fp16_error), when it was measured."""
    fixed = THRESHOLDS[precision]
    if precision != "fp16" or own_fp16 is None:
        return fixed
    return replace(fixed, rel_max_abs=min(fixed.rel_max_abs, max(FP16_FLOOR, FP16_OWN_FACTOR * own_fp16)))


def passes(metrics, limits):
    """The verdict: finite outputs and every metric on the right side of its limit (a value at the limit passes)."""
    return bool(metrics["finite"] and metrics["rel_max_abs"] <= limits.rel_max_abs
                and metrics["cosine"] >= limits.cosine and metrics["box_recall"] >= limits.box_recall
                and metrics["box_precision"] >= limits.box_precision)


@dataclass(frozen=True)
class AnchorTolerance:
    score: float  # largest |backend - PyTorch| of any class score at one anchor
    iou: float  # smallest IoU of the backend's box with PyTorch's box at the same anchor


ANCHOR_TOLERANCE = {"fp32": AnchorTolerance(1e-4, 0.999), "fp16": AnchorTolerance(1e-2, 0.98),
                    "int8": AnchorTolerance(0.1, 0.8)}
BORDERLINE_KINDS = ("confidence", "class", "nms_or_cap")


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
    """(detections per image as (n, 6) xyxy / conf / class, the anchor each came from per image). ultralytics' NMS
    with its time limit lifted: a saturated head's thousands of candidates must not be cut by the clock."""
    dets, anchors = non_max_suppression(torch.from_numpy(pred), CONF, IOU_NMS, return_idxs=True, max_time_img=3600)
    return [d.numpy() for d in dets], [a.numpy() for a in anchors]


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


def judge(ref, out, gt, det, gt_anchors, det_anchors, precision):
    """`disagreements` of one image split into real ones and borderline ones. `ref` / `out`: that image's raw
    (4+nc, anchors) outputs; a disagreement is borderline when the backend's values at its anchor(s) are
    PyTorch's within ANCHOR_TOLERANCE[precision]. Returns the disagreements (real only) plus `borderline`:
    [(side, index, kind)] with side 'missed' (a PyTorch box), 'extra' (a backend box) or 'flip' (a pair)."""
    tol, diff = ANCHOR_TOLERANCE[precision], disagreements(gt, det)
    real, borderline = {"matched": diff["matched"], "missed": [], "extra": [], "flips": []}, []
    for side, items, anchors_of in (("missed", diff["missed"], lambda g: [gt_anchors[g]]),
                                    ("extra", diff["extra"], lambda d: [det_anchors[d]]),
                                    ("flips", diff["flips"], lambda gd: [gt_anchors[gd[0]], det_anchors[gd[1]]])):
        for item in items:
            anchors = anchors_of(item)
            if all(anchor_agrees(ref, out, a, tol) for a in anchors):
                borderline.append((side, item, _why(ref, out, anchors, tol)))
            else:
                real[side].append(item)
    return {**real, "borderline": borderline}


def anchor_agrees(ref, out, anchor, tol):
    """Whether the backend's box and class scores at one anchor are PyTorch's within `tol`."""
    iou = _xywh_iou(ref[:4, anchor], out[:4, anchor])
    return bool(iou >= tol.iou and np.abs(out[4:, anchor] - ref[4:, anchor]).max() <= tol.score)


def _why(ref, out, anchors, tol):
    """Which decision flipped on (near-)equal values: the confidence threshold, the class argmax, else NMS or the
    max-detections cut."""
    for a in anchors:
        best = (ref[4:, a].max(), out[4:, a].max())
        if any(abs(b - CONF) <= tol.score for b in best):
            return "confidence"
    for a in anchors:
        for scores in (ref[4:, a], out[4:, a]):
            top = np.sort(scores)[-2:]
            if len(top) == 2 and top[1] - top[0] <= tol.score:
                return "class"
    return "nms_or_cap"


def _xywh_iou(a, b):
    """IoU of two (cx, cy, w, h) boxes (ultralytics' raw box layout)."""
    a1, a2, b1, b2 = a[:2] - a[2:] / 2, a[:2] + a[2:] / 2, b[:2] - b[2:] / 2, b[:2] + b[2:] / 2
    inter = np.clip(np.minimum(a2, b2) - np.maximum(a1, b1), 0, None).prod()
    union = np.clip(a[2:], 0, None).prod() + np.clip(b[2:], 0, None).prod() - inter
    return float(inter / union) if union > 0 else float(np.allclose(a, b))


def box_verdict(ref_v8, out_v8, ref_dets, dets, ref_anchors, det_anchors, precision):
    """Box recall and precision counting real disagreements only, the borderline ones by kind, and the judged
    disagreements per image (for the report's picture)."""
    n_ref, n_det = sum(map(len, ref_dets)), sum(map(len, dets))
    judged = [judge(r, o, g, d, ga, da, precision)
              for r, o, g, d, ga, da in zip(ref_v8, out_v8, ref_dets, dets, ref_anchors, det_anchors)]
    missed = sum(len(j["missed"]) + len(j["flips"]) for j in judged)
    extra = sum(len(j["extra"]) + len(j["flips"]) for j in judged)
    borderline = {k: sum(1 for j in judged for *_, kind in j["borderline"] if kind == k) for k in BORDERLINE_KINDS}
    result = {"box_recall": 1 - missed / n_ref if n_ref else 1.0, "box_precision": 1 - extra / n_det if n_det else 1.0,
              "borderline": borderline, "disagreements": {k: sum(len(j[k]) for j in judged)
                                                          for k in ("missed", "extra", "flips")}}
    if n_ref == n_det == 0:
        result["boxes_note"] = "nothing detected on these images (by either side): the raw outputs decide"
    return result, judged


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


def compare(reference, runner, images, precision, batch=1, to_v8_layout=None, limits=None):
    """Parity of `runner` against `reference` (both runners) on images: metrics and pass/fail.
    Raw metrics compare the outputs as the model emits them; anchors and boxes are compared in the
    (B, 4+nc, anchors) score layout `to_v8_layout` gives (export.checkpoint.kinds: identity for ultralytics).
    `limits`: Thresholds other than the precision's fixed ones (thresholds_for)."""
    ref, out = _run_all(reference, images, batch), _run_all(runner, images, batch)
    ref_v8, out_v8 = (to_v8_layout(ref), to_v8_layout(out)) if to_v8_layout else (ref, out)
    result = raw_metrics(ref, out)
    result["top_anchor_max_rel"] = _top_anchor_rel(ref_v8, out_v8)
    (ref_dets, ref_anchors), (dets, anchors) = detections(ref_v8), detections(out_v8)
    plain = box_metrics(ref_dets, dets)  # every decision counted: mAP50-95 and mean IoU as a detector sees them
    result.update({**plain, "raw_box_recall": plain["box_recall"], "raw_box_precision": plain["box_precision"]})
    verdict, judged = box_verdict(ref_v8, out_v8, ref_dets, dets, ref_anchors, anchors, precision)
    result.update(verdict)
    limits = limits or THRESHOLDS[precision]
    result["pass"] = passes(result, limits)
    result["thresholds"] = limits.__dict__
    result["anchor_tolerance"] = ANCHOR_TOLERANCE[precision].__dict__
    result["abs_diff_sample"] = np.abs(out - ref).ravel()[:: max(1, out.size // 20000)].tolist()
    result["detections_sample"] = {"reference": ref_dets[:MAX_PICTURED], "backend": dets[:MAX_PICTURED],
                                   "judged": judged[:MAX_PICTURED]}
    return result


def own_fp16_error(reference, twin, images, batch=1):
    """rel max abs of the twin run in fp16 by PyTorch against the reference: what fp16 itself costs this model on
    these images; None when some op of the model has no fp16 CPU kernel in PyTorch."""
    try:
        same_layout = getattr(reference, "to_layout", None)  # the reference's output mapped as the file's
        half = _run_all(TorchRunner(twin, half=True, to_layout=same_layout), images, batch)
    except RuntimeError:
        return None
    return raw_metrics(_run_all(reference, images, batch), half)["rel_max_abs"]


def _run_all(runner, images, batch):
    outs = [runner(images[i:i + batch]) for i in range(0, len(images) - batch + 1, batch)]
    return np.concatenate(outs)
