"""Make the attention families buildable from ultralytics YAMLs, without editing ultralytics.

Stock `parse_model` gives an unknown module no input channels and no width/depth scaling. We wrap
it: each of our layers goes to the stock parser as a stock stand-in that *does* get them
(`nn.BatchNorm2d` receives ch[f]; `C2f` receives c1, the width-scaled c2 and the depth-scaled n),
then we read the resolved numbers off the stand-in and build our module in its place. Channel
bookkeeping thus stays ultralytics' own at every scale, and YAMLs never carry channel counts.
"""

import copy

import torch
from ultralytics.nn import tasks
from ultralytics.utils import LOGGER

# kind -> stock stand-in: "attention" blocks keep C and take c1 first; "csp" blocks take C2f's arguments.
STAND_INS = {"attention": "nn.BatchNorm2d", "csp": "C2f"}
_FACTORIES = {}  # YAML name -> (kind, factory)
_stock_parse_model = tasks.parse_model


def register(yaml_modules):
    """Register {yaml name: (kind, factory)} and install the parse_model wrapper (idempotent)."""
    for name, (kind, factory) in yaml_modules.items():
        if kind not in STAND_INS:
            raise ValueError(f"{name}: unknown kind {kind!r}, expected one of {sorted(STAND_INS)}")
        _FACTORIES[name] = (kind, factory)
        if isinstance(factory, type):
            setattr(tasks, name, factory)  # also resolvable by name in ultralytics' own namespace
    tasks.parse_model = parse_model


def parse_model(d, ch, verbose=True):
    rows = d["backbone"] + d["head"]
    ours = {i: (row[2], list(row[3])) for i, row in enumerate(rows) if row[2] in _FACTORIES}
    if not ours:
        return _stock_parse_model(d, ch, verbose=verbose)
    d = copy.deepcopy(d)
    for i, row in enumerate(d["backbone"] + d["head"]):
        if i in ours:
            row[2] = STAND_INS[_FACTORIES[row[2]][0]]
    model, save = _stock_parse_model(d, ch, verbose=False)
    for i, (name, args) in ours.items():
        model[i] = _replace(model[i], *_FACTORIES[name], args)
    if verbose:
        _log_layers(model)
    return model, save


def _replace(stand_in, kind, factory, args):
    if kind == "attention":
        blocks = list(stand_in) if isinstance(stand_in, torch.nn.Sequential) else [stand_in]
        built = [factory(b.num_features, *args) for b in blocks]
        module = torch.nn.Sequential(*built) if len(built) > 1 else built[0]
    else:
        c1, c2 = stand_in.cv1.conv.in_channels, stand_in.cv2.conv.out_channels
        module = factory(c1, c2, len(stand_in.m), *args[1:])
    kind_of = type(module[0] if isinstance(module, torch.nn.Sequential) else module)
    module.i, module.f = stand_in.i, stand_in.f
    module.type = f"{kind_of.__module__}.{kind_of.__name__}"
    module.np = sum(p.numel() for p in module.parameters())
    return module


def _log_layers(model):
    LOGGER.info(f"\n{'':>3}{'from':>20}{'params':>10}  {'module':<45}")
    for m in model:
        LOGGER.info(f"{m.i:>3}{m.f!s:>20}{m.np:10.0f}  {m.type:<45}")
