"""Every documented limit of the verdicts, pinned at its boundary: the parity verdict per precision (docs/parity.md),
the fp16 limit that follows the model's own fp16 error, the anchor tolerance of borderline decisions, the int8
acceptance rule and its sensitivity fallback (docs/int8.md), and the exit codes (README). Each test feeds values at,
just inside and just outside a limit (np.nextafter: one float away), so loosening any limit fails one of them.
Unit level, no model is run: the whole file takes seconds. The loader's bounds: tests/test_load_limits.py."""

import json
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from calib import int8
from calib.int8 import Int8Job, make_int8
from calib.rules import Block
from export import cli
from export.errors import BadInput, StageFailed
from export.pipeline import bench_job, export_job, parity_job
from export.verify import parity
from export.verify.parity import (ANCHOR_TOLERANCE, THRESHOLDS, Thresholds, anchor_agrees, box_verdict, compare,
                                  judge, passes, thresholds_for)

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "fp16", "int8")
LIMITS = ("rel_max_abs", "cosine", "box_recall", "box_precision")
AT_MOST = {"rel_max_abs"}  # a metric that passes at or below its limit; the others pass at or above it


# ---- the documented numbers -----------------------------------------------------------------------------------
def _table_rows(text, header_words):
    """{first cell: [the numbers of the other cells]} of the markdown table whose header holds `header_words`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and all(w in line for w in header_words))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        first, *cells = [c.strip() for c in line.strip("|").split("|")]
        rows[first] = [float(re.search(r"\d+(?:\.\d+)?(?:e-?\d+)?", c).group()) for c in cells]
    return rows


PARITY_DOC = (REPO / "docs" / "parity.md").read_text()
DOCUMENTED = {p: Thresholds(*v) for p, v in _table_rows(PARITY_DOC, ("max abs / output scale", "cosine")).items()}
DOCUMENTED_ANCHOR = _table_rows(PARITY_DOC, ("class scores at the anchor",))  # precision -> [score, IoU]


def test_thresholds_are_the_documented_ones():
    assert set(DOCUMENTED) == set(PRECISIONS) and THRESHOLDS == DOCUMENTED
    assert {p: [t.score, t.iou] for p, t in ANCHOR_TOLERANCE.items()} == DOCUMENTED_ANCHOR


# ---- the parity verdict at each limit -------------------------------------------------------------------------
def _toward_passing(name, value):
    return np.nextafter(value, -np.inf if name in AT_MOST else np.inf)


def _toward_failing(name, value):
    return np.nextafter(value, np.inf if name in AT_MOST else -np.inf)


def _metrics_at(limits, **changed):
    """Every metric exactly at its limit (the worst that passes), finite, with `changed` in place."""
    return {"finite": True, **{name: getattr(limits, name) for name in LIMITS}, **changed}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_metric_at_its_documented_limit_passes(precision):
    assert passes(_metrics_at(DOCUMENTED[precision]), THRESHOLDS[precision])


@pytest.mark.parametrize("name", LIMITS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_one_float_past_a_documented_limit_fails(precision, name):
    documented = DOCUMENTED[precision]
    limit = getattr(documented, name)
    inside = _metrics_at(documented, **{name: _toward_passing(name, limit)})
    outside = _metrics_at(documented, **{name: _toward_failing(name, limit)})
    assert passes(inside, THRESHOLDS[precision]) and not passes(outside, THRESHOLDS[precision])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_non_finite_output_fails_with_every_metric_passing(precision):
    best = {"rel_max_abs": 0.0, "cosine": 1.0, "box_recall": 1.0, "box_precision": 1.0}
    assert passes({"finite": True, **best}, THRESHOLDS[precision])
    assert not passes({"finite": False, **best}, THRESHOLDS[precision])
    assert not passes({"finite": True, **best, "rel_max_abs": float("nan")}, THRESHOLDS[precision])


# ---- fp16: held to 3x the model's own fp16 error, at least 1e-3, at most 2e-2 (docs/parity.md) ---------------
FP16_FACTOR, FP16_FLOOR, FP16_CEILING = 3.0, 1e-3, 2e-2


@pytest.mark.parametrize("own, limit", [
    (None, FP16_CEILING),  # not measured (no fp16 CPU kernel): the fixed limit
    (0.0, FP16_FLOOR), (1e-4, FP16_FLOOR),  # fp16 hardly touches the model: the floor
    (FP16_FLOOR / FP16_FACTOR, FP16_FLOOR),  # 3x lands on the floor
    (5e-4, 1.5e-3), (2.1e-3, 6.3e-3),  # between: 3x the model's own
    (FP16_CEILING / FP16_FACTOR, FP16_CEILING),  # 3x lands on the ceiling
    (1e-2, FP16_CEILING), (1.0, FP16_CEILING),  # fp16 itself hurts the model: the fixed ceiling
])
def test_fp16_limit_follows_the_models_own_fp16_error(own, limit):
    got = thresholds_for("fp16", own)
    assert got.rel_max_abs == pytest.approx(limit, rel=1e-12, abs=0)
    assert replace(got, rel_max_abs=FP16_CEILING) == DOCUMENTED["fp16"]  # only the raw-output limit moves


@pytest.mark.parametrize("own", [1e-4, 5e-4, 1e-2])
def test_a_backend_one_float_past_the_fp16_limit_fails(own):
    limits = thresholds_for("fp16", own)
    at = _metrics_at(limits)
    assert passes(at, limits) and not passes({**at, "rel_max_abs": np.nextafter(limits.rel_max_abs, 1)}, limits)


def test_fp16_read_from_file_metadata_follows_the_own_error_too():
    """The precision of `parity` comes from the ONNX file's metadata: a string built at run time, not a literal."""
    assert thresholds_for("".join(("fp", "16")), 1e-4).rel_max_abs == FP16_FLOOR


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_only_fp16_follows_the_own_error(precision):
    assert thresholds_for(precision, 1e-6) is thresholds_for(precision) is THRESHOLDS[precision]


