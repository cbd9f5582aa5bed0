"""No false refusals: checkpoints that real training runs and ordinary torch.save calls produce must load.

The loader allowlists what a pickle may reconstruct; every value below is something a legitimate
checkpoint carries (ultralytics' own metrics, user callbacks stashing numpy / stdlib / torch objects).
Each test also asserts the pickle really contains the global it is meant to exercise, so a change
in how torch pickles a value cannot silently turn a test into a no-op.
"""

import argparse
import collections
import json
import pathlib
import pickletools
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ultralytics.nn.tasks import DetectionModel

import export

REPO = Path(__file__).resolve().parents[1]
NAMES = {0: "cat", 1: "dog", 2: "bird"}
DEMO_NAMES = {0: "circle", 1: "square", 2: "triangle"}
IMGSZ = 64


# ---- helpers ----------------------------------------------------------------------------------------
def pickle_globals(path):
    """The "module name" globals the checkpoint's data.pkl refers to (torch.save's protocol 2: GLOBAL only)."""
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"}


def stock_model(nc=3):
    model = DetectionModel("yolov8n.yaml", nc=nc, verbose=False)
    model.names = dict(NAMES) if nc == 3 else {i: str(i) for i in range(nc)}
    return model


def save_like_ultralytics(path, half=True, **extra):
    """A stripped best.pt as ultralytics 8.x writes it (strip_optimizer), plus any extra entries."""
    model = stock_model()
    ckpt = {"epoch": -1, "model": model.half() if half else model, "ema": None, "optimizer": None,
            "train_args": {"imgsz": IMGSZ, "batch": 4, "data": "data.yaml"}, "version": "8.4.190", **extra}
    torch.save(ckpt, path)
    return path


def assert_runs(loaded):
    """fp32, eval mode, and a forward on a 64x64 image gives finite detections of the right shape."""
    assert next(loaded.model.parameters()).dtype == torch.float32 and not loaded.model.training
    with torch.no_grad():
        out = loaded.model(torch.zeros(1, 3, IMGSZ, IMGSZ))
    pred = out[0] if isinstance(out, (list, tuple)) else out
    anchors = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
    assert pred.shape == (1, 4 + loaded.nc, anchors)
    assert torch.isfinite(pred).all()


