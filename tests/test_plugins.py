"""Custom ops: ONNX function bodies and Triton kernels vs torch references; plugin-bearing exports vs plain ones."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import models
import plugins
from export.cli import main
from models import s2, sta
from plugins import DOMAIN, s2_shift, sta_fold

REPO = Path(__file__).resolve().parents[1]
S2_SHAPES = [(2, 5, 7, 30), (1, 1, 1, 4), (1, 3, 1, 7), (1, 6, 6, 64)]
GRIDS = [(2, 3, 4, 5), (1, 2, 1, 1), (1, 1, 3, 2), (2, 8, 5, 5)]


def _single_op_model(op, rank, out_rank, attrs=None, bank=False):
    """A graph of one yolo_attn node, its local functions attached: what ORT / TensorRT's parser see."""
    inputs = ["x", "w"] if bank else ["x"]
    node = helper.make_node(op, inputs, ["y"], domain=DOMAIN, **(attrs or {}))
    infos = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None] * rank)]
    infos += [helper.make_tensor_value_info("w", TensorProto.FLOAT, [9, 1, 3, 3])] if bank else []
    graph = helper.make_graph([node], "g", infos, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * out_rank)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    plugins.attach_functions(model)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("direction", [1, 2])
def test_s2shift_body_matches_reference(direction):
    session = _single_op_model("S2Shift", 4, 4, {"direction": direction, "perm": s2_shift.PERM[direction]})
    for shape in S2_SHAPES:
        x = torch.randn(*shape)
        (y,) = session.run(None, {"x": x.numpy()})
        assert np.array_equal(y, s2_shift.reference(x, direction).numpy()), shape


EYE = torch.eye(9).reshape(9, 1, 3, 3)


def _banks():
    """The identity bank and a trained-looking one (ultralytics trains the 'frozen' banks)."""
    return {"identity": EYE, "trained": EYE + 0.03 * torch.randn(9, 1, 3, 3)}


def test_stoken_bodies_match_references():
    unfold = _single_op_model("StokenUnfold", 4, 5, bank=True)
    fold = _single_op_model("StokenFold", 5, 4, bank=True)
    for name, w in _banks().items():
        for shape in GRIDS:
            s, t = torch.randn(*shape), torch.randn(*shape[:2], 9, *shape[2:])
            got = unfold.run(None, {"x": s.numpy(), "w": w.numpy()})[0]
            assert np.allclose(got, sta_fold.reference_unfold(s, w).numpy(), atol=1e-6), (name, shape)
            got = fold.run(None, {"x": t.numpy(), "w": w.numpy()})[0]
            assert np.allclose(got, sta_fold.reference_fold(t, w).numpy(), atol=1e-5), (name, shape)


def test_identity_bank_ops_are_unfold_and_fold():
    """With the untrained bank the ops are exactly F.unfold / F.fold (im2col / col2im), 3x3, padding 1."""
    for shape in GRIDS:
        b, c, hh, ww = shape
        s, t = torch.randn(*shape), torch.randn(b, c, 9, hh, ww)
        im2col = torch.nn.functional.unfold(s.reshape(b * c, 1, hh, ww), 3, padding=1).reshape(b, c, 9, hh, ww)
        col2im = torch.nn.functional.fold(t.reshape(b * c, 9, hh * ww), (hh, ww), 3, padding=1).reshape(b, c, hh, ww)
        assert torch.allclose(sta_fold.reference_unfold(s, EYE), im2col)
        assert torch.allclose(sta_fold.reference_fold(t, EYE), col2im, atol=1e-6)


def test_export_twin_forms_match_plugin_references():
    """The twins' own decompositions (no plugins) compute the ops the plugins implement."""
    for shape in S2_SHAPES:
        x = torch.randn(*shape)
        assert torch.equal(s2.shift_clean(x, s2.SHIFT1), s2_shift.reference(x, 1))
        assert torch.equal(s2.shift_clean(x, s2.SHIFT2), s2_shift.reference(x, 2))
    trained = _banks()["trained"]
    for shape in GRIDS:
        s, t = torch.randn(*shape), torch.randn(*shape[:2], 9, *shape[2:])
        assert torch.allclose(sta.stoken_unfold(s), sta_fold.reference_unfold(s, EYE))
        assert torch.allclose(sta.stoken_fold(t), sta_fold.reference_fold(t, EYE), atol=1e-6)
        assert torch.allclose(sta.bank_unfold(s, trained), sta_fold.reference_unfold(s, trained))
        assert torch.allclose(sta.bank_fold(t, trained), sta_fold.reference_fold(t, trained), atol=1e-6)