def test_compare_judges_with_the_limits_it_is_given(monkeypatch):
    """compare's verdict is `passes` on its metrics, under `limits` when given, else the precision's own."""
    ref = np.zeros((1, 5, 4), np.float32)  # nothing detected: the raw outputs decide
    ref[0, 0] = [1.0, 2.0, 3.0, 4.0]
    out = ref.copy()
    out[0, 0, 3] += 4 * 2.0 ** -14  # rel max abs 2**-14 = 6.1e-5: within fp32's 1e-4
    result = compare(lambda x: ref, lambda x: out, np.zeros((1, 3, 8, 8)), "fp32")
    assert result["rel_max_abs"] == 2.0 ** -14 and result["pass"] and result["thresholds"]["rel_max_abs"] == 1e-4
    tight = Thresholds(2.0 ** -15, 0.0, 0.0, 0.0)
    assert not compare(lambda x: ref, lambda x: out, np.zeros((1, 3, 8, 8)), "fp32", limits=tight)["pass"]
    monkeypatch.setattr(parity, "passes", lambda metrics, limits: "the verdict")
    assert compare(lambda x: ref, lambda x: out, np.zeros((1, 3, 8, 8)), "int8")["pass"] == "the verdict"


# ---- the anchor tolerance: when a flipped decision is borderline -----------------------------------------------
NC = 2


def _anchor_pair(score_diff=0.0, height=2.0):
    """(ref, out) raw (4+nc, 1) outputs at one anchor: a 1 x 2 box, and the backend's box 1 x `height` (IoU =
    height / 2); class 0 scored 0 by PyTorch and `score_diff` by the backend (a difference exact in floats), class 1
    0.5 by both."""
    ref = np.zeros((4 + NC, 1))
    ref[:4, 0] = [0.0, 0.0, 1.0, 2.0]
    ref[5, 0] = 0.5
    out = ref.copy()
    out[3, 0] = height
    out[4, 0] = score_diff
    return ref, out


def _iou_of(height):
    ref, out = _anchor_pair(height=height)
    return parity._xywh_iou(ref[:4, 0], out[:4, 0])


def _height_for_iou(iou, below=False):
    """A box height whose IoU with PyTorch's box is `iou` exactly (below: the tallest height under it), found one
    float step at a time from height = 2 iou (the IoU grows with the height)."""
    height = 2 * iou
    for _ in range(100):
        got = _iou_of(height)
        if (got < iou) if below else (got == iou):
            return height
        height = np.nextafter(height, 2 if got < iou and not below else 0)
    raise AssertionError(f"no box height gives IoU {iou}")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_anchor_scores_agree_up_to_the_documented_tolerance(precision):
    score, _ = DOCUMENTED_ANCHOR[precision]
    tol = ANCHOR_TOLERANCE[precision]
    assert anchor_agrees(*_anchor_pair(score), 0, tol)
    assert not anchor_agrees(*_anchor_pair(np.nextafter(score, 1)), 0, tol)
    assert anchor_agrees(*_anchor_pair(-score), 0, tol)  # the backend lower by as much
    assert not anchor_agrees(*_anchor_pair(-np.nextafter(score, 1)), 0, tol)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_anchor_boxes_agree_down_to_the_documented_iou(precision):
    _, iou = DOCUMENTED_ANCHOR[precision]
    tol = ANCHOR_TOLERANCE[precision]
    at, under = _height_for_iou(iou), _height_for_iou(iou, below=True)
    assert _iou_of(at) == iou and iou - 1e-12 < _iou_of(under) < iou and at < 2
    assert anchor_agrees(*_anchor_pair(height=at), 0, tol) and not anchor_agrees(*_anchor_pair(height=under), 0, tol)


