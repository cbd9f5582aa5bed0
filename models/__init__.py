"""The four attention families: reference twins (checkpoint-compatible), export twins, YOLO registration.

Importing this package registers every family with ultralytics' YAML parser.
"""

import copy
from pathlib import Path

from models import fla, mlla, s2, sta
from models.registry import register

FAMILIES = {"fla": fla, "mlla": mlla, "sta": sta, "s2": s2}

# Reference class -> export twin. Twins subclass their reference and override forward only, so a
# twin made from a reference has the same attributes, submodules and state_dict keys.
EXPORT_TWINS = {ref: twin for family in FAMILIES.values() for ref, twin in family.EXPORT_TWINS.items()}

# Class/function name -> our object, for reconstructing checkpoints whatever module path a fork used.
CHECKPOINT_NAMES = {name: getattr(family, name) for family in FAMILIES.values() for name in family.CHECKPOINT_NAMES}

CFG_DIR = Path(__file__).parent / "cfg"
DEMO_DIR = Path(__file__).parent / "demo"


def to_export(model):
    """A deep copy of `model` with every reference-twin module replaced by its export twin."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        export_cls = EXPORT_TWINS.get(type(module))
        if export_cls is not None:
            module.__class__ = export_cls
    return twin


def structure_differences(module):
    """How `module` (an instance of a family class, as a checkpoint rebuilt it by class name) differs from the
    structure that class has when built as the tutorial builds it, which the export twin is written for: its own
    parameters, buffers, submodules (by name) and attributes. [] when it has that structure; each entry is short
    ("no cpe1", "extra parameter q_pos"). Extra attributes are not differences (ultralytics adds its own)."""
    template = _template(type(module))
    if template is None:
        return []
    got, want = _structure(module), _structure(template)
    found = []
    for kind in ("parameter", "buffer", "submodule"):
        found += [f"no {name}" for name in sorted(want[kind] - got[kind])]
        found += [f"extra {kind} {name}" for name in sorted(got[kind] - want[kind])]
    found += [f"no attribute {name}" for name in sorted(want["attribute"] - got["attribute"])]
    return found


_TEMPLATES = {}


def _template(cls):
    if cls not in _TEMPLATES:
        make = next((family.TEMPLATES.get(cls) for family in FAMILIES.values() if cls in family.TEMPLATES), None)
        _TEMPLATES[cls] = make() if make else None
    return _TEMPLATES[cls]


def _structure(module):
    d = module.__dict__
    return {"parameter": {k for k, v in d.get("_parameters", {}).items() if v is not None},
            "buffer": {k for k, v in d.get("_buffers", {}).items() if v is not None},
            "submodule": {k for k, v in d.get("_modules", {}).items() if v is not None},
            "attribute": {k for k in d if not k.startswith("_") and k != "training"}}


def family_of(module):
    """The family module (fla, mlla, sta, s2) a reference or export twin instance belongs to, else None."""
    for family in FAMILIES.values():
        if any(isinstance(module, cls) for pair in family.EXPORT_TWINS.items() for cls in pair):
            return family
    return None


def reference_output(block, x):
    """(a family block's reference output on its input x, a note where the seed code is ill-defined there or ''):
    each family's own rule (its `reference_output`), else the block's plain output."""
    rule = getattr(family_of(block), "reference_output", None)
    return rule(block, x) if rule else (block(x), "")


def reference_at(model, h, w):
    """`model` as the reference to compare exports with at h x w: a family whose seed is defined only at some
    sizes (FLA: square maps) redefines its blocks off them (its `defined_at`, on a copy); else `model` itself."""
    for family in FAMILIES.values():
        defined_at = getattr(family, "defined_at", None)
        model = defined_at(model, h, w) if defined_at else model
    return model


def demo_checkpoint(family="sta"):
    """Path of the shipped demo checkpoint trained with `family` (fla, mlla, sta, s2)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return DEMO_DIR / f"yolov8n-{family}.pt"


for _family in FAMILIES.values():
    register(_family.YAML_MODULES)
