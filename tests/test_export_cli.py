"""The main job end to end: ONNX (fp32, fp16), lint, TensorRT-RTX engine, parity, report, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from PIL import Image
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from ultralytics import YOLO

import models
from export.cli import main
from export.graph.lint import lint

REPO = Path(__file__).resolve().parents[1]
HAS_RTX = __import__("importlib").util.find_spec("tensorrt_rtx") is not None
REPORT_KEYS = {"weights", "onnx", "engine", "imgsz", "precision", "lint", "modules", "parity", "speed", "exit_code"}
METRIC_KEYS = {"max_abs", "mean_abs", "cosine", "box_recall", "box_precision", "map50_95", "pass"}


def _report(out):
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family", models.FAMILIES)
def test_fp32_onnx_passes_parity(family, tmp_path):
    assert main(["--weights", str(models.demo_checkpoint(family)), "--out", str(tmp_path)]) == 0
    report = _report(tmp_path)
    assert REPORT_KEYS <= set(report) and report["precision"] == "fp32" and report["lint"] == []
    ort_parity = report["parity"]["onnxruntime"]
    assert METRIC_KEYS <= set(ort_parity) and ort_parity["pass"]
    assert ort_parity["box_recall"] == 1.0 and ort_parity["detections_torch"] > 0
    assert report["modules"] and all(m["rel"] <= 1e-5 for m in report["modules"])
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Export report")
    assert "- ONNX Runtime (fp32): pass, max abs / output scale" in md  # the verdict line and its figure
    for picture in ("parity.png", "detections.png", "errors.png"):
        assert f"]({picture})" in md and picture in report["pictures"]
    assert "blocks.png" not in md and not (tmp_path / "blocks.png").exists()  # no --bench: nothing to show
    # one row per parity image (4 samples), one column each: PyTorch, the twin's parity is a table, ONNX Runtime
    assert Image.open(tmp_path / "detections.png").size == (2 * 330, 4 * 350)
    assert Image.open(tmp_path / "parity.png").size == (550, 400)  # the error histogram alone


@pytest.mark.slow
@pytest.mark.parametrize("family", models.FAMILIES)
def test_fp16_onnx_and_engine(family, tmp_path):
    args = ["--weights", str(models.demo_checkpoint(family)), "--out", str(tmp_path), "--half"]
    if HAS_RTX:
        args += ["--engine", "fp16"]
    assert main(args) == 0
    report = _report(tmp_path)
    stem = models.demo_checkpoint(family).stem
    assert report["onnx"].endswith(f"{stem}_fp16.onnx") and report["precision"] == "fp16"
    proto = onnx.load(report["onnx"])
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # fp32 in and out
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(i.data_type == TensorProto.FLOAT16 for i in proto.graph.initializer)
    assert report["parity"]["onnxruntime"]["pass"] and report["parity"]["onnxruntime"]["box_recall"] >= 0.99
    if HAS_RTX:
        engine = Path(report["engine"])
        assert engine.stat().st_size > 0 and json.loads(Path(f"{engine}.json").read_text())["names"]
        assert report["engine_build"]["strongly_typed"]
        assert "skipped" in report["parity"]["tensorrt"]  # no GPU here to run it


def test_ultralytics_runs_our_onnx_and_dynamic_shapes(tmp_path):
    weights = models.demo_checkpoint("mlla")
    assert main(["--weights", str(weights), "--out", str(tmp_path), "--dynamic", "--no-parity", "--imgsz", "256,320"]) == 0
    path = tmp_path / f"{weights.stem}.onnx"
    results = YOLO(str(path), task="detect").predict(str(models.DEMO_DIR / "images"), imgsz=(256, 320), verbose=False)
    assert len(results) == 4 and results[0].names == {0: "circle", 1: "square", 2: "triangle"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 3, 320, 320), (1, 3, 192, 256)]:
        (y,) = session.run(None, {"images": np.random.rand(*shape).astype(np.float32)})
        assert y.shape[0] == shape[0] and np.isfinite(y).all()
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert {"names", "stride", "imgsz", "task", "batch"} <= set(meta)


def test_bench_and_standalone_parity(tmp_path):
    weights = models.demo_checkpoint("s2")
    assert main(["--weights", str(weights), "--out", str(tmp_path), "--bench", "3", "--bench-rounds", "2",
                 "--batch", "2"]) == 0
    report = _report(tmp_path)
    speed = report["speed"]
    assert {"torch", "onnxruntime"} <= set(speed)
    assert all(len(s["round_medians_ms"]) == 2 and s["min_ms"] <= s["median_ms"] <= s["max_ms"] for s in speed.values())
    assert report["bench"]["threads"]["onnxruntime_intra_op_threads"] >= 1 and report["bench"]["batch"] == 2
    torch_rounds, ort_rounds = speed["torch"]["round_medians_ms"], speed["onnxruntime"]["round_medians_ms"]
    paired = sorted(t / o for t, o in zip(torch_rounds, ort_rounds))  # per round: the same round's two medians
    assert speed["onnxruntime"]["speedup_vs_torch"] == pytest.approx(sum(paired) / 2)  # median of two rounds
    attention = [r for r in report["blocks"]["rows"] if r["kind"] == "attention"]
    assert attention and all(r["ms"] > 0 and 0 < r["flop_share"] < 1 for r in attention)
    md = (tmp_path / "report.md").read_text()
    assert "## Where the time goes" in md and "](blocks.png)" in md and (tmp_path / "blocks.png").is_file()
    proc = subprocess.run([sys.executable, "-m", "export", "parity", "--weights", str(weights), "--onnx",
                           str(tmp_path / f"{weights.stem}.onnx")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["onnxruntime"]["pass"]


def test_lint_flags_three_input_einsum_and_scatternd():
    x, y, z = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in "xyz")
    nodes = [helper.make_node("Einsum", ["x", "y", "z"], ["e"], equation="ij,jk,kl->il", name="einsum3"),
             helper.make_node("ScatterND", ["e", "idx", "upd"], ["out"], name="scatter")]
    inits = [helper.make_tensor("idx", TensorProto.INT64, [1, 1], [0]),
             helper.make_tensor("upd", TensorProto.FLOAT, [1, 2], [1.0, 2.0])]
    graph = helper.make_graph(nodes, "g", [x, y, z], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 2])],
                              inits)
    findings = lint(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    rules = {(f["rule"], f["node"]) for f in findings}
    assert ("einsum-inputs", "einsum3") in rules and ("slow-op", "scatter") in rules
    assert any(f["severity"] == "error" for f in findings)


@pytest.mark.parametrize("args,phrase", [
    (["--imgsz", "250"], "multiples of the model stride"),
    (["--imgsz", "a,b"], "must be N or H,W"),
    (["--half", "--engine", "fp32"], "drop --half"),
    (["--images", "/nonexistent"], "no images found"),
    (["--batch", "0"], "--batch and --bench-rounds must be >= 1"),
    (["--bench-rounds", "0"], "--batch and --bench-rounds must be >= 1"),
])
def test_bad_arguments_exit_2(args, phrase, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--weights", str(models.demo_checkpoint("sta")), "--out", str(out), *args]) == 2
    assert phrase in capsys.readouterr().err and not out.exists()


def test_parity_failure_exits_4_and_names_the_block(tmp_path, monkeypatch):
    from export.pipeline import export_job
    import torch

    real_rewrite = export_job.rewrite

    def broken_rewrite(model, imgsz, images=None):
        twin, checks = real_rewrite(model, imgsz, images=images)
        with torch.no_grad():
            twin.get_submodule("model.10").stoken_refine.proj.weight.mul_(3.0)  # a wrong twin
        return twin, checks

    monkeypatch.setattr(export_job, "rewrite", broken_rewrite)
    assert main(["--weights", str(models.demo_checkpoint("sta")), "--out", str(tmp_path)]) == 4
    report = _report(tmp_path)
    assert report["exit_code"] == 4 and not report["parity"]["onnxruntime"]["pass"]
    assert report["localization"]["first_divergent_block"] == "model.10"
    assert (tmp_path / "report.md").exists() and Path(report["onnx"]).exists()


def test_build_unavailable_exits_3(tmp_path, monkeypatch, capsys):
    import export.engine.build as build

    def unavailable():
        raise build.BuildUnavailable("building an engine needs TensorRT: install it")

    monkeypatch.setattr(build, "backend", unavailable)
    assert main(["--weights", str(models.demo_checkpoint("sta")), "--out", str(tmp_path), "--engine", "fp16",
                 "--no-parity"]) == 3
    assert "install" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RTX, reason="TensorRT for RTX not installed (pip install '.[rtx]')")
@pytest.mark.parametrize("family", models.FAMILIES)
def test_dynamic_engine_builds(family, tmp_path):
    """Dynamic batch/H/W through TensorRT's shape analysis: the whole model, not one block."""
    args = ["--weights", str(models.demo_checkpoint(family)), "--out", str(tmp_path), "--dynamic", "--engine", "fp16",
            "--no-parity"]
    assert main(args) == 0
    report = _report(tmp_path)
    assert report["engine_build"]["profile"]["max"][0] == 8 and Path(report["engine"]).stat().st_size > 0


