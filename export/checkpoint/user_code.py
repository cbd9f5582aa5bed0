"""`--code DIR`: the user's own fork source for blocks we have no family for. An explicit opt-in, never a default.

Only the classes a checkpoint references, that we do not know, and that sit inside its model are resolved:
each from exactly the one file its pickled module path names under DIR (`ultralytics.nn.Addmodules.BiFormer`
-> `DIR/ultralytics/nn/Addmodules/BiFormer.py`; never a package's `__init__.py`), and only when that file's
source defines the class at its top level (read with `ast`, before anything runs). It is executed under a
private module name (`_yolo_attn_user_code.d0.ultralytics.nn.Addmodules.BiFormer`) so it never shadows the
installed ultralytics or our packages, with bytecode writing off (nothing lands in the user's folder). The
file's absolute imports (torch, stock ultralytics) resolve as usual; its relative imports load sibling files
under DIR, privately too. The parent packages are empty stand-ins: no `__init__.py` of the fork runs. The
resolved classes join the gated unpickler's table for this run only; instances are still created with
`cls.__new__` and filled by a vetted dict update, never by their own `__setstate__` or `__reduce__`.
"""

import ast
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from export.checkpoint import inplace_chains
from export.text import shown

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
    rewritten: dict = field(default_factory=dict)  # file -> [(line, statement)]: in-place chains (inplace_chains)

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
        if not _defines_class(path, name):
            raise CodeError(f"{path} defines no class {shown(name, 80)} at its top level (the checkpoint's "
                            f"{shown(qual)}); nothing was run")
        namespace = _load(module, path, roots[index], index, imported.rewritten)
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
        raise CodeError(f"module {shown(module, 80)} cannot come from --code (not a fork module path)")
    for index, root in enumerate(roots):
        candidate = root.joinpath(*parts).with_suffix(".py")
        if candidate.is_file():
            resolved = candidate.resolve()
            if not resolved.is_relative_to(root):  # a symlink out of DIR: DIR is what the user opted into
                raise CodeError(f"{candidate} links outside {root}; --code only runs files under its folder")
            return index, resolved
    where = ", ".join(str(r) for r in roots)
    raise CodeError(f"no file for module {module} under {where} (looked for {'/'.join(parts)}.py; a package's "
                    f"__init__.py is never run)")


def _defines_class(path, name):
    """Whether the source of `path` has `class <name>` at module level (also inside if / try / with blocks, not
    inside functions): parsed, not run."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (SyntaxError, ValueError, OSError) as e:
        raise CodeError(f"{path} cannot be parsed ({type(e).__name__}); nothing was run") from None
    statements = list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, ast.ClassDef) and node.name == name:
            return True
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            for block in ("body", "orelse", "finalbody", "handlers"):
                statements.extend(n for n in getattr(node, block, []) if isinstance(n, ast.stmt | ast.excepthandler))
    return False


_REWRITTEN = {}  # private module name -> [(line, statement)] its file's import rewrote (kept for later loads)


def _load(module, path, root, index, rewritten):
    private = f"{PRIVATE_ROOT}.d{index}.{module}"
    if private in sys.modules:
        if _REWRITTEN.get(private):
            rewritten[str(path)] = _REWRITTEN[private]
        return sys.modules[private]
    _stand_in_packages(root, module.split(".")[:-1], index)
    spec = importlib.util.spec_from_file_location(private, path)
    namespace = importlib.util.module_from_spec(spec)
    sys.modules[private] = namespace
    writing, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in the user's folder
    try:
        tree = ast.parse(path.read_bytes(), str(path))
        done = _REWRITTEN[private] = inplace_chains.rewrite(tree)  # same values; the form the exporter gets right
        if done:
            rewritten[str(path)] = done
        exec(compile(tree, str(path), "exec"), namespace.__dict__)
    except BaseException as e:  # the user's own code failing to import: one line, their file named
        del sys.modules[private]
        detail = str(e).splitlines()[0][:200] if str(e) else ""
        raise CodeError(f"importing {path} failed: {type(e).__name__}: {shown(detail)}") from None
    finally:
        sys.dont_write_bytecode = writing
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
