"""The kinds of block real tutorial forks hold (tests/paper_blocks.py), exported with --code as written: fp32, fp16
with its engine, and --dynamic proven at a second size, each block also checked on its own; and code torch's
exporter gets wrong (in-place ops on views) caught by that block check, naming the block and the line."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.cli import main
from export.graph.onnx_passes import float64_as_float32, grid_sample_one_type
from export.pipeline.export_job import _block_named_in, second_size
from tests import paper_blocks

BLOCKS = {"model.9.1": "DeformableLKA", "model.12.1": "MixedLocalChannel", "model.15.1": "RoutingAttention",
          "model.18.1": "DeformableAttentionInPlace", "model.21.1": "LocalUnfoldAttention"}


@pytest.fixture(scope="module")
def fork(tmp_path_factory):
    root = paper_blocks.write_fork(tmp_path_factory.mktemp("paper"))
    return root, paper_blocks.save_checkpoint(root, root.parent / "best.pt")


def _run(fork, out, *flags):
    root, ckpt = fork
    code = main(["--weights", str(ckpt), "--code", str(root), "--out", str(out), *flags])
    return code, json.loads((out / "report.json").read_text())


def _records(report):
    return {block: {r["rewrite"] for r in entry["rewrites"]} for block, entry in report["user_blocks"].items()}


@pytest.mark.slow
def test_fp32_export_matches_block_by_block(fork, tmp_path):
    code, report = _run(fork, tmp_path / "fp32")
    assert code == 0 and report["parity"]["onnxruntime"]["pass"]
    check = report["block_check"]
    assert check["pass"] and set(check["errors"]) == set(BLOCKS) and max(check["errors"].values()) < 1e-4
    records = _records(report)
    assert "deform-conv" in records["model.9.1"]  # torchvision's DeformConv2d in standard ops
    assert "adaptive-pool" in records["model.12.1"]  # to 5x5 from 8x8 (non-dividing) and back up to 8x8 (larger)
    assert {"float64", "inplace-chain"} <= records["model.18.1"]  # linspace of traced sizes; the reference points
    details = [r["detail"] for r in report["user_blocks"]["model.18.1"]["rewrites"] if r["rewrite"] == "inplace-chain"]
    assert len(details) == 2 and "ref[..., 1].div_(wk).mul_(2).sub_(1) as an indexed assignment" in details[0]
    assert report["lint"] == []  # no fp64, no fixed-kernel pooling, no ScatterND left


@pytest.mark.slow
def test_fp16_export_matches_and_its_engine_builds(fork, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    code, report = _run(fork, tmp_path / "fp16", "--engine", "fp16")
    assert code == 0 and report["parity"]["onnxruntime"]["pass"] and report["block_check"]["pass"]
    assert report["parity"]["onnxruntime"]["precision"] == "fp16"
    assert "grid-sample-type" in _records(report)["model.18.1"]  # fp16 input, grid from float32 arithmetic
    assert report["engine_build"]["precision"] == "fp16" and (tmp_path / "fp16" / "best_fp16.engine").is_file()


@pytest.mark.slow
def test_dynamic_export_matches_at_a_second_size(fork, tmp_path):
    code, report = _run(fork, tmp_path / "dynamic", "--dynamic")
    assert code == 0 and report["block_check"]["pass"]
    second = report["parity"]["onnxruntime@96x96"]
    assert second["pass"] and second["imgsz"] == [96, 96] and report["parity"]["onnxruntime"]["pass"]
    assert report["block_check"]["second_imgsz"] == [96, 96] and max(report["block_check"]["errors_second"].values()) < 1e-4


@pytest.mark.slow
def test_code_the_exporter_gets_wrong_fails_the_block_check_naming_block_and_line(fork, tmp_path, capsys):
    """A view held in a variable and written twice (wrong at every size) and offsets scaled by a tensor made from
    the sizes (frozen by the trace: right at the export size only), in one dynamic export."""
    root, _ = fork
    ckpt = paper_blocks.save_checkpoint(root, tmp_path / "wrong.pt", {
        15: ("DeformableAttention:DeformableAttentionHeldView", 64),
        18: ("DeformableAttention:DeformableAttentionFrozenScale", 128)})
    out = tmp_path / "out"
    assert main(["--weights", str(ckpt), "--code", str(root), "--out", str(out), "--dynamic"]) == 4
    captured = capsys.readouterr()
    assert "block check model.15.1 (DeformableAttentionHeldView)" in captured.out
    assert "xs.mul_(2).sub_(1)" in captured.out  # the line to rewrite
    assert captured.err.strip().splitlines() == [
        f"error: block check (model.15.1, model.18.1) failed (see {out / 'report.md'})"]
    report = json.loads((out / "report.json").read_text())
    check = report["block_check"]
    assert check["failed"] == ["model.15.1", "model.18.1"] and report["exit_code"] == 4
    assert check["errors"]["model.15.1"] > 1e-4  # wrong at the export size already
    assert check["errors"]["model.18.1"] < 1e-4 < check["errors_second"]["model.18.1"]  # right at 128 only
    frozen = [f for f in report["lint"] if f["rule"] == "frozen-shape"]  # the lint names the frozen line per block
    assert {f["block"] for f in frozen} == {"model.18.1"}
    assert any("scale = torch.tensor([1.0 / hk, 1.0 / wk]" in f["message"] for f in frozen)


# ---- the graph passes, on small graphs ------------------------------------------------------------------------
def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_float64_is_computed_in_float32_and_grid_sample_runs():
    """x (float) -> Cast to double -> Add a double constant -> GridSample's grid: ONNX Runtime has no double
    GridSample; after the pass the graph runs and gives the float32 result."""
    grid_offset = numpy_helper.from_array(np.full((1, 2, 2, 2), 0.25), "offset")  # float64 initializer
    nodes = [helper.make_node("Cast", ["g"], ["g64"], name="/model/model.3/Cast", to=TensorProto.DOUBLE),
             helper.make_node("Add", ["g64", "offset"], ["grid"], name="/model/model.3/Add"),
             helper.make_node("GridSample", ["x", "grid"], ["y"], name="/model/model.3/GridSample")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4]),
                           helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, 2, 2, 2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])], [grid_offset])
    with pytest.raises(Exception, match="GridSample"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert float64_as_float32(model) == ["/model/model.3/Cast", "/model/model.3/Add"]
    assert float64_as_float32(model) == []  # nothing left
    onnx.checker.check_model(model, full_check=True)
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    g = np.zeros((1, 2, 2, 2), np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "g": g})[0]
    assert y.dtype == np.float32 and np.allclose(y, 10)  # (0.25, 0.25) is pixel (2, 2) with align_corners=0


def test_grid_sample_grid_takes_the_input_type():
    nodes = [helper.make_node("GridSample", ["x", "grid"], ["y"], name="/model/model.5/GridSample")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 1, 4, 4]),
                           helper.make_tensor_value_info("grid", TensorProto.FLOAT, [1, 2, 2, 2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 1, 2, 2])])
    assert grid_sample_one_type(model) == ["/model/model.5/GridSample"]
    cast = model.graph.node[0]
    assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT16
    assert model.graph.node[1].input[1] == cast.output[0]
    assert grid_sample_one_type(model) == []  # one type now


def test_errors_are_charged_to_the_block_of_the_node_they_name():
    message = ("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for GridSample(16) node "
               "with name '/model/model.18/model.18.1/GridSample'")
    assert _block_named_in(message) == "model.18.1"
    assert _block_named_in("no node named here") is None


@pytest.mark.parametrize("imgsz, stride, expected", [((640, 640), 32, (608, 608)), ((128, 96), 32, (96, 64)),
                                                     ((64, 64), 32, (96, 96))])
def test_second_size_changes_every_axis_by_one_stride(imgsz, stride, expected):
    assert second_size(imgsz, stride) == expected


# ---- fp32 islands in the fp16 model --------------------------------------------------------------------------
@pytest.mark.slow
def test_fp32_keep_runs_the_block_in_fp32_inside_the_fp16_file(fork, tmp_path):
    root, _ = fork
    ckpt = paper_blocks.save_checkpoint(root, tmp_path / "gate.pt", {18: ("ScaledGate", 128)})
    out = tmp_path / "out"
    assert main(["--weights", str(ckpt), "--code", str(root), "--half", "--fp32-keep", "model.18.1",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["fp32_islands"] == [{"block": "model.18.1", "reason": "--fp32-keep"}]
    proto = onnx.load(str(out / "gate_fp16.onnx"))
    weights = {t.name: t.data_type for t in proto.graph.initializer}
    assert weights["model.model.18.1.mix.weight"] == TensorProto.FLOAT  # the island's conv runs in fp32
    assert weights["model.model.18.0.cv1.conv.weight"] == TensorProto.FLOAT16  # the rest stays half
    assert report["parity"]["onnxruntime"]["pass"] and "Kept fp32 inside the fp16 model" in (
        out / "report.md").read_text()


@pytest.mark.slow
def test_a_block_that_fails_fp16_is_found_and_kept_fp32(fork, tmp_path, capsys):
    """ScaledGate's sum of squares overflows fp16 in ONNX Runtime (non-finite outputs): the run localises it,
    keeps it fp32, exports and checks again, and passes."""
    root, _ = fork
    ckpt = paper_blocks.save_checkpoint(root, tmp_path / "gate.pt", {18: ("ScaledGate", 128)})
    code, report = _run((root, ckpt), tmp_path / "out", "--half")
    assert "parity onnxruntime (fp16): max abs nan" in capsys.readouterr().out  # the first try failed
    assert code == 0 and report["parity"]["onnxruntime"]["pass"]
    assert report["fp32_islands"] == [{"block": "model.18.1", "reason": "fp16 parity failed and the block was the "
                                                                      "first to diverge (non-finite output)"}]


def test_a_failing_fp16_block_is_kept_fp32_once():
    from types import SimpleNamespace

    from export.pipeline.export_job import Plan, fp16_island_needed

    plan = Plan(("fp16",), "fp16")
    failed = SimpleNamespace(localization={"backend": "onnxruntime", "first_divergent_block": "model.18.1",
                                           "block_errors": {"model.18.1": 0.3}})
    island = fp16_island_needed(failed, plan, [])
    assert island["block"] == "model.18.1" and "(0.3 of its output scale)" in island["reason"]
    assert fp16_island_needed(failed, plan, ["model.18.1"]) is None  # kept already: no loop
    assert fp16_island_needed(SimpleNamespace(localization=None), plan, []) is None
    fp32 = Plan(("fp32",), "fp32")
    assert fp16_island_needed(failed, fp32, []) is None  # an fp32 failure is not fp16's


def test_fp32_keep_needs_an_fp16_model(capsys):
    assert main(["--weights", "x.pt", "--fp32-keep", "model.1"]) == 2
    assert "--fp32-keep configures the fp16 model" in capsys.readouterr().err


def test_deform_conv2d_in_standard_ops_is_torchvisions():
    """Strides, paddings, dilations, groups, offset groups, DCNv2 masks, non-square maps; offsets of a few pixels,
    so sampling points fall outside the map too."""
    import itertools

    import torch
    import torchvision.ops as ops

    from export.graph.generic import _deform_conv2d

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for stride, pad, dil, groups, og, masked, hw in itertools.product((1, 2), (0, 3), (1, 2), (1, 2), (1, 2),
                                                                        (False, True), ((9, 9), (7, 11))):
        x, w, bias = torch.randn(2, 4, *hw, generator=g), torch.randn(6, 4 // groups, 3, 3, generator=g), \
            torch.randn(6, generator=g)
        ho, wo = ((n + 2 * pad - dil * 2 - 1) // stride + 1 for n in hw)
        offset = torch.randn(2, 2 * og * 9, ho, wo, generator=g) * 2
        mask = torch.rand(2, og * 9, ho, wo, generator=g) if masked else None
        expected = ops.deform_conv2d(x, offset, w, bias, stride=stride, padding=pad, dilation=dil, mask=mask)
        got = _deform_conv2d(None, lambda *a: None, False, x, offset, w, bias, (stride, stride), (pad, pad),
                             (dil, dil), mask)
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    assert worst < 2e-6


def test_a_failing_torch_export_prints_no_ir_dump(capfd):
    """torch's TorchScript exporter prints its whole IR graph to stdout when it fails (its log switch is always
    on); the trace keeps the console to our one line."""
    import torch

    from export.graph.to_onnx import trace

    class Complex(torch.nn.Module):
        def forward(self, x):
            return torch.view_as_real(torch.view_as_complex(x.reshape(1, -1, 2)) * 1j).reshape(x.shape)

    with pytest.raises(Exception):
        trace(Complex(), torch.rand(1, 4, 2, 2))
    captured = capfd.readouterr()
    assert "Torch IR graph" not in captured.out + captured.err
