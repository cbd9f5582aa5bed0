"""The shipped demo checkpoints: present, small, carrying their family, twin-exact, and as the README says."""

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox

import models
from tests.cases import rel_err
from tests.test_yaml import FAMILY_BLOCK

REPO = Path(__file__).resolve().parents[1]
SAMPLES = sorted((models.DEMO_DIR / "images").glob("*.jpg"))
METRICS = json.loads((models.DEMO_DIR / "metrics.json").read_text())


@pytest.mark.parametrize("family", models.FAMILIES)
def test_demo_checkpoint_shipped(family):
    path = models.demo_checkpoint(family)
    assert family in path.name and path.is_file()
    assert path.stat().st_size <= 10 * 2 ** 20
    # Our own file, so plain torch.load; loading untrusted checkpoints is the loader's job.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["model"] is not None and next(ckpt["model"].parameters()).dtype == torch.float16
    assert any(isinstance(m, FAMILY_BLOCK[family]) for m in ckpt["model"].modules())


@pytest.mark.parametrize("family", models.FAMILIES)
def test_demo_twin_matches_reference_on_sample_images(family):
    model = YOLO(str(models.demo_checkpoint(family))).model.float().fuse().eval()
    twin = models.to_export(model)
    imgs = [LetterBox((256, 256), auto=False)(image=cv2.imread(str(p))) for p in SAMPLES]
    x = torch.from_numpy(np.stack(imgs)[..., ::-1].transpose(0, 3, 1, 2).copy()).float() / 255
    with torch.no_grad():
        expected, got = model(x)[0], twin(x)[0]
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("family", models.FAMILIES)
def test_demo_detects_on_samples(family):
    results = YOLO(str(models.demo_checkpoint(family))).predict([str(p) for p in SAMPLES], imgsz=256,
                                                                 device="cpu", verbose=False)
    assert sum(len(r.boxes) for r in results) > 0


def test_readme_reports_measured_map():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Demo checkpoints")[1].split("\n## ")[0]  # other tables name the demos too
    for family, row in METRICS.items():
        line = next((ln for ln in section.splitlines() if re.search(rf"\|\s*{family}\s*\|", ln)), "")
        assert f"{row['mAP50']:.3f}" in line, f"README mAP50 for {family} differs from metrics.json"
