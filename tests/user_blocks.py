"""Attention blocks we have no family for, written here from their papers' descriptions, saved as a fork would.

`write_fork(root)` lays their source out as a tutorial fork does (`root/ultralytics/nn/Addmodules/<Name>.py`);
`save_checkpoint(root, path)` imports those files under their fork module paths only while building and saving a
yolov8n with the blocks after the three neck outputs, then removes every trace of them from sys.modules, so the
checkpoint names classes this process cannot import: exactly a user's best.pt from an edited copy of the code.
"""

import copy
import importlib.util
import sys
import textwrap
import types
from pathlib import Path

import torch
from torch import nn

PACKAGE = "ultralytics.nn.Addmodules"
IMGSZ = 128

SOURCES = {
    # CBAM (Woo et al., 2018): channel gate = sigmoid(MLP(avg-pool) + MLP(max-pool)) with one shared MLP;
    # spatial gate = sigmoid(7x7 conv over [channel mean, channel max]); applied in that order.
    "CBAMBlock": '''
        import torch
        from torch import nn


        class ChannelGate(nn.Module):
            def __init__(self, c, r=4):
                super().__init__()
                self.avg, self.max = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)
                self.mlp = nn.Sequential(nn.Conv2d(c, c // r, 1, bias=False), nn.ReLU(),
                                         nn.Conv2d(c // r, c, 1, bias=False))

            def forward(self, x):
                return torch.sigmoid(self.mlp(self.avg(x)) + self.mlp(self.max(x)))


        class SpatialGate(nn.Module):
            def __init__(self, k=7):
                super().__init__()
                self.conv = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)

            def forward(self, x):
                pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
                return torch.sigmoid(self.conv(pooled))


        class CBAMBlock(nn.Module):
            def __init__(self, c, r=4, k=7):
                super().__init__()
                self.channel, self.spatial = ChannelGate(c, r), SpatialGate(k)

            def forward(self, x):
                x = x * self.channel(x)
                return x * self.spatial(x)
    ''',
    # Contextual Transformer (Li et al., 2021): a k x k grouped conv gives the static context K1; two 1x1 convs
    # on [K1, X] give attention weights (k*k per channel, averaged), a softmax over positions weights the values
    # (1x1 conv of X) into the dynamic context K2; the output is K1 + K2.
    "CoTBlock": '''
        import torch
        from torch import nn
        from ultralytics.nn.modules import Conv  # stock ultralytics, resolved normally


        class CoTBlock(nn.Module):
            def __init__(self, c, k=3):
                super().__init__()
                self.k = k
                self.key = Conv(c, c, k, g=4)
                self.value = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
                self.attn = nn.Sequential(nn.Conv2d(2 * c, c // 2, 1, bias=False), nn.BatchNorm2d(c // 2),
                                          nn.ReLU(), nn.Conv2d(c // 2, k * k * c, 1))

            def forward(self, x):
                b, c, h, w = x.shape
                k1 = self.key(x)
                v = self.value(x).view(b, c, -1)
                a = self.attn(torch.cat([k1, x], 1)).reshape(b, c, self.k * self.k, h, w).mean(2).view(b, c, -1)
                return k1 + (a.softmax(-1) * v).view(b, c, h, w)
    ''',
    # Efficient attention (Shen et al., 2021) per head: keys softmaxed over positions, queries over channels,
    # the context K V^T (d x d) first, then applied to Q: written with one three-operand einsum, as tutorials do.
    "EinsumAttention": '''
        import torch
        from torch import nn


        class EinsumAttention(nn.Module):
            def __init__(self, c, heads=4):
                super().__init__()
                self.heads = heads
                self.qkv = nn.Conv2d(c, 3 * c, 1)
                self.proj = nn.Conv2d(c, c, 1)

            def forward(self, x):
                b, c, h, w = x.shape
                q, k, v = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
                out = torch.einsum("bhdn,bhen,bhdm->bhem", k.softmax(3), v, q.softmax(2))
                return x + self.proj(out.reshape(b, c, h, w))
    ''',
    # Shift attention (S2-MLP style spatial shift): channel groups shifted one pixel right / left by in-place
    # slice writes, then mixed by a 1x1 conv; the tutorial's square-grid side computed from the token count.
    "ShiftWrite": '''
        from torch import nn


        class ShiftWrite(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.mix = nn.Conv2d(c, c, 1)

            def forward(self, x):
                g = x.shape[1] // 4
                side = int((x.shape[2] * x.shape[3]) ** 0.5)  # shape code: fixed at the traced size
                out = x.clone()
                out[:, :g, :, 1:] = x[:, :g, :, :-1]
                out[:, g:2 * g, :, :side - 1] = x[:, g:2 * g, :, 1:side]
                return x + self.mix(out)
    ''',
}
# Where each block goes: after SPPF and the neck's P3, P4 and P5 outputs of yolov8n (256, 64, 128, 256 channels).
PLACEMENT = {9: ("ShiftWrite", 256), 15: ("CBAMBlock", 64), 18: ("CoTBlock", 128), 21: ("EinsumAttention", 256)}


