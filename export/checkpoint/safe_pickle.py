"""The gated unpickler: a checkpoint's pickle can only name, build and fill objects from an explicit table.

Trust model. Every global a pickle names is looked up in tables built here from our own imports; the
pickle's module string is never imported. A name resolves to one of:
- a *table class* (the exact ultralytics / torch layers and heads we support, the attention families by
  class name, a few plain classes): instances are created as `cls.__new__(cls)` and nothing else;
- an *op* (tensor/storage rebuilders, containers, numpy scalar/array/dtype, `_codecs.encode`): our own
  function that validates its arguments and builds the object itself (the real torch/numpy helper the
  pickle names is never called with pickle arguments);
- a *constant* (torch dtypes, layouts, qschemes) or a *marker* class that is only accepted as an op argument;
- anything else: an inert placeholder class (`Unknown`), so an unknown custom block can be reported by
  name and layer. Calling a placeholder (REDUCE with arguments) refuses the file at once.
BUILD applies only to instances this unpickler just created from a table class (or a placeholder), once,
with a dict of plain identifier keys that neither are dunders nor shadow the class's methods or
properties; it is a dict update (nn.Module's own __setstate__ is one), never the class's own
`__setstate__`. SETITEM(S)/APPEND(S)/ADDITEMS only fill exact dicts, lists and sets.
What the pickle builds is then validated as a whole by export.checkpoint.object_graph before any method is called.
"""

import _compat_pickle
import argparse
import collections
import functools
import inspect
import io
import math
import pathlib
import pickle
import re
import sys
import types
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.ops.deform_conv
import torchvision.ops.misc
import torchvision.ops.stochastic_depth
from torch import nn
from ultralytics.nn import tasks
from ultralytics.nn.modules import block, conv, head
from ultralytics.utils import IterableSimpleNamespace

import models
from models import yolov5

MAX_GLOBAL_NAME = 256  # characters in a module or class name
MAX_UNKNOWN_GLOBALS = 256  # distinct unknown names one file may reference
MAX_TENSOR_DIMS = 16
MAX_INT = 2 ** 62
MAX_KEY_NODES = 16  # values in one dict key or set item (a str, or a small tuple of numbers and strings)
MAX_KEY_INT = (1 << 31) - 1
MAX_STATE_KEYS = 4096  # attributes of one object; ultralytics' args namespace has ~130
MAX_INSTANCES = 100_000  # class instances one file may create; a yolov8x has ~500 modules
# Work the gate's checks and ops may do, in elements touched, per byte of pickle (plus a floor). A pickle
# can reference one large object many times for a few bytes each; without this, re-encoding, re-hashing or
# re-copying it each time amplifies a small file into unbounded time or memory.
WORK_PER_PICKLE_BYTE = 2
WORK_FLOOR = 1 << 20


class Refused(pickle.UnpicklingError):
    """The pickle asked for something outside the table; str(e) says what."""


class Unknown(nn.Module):
    """Stand-in for a global we do not reconstruct: holds the pickled state, has no behaviour."""

    origin = "?"

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.origin} was not reconstructed (unknown class)")


