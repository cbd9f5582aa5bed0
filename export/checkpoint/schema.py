"""Bounds on every value of a loaded model that later stages use, checked before any method of the model runs.

The gated unpickler and the object-graph validation make a checkpoint inert data of allowed types; they
do not bound what the values mean. Later code trusts them: ultralytics' SPPF loops `n` times keeping every
output, our STA twin iterates `n_iter` times, RepConv's fusion allocates c1 x c1/g x 3 x 3, the model's
forward indexes earlier outputs by each layer's `f`, the class names go into ONNX metadata. So each field of
the module classes we accept has a type and a bound here, derived from what a real model holds, with room:

- `FIELDS`: by attribute name, the same meaning in every class we accept (ultralytics, torch, the families,
  YOLOv5's compat classes); `CLASS_FIELDS`: where one class means something else by a name (Softmax's `dim`
  is an axis, not channels; a padding layer's `padding` may be negative, 6 ints). A field whose name is in
  neither is not read by the code of any class we accept (tests/test_schema.py builds every detection model
  ultralytics ships, ours and YOLOv5's, and every class of the table, and checks that every field they hold is
  listed); such a field is inert data (`UNLISTED`). Private fields (`_name`) are nn.Module's own tables,
  checked by export.checkpoint.object_graph, except those listed here: ones a torch layer's forward reads
  (MultiheadAttention's `_qkv_same_embed_dim`, a convolution's `_reversed_padding_repeated_twice`).
- `CONSISTENT`: numbers a class allocates from, which must agree with the weights they describe.
- the model as a whole: layer indices inside the model, class names, tensor bytes after `float()`.

A refusal names the class, the field, the value (escaped, cut short) and the bound.
"""

import math
from dataclasses import dataclass

import torch
import torchvision.ops
from torch import nn
from ultralytics.nn.modules import conv

from export.checkpoint.safe_pickle import MAX_STATE_KEYS, NAMESPACES, TORCH_LAYER_NAMES, TORCH_LAYERS, Refused
from export.text import shown

MAX_CHANNELS = 8192  # widest real YOLO layer: 2560 (yolov8x concat); attention widths 1024
MAX_REPEATS = 64  # repeat counts (`n`): a yolov8x C2f has 6
MAX_IMGSZ = 4096
MAX_NAMES, MAX_NAME_CHARS = 10_000, 256
MAX_LAYERS = 1024  # top-level layers; a yolov8x has 23, YOLOv9-E 42
MAX_TENSOR_BYTES = 1 << 30  # the model's tensors after float(), views counted at their own size; yolov8x: 0.27 GB
MAX_PAD = 256  # a padding layer's width per side; real ones pad a pixel or two (window attention: under a window)
MAX_UNFOLD_KERNEL = 16  # Unfold's output holds kernel_size**2 copies of its input; real ones use 3 to 7


@dataclass(frozen=True)
class Field:
    text: str  # what the value must be, for the refusal
    ok: object  # value -> bool

    def __or__(self, other):
        return Field(f"{self.text} or {other.text}", lambda v: self.ok(v) or other.ok(v))


def integer(low, high):
    return Field(f"an int in {low}..{high}", lambda v: type(v) is int and low <= v <= high)


def integers(low, high, max_len=4):
    """An int, or a tuple / list / torch.Size of 1..max_len ints, each in low..high."""
    def ok(v):
        values = v if type(v) in (tuple, list, torch.Size) and 0 < len(v) <= max_len else (v,)
        return all(type(x) is int and low <= x <= high for x in values)
    return Field(f"an int or up to {max_len} ints in {low}..{high}", ok)


def number(low, high):
    return Field(f"a number in {low}..{high}",
                 lambda v: type(v) in (int, float) and math.isfinite(v) and low <= v <= high)


def text(max_len):
    return Field(f"a printable string of at most {max_len} characters",
                 lambda v: type(v) is str and len(v) <= max_len and v.isprintable())


def choice(*values):
    return Field(f"one of {values}", lambda v: type(v) in (str, type(None)) and v in values)


