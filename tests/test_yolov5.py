"""YOLOv5-repository checkpoints end to end: loading without YOLOv5's code, the v5 ONNX layout, parity.

The demo `models/demo/yolov5s-s2.pt` was trained by YOLOv5's own train.py (tools/make_demo_v5.py) and
pickles `models.yolo.*` / `models.common.*` classes, S2Attention from the tutorial (seed 004) among them.
`tests/data/yolov5s-s2-expected.pt` is YOLOv5's own export-mode output of that checkpoint on a seeded
input, computed by YOLOv5's code (the `yolov5` package) when the demo was made, with the seed's in-place S2
shift replaced by the clean shift (this project's definition; tools/make_demo_v5.py `write_expected`); YOLOv5
is not installed here.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export
from export.cli import main
from export.checkpoint.loader import CheckpointError, read
from tests.crafted import call, glob, pickle_of, read_zip, write_zip

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo" / "yolov5s-s2.pt"
EXPECTED = REPO / "tests" / "data" / "yolov5s-s2-expected.pt"
NAMES = {0: "circle", 1: "square", 2: "triangle"}
HAS_RTX = __import__("importlib").util.find_spec("tensorrt_rtx") is not None


def _expected():
    e = torch.load(EXPECTED, weights_only=True)
    x = torch.rand(1, 3, e["imgsz"], e["imgsz"], generator=torch.Generator().manual_seed(e["seed"]))
    assert abs(float(x.sum()) - e["x_sum"]) < 1e-3  # the same input YOLOv5 saw
    return x, e["y"]


def _rel(got, expected):
    return float((torch.as_tensor(got) - expected).abs().max() / expected.abs().max())


def _export_mode(model):
    for m in model.modules():
        if hasattr(m, "export") and hasattr(m, "anchors"):
            m.export = True
    return model


def test_loads_in_a_fresh_process_without_yolov5_code():
    script = ("import json, sys, export; l = export.load(sys.argv[1]); "
              "print(json.dumps({'kind': l.kind, 'names': l.names, 'stride': l.stride, 'imgsz': l.imgsz, "
              "'remapped': l.remapped, 'theirs': sorted(m for m in sys.modules if m.split('.')[0] == 'yolov5' "
              "or m in ('models.yolo', 'models.common', 'models.experimental'))}))")
    proc = subprocess.run([sys.executable, "-c", script, str(DEMO)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["kind"] == "yolov5" and got["names"] == {str(k): v for k, v in NAMES.items()}
    assert got["stride"] == [8, 16, 32] and got["imgsz"] == 256 and got["theirs"] == []
    remapped = got["remapped"]
    assert remapped["models.yolo.DetectionModel"] == "models.yolov5.DetectionModel"
    assert remapped["models.yolo.Detect"] == "models.yolov5.Detect"
    assert remapped["models.common.S2Attention"] == "models.s2.S2Attention"
    assert remapped["models.common.C3"] == "ultralytics.nn.modules.block.C3"
    assert all(k.startswith(("models.yolo.", "models.common.")) for k in remapped)


def test_loaded_model_computes_what_yolov5_computes_with_the_clean_shift():
    x, expected = _expected()
    model = _export_mode(export.load(DEMO).model)
    with torch.no_grad():
        got = model(x)[0]
    assert got.shape == expected.shape and _rel(got, expected) <= 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("v5")
    code = main(["--weights", str(DEMO), "--imgsz", "320", "--out", str(out)])
    return code, out


def test_export_layout_metadata_and_parity(exported):
    code, out = exported
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"]["kind"] == "yolov5" and report["lint"] == []
    assert "- Checkpoint: YOLOv5 checkpoint" in (out / "report.md").read_text()
    assert report["parity"]["onnxruntime"]["pass"] and report["parity"]["torch"]["pass"]
    proto = onnx.load(str(out / "yolov5s-s2.onnx"))
    dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, 3 * (40 * 40 + 20 * 20 + 10 * 10), 5 + 3]  # (B, na*cells, 5+nc) like YOLOv5's export
    meta = {p.key: p.value for p in proto.metadata_props}
    assert int(meta["stride"]) == 32 and eval(meta["names"]) == NAMES  # what DetectMultiBackend reads, its way


def test_standalone_parity_on_yolov5_files(exported, capsys):
    _, out = exported
    assert main(["parity", "--weights", str(DEMO), "--onnx", str(out / "yolov5s-s2.onnx")]) == 0
    assert json.loads(capsys.readouterr().out)["onnxruntime"]["pass"]


def test_onnx_computes_what_yolov5_computes_with_the_clean_shift(exported):
    _, out = exported
    x, expected = _expected()
    session = ort.InferenceSession(str(out / "yolov5s-s2.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    assert _rel(got, expected) <= 1e-4


def test_fp16_onnx_passes_parity(tmp_path):
    assert main(["--weights", str(DEMO), "--imgsz", "320", "--half", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["precision"] == "fp16" and report["parity"]["onnxruntime"]["pass"]


def test_dynamic_onnx_builds_its_grids_from_the_input_size(tmp_path):
    assert main(["--weights", str(DEMO), "--imgsz", "320", "--dynamic", "--batch", "2", "--no-parity",
                 "--out", str(tmp_path)]) == 0
    session = ort.InferenceSession(str(tmp_path / "yolov5s-s2.onnx"), providers=["CPUExecutionProvider"])
    model = _export_mode(export.load(DEMO).model)
    for h, w in ((256, 256), (320, 448)):
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h + w))
        with torch.no_grad():
            expected = model(x)[0]
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (2, 3 * (h * w // 64 + h * w // 256 + h * w // 1024), 8)
        assert _rel(got, expected) <= 1e-4, (h, w)


@pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx is not installed")
def test_fp16_engine_builds(tmp_path):
    assert main(["--weights", str(DEMO), "--imgsz", "320", "--engine", "fp16", "--no-parity",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "yolov5s-s2_fp16.engine").stat().st_size > 0


def _as_yolov5_paths(src, dst, renames):
    """A copy of a torch.save zip whose pickle names its classes under YOLOv5's module paths."""
    top, records = read_zip(src)
    pkl = records["data.pkl"]
    for ours, theirs in renames.items():
        (module, name), v5_module = ours.rsplit(".", 1), theirs.rsplit(".", 1)[0]
        pkl = pkl.replace(f"c{module}\n{name}\n".encode(), f"c{v5_module}\n{name}\n".encode())
    records["data.pkl"] = pkl
    return write_zip(dst, top, records)


