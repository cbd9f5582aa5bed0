"""--nms: end-to-end files (NMS in the graph) in ultralytics' and TensorRT's layouts, checked against ultralytics'
NMS on the plain file, run by ultralytics' YOLO(); the plugin's numpy semantics; the options' checks."""

import json

import numpy as np
import onnx
import pytest
from PIL import Image

import models
from export.cli import main
from export.graph.nms import NMSParams, check_trt_node, efficient_nms
from export.inputs.images import read_images
from export.verify.runners import OrtRunner

DEMOS = [models.demo_checkpoint(f) for f in models.FAMILIES] + [models.DEMO_DIR / "yolov5s-s2.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("weights", DEMOS, ids=lambda p: p.stem)
def test_every_demo_gets_an_end_to_end_file_that_ultralytics_yolo_runs(weights, tmp_path):
    """The end-to-end file gives ultralytics' NMS of the plain file (which parity ties to PyTorch, tie-aware), and
    ultralytics' YOLO() reads it as final detections: the same rows ONNX Runtime gives."""
    from ultralytics import YOLO

    out = tmp_path / "out"
    assert main(["--weights", str(weights), "--nms", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["onnxruntime"]["pass"] and report["nms"]["pass"]
    check = report["nms"]["files"]["fp32"]
    assert check["detections"] > 0 and check["max_box_diff"] <= 0.01 and check["problems"] == []
    e2e = out / f"{weights.stem}_nms.onnx"
    size = report["imgsz"]
    images = tmp_path / "images"  # one sample at the export size: letterboxing is the identity on both sides
    images.mkdir()
    sample = sorted((models.DEMO_DIR / "images").iterdir())[0]
    Image.open(sample).convert("RGB").resize(size[::-1]).save(images / "sample.png")
    rows = OrtRunner(e2e)(np.asarray(read_images(images, size)))[0]
    rows = rows[rows[:, 4] > 0]
    result = YOLO(str(e2e), task="detect").predict(str(images / "sample.png"), imgsz=size, verbose=False)[0]
    got = np.concatenate([result.boxes.xyxy.numpy(), result.boxes.conf.numpy()[:, None],
                          result.boxes.cls.numpy()[:, None]], 1)
    assert len(rows) > 0 and got.shape == rows.shape and np.abs(got - rows).max() < 1e-3


@pytest.mark.slow
def test_trt_layout_is_checked_against_the_plugin_interface_and_semantics(tmp_path, capsys):
    out = tmp_path / "out"
    weights = models.DEMO_DIR / "yolov5s-s2.pt"
    assert main(["--weights", str(weights), "--nms", "trt", "--conf", "0.3", "--max-det", "50", "--agnostic-nms",
                 "--batch", "2", "--dynamic", "--half", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    check = report["nms"]["files"]["fp16"]
    assert report["nms"]["layout"] == "trt" and check["pass"] and check["detections"] > 0
    proto = onnx.load(str(out / "yolov5s-s2_fp16_trt-nms.onnx"))
    params = NMSParams(0.3, 0.7, 50, True)
    assert check_trt_node(proto, params, 2) == []
    assert check_trt_node(proto, NMSParams(0.3, 0.7, 60, True), 2) != []  # the check can fail
    node = next(n for n in proto.graph.node if n.op_type == "EfficientNMS_TRT")
    assert node.domain == "TRT" and list(node.output) == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["nms_layout"] == "trt" and eval(meta["args"])["nms"] is True


def test_efficient_nms_semantics():
    boxes = np.array([[[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]]], np.float32)
    scores = np.array([[[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.0, 0.95]]], np.float32)
    num, b, s, c = efficient_nms(boxes, scores, NMSParams(0.25, 0.5, 3, False))
    assert num.tolist() == [[3]] and s[0].tolist() == pytest.approx([0.95, 0.9, 0.7])  # box 1 suppressed by box 0
    assert c[0].tolist() == [1, 0, 1] and b.shape == (1, 3, 4) and num.dtype == np.int32 and c.dtype == np.int32
    num, _, s, _ = efficient_nms(boxes, scores, NMSParams(0.25, 0.5, 3, True))  # agnostic: box 0 suppressed too
    assert num.tolist() == [[2]] and s[0].tolist() == pytest.approx([0.95, 0.7, 0.0])
    num, *_ = efficient_nms(boxes, scores, NMSParams(0.96, 0.5, 3, False))
    assert num.tolist() == [[0]]


@pytest.mark.parametrize("argv, says", [(["--conf", "0.3"], "add --nms"), (["--nms", "--conf", "2"], "0..1"),
                                        (["--nms", "--max-det", "0"], "--max-det"),
                                        (["--agnostic-nms"], "add --nms")])
def test_nms_options_are_checked_before_anything_runs(argv, says, capsys, tmp_path):
    assert main(["--weights", str(tmp_path / "missing.pt"), *argv]) == 2
    assert says in capsys.readouterr().err


def _full_tensorrt():
    import importlib.util

    import torch

    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.skipif(not _full_tensorrt(), reason="needs full TensorRT on a CUDA GPU: TensorRT-RTX (all this machine "
                                                  "has) has no NonMaxSuppression runner and no EfficientNMS_TRT plugin")
@pytest.mark.parametrize("layout", ["ultralytics", "trt"])
def test_end_to_end_engine_builds_with_full_tensorrt(layout, tmp_path):
    out = tmp_path / "out"
    assert main(["--weights", str(models.demo_checkpoint("sta")), "--nms", layout, "--engine", "fp16",
                 "--out", str(out)]) == 0
    suffix = "nms" if layout == "ultralytics" else "trt-nms"
    assert (out / f"yolov8n-sta_fp16_{suffix}.engine").is_file()