NONE = Field("None", lambda v: v is None)
BOOL = Field("a bool", lambda v: type(v) is bool)
TENSOR = Field("a tensor", lambda v: type(v) in (torch.Tensor, nn.Parameter))
TENSORS = Field("a list of tensors", lambda v: type(v) is list and len(v) <= 16 and all(TENSOR.ok(t) for t in v))
RECORD = Field("a record (dict or namespace) of training settings", lambda v: isinstance(v, dict) or type(v) in NAMESPACES)
CHANNELS = integer(1, MAX_CHANNELS)
AXIS = NONE | integer(-8, 8)
KERNEL = integers(0, 64)
LAYERS = integers(-MAX_LAYERS, MAX_LAYERS, max_len=64)
PADS = integers(-MAX_PAD, MAX_PAD, max_len=6)  # (left, right[, top, bottom[, front, back]]); negative crops
NAMES = Field(f"a dict of at most {MAX_STATE_KEYS} names (to None)", lambda v: type(v) is dict
              and len(v) <= MAX_STATE_KEYS and all(type(k) is str and x is None for k, x in v.items()))

FIELDS = {
    # widths
    **dict.fromkeys(("c1", "c2", "c", "c_", "dim", "channel", "in_channels", "out_channels", "num_features",
                     "head_dim", "key_dim", "all_head_dim", "hidden_dim", "embed_dim", "kdim", "vdim",
                     "num_parameters"), CHANNELS),
    **dict.fromkeys(("in_features", "out_features", "in1_features", "in2_features", "embedding_dim"),
                    integer(1, 1 << 16)),
    **dict.fromkeys(("groups", "g"), CHANNELS),
    "c2s": integers(1, MAX_CHANNELS, max_len=64), "normalized_shape": integers(1, 1 << 16),
    "num_groups": CHANNELS, "num_channels": CHANNELS,
    # counts
    "n": integer(0, MAX_REPEATS), "n_iter": integer(0, 16), "num_heads": integer(1, 256), "nl": integer(1, 8),
    "na": integer(1, 64), "nc": integer(1, MAX_NAMES), "no": integer(1, MAX_NAMES + 1024), "reg_max": integer(0, 64),
    "area": integer(1, 64), "max_det": integer(1, 100_000), "k": KERNEL, "sr_ratio": integer(1, 64),
    "num_embeddings": integer(1, 1 << 24), "padding_idx": NONE | integer(0, 1 << 24),
    # geometry
    **dict.fromkeys(("kernel_size", "dilation", "output_padding"), KERNEL),
    "stride": KERNEL | TENSOR, "padding": KERNEL | choice("same", "valid"), "d": AXIS,
    "input_resolution": integers(1, MAX_IMGSZ, max_len=2), "stoken_size": integers(1, 64, max_len=2),
    "window_size": NONE | integers(1, MAX_IMGSZ, max_len=2), "scale_factor": NONE | number(0, 16),
    "size": NONE | integers(1, MAX_IMGSZ, max_len=3), "shape": NONE | integers(0, 1 << 20, max_len=8),
    "output_size": Field(f"an int or up to 3 ints (or None) in 1..{MAX_IMGSZ}", lambda v: all(
        x is None or (type(x) is int and 1 <= x <= MAX_IMGSZ) for x in (v if type(v) in (tuple, list) and
                                                                         0 < len(v) <= 3 else (v,)))),
    "upscale_factor": integer(1, 16), "downscale_factor": integer(1, 16),
    "divisor_override": NONE | integer(1, 1 << 16),
    "unflattened_size": integers(-1, 1 << 16, max_len=8),  # -1: the one size torch infers
    # what a convolution with a non-zero padding_mode passes to F.pad: its padding, or d * (k - 1) for "same"
    "_reversed_padding_repeated_twice": integers(0, 64 * 64, max_len=6),
    # numbers that scale values, not sizes
    "eps": number(0, 1), "momentum": NONE | number(0, 1), "p": number(0, 1), "alpha": number(-1e3, 1e3),
    "negative_slope": number(-1e3, 1e3), "scale": number(-1e6, 1e6), "focusing_factor": number(0, 64),
    "mlp_ratio": number(0, 64), "value": number(-1e6, 1e6), "beta": number(-1e6, 1e6),
    "threshold": number(-1e6, 1e6), "gamma": NONE | number(-1e6, 1e6) | TENSOR,
    "min_val": number(-1e6, 1e6), "max_val": number(-1e6, 1e6), "drop_prob": number(0, 1),
    "lambd": number(0, 1e3), "lower": number(-1e3, 1e3), "upper": number(-1e3, 1e3), "init": number(-1e3, 1e3),
    "dropout": number(0, 1), "norm_type": number(0, 64), "max_norm": NONE | number(0, 1e6),  # norm_type: p of a p-norm
    # switches and names
    **dict.fromkeys(("inplace", "add", "affine", "track_running_stats", "transposed", "return_indices", "ceil_mode",
                     "elementwise_affine", "export", "dynamic", "end2end", "legacy", "xyxy", "is_first",
                     "batch_first", "add_zero_attn", "_qkv_same_embed_dim", "scale_grad_by_freq", "sparse", "keepdim"),
                    BOOL),
    **dict.fromkeys(("align_corners", "recompute_scale_factor", "count_include_pad"), NONE | BOOL),
    "padding_mode": choice("zeros", "reflect", "replicate", "circular"), "approximate": choice("none", "tanh"),
    "mode": choice("nearest", "linear", "bilinear", "bicubic", "trilinear", "area", "nearest-exact"),
    "format": NONE | text(32), "name": text(64), "type": text(256), "task": text(32), "bn": NONE,
    "reduction": choice("none", "mean", "sum"),
    # the layer graph (checked against the model in _layer_graph) and bookkeeping
    "i": integer(0, MAX_LAYERS), "f": LAYERS, "idx": integers(0, 64, max_len=64),
    "save": integers(0, MAX_LAYERS, max_len=MAX_LAYERS),
    "np": integer(0, 1 << 40),
    # tensors kept as attributes
    **dict.fromkeys(("anchors", "strides", "class_weights"), TENSOR), **dict.fromkeys(("grid", "anchor_grid"), TENSORS),
    **dict.fromkeys(("bias_k", "bias_v"), NONE | TENSOR),  # MultiheadAttention without add_bias_kv: None
    # records no stage reads (training settings, the model YAML): inert data, bounded by the unpickler's budgets
    **dict.fromkeys(("yaml", "args", "hyp"), NONE | RECORD), **dict.fromkeys(("yaml_file", "pt_path"), text(4096)),
    "names": Field("class names (checked as a whole)", lambda v: True), "criterion": NONE,
    "process_group": NONE,  # SyncBatchNorm's: in eval it runs as BatchNorm, and a saved one holds None
}