def _yolov5_renames(extra=()):
    """Our class path -> YOLOv5's, for every class the demo pickles (read off the loader's remap list)."""
    renames = {ours: theirs for theirs, ours in export.load(DEMO).remapped.items()}
    renames.update(extra)
    return renames


def test_unstripped_last_pt_layout_loads(tmp_path):
    """train.py's last.pt mid-training: model and ema in half, optimizer state, numpy best_fitness, opt."""
    model = read(DEMO)[0]["model"].float()
    model.names = list(NAMES.values())  # older releases keep names as a list
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937, nesterov=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # momentum buffers: the optimizer state an unstripped checkpoint carries
    ckpt = {"epoch": 3, "best_fitness": np.float64(0.25), "model": copy.deepcopy(model).half(),
            "ema": copy.deepcopy(model).half(), "updates": 45, "optimizer": optimizer.state_dict(),
            "opt": {"imgsz": 256, "img_size": [256, 256], "weights": "", "hyp": {"lr0": 0.01}},
            "date": "2026-11-21T00:00:00"}
    torch.save(ckpt, tmp_path / "ours.pt")
    path = _as_yolov5_paths(tmp_path / "ours.pt", tmp_path / "last.pt", _yolov5_renames())
    loaded = export.load(path)
    assert loaded.kind == "yolov5" and loaded.source == "ema" and loaded.saved_half and loaded.imgsz == 256
    assert loaded.names == NAMES
    x, expected = _expected()
    with torch.no_grad():
        assert _rel(_export_mode(loaded.model)(x)[0], expected) <= 1e-4