# ---- the table -------------------------------------------------------------------------------------
# torch's own layers a detection model may hold, by their name under torch.nn (names missing from the
# installed torch are skipped: ZeroPad1d/3d and CircularPad* came in 2.1, RMSNorm in 2.4). Each holds only
# numbers, strings, tuples and tensors, and works when filled by a dict update (its own __setstate__, where it
# has one, only fills in fields older torch lacked: LEGACY_DEFAULTS). Every field they hold is bounded by
# export.checkpoint.schema.
TORCH_LAYER_NAMES = {
    "convolutions": ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"),
    "activations": ("ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "GLU", "SiLU",
                    "Mish", "Sigmoid", "LogSigmoid", "Hardsigmoid", "Hardswish", "Hardtanh", "Hardshrink", "Softshrink",
                    "Tanh", "Tanhshrink", "Softsign", "Softplus", "Threshold", "Softmax", "Softmin", "LogSoftmax",
                    "Softmax2d", "MultiheadAttention"),
    "pooling": ("MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d",
                "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
                "LPPool1d", "LPPool2d", "LPPool3d", "MaxUnpool1d", "MaxUnpool2d", "MaxUnpool3d"),
    "padding": ("ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d", "ConstantPad3d",
                "ReflectionPad1d", "ReflectionPad2d", "ReflectionPad3d", "ReplicationPad1d", "ReplicationPad2d",
                "ReplicationPad3d", "CircularPad1d", "CircularPad2d", "CircularPad3d"),
    "normalisation": ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d",
                      "InstanceNorm3d", "LayerNorm", "GroupNorm", "LocalResponseNorm", "RMSNorm"),
    "dropout": ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"),
    "reshaping": ("Fold", "Unfold", "PixelShuffle", "PixelUnshuffle", "ChannelShuffle", "Upsample",
                  "UpsamplingNearest2d", "UpsamplingBilinear2d", "Flatten", "Unflatten"),
    "containers": ("Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict"),
    "linear and distance": ("Identity", "Linear", "Bilinear", "Embedding", "CosineSimilarity", "PairwiseDistance"),
    "loss": ("BCEWithLogitsLoss",),  # older ultralytics pickled its training loss with the model
}
# torch layers torch.nn does not export, by their defining module: MultiheadAttention's `out_proj`.
TORCH_PARTS = {nn.modules.linear: ("NonDynamicallyQuantizableLinear",),
               # torchvision's own modules that detection forks hold (DCNv2-style deformable attention, SE, ...)
               torchvision.ops.deform_conv: ("DeformConv2d",),
               torchvision.ops.misc: ("SqueezeExcitation", "FrozenBatchNorm2d", "Conv2dNormActivation",
                                      "Conv3dNormActivation", "MLP", "Permute"),
               torchvision.ops.stochastic_depth: ("StochasticDepth",)}
# Left out on purpose: a checkpoint holding one is refused as a library class (loader.LibraryClassesError):
# - RNN, LSTM, GRU (and their cells, with them): RNNBase's own __setstate__ rebuilds `_flat_weights` from
#   `_all_weights` (a loop of `num_layers`, from the file) and the cuDNN weight layout; bypassed, they do not run.
# - Transformer, TransformerEncoder(Layer), TransformerDecoder(Layer): they hold `activation`, a function (code,
#   not data), which their __setstate__ fills in for older files.
# - Lazy* modules: an unmaterialised one holds UninitializedParameter and changes its own class on first call.
# - quantized modules (torch.ao.nn.quantized*): their packed weights are script objects built by __setstate__.
# - FractionalMaxPool2d/3d: random pooling regions on every call, so no export can match the model.
# - DataParallel / DistributedDataParallel: wrappers holding devices and process groups; ultralytics saves the
#   model inside them.
# - EmbeddingBag, AdaptiveLogSoftmaxWithLoss, CrossMapLRN2d, losses but BCEWithLogitsLoss: no detection model
#   holds them.


def _torch_layers():
    found = [getattr(nn, name, None) for names in TORCH_LAYER_NAMES.values() for name in names]
    found += [getattr(module, name, None) for module, names in TORCH_PARTS.items() for name in names]
    return tuple(cls for cls in found if isinstance(cls, type) and issubclass(cls, nn.Module))


TORCH_LAYERS = _torch_layers()

# ultralytics detection layers and heads, by the name under their defining module (names missing from
# the installed ultralytics are skipped: the table follows the pinned version).
ULTRALYTICS_LAYERS = {
    conv: ("Conv", "Conv2", "LightConv", "DWConv", "DWConvTranspose2d", "ConvTranspose", "Focus", "GhostConv",
           "RepConv", "ChannelAttention", "SpatialAttention", "CBAM", "Concat"),
    block: ("DFL", "SPP", "SPPF", "SPPELAN", "C1", "C2", "C3", "C2f", "C3x", "C3Ghost", "GhostBottleneck",
            "Bottleneck", "BottleneckCSP", "RepC3", "C3k2", "C3k", "C2PSA", "C2fPSA", "PSA", "PSABlock",
            "Attention", "SCDown", "RepVGGDW", "CIB", "C2fCIB", "ELAN1", "AConv", "ADown", "RepNCSPELAN4",
            "RepCSP", "RepBottleneck", "HGStem", "HGBlock", "ResNetBlock", "ResNetLayer", "A2C2f", "AAttn",
            "ABlock"),
    head: ("Detect", "v10Detect"),
    tasks: ("DetectionModel",),
}
# The training loss older ultralytics pickled with the model (`model.criterion`): plain data holders.
LOSS_CLASSES = {"ultralytics.utils.loss": ("v8DetectionLoss", "BboxLoss", "DFLoss"),
                "ultralytics.utils.tal": ("TaskAlignedAssigner",)}