@pytest.mark.parametrize("a, b, iou", [
    ((0, 0, 2, 2), (1, 1, 2, 2), 1 / 7),  # a corner overlap of 1 in a union of 7
    ((0, 0, 4, 2), (1, 0.5, 2, 1), 2 / 8), ((0, 0, 4, 4), (1, -1, 1, 1), 1 / 16),  # inside, off centre
    ((0, 0, 0.5, 0.25), (0, 0, 0.25, 0.5), 0.0625 / 0.1875),  # areas under 1: a cross
    ((0, 0, 1, 1), (5, 5, 1, 1), 0.0), ((3, 4, 0, 0), (3, 4, 0, 0), 1.0), ((3, 4, 0, 0), (3, 5, 0, 0), 0.0),
    ((0, 0, -1, -1), (0, 0, -1, -1), 1.0), ((0, 0, -1, 1), (0, 0, 1, 1), 0.0),  # negative sizes: empty boxes
])
def test_anchor_box_iou(a, b, iou):
    """The IoU of two (cx, cy, w, h) boxes, either way round; two empty boxes agree only where they coincide."""
    a, b = np.array(a, float), np.array(b, float)
    assert parity._xywh_iou(a, b) == pytest.approx(iou, abs=1e-15) and parity._xywh_iou(b, a) == parity._xywh_iou(a, b)


def _one_missed_box(score_diff):
    """judge's inputs for one image where PyTorch keeps a box at anchor 0 that the backend drops; the backend's
    scores there differ by `score_diff`."""
    ref, out = _anchor_pair(score_diff)
    gt = np.array([[-0.5, -0.5, 0.5, 0.5, 0.9, 0.0]])
    return ref, out, gt, np.zeros((0, 6)), np.array([0]), np.array([], int)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_judge_holds_a_dropped_box_to_its_precisions_tolerance(precision):
    score, _ = DOCUMENTED_ANCHOR[precision]
    within = judge(*_one_missed_box(score), precision)
    beyond = judge(*_one_missed_box(np.nextafter(score, 1)), precision)
    assert within["missed"] == [] and [side_index for *side_index, _ in within["borderline"]] == [["missed", 0]]
    assert beyond["missed"] == [0] and beyond["borderline"] == []


# ---- box_verdict: recall and precision count real disagreements only ------------------------------------------
def _box(x, cls=0.0, conf=0.9):
    return [x, 0.0, x + 10.0, 10.0, conf, cls]


def _outputs(n_anchors, changed=(), scores=(0.9, 0.1)):
    """(ref, out) of one image: the same raw outputs (a 10 px box, class scores `scores`) but at the anchors in
    `changed`, where the backend's scores are 0.5 higher (a real disagreement at every precision)."""
    ref = np.zeros((4 + NC, n_anchors))
    ref[2:4] = 10.0
    ref[4:] = np.array(scores)[:, None]
    out = ref.copy()
    out[4:, list(changed)] += 0.5
    return ref, out


def test_box_recall_and_precision_count_real_misses_extras_and_flips():
    """Six boxes a side: one matched, two flipped to another class, three missed, three extra (counts for which a
    sum differs from any other way to combine them)."""
    gt = np.array([_box(x) for x in (0, 100, 200, 300, 400, 500)])
    det = np.array([_box(0), _box(100, cls=1.0), _box(200, cls=1.0), _box(700), _box(800), _box(900)])
    ref, out = _outputs(12, changed=range(12))
    verdict, judged = box_verdict([ref], [out], [gt], [det], [np.arange(6)], [np.arange(6, 12)], "fp32")
    assert verdict["disagreements"] == {"missed": 3, "extra": 3, "flips": 2}
    assert verdict["box_recall"] == 1 - 5 / 6 and verdict["box_precision"] == 1 - 5 / 6  # a flip counts both ways
    assert judged[0]["flips"] == [(1, 1), (2, 2)] and "boxes_note" not in verdict


