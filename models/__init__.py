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


def demo_checkpoint(family="sta"):
    """Path of the shipped demo checkpoint trained with `family` (fla, mlla, sta, s2)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return DEMO_DIR / f"yolov8n-{family}.pt"


for _family in FAMILIES.values():
    register(_family.YAML_MODULES)