KERNEL_CHECK = """
import torch
from plugins.s2_shift import kernel as k, reference
from plugins.sta_fold import kernel as kk, reference_unfold, reference_fold
for shape in {s2_shapes}:
    x = torch.randn(*shape)
    for d in (1, 2):
        y = torch.empty_like(x); k.launch(x, y, d)
        assert torch.equal(y, reference(x, d)), (shape, d)
for shape in {grids}:
    for w in (torch.eye(9).reshape(9, 1, 3, 3), torch.randn(9, 1, 3, 3)):
        s = torch.randn(*shape); y = s.new_empty(*shape[:2], 9, *shape[2:]); kk.launch_unfold(s, w, y)
        assert torch.allclose(y, reference_unfold(s, w), atol=1e-5), shape
        t = torch.randn(*shape[:2], 9, *shape[2:]); y = s.new_empty(*shape); kk.launch_fold(t, w, y)
        assert torch.allclose(y, reference_fold(t, w), atol=1e-4), shape
print("ok")
"""


def test_triton_kernels_match_references_in_the_interpreter():
    """The kernels' logic, run by Triton's CPU interpreter (TRITON_INTERPRET=1): no GPU needed."""
    code = KERNEL_CHECK.format(s2_shapes=S2_SHAPES, grids=GRIDS)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_triton_kernels_compile_to_ptx(dtype):
    """What the AOT plugins embed: PTX for sm_80, compiled on this host without a GPU."""
    from plugins.s2_shift import kernel as s2_kernel
    from plugins.sta_fold import kernel as sta_kernel

    for compiled in (s2_kernel.ptx(dtype, 1), s2_kernel.ptx(dtype, 2), sta_kernel.ptx(sta_kernel.unfold_kernel, dtype),
                     sta_kernel.ptx(sta_kernel.fold_kernel, dtype)):
        assert ".entry" in compiled.asm["ptx"] and compiled.metadata.num_warps > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_kernels_on_gpu_match_references():
    from plugins.s2_shift.kernel import s2_shift_cuda
    from plugins.sta_fold.kernel import fold_cuda, unfold_cuda

    for shape in S2_SHAPES:
        x = torch.randn(*shape, device="cuda")
        for d in (1, 2):
            assert torch.equal(s2_shift_cuda(x, d), s2_shift.reference(x, d))
    w = (EYE + 0.03 * torch.randn(9, 1, 3, 3)).cuda()
    for shape in GRIDS:
        s, t = torch.randn(*shape, device="cuda"), torch.randn(*shape[:2], 9, *shape[2:], device="cuda")
        assert torch.allclose(unfold_cuda(s, w), sta_fold.reference_unfold(s, w), atol=1e-5)
        assert torch.allclose(fold_cuda(t, w), sta_fold.reference_fold(t, w), atol=1e-4)


def test_tensorrt_plugins_register():
    trt = pytest.importorskip("tensorrt", reason="full TensorRT >= 10.7 not installed (not installable here)")
    pytest.importorskip("tensorrt.plugin", reason="full TensorRT >= 10.7 not installed (not installable here)")
    assert plugins.register_tensorrt() is None
    registered = {(c.plugin_namespace, c.name) for c in trt.get_plugin_registry().all_creators}
    assert {(DOMAIN, op) for op in ("S2Shift", "StokenUnfold", "StokenFold")} <= registered, registered


def test_without_tensorrt_plugin_support_registration_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", None)  # what an import of TensorRT < 10.7 (or none) meets
    reason = plugins.register_tensorrt()
    assert reason.startswith("TensorRT plugins not registered (") and "inlines the ops' ONNX functions" in reason


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sta", "s2"])
def test_plugin_export_matches_plain_export(family, tmp_path):
    weights = models.demo_checkpoint(family)
    plain, plug = tmp_path / "plain", tmp_path / "plug"
    assert main(["--weights", str(weights), "--out", str(plain), "--no-parity", "--dynamic"]) == 0
    engine = ["--engine", "fp32"] if __import__("importlib").util.find_spec("tensorrt_rtx") else []
    assert main(["--weights", str(weights), "--out", str(plug), "--plugins", "--dynamic", *engine]) == 0
    onnx_name = f"{weights.stem}.onnx"
    proto = onnx.load(str(plug / onnx_name))
    custom = [n.op_type for n in proto.graph.node if n.domain == DOMAIN]
    expected_ops = {"sta": {"StokenUnfold", "StokenFold"}, "s2": {"S2Shift"}}[family]
    assert set(custom) == expected_ops and {f.name for f in proto.functions} == expected_ops
    assert len(custom) == {"sta": 4, "s2": 2}[family]  # one node per op instance: STA 2 unfold + 2 fold, S2 2 shifts
    sessions = [ort.InferenceSession(str(d / onnx_name), providers=["CPUExecutionProvider"]) for d in (plain, plug)]
    for shape in [(1, 3, 256, 256), (2, 3, 192, 320)]:
        x = np.random.rand(*shape).astype(np.float32)
        a, b = (s.run(None, {"images": x})[0] for s in sessions)
        assert np.allclose(a, b, rtol=1e-4, atol=1e-3)
    import json

    report = json.loads((plug / "report.json").read_text())
    assert report["parity"]["onnxruntime"]["pass"] and report["plugins"]["nodes"] == len(custom)
    if engine:
        assert Path(report["engine"]).stat().st_size > 0