def test_a_flipped_class_is_judged_at_both_of_its_anchors():
    """PyTorch's box 1 comes out of the backend as its box 0 with another class: borderline when the values agree
    at PyTorch's anchor for box 1 and the backend's anchor for box 0, whatever the other anchors hold."""
    gt, det = np.array([_box(0), _box(100)]), np.array([_box(100, cls=1.0), _box(0)])
    ref, out = _outputs(4, changed=[0, 3])  # gt anchors 0, 1; backend anchors 2, 3: the flip's are 1 and 2
    verdict, judged = box_verdict([ref], [out], [gt], [det], [np.array([0, 1])], [np.array([2, 3])], "fp32")
    assert judged[0]["borderline"] == [("flips", (1, 0), "nms_or_cap")] and judged[0]["flips"] == []
    assert verdict["box_recall"] == verdict["box_precision"] == 1.0


def test_borderline_disagreements_are_counted_by_kind_not_against_the_backend():
    """Three PyTorch boxes the backend drops, each at an anchor where the values agree: one at the confidence
    threshold, one with two tied classes, one decided by NMS or the cap."""
    gt = np.array([_box(0), _box(100), _box(200), _box(300)])
    ref, out = _outputs(4)
    ref[4:, 1] = out[4:, 1] = parity.CONF, 0.1
    ref[4:, 2] = out[4:, 2] = 0.6, 0.6
    verdict, _ = box_verdict([ref, ref], [out, out], [gt, gt], [gt[:1]] * 2, [np.arange(4)] * 2, [np.arange(1)] * 2,
                             "fp32")
    assert verdict["box_recall"] == 1.0 and verdict["box_precision"] == 1.0
    assert verdict["borderline"] == {"confidence": 2, "class": 2, "nms_or_cap": 2}


def test_nothing_detected_by_either_side_passes_on_the_raw_outputs():
    ref, out = _outputs(2)
    verdict, _ = box_verdict([ref], [out], [np.zeros((0, 6))], [np.zeros((0, 6))], [np.array([], int)],
                             [np.array([], int)], "int8")
    assert verdict["box_recall"] == verdict["box_precision"] == 1.0 and "raw outputs decide" in verdict["boxes_note"]


def test_one_side_detecting_nothing_scores_zero_not_one():
    ref, out = _outputs(2, changed=[0, 1])
    lost, _ = box_verdict([ref], [out], [np.array([_box(0)])], [np.zeros((0, 6))], [np.array([0])],
                          [np.array([], int)], "int8")
    gained, _ = box_verdict([ref], [out], [np.zeros((0, 6))], [np.array([_box(0)])], [np.array([], int)],
                            [np.array([1])], "int8")
    assert (lost["box_recall"], lost["box_precision"]) == (0.0, 1.0) and "boxes_note" not in lost
    assert (gained["box_recall"], gained["box_precision"]) == (1.0, 0.0) and "boxes_note" not in gained


# ---- int8 acceptance: drop <= tolerance, else keep blocks float best gain first ---------------------------------
REFERENCE_MAP = 0.5
BLOCKS = ("model.10", "model.16", "model.22")


class _Quantizer:
    """Stands in for calib.quantize.Quantizer: a model is named by the blocks it leaves float ("model.10|model.22")."""

    calibration_s = 0.25

    def __init__(self, *args):
        pass

    def quantize(self, float_blocks=()):
        return "|".join(sorted(float_blocks))


def _fake_stage(monkeypatch, scores):
    """make_int8 with quantizing and scoring faked: a model scores scores[the blocks it leaves float, sorted]
    (mAP50-95). Returns the list the models evaluated (and the protos saved) are appended to, in order, and the
    fake `evaluate`."""
    evaluated, fp32 = [], onnx.ModelProto()
    fp32.metadata_props.add(key="imgsz", value="[64, 64]")
    monkeypatch.setattr(int8, "Quantizer", _Quantizer)
    monkeypatch.setattr(int8, "blocks", lambda model, kind: [Block(b, f"owner of {b}", ("qk",)) for b in BLOCKS])
    monkeypatch.setattr(int8, "float_nodes", lambda proto, rules, forced=(): frozenset(forced))  # blocks for nodes
    monkeypatch.setattr(int8, "onnx", SimpleNamespace(  # the fp32 file, or a QDQ model the quantizer made
        load=lambda path: fp32 if path.endswith(".onnx") else onnx.ModelProto()))
    monkeypatch.setattr(int8, "save", lambda proto, path: evaluated.append(("saved", proto)))

    def evaluate(path):
        evaluated.append(path)
        return scores[tuple(path.split("|")) if path else ()]

    return evaluated, evaluate