NAMESPACES = (types.SimpleNamespace, IterableSimpleNamespace, argparse.Namespace)
# Defaults a class's own (bypassed) __setstate__ would fill in for checkpoints of older torch versions, and
# fields older torch lacked that forward reads (GELU's `approximate`: 1.12; MultiheadAttention's `batch_first`:
# 1.9). ultralytics itself sets a missing Upsample `recompute_scale_factor` to None when it loads a checkpoint.
LEGACY_DEFAULTS = {
    **{cls: {"padding_mode": "zeros"} for cls in TORCH_LAYERS if issubclass(cls, nn.modules.conv._ConvNd)},
    **{cls: {"dim": None} for cls in (nn.Softmax, nn.Softmin, nn.LogSoftmax)},
    **{cls: {"recompute_scale_factor": None} for cls in TORCH_LAYERS if issubclass(cls, nn.Upsample)},
    nn.AvgPool3d: {"padding": 0, "ceil_mode": False, "count_include_pad": True},
    nn.GELU: {"approximate": "none"},
    nn.MultiheadAttention: {"_qkv_same_embed_dim": True, "batch_first": False},
}
# Module roots that are libraries, never a fork's code: their names are never remapped to an attention family
# by class name, and one outside the table is refused as a library class, not reported as a custom block.
LIBRARY_ROOTS = {"torch", "torchvision", "numpy", "onnx", "onnxruntime"} | set(sys.stdlib_module_names)


@dataclass(frozen=True)
class Op:
    """A reconstruction step the pickle may call: our own function, validating its arguments."""

    name: str
    fn: object

    def __call__(self, *args):
        return self.fn(*args)


@dataclass(frozen=True)
class StorageType:
    """What `torch.FloatStorage` etc. resolve to: only the element type, for persistent_load."""

    name: str
    dtype: torch.dtype


class Marker:
    """A class the pickle may name only as an argument of an op (e.g. ndarray for numpy's _reconstruct)."""

    def __init__(self, name, cls):
        self.name, self.cls = name, cls


def _qualname(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _module_classes():
    """Exact module classes we reconstruct: qualified name -> class (aliases included)."""
    table = {_qualname(c): c for c in TORCH_LAYERS}
    for module, names in ULTRALYTICS_LAYERS.items():
        for name in names:
            cls = getattr(module, name, None)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                table[f"{module.__name__}.{name}"] = cls
                table[f"ultralytics.nn.modules.{name}"] = cls  # ultralytics 8.0's single modules.py
    return table


def _plain_classes():
    import ultralytics.utils.loss as loss
    import ultralytics.utils.tal as tal

    table = {}
    for module, names in ((loss, LOSS_CLASSES["ultralytics.utils.loss"]), (tal, LOSS_CLASSES["ultralytics.utils.tal"])):
        for name in names:
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                table[f"{module.__name__}.{name}"] = cls
                table[f"ultralytics.yolo.utils.{module.__name__.rsplit('.', 1)[1]}.{name}"] = cls
    for cls in NAMESPACES:
        table[_qualname(cls)] = cls
    table["ultralytics.yolo.utils.IterableSimpleNamespace"] = IterableSimpleNamespace
    return table


def _family_classes():
    return {name: obj for name, obj in models.CHECKPOINT_NAMES.items()
            if isinstance(obj, type) and issubclass(obj, nn.Module)}


def _constants():
    """torch dtypes, layouts, qschemes and memory formats by their pickled names (torch.float16, ...)."""
    kinds = (torch.dtype, torch.layout, torch.qscheme, torch.memory_format)
    return {f"torch.{name}": value for name, value in vars(torch).items() if isinstance(value, kinds)}


# torch.<Name>Storage -> element type (quantized and complex storages are not part of a YOLO checkpoint)
STORAGE_DTYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool, "UntypedStorage": torch.uint8}


MODULE_CLASSES = _module_classes()
PLAIN_CLASSES = _plain_classes()
FAMILY_CLASSES = _family_classes()
YOLOV5_CLASSES = yolov5.class_table()  # models.yolo.Detect, models.common.C3, ... -> our compat / ultralytics classes
CONSTANTS = _constants()
TABLE_MODULE_TYPES = (frozenset(MODULE_CLASSES.values()) | frozenset(FAMILY_CLASSES.values())
                      | frozenset(YOLOV5_CLASSES.values()))
TABLE_PLAIN_TYPES = frozenset(PLAIN_CLASSES.values())