def test_another_family_inside_yolov5(tmp_path):
    """STA in place of the demo's S2 block, saved under YOLOv5's paths: loads as YOLOv5 and exports exactly."""
    from models.sta import Fold, StAttention, StokenAttention, Unfold

    model = read(DEMO)[0]["model"].float()
    s2 = model.model[24]
    sta = StokenAttention(512, stoken_size=(4, 4))
    sta.i, sta.f, sta.type = s2.i, s2.f, "models.common.StokenAttention"
    model.model[24] = sta
    torch.save({"epoch": -1, "model": model.half(), "opt": {"imgsz": [320]}, "best_fitness": np.float64(0.1)},
               tmp_path / "ours.pt")
    renames = _yolov5_renames({f"models.sta.{c.__name__}": f"models.common.{c.__name__}"
                               for c in (StokenAttention, StAttention, Unfold, Fold)})
    path = _as_yolov5_paths(tmp_path / "ours.pt", tmp_path / "v5-sta.pt", renames)
    again = export.load(path)
    assert again.kind == "yolov5" and again.imgsz == 320
    assert again.remapped["models.common.StokenAttention"] == "models.sta.StokenAttention"
    assert all(k.startswith(("models.yolo.", "models.common.")) for k in again.remapped)
    out = tmp_path / "out"
    assert main(["--weights", str(path), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["onnxruntime"]["pass"] and report["modules"][0]["twin"] == "StokenAttentionExport"


def test_hostile_yolov5_pickle_is_refused(tmp_path):
    """YOLOv5 classes join the table as classes to instantiate, never as callables."""
    top, records = read_zip(DEMO)
    records["data.pkl"] = pickle_of(call(glob("models.yolo", "DetectionModel"), "cfg.yaml"))
    path = write_zip(tmp_path / "evil.pt", top, records)
    with pytest.raises(CheckpointError, match="asks to call models.yolov5.DetectionModel with arguments"):
        export.load(path)


@pytest.mark.slow
def test_ultralytics_layout_runs_in_ultralytics_yolo_with_our_detections(tmp_path):
    """--layout ultralytics: (B, 4+nc, anchors), objectness folded into the class scores; ultralytics' YOLO()
    predicts with it and finds the boxes the checkpoint's own model gives (our loader, YOLOv5's score rule)."""
    from PIL import Image
    from ultralytics import YOLO

    from export.checkpoint import kinds, load
    from export.inputs.images import read_images
    from export.verify.parity import CONF, IOU_NMS, detections
    from export.verify.runners import TorchRunner

    out = tmp_path / "out"
    assert main(["--weights", str(DEMO), "--layout", "ultralytics", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["onnxruntime"]["pass"] and report["parity"]["torch"]["pass"]
    proto = onnx.load(str(out / "yolov5s-s2.onnx"))
    assert [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == [1, 4 + 3, 3 * (32 ** 2 + 16 ** 2 + 8 ** 2)]
    assert eval({p.key: p.value for p in proto.metadata_props}["args"])["layout"] == "ultralytics"
    assert main(["parity", "--weights", str(DEMO), "--onnx", str(out / "yolov5s-s2.onnx")]) == 0  # reads the layout

    images = tmp_path / "images"  # one sample at the export size: letterboxing is the identity on both sides
    images.mkdir()
    sample = sorted((REPO / "models" / "demo" / "images").iterdir())[0]
    Image.open(sample).convert("RGB").resize((256, 256)).save(images / "sample.png")
    loaded = load(DEMO)
    expected = detections(TorchRunner(loaded.model, to_layout=kinds.YOLOV5.to_v8_layout)(
        np.asarray(read_images(images, (256, 256)))))[0][0]
    result = YOLO(str(out / "yolov5s-s2.onnx"), task="detect").predict(str(images / "sample.png"), imgsz=256,
                                                                       conf=CONF, iou=IOU_NMS, verbose=False)[0]
    got = np.concatenate([result.boxes.xyxy.numpy(), result.boxes.conf.numpy()[:, None],
                          result.boxes.cls.numpy()[:, None]], 1)
    assert len(expected) > 0 and got.shape == expected.shape
    order = np.lexsort((expected[:, 0], -expected[:, 4])), np.lexsort((got[:, 0], -got[:, 4]))
    assert np.abs(got[order[1]] - expected[order[0]]).max() < 0.05  # boxes (px), scores and classes


def test_the_ultralytics_layout_is_native_for_ultralytics_checkpoints():
    from types import SimpleNamespace

    from export.checkpoint import kinds

    assert kinds.of(SimpleNamespace(kind="ultralytics"), "ultralytics") is kinds.ULTRALYTICS
    assert kinds.of(SimpleNamespace(kind="yolov5"), "native") is kinds.YOLOV5
    assert kinds.of(SimpleNamespace(kind="yolov5"), "ultralytics").layout == "ultralytics"