def _job(tmp_path, tolerance=1.0, forced=()):
    return Int8Job(tmp_path / "m.onnx", tmp_path / "m_int8.onnx", None, None, ["a.jpg"], "test", (64, 64),
                   forced=list(forced), tolerance=tolerance)


def _make(monkeypatch, tmp_path, scores, tolerance=1.0, forced=()):
    evaluated, evaluate = _fake_stage(monkeypatch, scores)
    section = make_int8(_job(tmp_path, tolerance, forced), evaluate=evaluate, reference_map=REFERENCE_MAP)
    return section, [e for e in evaluated if type(e) is str], [e[1] for e in evaluated if type(e) is tuple]


def test_the_default_tolerance_is_the_documented_one_point():
    job = Int8Job(Path("m.onnx"), Path("m_int8.onnx"), None, None, [], "test", (64, 64))
    assert job.tolerance == 1.0 and cli.parser().parse_args([]).int8_tolerance == 1.0


@pytest.mark.parametrize("tolerance", [1.0, 2.5])
def test_a_drop_exactly_at_the_tolerance_passes_without_fallback(tolerance, monkeypatch, tmp_path):
    section, evaluated, _ = _make(monkeypatch, tmp_path, {(): REFERENCE_MAP - tolerance / 100}, tolerance)
    assert section["drop_points"] == tolerance and section["pass"] and section["tolerance_points"] == tolerance
    assert "sensitivity" not in section and evaluated == [""] and section["float_blocks"] == []


@pytest.mark.parametrize("score, drop", [(0.495, 0.5), (REFERENCE_MAP, 0.0), (0.51, -1.0)])
def test_a_drop_within_the_tolerance_or_a_gain_passes_without_fallback(score, drop, monkeypatch, tmp_path):
    section, evaluated, _ = _make(monkeypatch, tmp_path, {(): score}, tolerance=1.0)
    assert section["drop_points"] == drop and section["pass"] and "sensitivity" not in section and evaluated == [""]


@pytest.mark.parametrize("tolerance, over", [(1.0, 1.001), (2.5, 2.501)])
def test_a_drop_just_over_the_tolerance_fails_and_triggers_the_fallback(tolerance, over, monkeypatch, tmp_path):
    """0.001 points (the drop's rounding) over: every block is tried float; none helps, so it fails."""
    score = REFERENCE_MAP - over / 100
    section, evaluated, _ = _make(monkeypatch, tmp_path, {(): score, **{(b,): score for b in BLOCKS}}, tolerance)
    assert section["drop_points"] == over and not section["pass"]
    assert [row["block"] for row in section["sensitivity"]] == list(BLOCKS) and section["float_blocks"] == []
    assert evaluated == ["", *BLOCKS]


def test_the_jobs_tolerance_decides_not_a_constant(monkeypatch, tmp_path):
    scores = {(): REFERENCE_MAP - 0.02, **{(b,): REFERENCE_MAP - 0.02 for b in BLOCKS}}  # a drop of 2 points
    assert _make(monkeypatch, tmp_path, scores, tolerance=2.0)[0]["pass"]
    assert not _make(monkeypatch, tmp_path, scores, tolerance=1.999)[0]["pass"]


def test_drop_and_gain_are_points_rounded_to_a_thousandth(monkeypatch, tmp_path):
    scores = {(): 0.4871234, ("model.10",): 0.4912341, ("model.16",): 0.4871234, ("model.22",): 0.48}
    section, _, _ = _make(monkeypatch, tmp_path, scores, tolerance=0.5)  # a first drop of 1.28766 points
    assert section["first_map50_95"] == 0.4871234 and section["map50_95_fp32"] == REFERENCE_MAP
    gains = {row["block"]: row["gain_points"] for row in section["sensitivity"]}
    assert gains == {"model.10": 0.411, "model.16": 0.0, "model.22": -0.712}
    assert section["drop_points"] == 0.877 and section["map50_95_int8"] == 0.4912341 and not section["pass"]


