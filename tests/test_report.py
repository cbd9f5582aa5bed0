"""The report at a glance: disagreement marking, verdict lines, the detections grid."""

import numpy as np
from PIL import Image

from export.report import export_report, pictures
from export.verify.parity import THRESHOLDS, box_metrics, disagreements


def _boxes(rows):
    return np.array(rows, dtype=np.float32).reshape(-1, 6)  # x1, y1, x2, y2, conf, class


GT = _boxes([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.9, 1], [40, 40, 50, 50, 0.9, 2]])
DET = _boxes([[0, 0, 10, 10, 0.8, 0],  # the same box
              [20, 20, 30, 31, 0.8, 2],  # PyTorch's class 1 box, read as class 2: a flip
              [60, 60, 70, 70, 0.7, 0]])  # a box PyTorch does not have
# PyTorch's class 2 box at (40, 40) has no counterpart: missed


def test_planted_missing_extra_and_flipped_boxes_are_counted():
    d = disagreements(GT, DET)
    assert d == {"matched": 1, "missed": [2], "extra": [2], "flips": [(1, 1)]}
    # the same matching as the box metrics: one match of three either way
    m = box_metrics([GT], [DET])
    assert m["box_recall"] == d["matched"] / len(GT) and m["box_precision"] == d["matched"] / len(DET)
    assert disagreements(GT, GT[:0]) == {"matched": 0, "missed": [0, 1, 2], "extra": [], "flips": []}


def _parity(**values):
    r = {"finite": True, "rel_max_abs": 1e-6, "cosine": 1.0, "box_recall": 1.0, "box_precision": 1.0,
         "pass": True, "precision": "fp16", "thresholds": THRESHOLDS["fp16"].__dict__}
    return {**r, **values}


def test_verdict_names_the_deciding_figure():
    rep = {"parity": {"onnxruntime": _parity(rel_max_abs=1.5e-2),
                      "tensorrt": _parity(box_recall=0.5, **{"pass": False}),
                      "onnxruntime_int8": {"skipped": "no GPU"}}}
    lines = export_report.verdicts(rep)
    assert lines[0] == "- ONNX Runtime (fp16): pass, max abs / output scale 0.015 (limit <= 0.02)"
    assert lines[1] == "- TensorRT (fp16): **FAIL**, box recall 0.5 (limit >= 0.95)"
    assert lines[2].startswith("- ONNX Runtime (int8): not run (no GPU)")
    assert export_report.verdicts({"parity": {"onnxruntime": _parity(rel_max_abs=3.783751e-07)}})[0].endswith(
        "max abs / output scale 3.8e-7 (limit <= 0.02)")
    assert export_report.verdicts({"parity": {"onnxruntime": _parity(finite=False, **{"pass": False})}})[0].endswith(
        "**FAIL**, non-finite outputs")


def test_detections_grid_has_a_panel_per_image_and_backend(tmp_path):
    images = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    ref = [GT, GT[:1], GT[:0]]
    pictured = {"torch": {"reference": ref, "backend": ref},  # the twin: left out of the picture
                "onnxruntime": {"reference": ref, "backend": [DET, GT[:1], GT[:0]]},
                "onnxruntime_fp16": {"reference": ref, "backend": ref}}
    labels = {b: b for b in pictured}
    pictures.detections_plot(images, pictured, labels, {0: "a", 1: "b", 2: "c"}, tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").size == (3 * 330, 3 * 350)
