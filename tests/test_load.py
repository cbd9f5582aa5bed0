"""Loading any best.pt: fork-trained (fresh process, no fork), stock, hostile, unknown blocks, bad inputs."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from ultralytics import YOLO

import export
from export.checkpoint.loader import CheckpointError, UnknownBlocksError

REPO = Path(__file__).resolve().parents[1]

FORKS = {  # family: (fork module path, which of model/ema hold the weights)
    "fla": ("ultralytics.nn.Addmodules", "ema"),  # a last.pt mid-training: model None, ema set
    "mlla": ("ultralytics.nn.extra_modules.attention.mlla", "model"),  # a stripped best.pt
    "sta": ("ultralytics.nn.AddModules.STA", "model+ema"),
    "s2": ("ultralytics.nn.modules.block", "model"),  # the fork edited ultralytics' own block.py
}


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "tests.fork_tools", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("family", FORKS)
def test_fork_checkpoint_loads_without_the_fork(family, tmp_path):
    fork_module, layout = FORKS[family]
    _run("build", family, fork_module, layout, str(tmp_path))
    before = hashlib.sha256((tmp_path / "fork.pt").read_bytes()).hexdigest()
    result = json.loads(_run("load", str(tmp_path)).strip().splitlines()[-1])
    assert result["rel"] <= 1e-4  # the twin vs the fork model's own output, computed before saving
    assert result["seed_code_imported"] == []
    assert result["remapped"] and all(k.startswith(fork_module + ".") for k in result["remapped"])
    assert all(v.startswith("models.") for v in result["remapped"].values())
    assert result["source"] == ("ema" if "ema" in layout else "model") and result["saved_half"]
    assert result["names"] == {"0": "thing", "1": "other"} and result["imgsz"] in (320, 640)
    assert result["checks"] and all(c["rel"] <= 1e-5 for c in result["checks"])
    if family == "s2":
        assert "seed's in-place shift" in result["checks"][0]["note"]
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "export", "--weights", str(tmp_path / "fork.pt"), "--imgsz", "320",
                           "--out", str(out), "--no-parity"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"]["remapped"] == result["remapped"] and report["lint"] == []
    assert hashlib.sha256((tmp_path / "fork.pt").read_bytes()).hexdigest() == before


def _save_like_ultralytics(model, path, **extra):
    ckpt = {"epoch": -1, "model": model.half(), "ema": None, "optimizer": None,
            "train_args": {"imgsz": 320}, "version": "8.4.190", **extra}
    torch.save(ckpt, path)
    return path


def test_stock_checkpoint(tmp_path):
    path = _save_like_ultralytics(YOLO("yolov8n.yaml").model, tmp_path / "stock.pt")
    loaded = export.load(path)
    assert loaded.remapped == {} and loaded.nc == 80 and loaded.stride == [8, 16, 32]
    assert loaded.task == "detect" and loaded.imgsz == 320 and loaded.source == "model"
    assert next(loaded.model.parameters()).dtype == torch.float32 and not loaded.model.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules())  # fused
    twin, checks = export.rewrite(loaded.model, 320)
    assert checks == []


def test_demo_checkpoint_loads_through_the_safe_path():
    loaded = export.load(REPO / "models" / "demo" / "yolov8n-sta.pt")
    assert loaded.names == {0: "circle", 1: "square", 2: "triangle"}
    twin, checks = export.rewrite(loaded.model, (256, 320))
    assert len(checks) == 1 and checks[0].rel <= 1e-5


# ---- hostile pickles: refused, naming the global; the payload never runs ------------------------
class _Payload:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func,name", [(os.system, "system"), (eval, "builtins.eval"), (exec, "builtins.exec"),
                                       (subprocess.getoutput, "subprocess.getoutput")])
def test_hostile_pickle_refused_and_not_run(func, name, tmp_path):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if func in (os.system, subprocess.getoutput) else f"open({str(marker)!r}, 'w')"
    path = tmp_path / "evil.pt"
    torch.save({"model": YOLO("yolov8n.yaml").model.half(), "extra": _Payload(func, arg)}, path)
    with pytest.raises(CheckpointError, match=name) as err:
        export.load(path)
    assert "refused" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_hostile_payload_inside_the_model_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    model = YOLO("yolov8n.yaml").model
    model.model[3].hook = _Payload(os.system, f"touch {marker}")
    path = _save_like_ultralytics(model, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="system"):
        export.load(path)
    assert not marker.exists()


def test_hostile_legacy_format_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    torch.save({"ema": _Payload(os.system, f"touch {marker}")}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy pickle .* re-save"):
        export.load(path)
    assert not marker.exists()


# ---- an unknown custom block: listed with its module path and layer index -------------------------
class CBAM(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = torch.nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x))


def test_unknown_block_lists_class_path_and_layer(tmp_path, monkeypatch):
    model = YOLO("yolov8n.yaml").model
    CBAM.__module__, CBAM.__qualname__ = "ultralytics.nn.Addmodules.CBAM", "CBAM"
    monkeypatch.setitem(sys.modules, "ultralytics.nn.Addmodules.CBAM", type(sys)("ultralytics.nn.Addmodules.CBAM"))
    sys.modules["ultralytics.nn.Addmodules.CBAM"].CBAM = CBAM
    block = CBAM(256)
    block.i, block.f, block.type = 9, -1, "CBAM"
    model.model[9] = block
    path = _save_like_ultralytics(model, tmp_path / "cbam.pt")
    monkeypatch.delitem(sys.modules, "ultralytics.nn.Addmodules.CBAM")
    with pytest.raises(UnknownBlocksError) as err:
        export.load(path)
    assert err.value.blocks == {"ultralytics.nn.Addmodules.CBAM.CBAM": [9]}
    assert "layer 9" in str(err.value) and "models/<family>.py" in str(err.value)


# ---- bad inputs: one line, exit code 2 from the CLI, the file untouched -----------------------------
def _bad_inputs(tmp_path):
    good = _save_like_ultralytics(YOLO("yolov8n.yaml").model, tmp_path / "good.pt")
    data = good.read_bytes()
    script = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(script, str(tmp_path / "scripted.pt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"epoch": 3, "optimizer": None}, tmp_path / "nomodel.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")
    (tmp_path / "model.engine").write_bytes(b"ftrt" + bytes(64))
    (tmp_path / "adir").mkdir()
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as z:
        z.writestr("hello.txt", "hi")
    return {
        "missing": (tmp_path / "nope.pt", "no such file"),
        "directory": (tmp_path / "adir", "is a directory"),
        "empty": (tmp_path / "empty.pt", "empty"),
        "truncated": (tmp_path / "truncated.pt", "truncated"),
        "not a pickle": (tmp_path / "text.pt", "not a PyTorch checkpoint"),
        "tensor pickle": (tmp_path / "tensor.pt", "not an ultralytics checkpoint"),
        "dict without model": (tmp_path / "nomodel.pt", "without a model"),
        "torchscript": (tmp_path / "scripted.pt", "TorchScript"),
        "onnx": (tmp_path / "model.onnx", "ONNX"),
        "engine": (tmp_path / "model.engine", "TensorRT engine"),
        "other zip": (tmp_path / "other.pt", "not a PyTorch checkpoint"),
    }


def test_bad_inputs_give_one_line_errors(tmp_path):
    for case, (path, phrase) in _bad_inputs(tmp_path).items():
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(CheckpointError) as err:
            export.load(path)
        assert phrase in str(err.value), f"{case}: {err.value}"
        assert "\n" not in str(err.value) and err.value.exit_code == 2
        assert (path.read_bytes() if path.is_file() else None) == before


@pytest.mark.parametrize("case", ["missing", "truncated", "torchscript", "onnx"])
def test_cli_bad_input_exit_code_2_without_traceback(case, tmp_path):
    path, phrase = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "export", "--weights", str(path), "--out", str(out), "--no-parity"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and phrase in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("raised", [SystemExit(2), KeyboardInterrupt()])
def test_exit_raised_inside_loading_is_a_refusal_not_a_silent_exit(raised, monkeypatch):
    def unpickle(*args):
        raise raised

    monkeypatch.setattr(sys.modules["export.checkpoint.loader"], "unpickle", unpickle)  # export.load is also the function
    with pytest.raises(CheckpointError, match=type(raised).__name__) as err:
        export.load(REPO / "models" / "demo" / "yolov8n-sta.pt")
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