def test_fallback_keeps_blocks_float_best_gain_first_until_within_tolerance(monkeypatch, tmp_path):
    """Drop 3 points, tolerance 1: model.22 gains most, then model.10; with both float the drop is exactly 1, so
    model.16 (a positive gain, but no longer needed) stays int8."""
    scores = {(): 0.47, ("model.10",): 0.475, ("model.16",): 0.471, ("model.22",): 0.48, ("model.10", "model.22"): 0.49}
    section, evaluated, saved = _make(monkeypatch, tmp_path, scores, tolerance=1.0)
    assert [row["block"] for row in section["sensitivity"]] == ["model.22", "model.10", "model.16"]
    assert [row.get("kept_float", False) for row in section["sensitivity"]] == [True, True, False]
    assert evaluated == ["", *BLOCKS, "model.22", "model.10|model.22"]
    assert section["float_blocks"] == ["model.22", "model.10"] and section["pass"] and section["drop_points"] == 1.0
    stamped = json.loads({p.key: p.value for p in saved[0].metadata_props}["quantization"])
    assert stamped["float_blocks"] == ["model.22", "model.10"] and stamped["images"] == 1
    assert {p.key: p.value for p in saved[0].metadata_props}["imgsz"] == "[64, 64]"  # the fp32 export's own


@pytest.mark.parametrize("last_gain", [0.0, -0.1])
def test_fallback_never_keeps_a_block_that_does_not_help(last_gain, monkeypatch, tmp_path):
    """Still over tolerance after the helpful blocks: a block with gain <= 0 is not kept, and the run fails."""
    first = 0.47
    scores = {(): first, ("model.10",): first + last_gain / 100, ("model.16",): 0.475, ("model.22",): 0.472,
              ("model.16", "model.22"): 0.477}
    section, evaluated, _ = _make(monkeypatch, tmp_path, scores, tolerance=1.0)
    assert section["float_blocks"] == ["model.16", "model.22"] and not section["pass"]
    assert section["drop_points"] == 2.3 and evaluated[-1] == "model.16|model.22"


def test_forced_blocks_stay_float_and_are_not_measured(monkeypatch, tmp_path):
    scores = {("model.16",): 0.47, ("model.10", "model.16"): 0.475, ("model.16", "model.22"): 0.495}
    section, evaluated, _ = _make(monkeypatch, tmp_path, scores, tolerance=1.0, forced=["model.16"])
    assert [row["block"] for row in section["sensitivity"]] == ["model.22", "model.10"]
    assert section["float_blocks"] == ["model.16", "model.22"] and section["forced_float"] == ["model.16"]
    assert all("model.16" in e for e in evaluated) and section["pass"]


def test_without_labels_the_rules_alone_decide(monkeypatch, tmp_path):
    _fake_stage(monkeypatch, {})
    section = make_int8(_job(tmp_path))
    assert "pass" not in section and "first_map50_95" not in section and section["float_blocks"] == []
    assert section["calibration"] == {"source": "test", "images": 1, "method": "max", "batch": 1, "seconds": 0.25}


# ---- exit codes: 0, 2, 3, 4, 130 and their causes (README "Exit codes") -----------------------------------------
def test_exit_codes_are_the_documented_ones():
    readme = (REPO / "README.md").read_text()
    documented = {int(code): meaning for code, meaning in re.findall(r"^\| (\d+) \| ([^|]+)\|", readme, re.M)}
    assert set(documented) == {0, 2, 3, 4, 130} and documented[0].startswith("success")
    assert documented[2].startswith("bad input") and "failed" in documented[3]
    assert documented[4].startswith("parity failed") and documented[130].startswith("interrupted")
    from export import errors
    assert (errors.EXIT_OK, errors.EXIT_BAD_INPUT, errors.EXIT_STAGE_FAILED, errors.EXIT_VERDICT_FAILED,
            errors.EXIT_INTERRUPTED) == (0, 2, 3, 4, 130)
    assert BadInput.exit_code == 2 and StageFailed.exit_code == 3


def _raising(error):
    def job(args):
        raise error
    return job


@pytest.mark.parametrize("outcome, code", [
    (lambda args: 0, 0), (lambda args: 4, 4),  # the job's own verdict passes through
    (_raising(BadInput("bad")), 2), (_raising(StageFailed("failed")), 3),
    (_raising(ValueError("ours")), 3), (_raising(KeyboardInterrupt()), 130),
])
@pytest.mark.parametrize("command, module", [([], export_job), (["parity", "--weights", "w.pt", "--onnx", "m.onnx"],
                                                                 parity_job), (["bench", "m.pt"], bench_job)])