def _torch(*names):
    """The table's torch classes of these names, as far as this torch has them (RMSNorm came in 2.4)."""
    return [cls for cls in TORCH_LAYERS if cls.__name__ in names]


UNFOLD = {"kernel_size": integers(1, MAX_UNFOLD_KERNEL, max_len=2), "dilation": integers(1, 64, max_len=2),
          "padding": integers(0, 64, max_len=2), "stride": integers(1, 64, max_len=2)}
CLASS_FIELDS = {
    **{cls: {"dim": AXIS} for cls in (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.GLU, nn.CosineSimilarity)},
    nn.Flatten: {"start_dim": AXIS, "end_dim": AXIS}, nn.Unflatten: {"dim": AXIS},
    **{cls: {"padding": PADS} for cls in _torch(*TORCH_LAYER_NAMES["padding"])},
    nn.Unfold: UNFOLD, nn.Fold: {**UNFOLD, "output_size": integers(1, MAX_IMGSZ, max_len=2)},
    **{cls: {"stride": NONE | KERNEL} for cls in _torch("LPPool1d", "LPPool2d", "LPPool3d")},  # None: its kernel
    nn.LocalResponseNorm: {"size": CHANNELS, "k": number(-1e6, 1e6)},  # size: neighbouring channels; k: a float
    **{cls: {"eps": NONE | number(0, 1)} for cls in _torch("RMSNorm")},  # None: the dtype's eps
    nn.PairwiseDistance: {"norm": number(0, 64)},
    nn.ParameterList: {"_size": integer(0, MAX_STATE_KEYS)}, nn.ParameterDict: {"_keys": NAMES},
    torchvision.ops.StochasticDepth: {"mode": choice("row", "batch")},
    torchvision.ops.misc.Permute: {"dims": integers(-8, 8, max_len=8)},
}
UNLISTED = Field("any checkpoint data but an int beyond 2**40", lambda v: type(v) is not int or abs(v) <= 1 << 40)


def _repconv_sizes(m):
    """RepConv's fusion allocates c1 x c1/g x 3 x 3 from these: they must be its own convolution's."""
    c = m._modules.get("conv1")
    inner = c._modules.get("conv") if c is not None else None
    return inner is None or (m.c1, m.c2, m.g) == (inner.in_channels, inner.out_channels, inner.groups)


CONSISTENT = {conv.RepConv: (_repconv_sizes, "c1, c2 and g must be those of its conv1")}


