"""`--code DIR`: the user's own fork source for blocks we have no family for. An explicit opt-in, never a default.

Only the classes a checkpoint references, that we do not know, and that sit inside its model are resolved:
each from the one file its pickled module path names under DIR (`ultralytics.nn.Addmodules.BiFormer` ->
`DIR/ultralytics/nn/Addmodules/BiFormer.py`, or `.../BiFormer/__init__.py`), executed under a private module
name (`_yolo_attn_user_code.d0.ultralytics.nn.Addmodules.BiFormer`) so it never shadows the installed
ultralytics or our packages. The file's absolute imports (torch, stock ultralytics) resolve as usual; its
relative imports load sibling files under DIR, privately too. The parent packages are empty stand-ins: no
`__init__.py` of the fork runs. The resolved classes join the gated unpickler's table for this run only;
instances are still created with `cls.__new__` and filled by a vetted dict update, never by their own
`__setstate__` or `__reduce__`.
"""

import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

PRIVATE_ROOT = "_yolo_attn_user_code"
# Module roots that are never user code, whatever files DIR holds.
NEVER_FROM_CODE = {"torch", "torchvision", "numpy", "onnx", "onnxruntime", "export", "models", "plugins", "calib",
                   PRIVATE_ROOT} | set(sys.stdlib_module_names)


class CodeError(Exception):
    """A class could not be resolved from --code; str(e) is the one-line reason."""


@dataclass
class ImportedCode:
    classes: dict = field(default_factory=dict)  # pickled "module.Name" -> class
    files: dict = field(default_factory=dict)  # pickled "module" -> file executed for it (str)

    def sources(self):
        """{pickled "module.Name": the file its class came from}."""
        return {qual: self.files[qual.rpartition(".")[0]] for qual in self.classes}


def resolve(qualnames, code_dirs):
    """Import each pickled class name in `qualnames` from the first of `code_dirs` that has its module's file."""
    imported = ImportedCode()
    roots = [Path(d).resolve() for d in code_dirs]
    for qual in sorted(qualnames):
        module, _, name = qual.rpartition(".")
        index, path = _module_file(module, roots)
        namespace = _load(module, path, roots[index], index)
        cls = namespace.__dict__.get(name)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == namespace.__name__):
            raise CodeError(f"{path} defines no nn.Module class {name} (the checkpoint's {qual})")
        imported.classes[qual] = cls
        imported.files[module] = str(path)
    return imported


def is_user_class(cls):
    return cls.__module__.startswith(PRIVATE_ROOT + ".")


def pickled_name(cls):
    """The class path the checkpoint names for a class imported by --code (its module without our private prefix)."""
    return f"{cls.__module__.split('.', 2)[2]}.{cls.__qualname__}"


def _module_file(module, roots):
    parts = module.split(".")
    if not all(p.isidentifier() for p in parts) or parts[0] in NEVER_FROM_CODE:
        raise CodeError(f"module {module[:80]!r} cannot come from --code (not a fork module path)")
    for index, root in enumerate(roots):
        for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                resolved = candidate.resolve()
                if not resolved.is_relative_to(root):  # a symlink out of DIR: DIR is what the user opted into
                    raise CodeError(f"{candidate} links outside {root}; --code only runs files under its folder")
                return index, resolved
    where = ", ".join(str(r) for r in roots)
    raise CodeError(f"no file for module {module} under {where} (looked for "
                    f"{'/'.join(parts)}.py and {'/'.join(parts)}/__init__.py)")


def _load(module, path, root, index):
    private = f"{PRIVATE_ROOT}.d{index}.{module}"
    if private in sys.modules:
        return sys.modules[private]
    _stand_in_packages(root, module.split(".")[:-1], index)
    spec = importlib.util.spec_from_file_location(private, path, submodule_search_locations=(
        [str(path.parent)] if path.name == "__init__.py" else None))
    namespace = importlib.util.module_from_spec(spec)
    sys.modules[private] = namespace
    try:
        spec.loader.exec_module(namespace)
    except BaseException as e:  # the user's own code failing to import: one line, their file named
        del sys.modules[private]
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise CodeError(f"importing {path} failed: {type(e).__name__}: {detail}") from None
    return namespace


def _stand_in_packages(root, package_parts, index):
    """Empty parent packages whose __path__ is the fork's folder: relative imports find sibling files under
    DIR, and no fork __init__.py runs."""
    base = f"{PRIVATE_ROOT}.d{index}"
    depths = range(1, len(package_parts) + 1)
    levels = [(PRIVATE_ROOT, None), (base, root)] + [
        (".".join([base, *package_parts[:i]]), root.joinpath(*package_parts[:i])) for i in depths]
    for name, folder in levels:
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)] if folder else []
            sys.modules[name] = package