# ---- ops: our own reconstruction steps ---------------------------------------------------------------
def _require(ok, what):
    if not ok:
        raise Refused(what)


def _is_int(v, low=0, high=MAX_INT):
    return type(v) is int and low <= v <= high


def _is_shape(v):
    return isinstance(v, (tuple, list)) and len(v) <= MAX_TENSOR_DIMS and all(_is_int(s) for s in v)


@dataclass
class ExpansionBudget:
    """Elements that zero-stride (expanded) views may claim beyond their storages, for the whole file.
    YOLOv5 pickles its anchor grids as expanded views (~50k elements at 640); casting or copying such a
    view materialises every element, so an unbounded claim is a memory bomb."""

    left: int = 64 << 20

    def spend(self, elements):
        self.left -= elements
        _require(self.left >= 0, "expanded tensor views claiming far more elements than the file holds")


@dataclass
class LoadedStorage:
    """A storage record read from the zip: untyped bytes plus the element type they were saved as."""

    untyped: torch.UntypedStorage
    dtype: torch.dtype
    expansion: ExpansionBudget

    @property
    def numel(self):
        return self.untyped.nbytes() // self.dtype.itemsize


def _tensor_from_storage(storage, offset, size, stride, dtype=None):
    _require(type(storage) is LoadedStorage, "a tensor whose data is not a storage record")
    _require(dtype is None or dtype == storage.dtype, "a tensor viewing its storage as another dtype")
    _require(_is_int(offset) and _is_shape(size) and _is_shape(stride) and len(size) == len(stride),
             "a tensor with a malformed offset, size or stride")
    if all(size):
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        _require(last < storage.numel, f"a tensor reaching past its storage ({last} >= {storage.numel} elements)")
        storage.expansion.spend(max(0, math.prod(size) - storage.numel))
    return torch.empty(0, dtype=storage.dtype).set_(storage.untyped, offset, tuple(size), tuple(stride))


def _check_hooks(hooks):
    _require(hooks is None or (type(hooks) in (dict, collections.OrderedDict) and not hooks),
             "a tensor with backward hooks")


def _finish_tensor(t, requires_grad, hooks, metadata):
    _require(type(requires_grad) is bool, "a tensor with a non-bool requires_grad")
    _check_hooks(hooks)
    _require(metadata is None or (type(metadata) is dict and not any(metadata.values())),
             "a tensor with conj/neg metadata")
    return t.requires_grad_(requires_grad)


def rebuild_tensor(storage, offset, size, stride):
    return _tensor_from_storage(storage, offset, size, stride)


def rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return _finish_tensor(_tensor_from_storage(storage, offset, size, stride), requires_grad, hooks, metadata)


def rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    t = _tensor_from_storage(storage, offset, size, stride, dtype)
    return _finish_tensor(t, requires_grad, hooks, metadata)


def _tensor_state(t, state):
    """Python attributes saved on a tensor: plain identifiers that shadow nothing of Tensor's."""
    if type(state) is tuple:
        _require(len(state) == 2 and not state[1], "tensor state with slots")
        state = state[0]
    if state:
        _check_state_keys(type(t), state)
        t.__dict__.update(state)
    return t


def rebuild_parameter(data, requires_grad, hooks):
    _require(isinstance(data, torch.Tensor) and type(requires_grad) is bool, "a malformed parameter")
    _check_hooks(hooks)
    return nn.Parameter(data, requires_grad)


def rebuild_parameter_with_state(data, requires_grad, hooks, state):
    return _tensor_state(rebuild_parameter(data, requires_grad, hooks), state)


def rebuild_from_type_v2(func, new_type, args, state):
    _require(isinstance(func, Op) and func in TENSOR_OPS and type(args) is tuple,
             "a tensor rebuilt by something other than a tensor rebuilder")
    _require(isinstance(new_type, Marker) and new_type.cls in (torch.Tensor, nn.Parameter),
             "a tensor of a subclass other than Tensor or Parameter")
    t = func(*args)
    if new_type.cls is nn.Parameter:
        t = nn.Parameter(t, t.requires_grad)
    return _tensor_state(t, state)


def get_layout(name):
    value = CONSTANTS.get(name) if type(name) is str else None
    _require(isinstance(value, torch.layout), f"unknown tensor layout {name!r}")
    return value


