"""--code: blocks we have no family for, exported with the user's own fork source (opt-in), linted and proven by
parity; without it refused with the way forward; and it never runs anything but the named files under DIR."""

import json
import sys

import pytest
import torch

from export.cli import main
from export.checkpoint.loader import CheckpointError, UnknownBlocksError, load
from export.checkpoint.user_code import PRIVATE_ROOT
from tests import user_blocks

MARKER_SOURCE = '''
from pathlib import Path
Path({marker!r}).write_text("executed")
from torch import nn


class {name}(nn.Module):
    def forward(self, x):
        return x
'''


@pytest.fixture(scope="module")
def fork(tmp_path_factory):
    root = user_blocks.write_fork(tmp_path_factory.mktemp("fork"))
    return root, user_blocks.save_checkpoint(root, root.parent / "best.pt")


def test_without_code_the_blocks_are_refused_and_the_message_names_code(fork, capsys):
    _, ckpt = fork
    before = {name for name in sys.modules if name.startswith(PRIVATE_ROOT)}
    with pytest.raises(UnknownBlocksError) as e:
        load(ckpt)
    assert "--code" in str(e.value) and "CoTBlock at layer 18" in str(e.value)
    assert main(["--weights", str(ckpt), "--no-parity"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--code <your fork's root folder>" in err
    assert {name for name in sys.modules if name.startswith(PRIVATE_ROOT)} == before  # nothing was imported


def test_with_code_the_classes_come_from_the_fork_files_under_private_names(fork):
    root, ckpt = fork
    loaded = load(ckpt, code=[root])
    assert set(loaded.user_code) == {f"{user_blocks.PACKAGE}.CBAMBlock.{n}" for n in
                                     ("CBAMBlock", "ChannelGate", "SpatialGate")} | {
        f"{user_blocks.PACKAGE}.{n}.{n}" for n in ("CoTBlock", "EinsumAttention", "ShiftWrite")}
    block = loaded.model.model[18][1]
    assert type(block).__module__ == f"{PRIVATE_ROOT}.d0.{user_blocks.PACKAGE}.CoTBlock"
    assert user_blocks.PACKAGE not in sys.modules  # the fork path never shadows the installed ultralytics
    from ultralytics.nn.modules import Conv
    assert type(block.key) is Conv  # the fork file's stock-ultralytics import resolved normally
    x = torch.rand(1, 3, user_blocks.IMGSZ, user_blocks.IMGSZ)
    assert torch.isfinite(loaded.model(x)[0]).all()


@pytest.mark.slow
def test_fork_checkpoint_exports_lints_and_passes_parity_fp32_and_fp16(fork, tmp_path, capsys):
    root, ckpt = fork
    out = tmp_path / "out"
    assert main(["--weights", str(ckpt), "--code", str(root), "--half", "--out", str(out)]) == 0
    console = capsys.readouterr().out
    assert "--code: imported CoTBlock from" in console and "no export twin: exported as written" in console
    report = json.loads((out / "report.json").read_text())
    blocks = report["user_blocks"]
    assert set(blocks) == {"model.9.1", "model.15.1", "model.18.1", "model.21.1"}
    assert all(b["export"] == "no export twin: exported as written" for b in blocks.values())
    rewrites = {name: {r["rewrite"] for r in b["rewrites"]} for name, b in blocks.items()}
    assert rewrites == {"model.9.1": {"shape-code", "slice-writes"}, "model.15.1": {"adaptive-pool"},
                        "model.18.1": set(), "model.21.1": {"einsum-matmul"}}
    assert report["lint"] == []  # no Einsum, no ScatterND, no fixed-kernel pooling left
    assert report["parity"]["onnxruntime"]["pass"] and report["parity"]["onnxruntime"]["precision"] == "fp16"
    assert main(["--weights", str(ckpt), "--code", str(root), "--out", str(tmp_path / "fp32")]) == 0
    fp32 = json.loads((tmp_path / "fp32" / "report.json").read_text())
    assert fp32["parity"]["onnxruntime"]["pass"] and fp32["parity"]["onnxruntime"]["precision"] == "fp32"
    assert "Blocks exported as written (--code)" in (out / "report.md").read_text()


NONZERO_GATE = '''
    import torch
    from torch import nn


    class NonZeroGate(nn.Module):
        """A gate that also counts its active positions: a data-dependent NonZero in the graph (numerically nothing)."""

        def __init__(self, c):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1, c, 1, 1))

        def forward(self, x):
            return x * self.scale + 0 * torch.nonzero(x > 0).float().sum()
'''


def test_lint_names_the_block_of_every_finding(tmp_path, capsys):
    """A --code block whose graph the lint flags: each finding carries the block's module path, in the report and
    on the console."""
    root = user_blocks.write_fork(tmp_path / "fork", extra={"NonZeroGate": NONZERO_GATE})
    ckpt = user_blocks.save_checkpoint(root, tmp_path / "best.pt", placement={15: ("NonZeroGate", 64)})
    out = tmp_path / "out"
    assert main(["--weights", str(ckpt), "--code", str(root), "--no-parity", "--out", str(out)]) == 0
    findings = json.loads((out / "report.json").read_text())["lint"]
    assert [(f["rule"], f["op"]) for f in findings] == [("slow-op", "NonZero")], findings
    assert findings[0]["block"] == "model.15.1" and findings[0]["onnx"] == "fp32"
    console = capsys.readouterr().out
    assert "lint best.onnx: 0 error(s), 1 warning(s)" in console and "/model.15.1/NonZero" in console


def test_localisation_watches_every_code_block(fork, tmp_path):
    """When parity fails, every block that is not stock ultralytics gets its own ONNX output: --code blocks too."""
    import numpy as np

    from export.graph import generic
    from export.verify.localize import localize
    from export.graph.rewrite import outermost_user_blocks, rewrite, watched_blocks

    root, ckpt = fork
    loaded = load(ckpt, code=[root])
    twin, _ = rewrite(loaded.model, user_blocks.IMGSZ)
    names = outermost_user_blocks(twin)
    assert watched_blocks(loaded.model) == names == ["model.9.1", "model.15.1", "model.18.1", "model.21.1"]
    images = np.random.default_rng(0).random((1, 3, user_blocks.IMGSZ, user_blocks.IMGSZ), dtype=np.float32)
    with generic.exportable_calls(twin, names):
        first, errors = localize(loaded.model, twin, images, False, tmp_path, "fp32")
    assert first is None and set(errors) == set(names) and max(errors.values()) < 1e-5


# ---- --code never executes anything but the named files under DIR ----------------------------------------
def _pickled_model_with(tmp_path, module, name):
    """A checkpoint whose model holds one block of class `module.name` (the class need not exist anywhere)."""
    return user_blocks.checkpoint_naming(tmp_path / f"{module}.pt", module, name)


def test_code_runs_only_files_the_checkpoint_names_under_dir(fork, tmp_path):
    root, ckpt = fork
    marker = tmp_path / "unused-ran"
    user_blocks.write_fork(root, {"Unused": MARKER_SOURCE.format(marker=str(marker), name="Unused")})
    load(ckpt, code=[root])
    assert not marker.exists()  # a fork file the checkpoint does not name is never executed


def test_a_module_outside_dir_is_never_imported_even_when_importable(tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    marker = tmp_path / "outside-ran"
    (outside / "evilmod.py").write_text(MARKER_SOURCE.format(marker=str(marker), name="Evil"))
    monkeypatch.syspath_prepend(str(outside))  # importable by name: --code must still not import it
    code = tmp_path / "code"
    code.mkdir()
    ckpt = _pickled_model_with(tmp_path, "evilmod", "Evil")
    with pytest.raises(CheckpointError, match="no file for module evilmod"):
        load(ckpt, code=[code])
    assert not marker.exists()


def test_a_symlink_out_of_dir_and_library_module_paths_are_refused(tmp_path):
    outside = tmp_path / "outside.py"
    marker = tmp_path / "link-ran"
    outside.write_text(MARKER_SOURCE.format(marker=str(marker), name="Evil"))
    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "linked.py").symlink_to(outside)
    with pytest.raises(CheckpointError, match="links outside"):
        load(_pickled_model_with(tmp_path, "pkg.linked", "Evil"), code=[code])
    (code / "os").mkdir()
    (code / "os" / "path.py").write_text(MARKER_SOURCE.format(marker=str(marker), name="Evil"))
    with pytest.raises(CheckpointError, match="cannot come from --code"):
        load(_pickled_model_with(tmp_path, "os.path", "Evil"), code=[code])
    assert not marker.exists()


GATED_SOURCE = '''
from torch import nn


class Gated(nn.Module):
    def __setstate__(self, state):
        raise AssertionError("the fork's own __setstate__ ran")

    def helper(self):
        return 1

    def forward(self, x):
        return x
'''


def test_code_classes_are_still_built_only_by_the_gate(tmp_path):
    """A --code class joins the table for this run only as a class to create (cls.__new__) and fill by a vetted
    dict update: its own __setstate__ never runs, state shadowing its methods is refused, calls are refused."""
    code = tmp_path / "code"
    (code / "fork").mkdir(parents=True)
    (code / "fork" / "gated.py").write_text(GATED_SOURCE)
    plain = user_blocks.checkpoint_naming(tmp_path / "plain.pt", "fork.gated", "Gated", {"scale": 2})
    loaded = load(plain, code=[code])  # no AssertionError: the fork's __setstate__ was bypassed
    assert loaded.model.model[9].scale == 2
    shadow = user_blocks.checkpoint_naming(tmp_path / "shadow.pt", "fork.gated", "Gated", {"helper": 1})
    with pytest.raises(CheckpointError, match="shadow its method"):
        load(shadow, code=[code])
    from tests.crafted import call, glob, pickle_of, read_zip, write_zip

    top, records = read_zip(plain)
    records["data.pkl"] = pickle_of({"model": call(glob("fork.gated", "Gated"), 64)})
    with pytest.raises(CheckpointError, match="call"):
        load(write_zip(tmp_path / "call.pt", top, records), code=[code])


def test_a_non_module_global_is_refused_even_with_code(tmp_path):
    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    marker = tmp_path / "fn-ran"
    (code / "pkg" / "fns.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n"
                                         "def system(*a):\n    return 0\n")
    from tests.crafted import call, glob, pickle_of, read_zip, write_zip

    top, records = read_zip(user_blocks.checkpoint_naming(tmp_path / "base.pt", "pkg.other", "Block"))
    records["data.pkl"] = pickle_of({"model": call(glob("pkg.fns", "system"), "id")})
    with pytest.raises(CheckpointError):
        load(write_zip(tmp_path / "fn.pt", top, records), code=[code])
    records["data.pkl"] = pickle_of({"model": glob("pkg.fns", "system")})  # named, not called: still refused
    with pytest.raises(CheckpointError):
        load(write_zip(tmp_path / "fn2.pt", top, records), code=[code])
    assert not marker.exists()



def test_a_package_init_is_never_run_for_a_class_path(tmp_path):
    """`ultralytics.Evil` names the package `ultralytics`: its DIR/ultralytics/__init__.py must not run."""
    code = tmp_path / "code"
    (code / "ultralytics").mkdir(parents=True)
    marker = tmp_path / "init-ran"
    (code / "ultralytics" / "__init__.py").write_text(MARKER_SOURCE.format(marker=str(marker), name="Evil"))
    (code / "pkg" / "block").mkdir(parents=True)
    (code / "pkg" / "block" / "__init__.py").write_text(MARKER_SOURCE.format(marker=str(marker), name="Block"))
    with pytest.raises(CheckpointError, match="no file for module ultralytics .*__init__.py is never run"):
        load(_pickled_model_with(tmp_path, "ultralytics", "Evil"), code=[code])
    with pytest.raises(CheckpointError, match="no file for module pkg.block"):
        load(_pickled_model_with(tmp_path, "pkg.block", "Block"), code=[code])
    assert not marker.exists()


def test_a_file_without_the_class_is_never_run(tmp_path):
    """The checkpoint picks the file by its class path: unless the file's source defines that class, it stays
    unrun (a checkpoint cannot use a class path to run an arbitrary .py under DIR)."""
    code = tmp_path / "code"
    (code / "tools").mkdir(parents=True)
    marker = tmp_path / "script-ran"
    (code / "tools" / "train.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n"
                                             "def main():\n    class Block:\n        pass\n")
    with pytest.raises(CheckpointError, match="defines no class Block .*nothing was run"):
        load(_pickled_model_with(tmp_path, "tools.train", "Block"), code=[code])
    assert not marker.exists()


def test_a_class_defined_under_an_if_block_is_found(tmp_path):
    code = tmp_path / "code"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "guarded.py").write_text("import torch\nfrom torch import nn\nif torch.__version__:\n"
                                             "    class Guarded(nn.Module):\n        def forward(self, x):\n"
                                             "            return x\n")
    loaded = load(user_blocks.checkpoint_naming(tmp_path / "g.pt", "pkg.guarded", "Guarded"), code=[code])
    assert type(loaded.model.model[9]).__name__ == "Guarded"


def test_no_bytecode_is_written_into_the_fork(fork):
    root, ckpt = fork
    load(ckpt, code=[root])
    assert sys.dont_write_bytecode is False or sys.flags.dont_write_bytecode  # restored after the import
    assert not list(root.rglob("__pycache__")) and not list(root.rglob("*.pyc"))