def run_cli(weights, out):
    return subprocess.run([sys.executable, "-m", "export", "--weights", str(weights), "--out", str(out),
                           "--no-parity", "--imgsz", str(IMGSZ)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def assert_cli_exports(weights, out, source, names):
    proc = run_cli(weights, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["exit_code"] == 0 and (out / Path(report["onnx"]).name).is_file()
    assert report["checkpoint"]["source"] == source
    assert report["checkpoint"]["names"] == {str(k): v for k, v in names.items()}


# ---- numpy values (torch.save's protocol 2 pickles their bytes via _codecs.encode) ------------------
def numpy_extras():
    return {"best_fitness": np.float64(0.5), "updates": np.int64(12), "lr": np.float32(0.01),
            "train_metrics": {"metrics/mAP50(B)": np.float64(0.25), "fitness": np.float32(0.1)},
            "anchors": np.arange(6, dtype=np.float32).reshape(2, 3), "indices": np.arange(5, dtype=np.int64),
            "blob": b"\x00\x01\xfe\xff raw bytes", "empty": b""}


@pytest.fixture
def numpy_checkpoint(tmp_path):
    return save_like_ultralytics(tmp_path / "numpy.pt", **numpy_extras())


def test_numpy_scalars_arrays_and_bytes_load(numpy_checkpoint):
    globals_ = pickle_globals(numpy_checkpoint)
    assert "_codecs encode" in globals_ and any(g.endswith(" scalar") for g in globals_)  # the premise
    loaded = export.load(numpy_checkpoint)
    assert loaded.names == NAMES and loaded.nc == 3 and loaded.imgsz == IMGSZ
    assert_runs(loaded)


def test_numpy_checkpoint_exports_via_cli(numpy_checkpoint, tmp_path):
    assert_cli_exports(numpy_checkpoint, tmp_path / "out", "model", NAMES)


# ---- stdlib and torch values a checkpoint may carry ---------------------------------------------------
def tensor_with_attribute():
    t = torch.arange(4.0)
    t.foo = 1  # a Python attribute makes torch pickle via _rebuild_from_type_v2
    return t


def parameter_with_attribute():
    p = torch.nn.Parameter(torch.ones(3))
    p.tag = "head"  # a Python attribute makes torch pickle via _rebuild_parameter_with_state
    return p


# name: (value factory, the global(s) its pickle must contain, any one of them)
EXTRA_VALUES = {
    "Counter": (lambda: collections.Counter("aabbbc"), {"collections Counter"}),
    "set": (lambda: {1, 2, 3}, {"__builtin__ set", "builtins set"}),
    "frozenset": (lambda: frozenset({"a", "b"}), {"__builtin__ frozenset", "builtins frozenset"}),
    "OrderedDict": (lambda: collections.OrderedDict(a=1, b=2), {"collections OrderedDict"}),
    "SimpleNamespace": (lambda: types.SimpleNamespace(lr=0.01, epochs=3), {"types SimpleNamespace"}),
    "argparse.Namespace": (lambda: argparse.Namespace(weights="x.pt", imgsz=64), {"argparse Namespace"}),
    "Path": (lambda: pathlib.Path("/data/runs/train"), {"pathlib PosixPath", "pathlib WindowsPath"}),
    "torch.Size": (lambda: torch.Size([1, 3, 64, 64]), {"torch Size"}),
    "torch.device": (lambda: torch.device("cpu"), {"torch device"}),
    "dtype": (lambda: torch.float16, {"torch float16"}),
    "layout": (lambda: torch.strided, {"torch.serialization _get_layout", "torch strided"}),
    "qscheme per_tensor_affine": (lambda: torch.per_tensor_affine, {"torch per_tensor_affine"}),
    "qscheme per_channel_symmetric": (lambda: torch.per_channel_symmetric, {"torch per_channel_symmetric"}),
    "tensor with attribute": (tensor_with_attribute, {"torch._tensor _rebuild_from_type_v2"}),
    "parameter with attribute": (parameter_with_attribute, {"torch._utils _rebuild_parameter_with_state"}),
    # YOLOv5 keeps Detect.anchor_grid as expanded (zero-stride) views of a 6-element tensor
    "expanded anchor grid": (lambda: [torch.rand(3, 2).view(1, 3, 1, 1, 2).expand(1, 3, 80, 80, 2)],
                             {"torch._utils _rebuild_tensor_v2"}),
}


@pytest.mark.parametrize("name", EXTRA_VALUES)
def test_extra_value_loads(name, tmp_path):
    make, expected_globals = EXTRA_VALUES[name]
    path = save_like_ultralytics(tmp_path / "extra.pt", extra_value=make(), nested={"inner": [make()]})
    assert pickle_globals(path) & expected_globals, f"{name} no longer pickles via {expected_globals}"
    loaded = export.load(path)
    assert loaded.names == NAMES and loaded.source == "model"
    assert_runs(loaded)


# ---- ultralytics-style stripped checkpoints ----------------------------------------------------------
@pytest.mark.parametrize("half", [True, False], ids=["fp16", "fp32"])
def test_stripped_checkpoint_loads(half, tmp_path):
    loaded = export.load(save_like_ultralytics(tmp_path / "best.pt", half=half))
    assert loaded.saved_half is half and loaded.source == "model" and loaded.task == "detect"
    assert loaded.names == NAMES and loaded.nc == 3 and loaded.stride == [8, 16, 32] and loaded.imgsz == IMGSZ
    assert loaded.remapped == {}
    assert_runs(loaded)


# ---- a real ultralytics training run -----------------------------------------------------------------
TRAIN_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tools.make_demo import make_dataset
import models  # registers the attention layers the yaml names
from ultralytics import YOLO
data = make_dataset({root!r} + "/data", n_train=8, n_val=4, size=96)
YOLO({cfg!r}).train(data=str(data), imgsz=64, epochs=1, batch=4, workers=0, device="cpu", project={root!r},
                    name="t", exist_ok=True, plots=False, amp=False, save_period=1, verbose=False)
"""


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory):
    """weights/ of a one-epoch STA training run. A subprocess, so the trainer's global state (seeds,
    deterministic algorithms, thread counts) stays out of this test session."""
    root = tmp_path_factory.mktemp("train")
    script = TRAIN_SCRIPT.format(repo=str(REPO), root=str(root), cfg=str(REPO / "models/cfg/yolov8n-sta.yaml"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "t" / "weights"


def test_unstripped_training_checkpoint_loads(trained_weights):
    path = trained_weights / "epoch0.pt"
    raw = torch.load(path, map_location="cpu", weights_only=False)  # trusted here: we wrote it
    assert raw["model"] is None and raw["optimizer"] and raw["train_metrics"]  # the premise: really unstripped
    loaded = export.load(path)
    assert loaded.source == "ema" and loaded.saved_half
    assert loaded.names == DEMO_NAMES and loaded.nc == 3 and loaded.stride == [8, 16, 32]
    assert loaded.imgsz == 64 and loaded.task == "detect" and loaded.remapped == {}
    assert_runs(loaded)


def test_stripped_training_checkpoint_loads(trained_weights):
    loaded = export.load(trained_weights / "best.pt")
    assert loaded.source == "model" and loaded.saved_half and loaded.names == DEMO_NAMES and loaded.imgsz == 64
    assert_runs(loaded)


def test_unstripped_training_checkpoint_exports_via_cli(trained_weights, tmp_path):
    assert_cli_exports(trained_weights / "epoch0.pt", tmp_path / "out", "ema", DEMO_NAMES)


# ---- the shipped demo checkpoints --------------------------------------------------------------------
@pytest.mark.parametrize("family", ["fla", "mlla", "sta", "s2"])
def test_demo_checkpoint_loads(family):
    loaded = export.load(REPO / "models" / "demo" / f"yolov8n-{family}.pt")
    assert loaded.names == DEMO_NAMES and loaded.nc == 3 and loaded.stride == [8, 16, 32]
    assert loaded.source == "model" and loaded.saved_half and loaded.imgsz == 256
    assert_runs(loaded)


def test_ultralytics_8_0_module_paths_load(trained_weights, tmp_path):
    """ultralytics 8.0 pickled its layers from one ultralytics/nn/modules.py and its namespaces from
    ultralytics.yolo.utils; the class table reads those paths as the same classes."""
    from tests.crafted import rewrite, read_zip

    _, records = read_zip(trained_weights / "epoch0.pt")
    old = records["data.pkl"]
    for sub in ("conv", "block", "head"):
        old = old.replace(f"cultralytics.nn.modules.{sub}\n".encode(), b"cultralytics.nn.modules\n")
    old = old.replace(b"cultralytics.utils\nIterableSimpleNamespace\n", b"cultralytics.yolo.utils\nIterableSimpleNamespace\n")
    path = rewrite(trained_weights / "epoch0.pt", tmp_path / "v8.0.pt", data_pkl=old)
    assert {"ultralytics.nn.modules Conv", "ultralytics.yolo.utils IterableSimpleNamespace"} <= pickle_globals(path)
    loaded = export.load(path)
    assert loaded.source == "ema" and loaded.names == DEMO_NAMES and loaded.remapped == {}
    assert_runs(loaded)