@pytest.mark.parametrize("name", ["s2_c30", "sta", "sta_grid1x1", "sta_iter2", "sta_trained_banks"])
def test_plugin_twin_exports_custom_nodes_matching_plain_twin(name, tmp_path):
    from export.graph.to_onnx import export_module
    from tests.cases import CASES, rel_err

    case = CASES[name]
    plain = models.to_export(case.build())
    twin = models.to_export(case.build())
    assert plugins.apply(twin) == 1
    path = tmp_path / "plug.onnx"
    proto = export_module(twin, torch.randn(2, case.channels, *case.sizes[0]), path,
                          dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    custom = [n for n in proto.graph.node if n.domain == DOMAIN]
    assert custom and all(len(n.input) == len(next(f for f in proto.functions if f.name == n.op_type).input)
                          for n in custom)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for h, w in case.sizes:
        x = torch.randn(1, case.channels, h, w)
        with torch.no_grad():
            expected = plain(x)
        assert rel_err(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), expected) <= 1e-5
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX not installed")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, case.channels, 4, 4), (1, case.channels, 16, 16), (2, case.channels, 32, 32))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None


def test_inlined_for_the_parser_every_call_has_its_own_named_body(tmp_path):
    """Without registered plugins the parser inlines the functions: we inline first, naming each body node after
    its call site, so the engine's layers are unique and traceable (no duplicate-name warnings)."""
    from export.graph.to_onnx import export_module
    from tests.cases import CASES

    twin = models.to_export(CASES["sta"].build())
    plugins.apply(twin)
    path = tmp_path / "plug.onnx"
    proto = export_module(twin, torch.randn(1, CASES["sta"].channels, 16, 16), path)
    inlined = plugins.inline_for_parser(proto)
    assert not inlined.functions and not any(n.domain == DOMAIN for n in inlined.graph.node)
    names = [n.name for n in inlined.graph.node]
    assert all(names) and len(names) == len(set(names))
    sites = [n.name for n in proto.graph.node if n.domain == DOMAIN]
    assert len(sites) == 4 and all(any(name.startswith(site + "/") for name in names) for site in sites)
    x = np.random.rand(1, CASES["sta"].channels, 16, 16).astype(np.float32)
    inlined_path = tmp_path / "inlined.onnx"
    inlined_path.write_bytes(inlined.SerializeToString())
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for p in (path, inlined_path))
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_plugin_dynamic_fp16_build_is_quiet_and_verbose_on_request(tmp_path, capfd, caplog):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX not installed (pip install '.[rtx]')")
    args = ["--plugins", "--dynamic", "--engine", "fp16", "--no-parity"]
    assert main([*args, "--out", str(tmp_path / "quiet")]) == 0
    quiet = capfd.readouterr()
    quiet_slim = [r for r in caplog.records if r.name == "onnxslim" and r.levelno < logging.WARNING]
    caplog.clear()
    assert "already exists" not in quiet.out + quiet.err  # no duplicate node names from inlined functions
    assert "zeroIsPlaceHolder" not in quiet.out + quiet.err  # runtime-shaped Reshapes are literal (allowzero=1)
    assert "TensorRT warning:" not in quiet.out + quiet.err  # no warning left at all on the demo
    assert "TensorRT verbose:" not in quiet.out + quiet.err and "TensorRT info:" not in quiet.out + quiet.err
    assert main([*args, "-v", "--out", str(tmp_path / "loud")]) == 0
    loud = capfd.readouterr()
    assert "TensorRT verbose:" in loud.out + loud.err
    assert "/model/model.10/StokenUnfold/" in loud.out + loud.err  # layers named after their call site
    # so does onnxslim's (its stderr handler is bound once per process: look at the log records themselves)
    assert not quiet_slim and any(r.name == "onnxslim" and r.levelno == logging.DEBUG for r in caplog.records)