def plain_key(v):
    """A dict key or set item we allow: a string, bytes, None, a bool, an int of at most 32 bits, a finite float,
    or a small tuple of those. Small matters: hashing a deeply nested tuple recurses in C and overflows the
    stack, and a large one re-hashed on every reference costs time without bound. So do big ints (a 1 MiB int
    is re-hashed on every insert) and ints chosen to share one hash (equal modulo 2**61 - 1: every insert
    probes all the others); below 2**31 an int is its own hash."""
    todo, nodes = [v], 0
    while todo:
        x = todo.pop()
        nodes += 1
        if type(x) is tuple and len(x) <= MAX_KEY_NODES:
            todo.extend(x)
        elif type(x) is int and not -MAX_KEY_INT <= x <= MAX_KEY_INT:
            return False
        elif type(x) is float and not math.isfinite(x):
            return False
        elif not (x is None or type(x) in (bool, int, float, str, bytes)):
            return False
        if nodes > MAX_KEY_NODES:
            return False
    return True


def _cost(obj):
    """Elements an op or check touches when handed `obj` (one level: deeper levels were charged when built)."""
    return len(obj) + 1 if type(obj) in (str, bytes, bytearray, tuple, list, dict, collections.OrderedDict,
                                         set, frozenset) else 1


def make_ordered_dict(items=()):
    _require(type(items) in (list, tuple) and all(type(p) in (list, tuple) and len(p) == 2 and plain_key(p[0])
                                                  for p in items), "a malformed OrderedDict")
    return collections.OrderedDict(items)


def make_counter(mapping=None):
    _require(mapping is None or (type(mapping) is dict and all(map(plain_key, mapping))), "a malformed Counter")
    return collections.Counter(mapping or {})


def _make_set(kind):
    def make(items=()):
        _require(type(items) in (list, tuple) and all(map(plain_key, items)), f"a malformed {kind.__name__}")
        return kind(items)

    return make


def encode_latin1(text, encoding="latin1"):
    _require(type(text) is str and encoding in ("latin1", "latin-1"), "_codecs.encode other than str to latin-1")
    return text.encode("latin-1")


def make_empty_bytes(*args):
    _require(args == (), "bytes(...) with arguments")  # protocol 2 pickles b"" as bytes()
    return b""


def make_bytearray(data=b"", encoding=None):
    # protocol 2 pickles bytearray(b) as bytearray(str, 'latin-1'); never bytearray(n), which allocates n bytes
    if type(data) is str:
        _require(encoding in ("latin1", "latin-1"), "bytearray from a str other than latin-1")
        return bytearray(data, "latin-1")
    _require(type(data) is bytes and encoding is None, "bytearray from anything but bytes or a latin-1 str")
    return bytearray(data)


def make_size(dims=()):
    _require(_is_shape(dims), "a malformed torch.Size")
    return torch.Size(dims)


def make_device(kind, index=None):
    _require(type(kind) is str and len(kind) <= 32 and (index is None or _is_int(index, high=1024)),
             "a malformed torch.device")
    return torch.device(kind) if index is None else torch.device(kind, index)


def make_complex(real=0.0, imag=0.0):
    _require(type(real) in (int, float) and type(imag) in (int, float), "a malformed complex")
    return complex(real, imag)


def _make_path(pure):
    def make(*parts):
        _require(all(type(p) is str for p in parts), "a path made of non-strings")
        return pure(*parts)

    return make


NUMPY_CODE = re.compile(r"^(b1|[iu][1248]|f[248]|c(8|16)|[SU]\d{1,6})$")


def make_np_dtype(code, align=False, copy=True):
    # copy=True: a fresh dtype object, so the BUILD that follows cannot touch numpy's shared singletons
    _require(type(code) is str and NUMPY_CODE.match(code) and align is False and copy is True,
             f"numpy dtype {code!r} (only plain numeric and fixed-width string dtypes, as pickled by numpy)")
    return np.dtype(code, align=False, copy=True)


def np_reconstruct(subtype, shape, typecode):
    _require(isinstance(subtype, Marker) and subtype.cls is np.ndarray and shape == (0,) and typecode == b"b",
             "numpy _reconstruct other than numpy's own empty-array form")
    return np.ndarray.__new__(np.ndarray, (0,), "b")


def np_scalar(dtype, data=None):
    _require(isinstance(dtype, np.dtype) and not dtype.hasobject and type(data) is bytes
             and len(data) == dtype.itemsize, "a malformed numpy scalar")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _table_new(cls, base=None, state=None):
    """copyreg._reconstructor(cls, object, None), as protocols 0/1 pickle plain objects: cls.__new__(cls)."""
    _require(isinstance(base, Marker) and base.cls is object and state is None, "copyreg._reconstructor with a base")
    return cls


