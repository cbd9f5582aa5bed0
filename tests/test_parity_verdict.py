"""The parity verdict holds both ways: decisions flipped on equal values (ties at the detection cap, scores at
the confidence threshold, near-tied classes) are borderline, never failures, so exact exports of untrained and
saturated models pass; real faults planted in an exported ONNX the way bugs happen fail it."""

import json

import numpy as np
import onnx
import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

import models
from export.checkpoint import kinds, load
from export.cli import main
from export.inputs.images import read_images, tile
from export.verify.parity import CONF, box_verdict, compare, detections
from export.verify.runners import OrtRunner, TorchRunner
from tools.parity_sensitivity import (drop_one_bias, scale_attention_weight, shift_boxes_by_one_stride,
                                      swap_two_channels)


# ---- the judgement on synthetic outputs --------------------------------------------------------------------
def _grid_output(n_side=20, nc=2, score=0.9):
    """(1, 4+nc, n_side**2): one 8 px box per cell of a grid, class 0 at `score`, the other classes low."""
    cy, cx = np.meshgrid(np.arange(n_side) * 10.0 + 5, np.arange(n_side) * 10.0 + 5, indexing="ij")
    boxes = np.stack([cx.ravel(), cy.ravel(), np.full(cx.size, 8.0), np.full(cx.size, 8.0)])
    scores = np.full((nc, cx.size), 0.01)
    scores[0] = score
    return np.concatenate([boxes, scores])[None].astype(np.float32)


def _verdict(ref, out, precision="fp32"):
    (rd, ra), (od, oa) = detections(ref), detections(out)
    return box_verdict(ref, out, rd, od, ra, oa, precision)[0]


def test_ties_at_the_detection_cap_are_borderline():
    ref = _grid_output(20)  # 400 equal boxes: NMS keeps 300, which ones is decided by the order of equal scores
    out = ref.copy()
    out[0, 4] += np.random.default_rng(0).uniform(-1e-7, 1e-7, out.shape[-1]).astype(np.float32) + 1e-7
    v = _verdict(ref, out)
    assert v["box_recall"] == 1.0 and v["box_precision"] == 1.0
    assert v["borderline"]["nms_or_cap"] > 0 and v["disagreements"] == {"missed": 0, "extra": 0, "flips": 0}


def test_a_score_at_the_threshold_and_a_near_tied_class_are_borderline():
    ref = _grid_output(4)
    ref[0, 4, 0] = CONF + 2e-8  # kept by PyTorch, dropped by the backend
    ref[0, 4:, 1] = [0.6, 0.6 - 1e-6]  # class 0 by a hair
    out = ref.copy()
    out[0, 4, 0] = CONF - 2e-8
    out[0, 4:, 1] = [0.6 - 1e-6, 0.6]
    v = _verdict(ref, out)
    assert v["box_recall"] == 1.0 and v["borderline"]["confidence"] == 1 and v["borderline"]["class"] == 1


def test_a_real_change_at_an_anchor_is_a_disagreement():
    ref = _grid_output(4)
    out = ref.copy()
    out[0, 4, 5] = 0.1  # a confident box the backend loses: its own score differs far beyond tolerance
    out[0, 0, 6] += 5.0  # a box moved by most of its width: no match (IoU 0.23), and its anchor disagrees
    v = _verdict(ref, out)
    assert v["disagreements"]["missed"] == 2 and v["disagreements"]["extra"] == 1
    assert v["box_recall"] == pytest.approx(14 / 16) and sum(v["borderline"].values()) == 0


def test_a_single_class_model_has_no_class_ties():
    ref = _grid_output(4, nc=1)
    ref[0, 4, 0] = CONF + 2e-8
    out = ref.copy()
    out[0, 4, 0] = CONF - 2e-8
    v = _verdict(ref, out)
    assert v["box_recall"] == 1.0 and v["borderline"] == {"confidence": 1, "class": 0, "nms_or_cap": 0}


def test_nothing_detected_is_said_plainly():
    quiet = _grid_output(4, score=0.01)
    v = _verdict(quiet, quiet.copy())
    assert v["box_recall"] == v["box_precision"] == 1.0 and "nothing detected" in v["boxes_note"]


# ---- untrained and saturated models: exact exports pass -------------------------------------------------------
IMGSZ = 128