def write_fork(root, extra=None, sources=None):
    """The blocks' source under root as a fork lays it out (`sources`: {file stem: source}, these blocks by
    default); `extra`: more {file stem: source} to add."""
    folder = Path(root, *PACKAGE.split("."))
    folder.mkdir(parents=True, exist_ok=True)
    for stem, source in {**(SOURCES if sources is None else sources), **(extra or {})}.items():
        (folder / f"{stem}.py").write_text(textwrap.dedent(source).lstrip())
    return Path(root)


def save_checkpoint(root, path, placement=PLACEMENT, nc=2, cls_bias=None):
    """A yolov8n with the blocks from root's fork files, saved as ultralytics saves best.pt (half weights).
    `placement`: {layer: (file stem, or "stem:Class", channels)}.
    `cls_bias`: the class biases set to this (+6 saturates every score)."""
    from ultralytics.nn.tasks import DetectionModel

    added = _import_as_fork(root, {name.partition(":")[0] for name, _ in placement.values()})
    try:
        model = DetectionModel("yolov8n.yaml", nc=nc, verbose=False)
        for index, (name, channels) in placement.items():
            stem, _, cls = name.partition(":")  # "File:Class" for a class named other than its file
            block = getattr(sys.modules[f"{PACKAGE}.{stem}"], cls or stem)(channels)
            model.model[index] = _after(model.model[index], block)
        model.names = {i: f"class{i}" for i in range(nc)}
        _randomise_batchnorm(model)
        for branch in model.model[-1].cv3 if cls_bias is not None else ():
            branch[-1].bias.data.fill_(cls_bias)
        ckpt = {"model": copy.deepcopy(model).half(), "ema": None, "epoch": 1, "train_args": {"imgsz": IMGSZ}}
        torch.save(ckpt, path)
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return Path(path)


def _import_as_fork(root, stems):
    added = [PACKAGE] if PACKAGE not in sys.modules else []
    if added:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(Path(root, *PACKAGE.split(".")))]
        sys.modules[PACKAGE] = package
    for stem in sorted(stems):
        name = f"{PACKAGE}.{stem}"
        spec = importlib.util.spec_from_file_location(name, Path(root, *PACKAGE.split("."), f"{stem}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        added.append(name)
        spec.loader.exec_module(module)
    return added


def _after(layer, block):
    """layer then block, as one layer of the model (keeps ultralytics' routing attributes)."""
    both = nn.Sequential(layer, block)
    both.f, both.i, both.type, both.np = layer.f, layer.i, "fork", layer.np
    return both


def _randomise_batchnorm(model):
    """Trained-looking BatchNorm statistics (fresh ones are identity), deterministic."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def checkpoint_naming(path, module, name, attributes=None, base=nn.Module):
    """A yolov8n checkpoint whose layer 9 is a block of class `module.name`: a class made here only to be pickled
    under that path (nothing needs to exist there); `attributes` go into the block's __dict__ as saved."""
    from ultralytics.nn.tasks import DetectionModel

    cls = type(name, (base,), {"__module__": module, "__qualname__": name, "forward": lambda self, x: x})
    model = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    block = cls()
    block.__dict__.update(attributes or {})
    block.i, block.f, block.type, block.np = 9, -1, name, 0
    model.model[9] = block
    model.names = {0: "a", 1: "b"}
    with _importable(module, name, cls):
        torch.save({"model": model.half(), "ema": None}, path)
    return Path(path)


class _importable:
    """`module.name` is `cls` for pickle while saving: stub modules where none exist, restored afterwards."""

    def __init__(self, module, name, cls):
        self.module, self.name, self.cls, self.added, self.previous = module, name, cls, [], None

    def __enter__(self):
        parts = self.module.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in sys.modules:
                sys.modules[prefix] = types.ModuleType(prefix)
                self.added.append(prefix)
        target = sys.modules[self.module]
        self.previous = target.__dict__.get(self.name)
        setattr(target, self.name, self.cls)

    def __exit__(self, *exc):
        target = sys.modules[self.module]
        if self.previous is None:
            delattr(target, self.name)
        else:
            setattr(target, self.name, self.previous)
        for prefix in self.added:
            sys.modules.pop(prefix, None)
