"""Families are matched by structure, not by name: a block named like a family class but built differently never
reaches a twin (one-line refusal without --code, exported as written with it); real family blocks all match."""

import json

import pytest

import models
from export.checkpoint import load
from export.cli import main
from tests import paper_blocks, user_blocks


@pytest.fixture(scope="module")
def lookalikes(tmp_path_factory):
    root = user_blocks.write_fork(tmp_path_factory.mktemp("look"), sources=paper_blocks.LOOKALIKES)
    return root, user_blocks.save_checkpoint(root, root.parent / "look.pt", placement=paper_blocks.LOOKALIKE_PLACEMENT)


@pytest.mark.parametrize("weights", [models.demo_checkpoint(f) for f in models.FAMILIES]
                         + [models.DEMO_DIR / "yolov5s-s2.pt"], ids=lambda p: p.stem)
def test_every_family_block_of_the_demos_has_the_twins_structure(weights):
    loaded = load(weights)
    family = [m for m in loaded.model.modules() if models.family_of(m) is not None]
    assert family and all(models.structure_differences(m) == [] for m in family)


def test_lookalikes_are_refused_in_one_line_naming_what_differs(lookalikes, capsys, tmp_path):
    _, ckpt = lookalikes
    assert main(["--weights", str(ckpt), "--out", str(tmp_path / "out"), "--no-parity"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--code <your fork's root folder>" in err and "Traceback" not in err
    for says in ("MLLAcore.MLLAttention at layer 12 is named like our MLLAttention", "no cpe1",
                 "FLAlite.FocusedLinearAttention at layer 15", "no dwc", "STAlite.StokenAttention at layer 18",
                 "no stoken_refine", "S2lite.S2Attention at layer 21", "no split_attention"):
        assert says in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_with_code_lookalikes_are_exported_as_written_and_match(lookalikes, tmp_path):
    root, ckpt = lookalikes
    out = tmp_path / "out"
    assert main(["--weights", str(ckpt), "--code", str(root), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["modules"] == []  # no twin was used
    assert set(report["user_blocks"]) == {"model.12.1", "model.15.1", "model.18.1", "model.21.1"}
    assert all("built differently" in b["export"] for b in report["user_blocks"].values())
    assert report["parity"]["onnxruntime"]["pass"] and report["block_check"]["pass"]