def test_each_outcome_of_a_job_maps_to_its_exit_code(command, module, outcome, code, monkeypatch, capsys):
    monkeypatch.setattr(module, "run", outcome)
    assert cli.main(command) == code
    err = capsys.readouterr().err
    assert err.count("\n") == (0 if code in (0, 4) else 1) and (code in (0, 4) or err.startswith("error: "))


def test_a_refused_argument_is_exit_2_before_the_job_runs(monkeypatch, capsys):
    monkeypatch.setattr(export_job, "run", _raising(AssertionError("the job ran")))
    assert cli.main(["--batch", "0"]) == 2 and "--batch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as unknown:  # argparse's own refusal: exit 2 too
        cli.main(["--engine", "fp64"])
    assert unknown.value.code == 2


def test_main_reads_the_command_line_when_given_no_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["yolo-attn-export", "parity", "--weights", "w.pt", "--onnx", "m.onnx"])
    monkeypatch.setattr(parity_job, "run", lambda args: 4 if args.onnx == Path("m.onnx") else 0)
    assert cli.main() == 4


@pytest.mark.parametrize("argv, levels", [([], [2, 2]), (["-v"], [0, 2])])
def test_onnx_runtime_logs_warnings_only_unless_verbose_and_is_left_quiet(argv, levels, monkeypatch):
    """ONNX Runtime's logger is process-wide: the main job sets it (0: everything with -v, 2: warnings) and leaves it
    at its own default (2) for whoever runs next."""
    set_to = []
    monkeypatch.setattr(cli.ort, "set_default_logger_severity", set_to.append)
    monkeypatch.setattr(export_job, "run", lambda args: 0)
    cli.main(argv)
    assert set_to == levels


