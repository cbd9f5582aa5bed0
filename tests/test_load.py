"""Loading any best.pt: fork-trained (fresh process, no fork), stock, hostile, unknown blocks, bad inputs."""

import copy
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
from export.cli import main
from export.checkpoint.loader import CheckpointError, LibraryClassesError, UnknownBlocksError

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


# ---- torch's own layers: reconstructed from the table, no --code ---------------------------------
def _stock_layers(c=256, side=4):
    """After yolov8n's SPPF at imgsz 128 (c x 4 x 4): a 3x3 depthwise aggregation written with Unfold, then a new
    norm, padding, pooling and activation; 4-d in, 4-d out."""
    return torch.nn.Sequential(torch.nn.ReflectionPad2d(1), torch.nn.Unfold(3), torch.nn.Unflatten(2, (side, side)),
                               torch.nn.Conv2d(9 * c, c, 1, groups=c), torch.nn.InstanceNorm2d(c, affine=True),
                               torch.nn.ReplicationPad2d(1), torch.nn.LPPool2d(2, 3, stride=1), torch.nn.CELU())


def test_checkpoint_of_stock_torch_layers_loads_without_code_and_keeps_its_output(tmp_path):
    model = YOLO("yolov8n.yaml").model
    layer = torch.nn.Sequential(model.model[9], _stock_layers())
    layer.i, layer.f, layer.type, layer.np = 9, -1, "torch.nn.Sequential", 0  # as ultralytics tags a layer
    model.model[9] = layer
    model.attention = torch.nn.MultiheadAttention(64, 4, kdim=32, vdim=32, batch_first=True)  # held, not in forward
    path = _save_like_ultralytics(model, tmp_path / "stock-layers.pt")
    saved = copy.deepcopy(model).float().eval()  # the saved (half) weights, as the loader casts them
    loaded = export.load(path)
    assert loaded.remapped == {} and loaded.user_code == {}
    assert [type(m).__name__ for m in loaded.model.model[9][1]] == [type(m).__name__ for m in _stock_layers(8, 2)]
    assert type(loaded.model.attention.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
    x, q, kv = torch.rand(1, 3, 128, 128), torch.rand(1, 5, 64), torch.rand(1, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)[0], saved(x)[0])
        torch.testing.assert_close(loaded.model.attention(q, kv, kv)[0], saved.attention(q, kv, kv)[0])


def _with_lstm(model, index=9):
    """A torch layer the loader deliberately does not reconstruct, inside layer `index`."""
    model.model[index].lstm = torch.nn.LSTM(4, 4)
    return model


def test_library_class_outside_the_table_is_refused_as_such_not_as_a_custom_block(tmp_path, capsys):
    path = _save_like_ultralytics(_with_lstm(YOLO("yolov8n.yaml").model), tmp_path / "lstm.pt")
    with pytest.raises(LibraryClassesError) as err:
        export.load(path)
    assert err.value.classes == {"torch.nn.modules.rnn.LSTM": [9]} and err.value.blocks == {}
    assert str(err.value) == ("torch.nn.modules.rnn.LSTM at layer 9 is a library class the loader does not reconstruct "
                              "(its table of stock layers is in docs/checkpoints.md); library classes cannot come "
                              "from --code")
    fork = tmp_path / "fork"  # even a folder holding a file for its module path: --code never supplies torch's classes
    (fork / "torch" / "nn" / "modules").mkdir(parents=True)
    source = f"open({str(tmp_path / 'ran')!r}, 'w')\nclass LSTM: pass\n"
    (fork / "torch" / "nn" / "modules" / "rnn.py").write_text(source)
    for code in ([], ["--code", str(fork)]):
        assert main(["--weights", str(path), "--out", str(tmp_path / "out"), "--no-parity", *code]) == 2
        err_text = capsys.readouterr().err
        assert err_text.count("\n") == 1 and "torch.nn.modules.rnn.LSTM at layer 9 is a library class" in err_text
        assert "unknown custom block" not in err_text and "pass --code" not in err_text
        assert "--code: module" not in err_text and not (tmp_path / "out").exists()  # not --code's own refusal
    assert not (tmp_path / "ran").exists()


def test_library_class_and_custom_block_are_each_named_as_what_they_are(tmp_path, monkeypatch):
    model = _with_lstm(YOLO("yolov8n.yaml").model, index=4)
    model.model[9] = _cbam_block(monkeypatch)
    path = _save_like_ultralytics(model, tmp_path / "mixed.pt")
    monkeypatch.delitem(sys.modules, "ultralytics.nn.Addmodules.CBAM")
    with pytest.raises(LibraryClassesError) as err:
        export.load(path)
    assert err.value.classes == {"torch.nn.modules.rnn.LSTM": [4]}
    assert err.value.blocks == {"ultralytics.nn.Addmodules.CBAM.CBAM": [9]}
    message = str(err.value)
    assert message.startswith("torch.nn.modules.rnn.LSTM at layer 4 is a library class")
    custom = "unknown custom block(s): ultralytics.nn.Addmodules.CBAM.CBAM at layer 9, which --code could supply"
    assert custom in message
    assert "\n" not in message


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


def _cbam_block(monkeypatch):
    """A CBAM for layer 9, pickled under a fork's module path (remove that module from sys.modules once saved)."""
    CBAM.__module__, CBAM.__qualname__ = "ultralytics.nn.Addmodules.CBAM", "CBAM"
    monkeypatch.setitem(sys.modules, "ultralytics.nn.Addmodules.CBAM", type(sys)("ultralytics.nn.Addmodules.CBAM"))
    sys.modules["ultralytics.nn.Addmodules.CBAM"].CBAM = CBAM
    block = CBAM(256)
    block.i, block.f, block.type = 9, -1, "CBAM"
    return block


def test_unknown_block_lists_class_path_and_layer(tmp_path, monkeypatch):
    model = YOLO("yolov8n.yaml").model
    model.model[9] = _cbam_block(monkeypatch)
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
