"""Every family YAML builds at n/s/m/l/x with the right channels, runs, exports-twins cleanly and trains."""

import importlib.util
from pathlib import Path

import pytest
import torch
from ultralytics import YOLO

import models
from models import fla, mlla, s2, sta

REPO = Path(__file__).resolve().parents[1]
SCALES = "nsmlx"
FAMILY_BLOCK = {"fla": fla.C2f_FLA, "mlla": mlla.MLLAttention, "sta": sta.StokenAttention, "s2": s2.S2Attention}


# Where each family's block sits, as the stock yolov8 layer whose channels it must take at every scale.
STOCK_SOURCE = {"mlla": 9, "sta": 9, "s2": 21}  # SPPF on P5; the P5 head C2f


def _conv_channels(m):
    """(c1, c2) of a stock C2f or SPPF layer."""
    return m.cv1.conv.in_channels, m.cv2.conv.out_channels


def _block_channels(block):
    if isinstance(block, fla.C2f_FLA):
        return block.cv1.conv.in_channels, block.cv2.conv.out_channels
    if isinstance(block, mlla.MLLAttention):
        return block.dim, block.dim
    if isinstance(block, sta.StokenAttention):
        return block.stoken_refine.qkv.in_channels, block.stoken_refine.proj.out_channels
    return block.mlp1.in_features, block.mlp2.out_features


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("family", FAMILY_BLOCK)
def test_yaml_builds_at_every_scale(family, scale):
    model = YOLO(str(models.CFG_DIR / f"yolov8{scale}-{family}.yaml")).model.eval()
    stock = YOLO(f"yolov8{scale}.yaml").model.model
    blocks = [m for m in model.model if isinstance(m, FAMILY_BLOCK[family])]
    assert blocks, f"no {FAMILY_BLOCK[family].__name__} in yolov8{scale}-{family}"
    for block in blocks:
        if family == "fla":  # C2f_FLA replaces the neck C2f at the same index: same c1 and c2
            expected = _conv_channels(stock[block.i])
        else:  # channel-preserving block after a stock layer: c = that layer's output
            c = _conv_channels(stock[STOCK_SOURCE[family]])[1]
            expected = (c, c)
        assert _block_channels(block) == expected, f"layer {block.i}"
    square, rect = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 96)  # the seed FLA is square-only; twins are not
    with torch.no_grad():
        out = model(square)[0]
        twin = models.to_export(model)
        assert torch.allclose(twin(square)[0], out, rtol=1e-4, atol=1e-3)
        assert twin(rect)[0].shape == (1, 4 + 80, 8 * 12 + 4 * 6 + 2 * 3)


def test_params_grow_with_scale():
    counts = [sum(p.numel() for p in YOLO(str(models.CFG_DIR / f"yolov8{s}-sta.yaml")).model.parameters())
              for s in SCALES]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


def _make_demo_module():
    spec = importlib.util.spec_from_file_location("make_demo", REPO / "tools" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return _make_demo_module().make_dataset(tmp_path_factory.mktemp("data"), n_train=8, n_val=4, size=96)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_BLOCK)
def test_one_epoch_training_smoke(family, tiny_dataset, tmp_path):
    model = YOLO(str(models.CFG_DIR / f"yolov8n-{family}.yaml"))
    model.train(data=str(tiny_dataset), epochs=1, imgsz=64, batch=4, workers=0, device="cpu", project=str(tmp_path),
                name="run", plots=False, amp=False, verbose=False, val=False)
    trained = YOLO(str(Path(model.trainer.last)))
    assert any(isinstance(m, FAMILY_BLOCK[family]) for m in trained.model.modules())
    results = trained.predict(str(Path(tiny_dataset).parent / "images" / "val"), imgsz=64, device="cpu", verbose=False)
    assert len(results) == 4