def _ops():
    ops = {
        "torch._utils._rebuild_tensor": rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": rebuild_parameter_with_state,
        "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2,
        "torch.serialization._get_layout": get_layout,
        "collections.OrderedDict": make_ordered_dict,
        "collections.Counter": make_counter,
        "builtins.set": _make_set(set),
        "builtins.frozenset": _make_set(frozenset),
        "builtins.bytes": make_empty_bytes,
        "builtins.bytearray": make_bytearray,
        "builtins.complex": make_complex,
        "_codecs.encode": encode_latin1,
        "torch.Size": make_size,
        "torch.device": make_device,
        "numpy.dtype": make_np_dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x and 2.x pickles
        ops[f"{module}._reconstruct"] = np_reconstruct
        ops[f"{module}.scalar"] = np_scalar
    for module in ("pathlib", "pathlib._local"):  # Python 3.13 pickles paths from pathlib._local
        for name, pure in (("PosixPath", pathlib.PurePosixPath), ("PurePosixPath", pathlib.PurePosixPath),
                           ("WindowsPath", pathlib.PureWindowsPath), ("PureWindowsPath", pathlib.PureWindowsPath)):
            ops[f"{module}.{name}"] = _make_path(pure)
    return {name: Op(name, fn) for name, fn in ops.items()}


OPS = _ops()
TENSOR_OPS = frozenset(OPS[f"torch._utils._rebuild_{n}"] for n in ("tensor", "tensor_v2", "tensor_v3"))
MARKERS = {name: Marker(name, cls) for name, cls in (
    ("torch._tensor.Tensor", torch.Tensor), ("torch.Tensor", torch.Tensor), ("torch.nn.parameter.Parameter", nn.Parameter),
    ("numpy.ndarray", np.ndarray), ("builtins.object", object))}
RECONSTRUCTOR = "copyreg._reconstructor"


# ---- BUILD state rules -------------------------------------------------------------------------------
# ultralytics tags every layer with `type` (its class path, a str), shadowing nn.Module.type(): a str
# cannot be called, so this one shadow is data; every other shadowing key is refused.
SHADOWS_ALLOWED = {"type": str}


def _check_state_keys(cls, state):
    _require(type(state) in (dict, collections.OrderedDict), f"a {cls.__name__} whose state is not a dict")
    _require(len(state) <= MAX_STATE_KEYS, f"a {cls.__name__} with more than {MAX_STATE_KEYS} attributes")
    for key, value in state.items():
        _require(type(key) is str and key.isidentifier() and not key.startswith("__"),
                 f"a {cls.__name__} attribute named {str(key)[:40]!r} (only plain identifiers may be set)")
        _require(not _shadows(cls, key) or type(value) is SHADOWS_ALLOWED.get(key),
                 f"a {cls.__name__} attribute {key!r} that would shadow its method or property")


@functools.lru_cache(maxsize=8192)
def _shadows(cls, key):
    attr = inspect.getattr_static(cls, key, None)
    return attr is not None and (callable(attr) or hasattr(type(attr), "__get__"))


def _build_object(inst, state):
    if type(state) is tuple:  # (dict state, slot state): our classes have no slots
        _require(len(state) == 2 and not state[1], f"{type(inst).__name__} state with slots")
        state = state[0]
    state = state or {}
    _check_state_keys(type(inst), state)
    if isinstance(inst, nn.Module):
        _require(all(type(state.get(k, {})) in (dict, collections.OrderedDict) for k in MODULE_TABLES),
                 f"a {type(inst).__name__} whose parameter, buffer or submodule table is not a dict")
        nn.Module.__setstate__(inst, dict(state))  # vetted: a dict update plus missing hook dicts
        for key, value in LEGACY_DEFAULTS.get(type(inst), {}).items():
            inst.__dict__.setdefault(key, value)
    else:
        inst.__dict__.update(state)


def _build_ndarray(arr, state):
    _require(type(state) is tuple and len(state) == 5, "a malformed numpy array state")
    version, shape, dtype, fortran, raw = state
    _require(version == 1 and _is_shape(shape) and isinstance(dtype, np.dtype) and type(fortran) is bool
             and type(raw) is bytes, "a malformed numpy array state")
    _require(not dtype.hasobject and dtype.fields is None and dtype.subdtype is None,
             "a numpy array of objects or records")
    _require(int(np.prod(shape, dtype=object)) * dtype.itemsize == len(raw),
             "a numpy array whose shape does not match its data")
    np.ndarray.__setstate__(arr, state)


def _build_dtype(dtype, state):
    canonical = dtype.__reduce__()[2]  # what numpy itself pickles for this fresh dtype
    _require(type(state) is tuple and len(state) == len(canonical)
             and state[0] == canonical[0] and state[1] in ("<", ">", "|", "=") and state[2:] == canonical[2:],
             "a numpy dtype state other than numpy's own")
    dtype.__setstate__(state)


MODULE_TABLES = ("_parameters", "_buffers", "_modules")
BUILT_BY_NUMPY = {np_reconstruct: _build_ndarray, make_np_dtype: _build_dtype}


# ---- the unpickler -----------------------------------------------------------------------------------
@dataclass
class UnpickleLog:
    remapped: dict = field(default_factory=dict)  # "fork.path.Name" -> "models.family.Name"
    unknown: dict = field(default_factory=dict)  # "module.Name" -> placeholder class
    kind: str = "ultralytics"  # "yolov5" once a YOLOv5-repository class path is resolved
    user_classes: dict = field(default_factory=dict)  # "module.Name" -> class imported by --code, this run only

    def placeholder(self, module, name):
        key = f"{module}.{name}"
        if key not in self.unknown:
            _require(len(self.unknown) < MAX_UNKNOWN_GLOBALS, "more than 256 distinct unknown globals")
            self.unknown[key] = type(name, (Unknown,), {"__module__": module, "__qualname__": name, "origin": key})
        return self.unknown[key]


def _dotted(text):
    """A module path or class name as Python spells one: identifiers joined by dots (no newline, no escape code:
    these names reach the console and the report)."""
    return all(part.isidentifier() for part in text.split("."))


def _describe(obj):
    if isinstance(obj, (Op, Marker)):
        return obj.name
    if isinstance(obj, type):
        return getattr(obj, "origin", None) or _qualname(obj)
    return f"a {type(obj).__name__} object"


class GatedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode can be intercepted
    def __init__(self, data, log, storages):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.log, self.storages = log, storages
        self._unbuilt = {}  # id -> (object, builder): instances created here and not yet BUILT
        self._work_left = WORK_PER_PICKLE_BYTE * len(data) + WORK_FLOOR
        self._instances = 0
        self._user_types = frozenset(log.user_classes.values())

    def _charge(self, *objs):
        self._work_left -= sum(_cost(o) for o in objs)
        _require(self._work_left >= 0, "a pickle that asks for far more work than its size accounts for "
                                       "(one object referenced and rebuilt over and over)")

    # -- globals
    def find_class(self, module, name):
        _require(type(module) is str and type(name) is str and 0 < len(module) <= MAX_GLOBAL_NAME
                 and 0 < len(name) <= MAX_GLOBAL_NAME and _dotted(module) and _dotted(name),
                 "a malformed global name (not a dotted Python name)")
        if self.proto < 3:  # protocol-2 pickles use Python 2 names for some builtins (__builtin__.set)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        module = "torch._tensor" if module == "torch.tensor" else module
        qual = f"{module}.{name}"
        for table in (OPS, MARKERS, CONSTANTS, MODULE_CLASSES, PLAIN_CLASSES):
            if qual in table:
                return table[qual]
        if qual in YOLOV5_CLASSES:  # looked up, never imported: their `models` is not our `models`
            self.log.kind = "yolov5"
            self.log.remapped[qual] = _qualname(YOLOV5_CLASSES[qual])
            return YOLOV5_CLASSES[qual]
        if qual == RECONSTRUCTOR:
            return Op(RECONSTRUCTOR, None)
        if module in ("torch", "torch.cuda") and name in STORAGE_DTYPES:
            return StorageType(name, STORAGE_DTYPES[name])
        if qual in self.log.user_classes:  # resolved by export.checkpoint.user_code from the user's --code folder
            return self.log.user_classes[qual]
        family = FAMILY_CLASSES.get(name)
        if family is not None and module.split(".")[0] not in LIBRARY_ROOTS:
            if qual != _qualname(family):
                self.log.remapped[qual] = _qualname(family)
            return family
        return self.log.placeholder(module, name)

    def get_extension(self, code):
        raise Refused("a copyreg extension code (EXT opcodes name globals through a process-wide registry)")

    def persistent_load(self, pid):
        _require(type(pid) is tuple and len(pid) == 5 and pid[0] == "storage", "a persistent id other than a storage")
        _, storage_type, key, location, numel = pid
        _require(type(storage_type) is StorageType and type(key) is str and type(location) is str and _is_int(numel),
                 "a malformed storage reference")
        return self.storages(key, storage_type.dtype, numel)

    # -- calls
    def _new(self, cls, args, kwargs=None):
        """The only way an object comes to exist: an op we wrote, or cls.__new__(cls) with no arguments."""
        if isinstance(cls, Op) and cls.name == RECONSTRUCTOR:
            _require(not kwargs and type(args) is tuple and len(args) == 3 and isinstance(args[0], type),
                     "a malformed copyreg._reconstructor call")
            cls, args = _table_new(*args), ()
        if isinstance(cls, Op):
            return self._call_op(cls, args, kwargs)
        instantiable = isinstance(cls, type) and (cls in TABLE_MODULE_TYPES or cls in TABLE_PLAIN_TYPES
                                                  or issubclass(cls, Unknown) or cls in self._user_types)
        _require(instantiable and args == () and not kwargs,
                 f"the checkpoint asks to call {_describe(cls)}" + (" with arguments" if instantiable else ""))
        self._instances += 1
        _require(self._instances <= MAX_INSTANCES, f"more than {MAX_INSTANCES} objects of classes")
        inst = cls.__new__(cls)
        self._unbuilt[id(inst)] = (inst, _build_object)
        return inst

    def _call_op(self, op, args, kwargs):
        _require(not kwargs and type(args) is tuple, f"{op.name} called with keywords")
        self._charge(*args)
        try:
            obj = op(*args)
        except (TypeError, ValueError, OverflowError, RuntimeError) as e:
            raise Refused(f"{op.name} called with arguments it does not take ({type(e).__name__})") from None
        builder = BUILT_BY_NUMPY.get(op.fn)  # numpy arrays and dtypes get their contents from a BUILD
        if builder is not None:
            self._unbuilt[id(obj)] = (obj, builder)
        return obj

    def load_reduce(self):  # also NEWOBJ: both go through the same gate
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args)

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args, kwargs)

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0/1)
        self.append(self._new(klass, tuple(args)))

    # -- filling objects
    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        entry = self._unbuilt.pop(id(inst), None)
        _require(entry is not None and entry[0] is inst,
                 f"the checkpoint asks to set attributes on {_describe(inst)}, which it did not just create")
        self._charge(state, *(state if type(state) is tuple else ()))
        entry[1](inst, state)

    def _target(self, kinds, op):
        target = self.stack[-1]
        _require(type(target) in kinds, f"{op} on {_describe(target)}")
        return target

    def _key(self, key):
        self._charge(key)
        _require(plain_key(key), "a dict key or set item that is not a number, string or small tuple of those")
        return key

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._target((dict, collections.OrderedDict, collections.Counter), "SETITEM")[self._key(key)] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = self._target((dict, collections.OrderedDict, collections.Counter), "SETITEMS")
        for i in range(0, len(items), 2):
            target[self._key(items[i])] = items[i + 1]

    def load_dict(self):
        items = self.pop_mark()
        self.append({self._key(items[i]): items[i + 1] for i in range(0, len(items), 2)})

    def load_append(self):
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)

    def load_appends(self):
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)

    def load_additems(self):
        items = self.pop_mark()
        self._target((set,), "ADDITEMS").update(self._key(item) for item in items)

    def load_frozenset(self):
        self.append(frozenset(self._key(item) for item in self.pop_mark()))

    def load_persid(self):
        raise Refused("a protocol-0 persistent id")

    dispatch = dict(pickle._Unpickler.dispatch)
    for _code, _method in ((pickle.REDUCE, load_reduce), (pickle.NEWOBJ, load_reduce), (pickle.NEWOBJ_EX, load_newobj_ex),
                           (pickle.BUILD, load_build), (pickle.SETITEM, load_setitem), (pickle.SETITEMS, load_setitems),
                           (pickle.APPEND, load_append), (pickle.APPENDS, load_appends), (pickle.ADDITEMS, load_additems),
                           (pickle.DICT, load_dict), (pickle.FROZENSET, load_frozenset), (pickle.PERSID, load_persid)):
        dispatch[_code[0]] = _method
    del _code, _method


def unpickle(data, log, storages):
    """Rebuild the object a checkpoint's data.pkl describes; `storages(key, dtype, numel)` gives storage records."""
    return GatedUnpickler(data, log, storages).load()
