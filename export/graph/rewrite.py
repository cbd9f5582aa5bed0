"""Swap every reference-twin module for its export twin and check each one on the model's own activations.

    twin, checks = rewrite(model, imgsz=(384, 640))

Each check compares one block's twin with its reference on the input that block sees at the export
size (captured from a probe forward pass), and notes where the seed code is ill-defined there.
"""

from dataclasses import asdict, dataclass

import torch

import models
from export.checkpoint.user_code import is_user_class


@dataclass
class ModuleCheck:
    name: str  # where the block sits in the model, e.g. "model.10"
    reference: str
    twin: str
    input_shape: list
    max_abs: float  # max |twin - reference| on this block's real input
    scale: float  # max |reference output|
    note: str = ""

    @property
    def rel(self):
        return self.max_abs / max(self.scale, 1e-12)

    def as_dict(self):
        return {**asdict(self), "rel": self.rel}


def rewrite(model, imgsz, images=None, seed=0):
    """(export-twin copy of model, [ModuleCheck per replaced block]); model is left untouched.

    The probe is `images` (letterboxed to imgsz) when given: real images exercise the blocks as deployment
    will (noise gives near-constant deep features); otherwise seeded uniform noise.
    """
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    twin = models.to_export(model)
    names = outermost_family_modules(model)
    probe = images if images is not None else torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    inputs = _capture_inputs(twin, names, probe)
    return twin, [_check(name, model.get_submodule(name), twin.get_submodule(name), inputs[name]) for name in names]


def outermost_family_modules(model):
    """Names of the family modules in model that no other family module contains."""
    return _outermost(model, lambda m: type(m) in models.EXPORT_TWINS)


def outermost_user_blocks(model):
    """Names of the blocks imported with --code (no export twin: exported as written), outermost ones only."""
    return _outermost(model, lambda m: is_user_class(type(m)))


def watched_blocks(model):
    """Every block that is not stock ultralytics: the attention families and the --code blocks, in model order."""
    return _outermost(model, lambda m: type(m) in models.EXPORT_TWINS or is_user_class(type(m)))


def _outermost(model, wanted):
    found = []
    for name, m in model.named_modules():
        if wanted(m) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def _capture_inputs(model, names, x):
    captured, hooks = {}, []

    def keep(name):
        def hook(module, args):  # returns None: a pre-hook's return value would replace the input
            captured.setdefault(name, args[0].detach().clone())
        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(keep(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def _check(name, reference, twin, x):
    with torch.no_grad():
        expected, note = models.reference_output(reference, x)
        got = twin(x)
    return ModuleCheck(name=name, reference=type(reference).__name__, twin=type(twin).__name__,
                       input_shape=list(x.shape), max_abs=(got - expected).abs().max().item(),
                       scale=expected.abs().max().item(), note=note)
