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