def test_an_internal_error_shows_its_traceback_only_with_verbose(monkeypatch, capsys):
    monkeypatch.setattr(export_job, "run", _raising(ValueError("ours\nand more")))
    assert cli.main(["-v"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: ValueError: ours (an internal error; rerun with -v for the "
                                               "traceback)\n")


def test_sub_commands_get_their_own_arguments_and_a_typo_is_named(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(parity_job, "run", lambda args: seen.append(args.onnx) or 0)
    monkeypatch.setattr(bench_job, "run", lambda args: seen.append(args.models) or 0)
    assert cli.main(["parity", "--weights", "w.pt", "--onnx", "m.onnx"]) == cli.main(["bench", "m.pt"]) == 0
    assert seen == [Path("m.onnx"), ["m.pt"]]
    with pytest.raises(SystemExit):
        cli.main(["profile"])
    assert "unrecognized arguments: profile" in capsys.readouterr().err


def _args(*argv):
    return cli.parser().parse_args(list(argv))


@pytest.mark.parametrize("refused, accepted", [
    (["--half", "--engine", "fp32"], [["--half", "--engine", "fp16"], ["--engine", "fp32"]]),
    (["--calib", "images"], [["--calib", "images", "--int8"], ["--calib", "images", "--engine", "int8"]]),
    (["--int8-exclude", "model.10"], [["--int8-exclude", "model.10", "--int8"]]),
    (["--fp32-keep", "model.1"], [["--fp32-keep", "model.1", extra, *more] for extra, *more in
                                  (["--half"], ["--engine", "fp16"], ["--engine", "int8"], ["--int8"])]),
    (["--conf", "0.3"], [["--conf", "0.3", "--nms"]]), (["--iou", "0.5"], [["--iou", "0.5", "--nms", "trt"]]),
    (["--max-det", "100"], [["--max-det", "100", "--nms"]]), (["--agnostic-nms"], [["--agnostic-nms", "--nms"]]),
])
def test_argument_combinations_that_cannot_work_are_refused(refused, accepted):
    """Refused naming the option; the arguments are built at run time, as a command line's are (not the literals
    Python shares)."""
    with pytest.raises(BadInput, match=re.escape(refused[0])):
        cli.check(_args(*map(_fresh, refused)))
    for argv in accepted:
        cli.check(_args(*map(_fresh, argv)))


def _fresh(text):
    return "".join(list(text))


@pytest.mark.parametrize("option, ok, refused", [
    ("--batch", ("1", "2"), "0"), ("--bench-rounds", ("1", "2"), "0"), ("--bench", ("0", "1"), "-1"),
    ("--calib-n", ("0", "1"), "-1"), ("--int8-tolerance", ("0", "0.5"), str(np.nextafter(0.0, -1))),
])
def test_argument_bounds(option, ok, refused):
    for value in ok:
        cli.check(_args(f"{option}={value}"))
    with pytest.raises(BadInput):
        cli.check(_args(f"{option}={refused}"))


@pytest.mark.parametrize("option, ok, refused", [
    ("--conf", ("0", "0.5", "1"), (str(np.nextafter(0.0, -1)), str(np.nextafter(1.0, 2)))),
    ("--iou", ("0", "0.5", "1"), (str(np.nextafter(0.0, -1)), str(np.nextafter(1.0, 2)))),
    ("--max-det", ("1", "300", "10000"), ("0", "10001")),
])
def test_nms_argument_bounds(option, ok, refused):
    for value in ok:
        cli.check(_args("--nms", f"{option}={value}"))
    for value in refused:
        with pytest.raises(BadInput, match=option):
            cli.check(_args("--nms", f"{option}={value}"))


@pytest.mark.parametrize("option, ok, refused", [
    ("--batch", ("1", "2"), "0"), ("--rounds", ("1", "2"), "0"), ("--iterations", ("1", "2"), "0"),
    ("--warmup", ("0", "1"), "-1"),
    ("--threads", ("0", "1", "2"), "-1"),  # 0 is taken as not given (torch's thread count), as `--threads` absent
])
def test_bench_argument_bounds(option, ok, refused):
    for value in ok:
        cli.check_bench(cli.bench_parser().parse_args(["m.pt", f"{option}={value}"]))
    with pytest.raises(BadInput):
        cli.check_bench(cli.bench_parser().parse_args(["m.pt", f"{option}={refused}"]))


def _finish(report, monkeypatch, tmp_path):
    monkeypatch.setattr(export_job, "write_report", lambda report, out: None)
    monkeypatch.setattr(export_job, "say", lambda text: None)
    return export_job.finish({"pictures": [], **report}, tmp_path)


PASSED = {"onnxruntime": {"pass": True}, "tensorrt": {"skipped": "no GPU"}}


@pytest.mark.parametrize("extra, code, says", [
    ({}, 0, None),
    ({"parity": {**PASSED, "onnxruntime_fp16": {"pass": False}}}, 4, "onnxruntime_fp16"),
    ({"nms": {"pass": False}}, 4, "end-to-end NMS check"),
    ({"nms": {"pass": True}, "block_check": {"pass": True, "failed": []}, "int8": {"pass": True}}, 0, None),
    ({"block_check": {"pass": False, "failed": ["model.9"]}}, 4, "block check (model.9)"),
    ({"int8": {"pass": False, "drop_points": 1.25, "tolerance_points": 1.0, "float_blocks": ["model.10"]}}, 4,
     "int8 accuracy (mAP50-95 drop 1.25 points > tolerance 1.0, with model.10 kept float)"),
    ({"int8": {"pass": False, "drop_points": 3.0, "tolerance_points": 2.5, "float_blocks": []}}, 4,
     "int8 accuracy (mAP50-95 drop 3.00 points > tolerance 2.5)"),
])
def test_finish_exits_4_when_any_verdict_failed(extra, code, says, monkeypatch, tmp_path, capsys):
    report = {"parity": PASSED, **extra}
    assert _finish(report, monkeypatch, tmp_path) == code and report.get("exit_code", code) == code
    err = capsys.readouterr().err
    assert (says in err and err.count("\n") == 1 and "report.md" in err) if says else err == ""


def test_finish_records_the_exit_code_in_the_report(monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(export_job, "write_report", lambda report, out: written.append(dict(report)))
    monkeypatch.setattr(export_job, "say", lambda text: None)
    export_job.finish({"pictures": [], "parity": {"onnxruntime": {"pass": False}}}, tmp_path)
    assert written[0]["exit_code"] == 4


@pytest.mark.parametrize("results, code", [
    ({"onnxruntime": {"pass": True}, "tensorrt": {"skipped": "no runtime"}}, 0),
    ({"onnxruntime": {"pass": True}, "tensorrt": {"pass": False}}, 4),
    ({"onnxruntime": {"pass": False}}, 4),
])
def test_standalone_parity_exits_4_when_a_backend_failed(results, code, monkeypatch, capsys):
    monkeypatch.setattr(parity_job, "check", lambda args: results)
    assert parity_job.run(SimpleNamespace()) == code and capsys.readouterr().out == json.dumps(results, indent=2) + "\n"