def test_console_script_ignores_a_yolov5_checkout_in_the_working_directory(tmp_path):
    """Inside a YOLOv5 checkout, `python -m export` would import its export.py and models/; the installed
    console script must run our exporter whatever the working directory holds."""
    script = Path(sys.executable).with_name("yolo-attn-export")
    assert script.exists(), "the package install should create the yolo-attn-export console script"
    marker = tmp_path / "their_code_ran"
    (tmp_path / "export.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    proc = subprocess.run([str(script), "--weights", "missing.pt", "--no-parity"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no such file" in proc.stderr and not marker.exists()


def test_a_model_that_fails_its_first_forward_is_bad_input(tmp_path, capsys):
    """Legal values that still break the model (Detect reads a saved layer of the wrong width): exit 2, one line,
    nothing written, before any of our code runs on the model."""
    import torch

    ckpt = torch.load(models.demo_checkpoint("sta"), weights_only=False)  # our own demo file: trusted
    ckpt["model"].model[-1].f = [16, 19, 16]
    weights = tmp_path / "wrong_input.pt"
    torch.save(ckpt, weights)
    assert main(["--weights", str(weights), "--out", str(tmp_path / "out"), "--no-parity"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fails on a 256x256 image (RuntimeError" in err
    assert not (tmp_path / "out").exists()


def test_an_unexpected_failure_is_one_line_and_exit_3(tmp_path, monkeypatch, capsys):
    from export.pipeline import export_job

    def broken(*args):
        raise ValueError("something of ours broke\nsecond line")

    monkeypatch.setattr(export_job, "lint_files", broken)
    assert main(["--weights", str(models.demo_checkpoint("sta")), "--out", str(tmp_path), "--no-parity"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ValueError: something of ours broke" in err and "-v" in err
    assert "Traceback" not in err
    assert main(["--weights", str(models.demo_checkpoint("sta")), "--out", str(tmp_path), "--no-parity", "-v"]) == 3
    assert "Traceback" in capsys.readouterr().err
