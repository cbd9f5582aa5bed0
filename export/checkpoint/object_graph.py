"""Validate what the gated unpickler built, as a whole, before any method is called on it.

After this passes, the checkpoint is a bounded structure of exact allowlisted types whose every
attribute is inert data: numbers, strings, bytes, None; tuples, lists, sets and dicts of those;
strided dense tensors; torch dtypes/devices/sizes; numpy scalars and non-object arrays; pure paths;
namespaces of those; and module instances of the table's exact classes, forming a tree of bounded
size. Only then may the loader cast, fuse and run the model. Placeholders (unknown classes) are
collected, not descended into: the loader refuses them by name and layer.
"""

import collections
import pathlib
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.ops
from torch import nn

from export.checkpoint.safe_pickle import (NAMESPACES, TABLE_MODULE_TYPES, TABLE_PLAIN_TYPES, Refused, Unknown,
                                           _check_state_keys, plain_key)
from export.text import shown

MAX_DEPTH = 100  # nesting of containers and modules; deeper structures break recursive library code
MAX_OBJECTS = 5_000_000
_DONE = object()
MEMBER_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
MAX_MODULE_PATHS = 100_000  # a yolov8x has ~500 module paths; shared children would multiply them
PRIMITIVES = (type(None), bool, int, float, complex, str, bytes, bytearray)
TORCH_VALUES = (torch.dtype, torch.layout, torch.qscheme, torch.memory_format, torch.device)
DICTS = (dict, collections.OrderedDict, collections.Counter)
SEQUENCES = (tuple, list, set, frozenset)
HOOK_TABLES = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


@dataclass
class GraphReport:
    modules: list = field(default_factory=list)  # every module instance, table or placeholder


def validate(root, user_types=frozenset()):
    """Refuse (safe_pickle.Refused) unless `root` is inert data and allowlisted modules (`user_types`: module
    classes imported by --code for this run, checked as table modules are)."""
    report = GraphReport()
    _Walk(report, frozenset(user_types)).run(root)
    for module in report.modules:
        _check_module_numbers(module)
    _check_module_paths(report.modules)
    return report


