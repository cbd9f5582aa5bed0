"""Is an end-to-end file's NMS the NMS of its plain file? (`--nms`)

The plain file's raw output is already compared with PyTorch, tie-aware (parity.compare). What the end-to-end
file adds is the NMS: so its detections are compared with ultralytics' `non_max_suppression` (the parameters the
user gave) run on the plain file's output for the same images. Together: the end-to-end file detects what PyTorch
detects. The TensorRT layout cannot run here (ONNX Runtime has no EfficientNMS_TRT): its node is checked against
NVIDIA's documented interface, and the boxes and scores feeding it (the file cut before the node, run by ONNX
Runtime) go through a numpy implementation of the plugin's documented semantics (export.graph.nms.efficient_nms).
"""

import numpy as np
import onnx
import torch
from ultralytics.utils.nms import non_max_suppression

from export.graph.nms import check_trt_node, efficient_nms, trt_inputs_model
from export.verify.parity import box_metrics
from export.verify.runners import OrtRunner

# Largest box (px) and score differences between the end-to-end file and the NMS of its plain file; a detection
# on one side only is borderline when its score is within the score tolerance of the threshold.
TOLERANCE = {"fp32": (0.01, 1e-4), "fp16": (0.5, 1e-2), "int8": (0.5, 1e-2)}


def check_end_to_end(plain_path, e2e_path, layout, params, images, batch, precision, to_v8_layout, reference=None):
    """{layout, file, images, detections, borderline, max_box_diff, max_score_diff, problems, pass}; with the
    PyTorch `reference` runner also `vs_pytorch`: box recall, precision and mean IoU of the end-to-end detections
    against ultralytics' NMS (same parameters) of the reference output, every decision counted (informative: the
    verdict on PyTorch is the plain file's tie-aware parity)."""
    expected = _python_nms(OrtRunner(plain_path), images, batch, params, to_v8_layout)
    proto = onnx.load(str(e2e_path))
    problems = check_trt_node(proto, params, batch) if layout == "trt" else []
    got = _trt_detections(proto, images, batch, params) if layout == "trt" else _ultralytics_detections(
        OrtRunner(e2e_path), images, batch)
    box_tol, score_tol = TOLERANCE[precision]
    result = {"layout": layout, "file": str(e2e_path), "images": len(images), "detections": 0, "borderline": 0,
              "max_box_diff": 0.0, "max_score_diff": 0.0}
    for want, have in zip(expected, got):
        _compare(want, have, params.conf, score_tol, result, problems)
    if result["max_box_diff"] > box_tol or result["max_score_diff"] > score_tol:
        problems.append(f"detections differ from the plain file's NMS by up to {result['max_box_diff']:.3g} px / "
                        f"score {result['max_score_diff']:.3g} (tolerance {box_tol} px / {score_tol})")
    result.update(problems=problems, **{"pass": not problems})
    if reference is not None:
        metrics = box_metrics(_python_nms(reference, images, batch, params, to_v8_layout), got)
        result["vs_pytorch"] = {k: metrics[k] for k in ("box_recall", "box_precision", "mean_iou")}
    return result


def _python_nms(runner, images, batch, params, to_v8_layout):
    dets = []
    for i in range(0, len(images), batch):
        pred = to_v8_layout(runner(images[i:i + batch]))
        out = non_max_suppression(torch.from_numpy(pred), params.conf, params.iou, agnostic=params.agnostic,
                                  max_det=params.max_det, max_time_img=3600)
        dets += [d.numpy() for d in out]
    return dets


def _ultralytics_detections(runner, images, batch):
    rows = []
    for i in range(0, len(images), batch):
        for image in runner(images[i:i + batch]):
            rows.append(image[image[:, 4] > 0])  # zero rows pad the detections
    return rows


def _trt_detections(proto, images, batch, params):
    cut = OrtRunner(trt_inputs_model(proto))
    rows = []
    for i in range(0, len(images), batch):
        boxes, scores = cut.session.run(None, {"images": images[i:i + batch]})
        num, det_boxes, det_scores, det_classes = efficient_nms(boxes, scores, params)
        for n, b, s, c in zip(num[:, 0], det_boxes, det_scores, det_classes):
            rows.append(np.concatenate((b[:n], s[:n, None], c[:n, None].astype(np.float32)), 1))
    return rows


def _compare(want, have, conf, score_tol, result, problems):
    """Match one image's detections (same class, best IoU) and fold the differences into `result`."""
    want, have = want[np.argsort(-want[:, 4])], have[np.argsort(-have[:, 4])]
    free = list(range(len(have)))
    result["detections"] += len(want)
    for row in want:
        j = _best_match(row, have, free)
        if j is None:
            _one_sided(row, conf, score_tol, result, problems, "missing")
            continue
        free.remove(j)
        result["max_box_diff"] = max(result["max_box_diff"], float(np.abs(have[j, :4] - row[:4]).max()))
        result["max_score_diff"] = max(result["max_score_diff"], float(abs(have[j, 4] - row[4])))
    for j in free:
        _one_sided(have[j], conf, score_tol, result, problems, "extra")


def _best_match(row, have, free):
    best, best_iou = None, 0.5
    for j in free:
        if have[j, 5] == row[5]:
            iou = _iou(row[:4], have[j, :4])
            if iou > best_iou:
                best, best_iou = j, iou
    return best


def _one_sided(row, conf, score_tol, result, problems, what):
    if abs(row[4] - conf) <= score_tol:
        result["borderline"] += 1
    else:
        problems.append(f"{what} detection: class {int(row[5])}, score {row[4]:.3f}, box {np.round(row[:4], 1).tolist()}")


def _iou(a, b):
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.clip(rb - lt, 0, None).prod()
    return inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter + 1e-12)
