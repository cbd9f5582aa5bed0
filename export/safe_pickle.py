"""A restricted unpickler for torch.load: reconstructs only an allowlist, never runs code from the file.

Globals resolve to: allowlisted torch / ultralytics / numpy / builtin objects; our family classes by
*name* whatever module path the fork used (remaps are recorded); anything else to an inert
placeholder class. Calls a pickle asks for (REDUCE, INST, OBJ) run only for a fixed set of
reconstruction helpers; any other call is recorded and skipped. The caller decides afterwards
whether the placeholders mean "unknown custom block" or "refused global".
"""

import _compat_pickle
import builtins
import collections
import functools
import copyreg
import importlib
import pathlib
import pickle
import types
from dataclasses import dataclass, field

import numpy as np
import torch
from ultralytics.utils import IterableSimpleNamespace

import models

IMPORTABLE_ROOTS = ("torch", "ultralytics", "models", "numpy")
SAFE_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "bytearray", "tuple", "list", "dict", "object",
                 "int", "float", "bool", "str", "bytes"}
EXTRA_CLASSES = {"ultralytics.utils.IterableSimpleNamespace", "torch.nn.parameter.Parameter"}
# Plain (non-Module) classes older ultralytics pickled with the training model (its `criterion`).
PLAIN_CLASS_MODULES = {"ultralytics.utils.loss", "ultralytics.utils.tal"}
NUMPY_NAMES = {"_reconstruct", "scalar", "ndarray", "dtype"}
# Tensor rebuilders that take data, never a callable (_rebuild_from_type* would call one: excluded).
TORCH_REBUILDERS = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                    "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
                    "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_device_tensor_from_numpy"}


class Unknown(torch.nn.Module):
    """Stand-in for a global we do not reconstruct: holds the pickled state, has no behaviour."""

    origin = "?"

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.origin} was not reconstructed (unknown class)")


@dataclass
class UnpickleLog:
    remapped: dict = field(default_factory=dict)  # "fork.path.Name" -> "models.family.Name"
    unknown: dict = field(default_factory=dict)  # "module.Name" -> placeholder class
    called: set = field(default_factory=set)  # globals the file asked to call and was refused

    def placeholder(self, module, name):
        key = f"{module}.{name}"
        if key not in self.unknown:
            self.unknown[key] = type(name, (Unknown,), {"__module__": module, "__qualname__": name, "origin": key})
        return self.unknown[key]


@functools.lru_cache(maxsize=1)
def _callable_allowlist():
    rebuilders = {getattr(torch._utils, n) for n in TORCH_REBUILDERS if hasattr(torch._utils, n)}
    numpy_helpers = {np.ndarray, np.dtype}
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            m = importlib.import_module(mod)
            numpy_helpers |= {m._reconstruct, m.scalar}
        except (ImportError, AttributeError):
            pass
    return rebuilders | numpy_helpers | {
        collections.OrderedDict, set, frozenset, slice, range, complex, bytearray, torch.Size, torch.device,
        types.SimpleNamespace, IterableSimpleNamespace, pathlib.PosixPath, pathlib.WindowsPath,
        pathlib.PurePosixPath, pathlib.PureWindowsPath, copyreg._reconstructor,
    }


def _resolve_allowed(module, name):
    """The allowlisted object for module.name, or None."""
    qual = f"{module}.{name}"
    if module == "builtins":
        return getattr(builtins, name) if name in SAFE_BUILTINS else None
    if qual == "collections.OrderedDict":
        return collections.OrderedDict
    if qual == "copyreg._reconstructor":
        return copyreg._reconstructor
    if module == "pathlib" and name in {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"}:
        return getattr(pathlib, name)
    if qual == "types.SimpleNamespace":
        return types.SimpleNamespace
    if module.split(".")[0] not in IMPORTABLE_ROOTS:
        return None
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    if module == "torch":
        return obj if isinstance(obj, (torch.dtype, torch.layout)) or obj in (torch.Size, torch.device) else None
    if module == "torch._utils":
        return obj if name in TORCH_REBUILDERS else None
    if module.split(".")[0] == "numpy":
        return obj if name in NUMPY_NAMES or module == "numpy.dtypes" else None
    if qual in EXTRA_CLASSES or (isinstance(obj, type) and issubclass(obj, torch.nn.Module)):
        return obj
    if module in PLAIN_CLASS_MODULES and isinstance(obj, type) and obj.__module__ == module:
        return obj
    if module.split(".")[0] == "models" and name in models.CHECKPOINT_NAMES:
        return obj
    return None


class RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler: its opcodes can be intercepted
    log: UnpickleLog  # set per load by pickle_module()

    def find_class(self, module, name):
        # Protocol-2 pickles name some globals by their Python 2 names: map back as pickle's fix_imports does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        obj = _resolve_allowed(module, name)
        if obj is not None:
            return obj
        target = models.CHECKPOINT_NAMES.get(name)
        if target is not None:
            self.log.remapped[f"{module}.{name}"] = f"{target.__module__}.{name}"
            return target
        return self.log.placeholder(module, name)

    def _may_call(self, func, args):
        try:
            allowed = func in _callable_allowlist()
        except TypeError:  # unhashable: certainly not one of ours
            allowed = False
        if allowed and func is copyreg._reconstructor:  # runs base.__init__: only plain objects of allowed classes
            allowed = len(args) == 3 and args[1] is object and not issubclass(args[0], Unknown)
        if not allowed:
            self.log.called.add(getattr(func, "origin", None) or f"{getattr(func, '__module__', '?')}."
                                                                   f"{getattr(func, '__qualname__', repr(func))}")
        return allowed

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        self.stack[-1] = func(*args) if self._may_call(func, args) else Unknown()

    def _instantiate(self, klass, args):
        self.append(klass(*args) if self._may_call(klass, args) else Unknown())

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce


def pickle_module(log):
    """A pickle-module object for torch.load(pickle_module=...) whose unpickler records into `log`."""
    unpickler = type("Unpickler", (RestrictedUnpickler,), {"log": log})

    def load(file, **kwargs):
        return unpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="restricted_pickle", Unpickler=unpickler, load=load,
                                 UnpicklingError=pickle.UnpicklingError)