class _Walk:
    """Depth-first over everything reachable from the root, each object once. The depth bound holds on every
    path, not only on the first one found: an object's height (its longest path down to plain values) is
    computed from its children's, so a deep chain also reachable from a flat list is measured at its full
    depth. A structure that contains itself is refused; recursive library code (copy.deepcopy in the
    rewrite) would then recurse as deep as the height."""

    def __init__(self, report, user_types):
        self.report, self.user_types = report, user_types
        self.heights, self.open = {}, set()  # id -> height of finished objects; ids on the current path
        self.count = 0  # objects expanded so far (each once): the finished ones and those on the current path

    def run(self, root):
        stack = [[root, None, 0]]  # [object, iterator over its children (None: not expanded yet), tallest child]
        while stack:
            frame = stack[-1]
            obj, children = frame[0], frame[1]
            if children is None:
                self.open.add(id(obj))
                self.count += 1
                if self.count > MAX_OBJECTS:
                    raise Refused(f"more than {MAX_OBJECTS} objects")
                frame[1] = children = iter(self._visit(obj))
            child = next(children, _DONE)
            if child is _DONE:
                stack.pop()
                self.open.discard(id(obj))
                height = self.heights[id(obj)] = frame[2] + 1
                if height > MAX_DEPTH:
                    raise Refused(f"nesting deeper than {MAX_DEPTH} levels")
                if stack:
                    stack[-1][2] = max(stack[-1][2], height)
            elif type(child) in PRIMITIVES or isinstance(child, TORCH_VALUES):
                continue
            elif id(child) in self.open:
                raise Refused("a structure that contains itself")
            elif id(child) in self.heights:
                frame[2] = max(frame[2], self.heights[id(child)])
            else:
                stack.append([child, None, 0])

    def _visit(self, obj):
        """Check `obj` and return the values to descend into."""
        kind = type(obj)
        if kind in DICTS:
            if not all(plain_key(k) for k in obj):
                raise Refused("a dict with a key that is not a number, string or tuple of those")
            return list(obj.values())
        if kind in SEQUENCES or kind is torch.Size:
            return list(obj)
        if kind in (torch.Tensor, nn.Parameter):
            return self._tensor(obj)
        if kind is np.ndarray or isinstance(obj, (np.generic, np.dtype)):
            _check_numpy(obj)
            return []
        if kind in (pathlib.PurePosixPath, pathlib.PureWindowsPath):
            return []
        if kind in TABLE_MODULE_TYPES or kind in self.user_types or (
                kind in TABLE_PLAIN_TYPES and isinstance(obj, nn.Module)):
            return self._module(obj)
        if kind in NAMESPACES or kind in TABLE_PLAIN_TYPES:
            return self._attributes(obj)
        if isinstance(obj, Unknown):
            return self._placeholder(obj)
        if isinstance(obj, type) and issubclass(obj, Unknown):
            raise Refused(f"it references {shown(obj.origin)}, which is not an allowed global")
        raise Refused(f"a value of type {shown(_name(obj))}, which is not checkpoint data")

    def _attributes(self, obj):
        _check_state_keys(type(obj), obj.__dict__)
        return list(obj.__dict__.values())

    def _tensor(self, t):
        if t.layout != torch.strided or t.is_quantized or t.device.type != "cpu":
            raise Refused(f"a {t.layout} / quantized / non-CPU tensor (only dense tensors are reconstructed)")
        return self._attributes(t) if t.__dict__ else []

    def _module(self, m):
        self.report.modules.append(m)
        d = m.__dict__
        _check_state_keys(type(m), d)
        for table in ("_parameters", "_buffers", "_modules"):
            if type(d.get(table)) not in (dict, collections.OrderedDict) or not all(type(k) is str for k in d[table]):
                raise Refused(f"a {type(m).__name__} without a proper {table} table")
            if not all(MEMBER_NAME.fullmatch(k) for k in d[table]):  # module paths reach the console and report
                bad = next(k for k in d[table] if not MEMBER_NAME.fullmatch(k))
                raise Refused(f"a {type(m).__name__} with a {table[1:-1]} named {shown(bad, 40)} (names are letters, "
                              f"digits, '_' and '-')")
        if any(type(v) not in (nn.Parameter, torch.Tensor, type(None)) for v in d["_parameters"].values()) or \
                any(type(v) not in (torch.Tensor, nn.Parameter, type(None)) for v in d["_buffers"].values()):
            raise Refused(f"a {type(m).__name__} whose parameters or buffers are not tensors")
        if any(v is not None and not isinstance(v, nn.Module) for v in d["_modules"].values()):
            raise Refused(f"a {type(m).__name__} whose submodules are not modules")
        if any(d.get(h) for h in HOOK_TABLES):
            raise Refused(f"a {type(m).__name__} with hooks (hooks are code)")
        if type(d.get("training", False)) is not bool:
            raise Refused(f"a {type(m).__name__} whose `training` flag is not a bool")
        return list(d.values())

    def _placeholder(self, m):
        """An unknown class: reported by the loader, so only its submodules are looked at."""
        self.report.modules.append(m)
        children = m.__dict__.get("_modules")
        if type(children) in (dict, collections.OrderedDict):
            return [v for v in children.values() if isinstance(v, nn.Module)]
        return []


def unknown_blocks(model):
    """{placeholder origin: [layer indices]} for the placeholders inside a validated model, by __dict__ only."""
    blocks = {}
    for layer, m in modules_by_layer(model):
        if isinstance(m, Unknown):
            blocks.setdefault(m.origin, set()).add(layer)
    return {origin: sorted(indices) for origin, indices in blocks.items()}


def modules_by_layer(model):
    """(layer index, module) for every module inside a validated model's layers, by __dict__ only."""
    layers = _children(model)
    sequential = model.__dict__.get("_modules", {}).get("model") if type(model.__dict__.get("_modules")) in DICTS else None
    if isinstance(sequential, nn.Sequential):
        layers = _children(sequential)
    for position, layer in enumerate(layers or [model]):
        index = layer.__dict__.get("i")
        for m in _subtree(layer):
            yield (index if type(index) is int else position), m


def _subtree(root):
    seen, todo = {id(root)}, [root]
    while todo:
        m = todo.pop()
        yield m
        for c in _children(m):
            if id(c) not in seen:
                seen.add(id(c))
                todo.append(c)


def _name(obj):
    kind = obj if isinstance(obj, type) else type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _check_numpy(obj):
    dtype = obj if isinstance(obj, np.dtype) else obj.dtype
    if dtype.hasobject or dtype.fields is not None:
        raise Refused("a numpy value of objects or records")


def _check_module_paths(modules):
    """Count root-to-module paths through _modules (a DAG of shared children multiplies them); refuse cycles."""
    paths = {}  # id -> number of paths from this module down, itself included
    for root in modules:
        if id(root) in paths:
            continue
        stack, open_ids = [(root, iter(_children(root)))], {id(root)}
        while stack:
            module, pending = stack[-1]
            child = next(pending, None)
            if child is None:
                stack.pop()
                open_ids.discard(id(module))
                paths[id(module)] = 1 + sum(paths[id(c)] for c in _children(module))
                if paths[id(module)] > MAX_MODULE_PATHS:
                    raise Refused(f"a module graph with more than {MAX_MODULE_PATHS} paths (shared submodules)")
            elif id(child) in open_ids:
                raise Refused("a module that contains itself")
            elif id(child) not in paths:
                stack.append((child, iter(_children(child))))
                open_ids.add(id(child))