def _untrained(family, path, cls_bias, imgsz=IMGSZ):
    """A randomly initialised model (the family's YAML, or stock yolov8n), its class biases set to `cls_bias`,
    saved as ultralytics saves a best.pt. A bias of +6 saturates every score: every anchor clears the threshold."""
    torch.manual_seed(0)
    yaml = models.CFG_DIR / f"yolov8-{family}.yaml" if family != "plain" else "yolov8n.yaml"
    model = DetectionModel(str(yaml), nc=3, verbose=False)
    model.names = {0: "a", 1: "b", 2: "c"}
    for branch in model.model[-1].cv3:
        branch[-1].bias.data.fill_(cls_bias)
    torch.save({"model": model.half(), "ema": None, "epoch": 1, "train_args": {"imgsz": imgsz}}, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("family", [*models.FAMILIES, "plain"])
@pytest.mark.parametrize("cls_bias", [6.0, 0.0], ids=["saturated", "untrained"])
def test_exact_exports_of_untrained_models_pass(family, cls_bias, tmp_path):
    weights = _untrained(family, tmp_path / f"{family}.pt", cls_bias)
    for extra in ([], ["--half"]):
        out = tmp_path / ("fp16" if extra else "fp32")
        assert main(["--weights", str(weights), "--out", str(out), *extra]) == 0, (out / "report.md").read_text()
        report = json.loads((out / "report.json").read_text())
        parity = report["parity"]["onnxruntime"]
        assert parity["pass"] and parity["disagreements"] == {"missed": 0, "extra": 0, "flips": 0}
        if cls_bias > 0:  # every anchor above the threshold: NMS alone decides among near-equal boxes
            assert parity["detections_torch"] >= 4 * 40


@pytest.mark.slow
def test_exact_export_at_the_detection_cap_passes(tmp_path):
    """At 416 a saturated head keeps more than 300 boxes after NMS on every image: the cut among equal scores."""
    weights = _untrained("plain", tmp_path / "plain.pt", 6.0, imgsz=416)
    assert main(["--weights", str(weights), "--out", str(tmp_path / "out"), "--half"]) == 0
    parity = json.loads((tmp_path / "out" / "report.json").read_text())["parity"]["onnxruntime"]
    assert parity["pass"] and parity["detections_torch"] == 4 * 300 and parity["box_recall"] == 1.0


@pytest.mark.slow
def test_exact_export_of_a_saturated_code_block_model_passes(tmp_path):
    from tests import user_blocks

    root = user_blocks.write_fork(tmp_path / "fork")
    weights = user_blocks.save_checkpoint(root, tmp_path / "best.pt", cls_bias=6.0)
    for extra in ([], ["--half"]):
        out = tmp_path / ("fp16" if extra else "fp32")
        assert main(["--weights", str(weights), "--code", str(root), "--out", str(out), *extra]) == 0
        parity = json.loads((out / "report.json").read_text())["parity"]["onnxruntime"]
        assert parity["pass"] and parity["detections_torch"] >= 4 * 40
    # the export re-checked alone: `parity` takes --code as the main job does
    onnx_file = next((tmp_path / "fp16").glob("*_fp16.onnx"))
    assert main(["parity", "--weights", str(weights), "--onnx", str(onnx_file), "--code", str(root)]) == 0
    assert main(["bench", str(weights), "--code", str(root), "--imgsz", "64", "--rounds", "1", "--iterations", "1",
                 "--warmup", "0", "--out", str(tmp_path / "bench")]) == 0


# ---- planted faults: the verdict fails ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sta_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("sta")
    weights = models.demo_checkpoint("sta")
    assert main(["--weights", str(weights), "--out", str(out), "--no-parity"]) == 0
    loaded = load(weights)
    imgsz = tuple(json.loads((out / "report.json").read_text())["imgsz"])
    images = tile(read_images(models.DEMO_DIR / "images", imgsz), 1)
    reference = TorchRunner(models.reference_at(loaded.model, *imgsz))
    return out / f"{weights.stem}.onnx", reference, images, kinds.of(loaded)


FAULTS = {"attention-weight-x1.02": scale_attention_weight, "two-channels-swapped": swap_two_channels,
          "one-bias-dropped": drop_one_bias, "boxes-shifted-one-stride": shift_boxes_by_one_stride}


def test_the_unchanged_export_passes(sta_export):
    path, reference, images, kind = sta_export
    assert compare(reference, OrtRunner(path), images, "fp32", 1, kind.to_v8_layout)["pass"]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_planted_fault_fails_fp32_parity(fault, sta_export, tmp_path):
    path, reference, images, kind = sta_export
    proto = onnx.load(str(path))
    FAULTS[fault](proto)
    planted = tmp_path / "planted.onnx"
    onnx.save(proto, str(planted))
    result = compare(reference, OrtRunner(planted), images, "fp32", 1, kind.to_v8_layout)
    assert not result["pass"], {k: result[k] for k in ("rel_max_abs", "cosine", "box_recall", "box_precision")}


def test_fp16_is_held_to_what_fp16_itself_costs_the_model(tmp_path):
    """A 10% error in one attention weight of the fp16 file: inside the fixed fp16 limit (2e-2), outside three
    times the model's own PyTorch fp16 error; the unchanged fp16 file passes the tighter limit."""
    from export.graph.rewrite import rewrite
    from export.verify.parity import THRESHOLDS, own_fp16_error, thresholds_for

    weights = models.demo_checkpoint("sta")
    assert main(["--weights", str(weights), "--out", str(tmp_path), "--half", "--no-parity"]) == 0
    loaded = load(weights)
    imgsz = tuple(json.loads((tmp_path / "report.json").read_text())["imgsz"])
    images = tile(read_images(models.DEMO_DIR / "images", imgsz), 1)
    reference = TorchRunner(models.reference_at(loaded.model, *imgsz))
    twin, _ = rewrite(loaded.model, imgsz, images=torch.from_numpy(images[:1]))
    own = own_fp16_error(reference, twin, images)
    limits = thresholds_for("fp16", own)
    assert 0 < own < 1e-2 and limits.rel_max_abs < THRESHOLDS["fp16"].rel_max_abs
    path = tmp_path / f"{weights.stem}_fp16.onnx"
    to_layout = kinds.of(loaded).to_v8_layout
    assert compare(reference, OrtRunner(path), images, "fp16", 1, to_layout, limits)["pass"]
    proto = onnx.load(str(path))
    scale_attention_weight(proto, 1.1)
    planted = tmp_path / "planted.onnx"
    onnx.save(proto, str(planted))
    assert compare(reference, OrtRunner(planted), images, "fp16", 1, to_layout)["pass"]  # the fixed limit misses it
    assert not compare(reference, OrtRunner(planted), images, "fp16", 1, to_layout, limits)["pass"]