def check_model(model):
    """Refused unless every field of every module is within its bound and the model as a whole is sound."""
    for path, module in _named_modules(model):
        _check_fields(path, module)
        rule = CONSISTENT.get(type(module))
        if rule and not rule[0](module):
            raise Refused(f"{_where(path, module)}: {rule[1]}")
    _layer_graph(model)
    _tensor_bytes(model)


def check_names(names):
    """The class names: at most MAX_NAMES, each printable and at most MAX_NAME_CHARS long."""
    if len(names) > MAX_NAMES:
        raise Refused(f"{len(names)} class names (at most {MAX_NAMES})")
    for key, name in names.items():
        if not (type(key) is int and 0 <= key < MAX_NAMES and text(MAX_NAME_CHARS).ok(name)):
            raise Refused(f"class name {shown(key, 20)}: {shown(name, 40)!s} is not {text(MAX_NAME_CHARS).text}")


def image_size(value, stride):
    """The training image size a checkpoint records, as ultralytics trained at it: each side rounded up to a
    multiple of the largest stride; refused above MAX_IMGSZ. None stays None."""
    if value is None:
        return None
    sides = value if isinstance(value, (list, tuple)) else [value]
    if not (1 <= len(sides) <= 2 and all(type(v) is int and 0 < v <= MAX_IMGSZ for v in sides)):
        raise Refused(f"train_args imgsz {shown(value, 40)} is not one or two ints in 1..{MAX_IMGSZ}")
    rounded = [-(-v // stride) * stride for v in sides]
    return rounded[0] if not isinstance(value, (list, tuple)) else rounded


def _named_modules(model):
    """(path, module) by the validated __dict__ tables only: no method of the model is called here."""
    todo, seen = [("", model)], set()
    while todo:
        path, m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield path, m
        for name, child in m.__dict__["_modules"].items():
            if child is not None:
                todo.append((f"{path}.{name}" if path else name, child))


def _check_fields(path, module):
    own = CLASS_FIELDS.get(type(module), {})
    for name, value in module.__dict__.items():
        bound = own.get(name) or FIELDS.get(name) or (None if name.startswith("_") else UNLISTED)
        if bound is None or name == "training":  # nn.Module's own tables: checked by object_graph
            continue
        if not bound.ok(value):
            raise Refused(f"{_where(path, module)}.{name} = {shown(value, 60)}: must be {bound.text}")


def _where(path, module):
    return f"{type(module).__name__} {path or '(the model)'}"


def _layer_graph(model):
    """Every top-level layer's `i` is its position and each input index `f` names an earlier, saved output:
    the model's forward indexes its outputs so far by `f`, and a bad index fails it (or picks a None)."""
    sequential = model.__dict__["_modules"].get("model")
    if not isinstance(sequential, nn.Sequential):
        return
    layers = list(sequential.__dict__["_modules"].values())
    if len(layers) > MAX_LAYERS:
        raise Refused(f"a model of {len(layers)} layers (at most {MAX_LAYERS})")
    save = set(model.__dict__.get("save") or ())
    for position, layer in enumerate(layers):
        i, f = layer.__dict__.get("i", position), layer.__dict__.get("f", -1)
        if i != position:
            raise Refused(f"layer {position} ({type(layer).__name__}) says it is layer {shown(i, 20)}")
        for j in f if isinstance(f, (list, tuple)) else [f]:
            source = j if j >= 0 else position + j
            if j != -1 and not (0 <= source < position and source in save):
                raise Refused(f"layer {position} ({type(layer).__name__}) takes input from layer {j}, which is not "
                              f"an earlier saved layer")
        if position == 0 and f != -1:
            raise Refused(f"layer 0 ({type(layer).__name__}) takes input from layer {shown(f, 20)}, not the image")


def _tensor_bytes(model):
    """The bytes the model's tensors take once cast to fp32: each tensor its own copy, however many of them view
    one storage (casting a view copies it)."""
    total = 0
    for _, m in _named_modules(model):
        tables = (m.__dict__["_parameters"], m.__dict__["_buffers"])
        tensors = [t for table in tables for t in table.values() if t is not None]
        tensors += [t for v in m.__dict__.values() for t in (v if type(v) is list else [v]) if TENSOR.ok(t)]
        for t in tensors:
            total += t.numel() * (4 if t.is_floating_point() else t.element_size())
            if total > MAX_TENSOR_BYTES:
                raise Refused(f"tensors that take more than {MAX_TENSOR_BYTES >> 20} MiB once cast to fp32 (views "
                              f"of one storage each become a copy)")
