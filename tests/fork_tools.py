"""Make fork-style checkpoints from the seed code, and load them, each in its own process.

    python -m tests.fork_tools build FAMILY FORK_MODULE LAYOUT OUT_DIR   # writes OUT_DIR/fork.pt, expected.pt
    python -m tests.fork_tools load OUT_DIR                              # prints a JSON line

`build` puts the seed classes under FORK_MODULE (a made-up module, or a real ultralytics module the
fork edited), builds a YOLO model with them, records its output before saving, and saves the way
ultralytics does (half weights; LAYOUT picks which of model/ema hold them). `load` runs in a fresh
process where that module path does not exist (or lacks the classes) and uses only the project.
"""

import copy
import json
import sys
import types
from pathlib import Path

import torch

FAMILY_SETUP = {  # YAML scale, probe size: the seed code only runs where it is defined
    "fla": ("n", 320),  # square maps only
    "mlla": ("n", 640),  # the fork adapter runs at its training resolution (P5 20x20)
    "sta": ("n", 320),
    "s2": ("s", 320),  # the seed's SplitAttention() is 512 wide: yolov8s' P5 head
}


def _install_fork_classes(family, fork_module):
    from tests import seed_code

    module = sys.modules.get(fork_module)
    if module is None:
        module = types.ModuleType(fork_module)
        sys.modules[fork_module] = module
    fork = {}
    for cls in seed_code.FAMILY_CLASSES[family]:
        fork[cls.__name__] = type(cls.__name__, (cls,), {"__module__": fork_module, "__qualname__": cls.__name__})
        setattr(module, cls.__name__, fork[cls.__name__])
    return fork


def build(family, fork_module, layout, out):
    import models
    from ultralytics import YOLO

    scale, size = FAMILY_SETUP[family]
    fork = _install_fork_classes(family, fork_module)
    model = YOLO(str(models.CFG_DIR / f"yolov8{scale}-{family}.yaml")).model
    for m in model.modules():  # the same layout, now the fork's (seed) classes
        if type(m).__name__ in fork and type(m).__module__.startswith("models."):
            m.__class__ = fork[type(m).__name__]
    model.names = {0: "thing", 1: "other"}
    if family == "sta":  # as after training in ultralytics, which re-enables grads on the "frozen" identity banks
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("unfold.weights", "fold.weights")):
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.03)
    saved = copy.deepcopy(model).half()
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = _fork_output(family, copy.deepcopy(saved).float().eval(), x)
    ckpt = {"epoch": 3, "best_fitness": 0.5, "model": saved if "model" in layout else None,
            "ema": saved if "ema" in layout else None, "updates": 10, "optimizer": None,
            "train_args": {"model": f"yolov8{scale}-{family}.yaml", "imgsz": size, "epochs": 10},
            "date": "2026-11-21T00:00:00", "version": "8.3.0"}
    out = Path(out)
    torch.save(ckpt, out / "fork.pt")
    torch.save({"x": x, "expected": expected, "size": size}, out / "expected.pt")


def _fork_output(family, model, x):
    """The fork model's output; for S2 with the clean shift (the seed's eager-CPU smear is not our definition)."""
    from tests import seed_code
    import models.s2

    with torch.no_grad():
        if family != "s2":
            return model(x)[0]
        original = seed_code.spatial_shift1, seed_code.spatial_shift2
        seed_code.spatial_shift1, seed_code.spatial_shift2 = models.s2.spatial_shift1, models.s2.spatial_shift2
        try:
            return model(x)[0]
        finally:
            seed_code.spatial_shift1, seed_code.spatial_shift2 = original


def load(out):
    import export

    out = Path(out)
    ref = torch.load(out / "expected.pt", weights_only=True)
    loaded = export.load(out / "fork.pt")
    twin, checks = export.rewrite(loaded.model, ref["size"])
    with torch.no_grad():
        got = twin(ref["x"])[0]
    expected = ref["expected"]
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    forked = [name for name in sys.modules if name.startswith("tests.seed_code")]
    print(json.dumps({"rel": rel, "remapped": loaded.remapped, "source": loaded.source, "saved_half": loaded.saved_half,
                      "names": loaded.names, "imgsz": loaded.imgsz, "checks": [c.as_dict() for c in checks],
                      "seed_code_imported": forked}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"build": build, "load": load}[command](*args)