def _children(m):
    children = m.__dict__.get("_modules")
    return [c for c in children.values() if isinstance(c, nn.Module)] if type(children) in DICTS else []


# ---- the numbers fusing and casting read: consistent with the tensors they describe --------------------
def _small_ints(v, n=None, low=0, high=4096):
    values = v if type(v) is tuple else (v,)
    return (n is None or len(values) == n) and all(type(x) is int and low <= x <= high for x in values)


def _check_conv(m):
    d, p = m.__dict__, m.__dict__["_parameters"]
    c_in, c_out, groups, k = d.get("in_channels"), d.get("out_channels"), d.get("groups"), d.get("kernel_size")
    dims = CONV_DIMS[type(m)]
    ok = (_small_ints(c_in, 1, 1, 1 << 16) and _small_ints(c_out, 1, 1, 1 << 16) and _small_ints(groups, 1, 1, 1 << 16)
          and c_in % groups == 0 and c_out % groups == 0 and _small_ints(k, dims, 1, 64)
          and all(_small_ints(d.get(a), dims, 0, 64) for a in ("stride", "dilation"))
          and (d.get("padding") in ("same", "valid") or _small_ints(d.get("padding"), dims, 0, 64)))
    if ok and isinstance(p.get("weight"), torch.Tensor):
        expected = (c_in, c_out // groups) if d.get("transposed") else (c_out, c_in // groups)
        ok = tuple(p["weight"].shape) == (*expected, *k)
        ok = ok and (p.get("bias") is None or tuple(p["bias"].shape) == ((c_out,)))
    return ok


def _check_batchnorm(m):
    d = m.__dict__
    n = d.get("num_features")
    tensors = [*d["_parameters"].values(), d["_buffers"].get("running_mean"), d["_buffers"].get("running_var")]
    return _small_ints(n, 1, 1, 1 << 16) and type(d.get("eps")) is float and d["eps"] > 0 and all(
        t is None or tuple(t.shape) == (n,) for t in tensors)


def _check_linear(m):
    d, w = m.__dict__, m.__dict__["_parameters"].get("weight")
    return _small_ints(d.get("in_features"), 1, 1, 1 << 20) and _small_ints(d.get("out_features"), 1, 1, 1 << 20) \
        and (w is None or tuple(w.shape) == (d["out_features"], d["in_features"]))


def _check_upsample(m):
    scale, size = m.__dict__.get("scale_factor"), m.__dict__.get("size")
    return (scale is None or (type(scale) in (int, float) and 0 < scale <= 16)) and (size is None or _small_ints(size))


def _check_deform_conv(m):
    """torchvision's DeformConv2d: its weight (out, in / groups, kh, kw) as its sizes say."""
    d, w = m.__dict__, m.__dict__["_parameters"].get("weight")
    k, groups = d.get("kernel_size"), d.get("groups")
    return (_small_ints(d.get("in_channels"), 1, 1, 1 << 16) and _small_ints(d.get("out_channels"), 1, 1, 1 << 16)
            and _small_ints(groups, 1, 1, 1 << 16) and _small_ints(k, 2, 1, 64) and w is not None
            and d["in_channels"] % groups == 0
            and tuple(w.shape) == (d["out_channels"], d["in_channels"] // groups, *k))


def _check_frozen_batchnorm(m):
    """torchvision's FrozenBatchNorm2d: four 1-D buffers of one size, a positive eps."""
    b = m.__dict__["_buffers"]
    shapes = {tuple(b[k].shape) if b.get(k) is not None else None for k in ("weight", "bias", "running_mean",
                                                                         "running_var")}
    return len(shapes) == 1 and None not in shapes and len(next(iter(shapes))) == 1 and \
        type(m.__dict__.get("eps")) is float and m.__dict__["eps"] > 0


CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3,
             nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
NUMBER_CHECKS = {**dict.fromkeys(CONV_DIMS, _check_conv),
                 **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm), _check_batchnorm),
                 **dict.fromkeys((nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear), _check_linear),
                 nn.Upsample: _check_upsample, torchvision.ops.DeformConv2d: _check_deform_conv,
                 torchvision.ops.FrozenBatchNorm2d: _check_frozen_batchnorm}


def _check_module_numbers(m):
    check = NUMBER_CHECKS.get(type(m))
    if check is not None and not check(m):
        raise Refused(f"a {type(m).__name__} whose sizes do not match its weights")
