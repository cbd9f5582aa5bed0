"""Generic rewrites for attention blocks that have no hand-written export twin (CBAM, CoordAtt, BiFormer, ...).

Such blocks are exported as their PyTorch code is written. Three things in that code export badly for TensorRT, and
each has an exact rewrite here:

- adaptive pooling (`F.adaptive_avg_pool2d` / `adaptive_max_pool2d`, and the nn modules calling them): torch exports
  it as a pool with a kernel fixed at the traced size, fails with dynamic H/W (output size 1 aside: Global*Pool) and
  for sizes that do not divide the input; a mean/max over the pooled axes (after a reshape into equal bins when the
  output size divides the input) computes the same and exports at any size;
- `torch.einsum`: exported as an Einsum node; permutes, reshapes, sums and batched matmuls compute the same;
- in-place slice writes (`x[:, 2:5] = y`): exported as ScatterND, which TensorRT runs serialised; when the written
  region is a literal box, Slice + Concat assemble the same tensor (`literal_slice_writes`, on the ONNX graph).

`exportable_calls` swaps the torch calls only while a named block runs, and records per block what it rewrote (and
what it saw but could not cover: `NOT_COVERED`). Python numbers computed from tensors ("shape code") cannot be
rewritten generically; `shape_code_warnings` turns the tracer's warnings about them into the same kind of records.
"""

import contextlib
import functools
import inspect
import linecache
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from export.graph.onnx_passes import node_scope

NOT_COVERED = "not-covered"


@contextlib.contextmanager
def exportable_calls(model, block_names):
    """While active, the calls listed in `_REWRITES` made inside the forward of one of the modules `block_names`
    (paths as in model.named_modules()) run as their export-friendly equivalents. Yields the list of records
    {"block", "rewrite", "detail"} (no duplicates), attributed to the innermost named block running."""
    modules = dict(model.named_modules())
    missing = [name for name in block_names if name not in modules]
    if missing:
        raise ValueError(f"no such modules in the model: {missing}")
    used, running = [], []
    if not block_names:  # nothing to rewrite: leave torch's functions alone
        yield used
        return

    def note(block, rewrite, detail):
        entry = {"block": block, "rewrite": rewrite, "detail": detail}
        if entry not in used:
            used.append(entry)

    with contextlib.ExitStack() as stack:
        for name in block_names:
            stack.enter_context(_tracked(modules[name], name, running))
        block_modules = {sys.modules.get(type(modules[name]).__module__) for name in block_names}
        for owner, attribute, rewrite in _REWRITES:
            original = getattr(owner, attribute)
            switch = _switch(original, rewrite, running, note)
            for namespace, name in _bindings(original, owner, attribute, block_modules):
                stack.enter_context(_swapped(namespace, name, switch))
        yield used


@contextlib.contextmanager
def _tracked(module, name, running):
    """Keep `name` on `running` while `module`'s forward runs (popped on exceptions too: always_call)."""
    def enter(*_):
        running.append(name)

    def leave(*_):  # returns None: a forward hook's return value would replace the output
        running.pop()

    hooks = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _bindings(original, owner, attribute, block_modules):
    """Where user code finds `original`: the torch attribute, and module-level aliases in the blocks' source
    modules (`from torch import einsum` binds the function at import time, out of reach of the torch patch)."""
    found = [(owner, attribute)]
    for module in block_modules:
        if module is None or module.__name__.split(".")[0] == "torch":
            continue
        found += [(module, name) for name, value in vars(module).items() if value is original]
    return found


@contextlib.contextmanager
def _swapped(namespace, name, value):
    saved = getattr(namespace, name)
    setattr(namespace, name, value)
    try:
        yield
    finally:
        setattr(namespace, name, saved)


def _switch(original, rewrite, running, note):
    """`original` outside the named blocks, `rewrite` (told the original and how to note) inside them."""

    @functools.wraps(original)
    def call(*args, **kwargs):
        if not running:
            return original(*args, **kwargs)
        return rewrite(original, functools.partial(note, running[-1]), *args, **kwargs)

    return call


def _concrete(sizes):
    """Python ints for `sizes`. While tracing, tensor sizes are 0-dim tensors and int() warns that the value is
    frozen: here it only picks the rewrite, the graph keeps computing from the traced sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        return [int(s) for s in sizes]


# ---- adaptive pooling ----------------------------------------------------------------------------------------

def _adaptive_avg_pool2d(original, note, input, output_size):
    return _adaptive_pool(original, note, "avg", input, output_size)


def _adaptive_max_pool2d(original, note, input, output_size, return_indices=False):
    if return_indices:
        note(NOT_COVERED, "adaptive_max_pool2d with return_indices is exported as torch exports it")
        return original(input, output_size, return_indices)
    return _adaptive_pool(original, note, "max", input, output_size)


def _adaptive_pool(original, note, kind, x, output_size):
    function = f"adaptive_{kind}_pool2d"
    if x.dim() not in (3, 4):
        return original(x, output_size)  # torch reports the error
    bins = _output_bins(output_size)
    h, w = _concrete(x.shape[-2:])
    if bins is None:
        note(NOT_COVERED, f"{function} to {output_size!r}: an output size other than ints and None is exported as "
                          "torch exports it")
        return original(x, output_size)
    if any(b is not None and (b < 1 or n % b) for b, n in zip(bins, (h, w))):
        note(NOT_COVERED, f"{function} to {_size_text(bins)} from {h}x{w}: adaptive pooling to a non-dividing size "
                          "is exported as torch exports it (torch's exporter rejects sizes that do not divide the "
                          "input)")
        return original(x, output_size)
    reduce, onnx_op = (torch.mean, "ReduceMean") if kind == "avg" else (torch.amax, "ReduceMax")
    if all(b in (None, 1) for b in bins):  # global pooling over some axes: a plain reduction
        axes = [axis for axis, b in zip((-2, -1), bins) if b == 1]
        note("adaptive-pool", f"{function} to {_size_text(bins)} as {onnx_op} over "
                              f"{', '.join('HW'[a] for a in axes) or 'nothing'}")
        return reduce(x, dim=axes, keepdim=True) if axes else x.clone()  # dim=[] would reduce everything
    note("adaptive-pool", f"{function} to {_size_text(bins)} as Reshape into equal bins + {onnx_op} (input H, W "
                          "must stay divisible by the output size)")
    th, tw = x.shape[-2:]  # traced sizes: the bins follow the input size in a dynamic export
    rows = (th, 1) if bins[0] is None else (bins[0], th // bins[0])
    cols = (tw, 1) if bins[1] is None else (bins[1], tw // bins[1])
    return reduce(x.reshape(*x.shape[:-2], *rows, *cols), dim=(-3, -1))


def _output_bins(output_size):
    """(rows, cols) with None for 'keep', or None for a form not covered (tensors, wrong length)."""
    if _is_int(output_size):
        return (int(output_size), int(output_size))
    if isinstance(output_size, (tuple, list)) and len(output_size) == 2 and all(
            s is None or _is_int(s) for s in output_size):
        return tuple(None if s is None else int(s) for s in output_size)
    return None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _size_text(bins):
    return "(" + ", ".join(str(b) for b in bins) + ")"


# ---- einsum -----------------------------------------------------------------------------------------------------

def _einsum(original, note, *args):
    if not args or not isinstance(args[0], str):
        note(NOT_COVERED, "einsum in sublist form is exported as torch exports it (an Einsum node)")
        return original(*args)
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    terms, output = _parse_einsum(equation.replace(" ", ""))
    if "." in equation or any(len(set(term)) < len(term) for term in terms):
        note(NOT_COVERED, f"einsum '{equation}' (ellipsis or a diagonal) is exported as torch exports it "
                          "(an Einsum node)")
        return original(*args)
    if not _einsum_consistent(terms, output, operands):
        return original(*args)  # torch reports what is wrong with it
    count = f"{len(operands)} operand" + ("s" if len(operands) > 1 else "")
    note("einsum-matmul", f"einsum '{equation}' ({count}) as " + ("matmuls" if len(operands) > 1 else "sum/permute"))
    return einsum_as_matmuls(terms, output, operands)


def _parse_einsum(equation):
    """(input terms, output term); an implicit output is the labels used once, sorted (as torch and numpy do)."""
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if not arrow:
        labels = "".join(terms)
        output = "".join(sorted(c for c in set(labels) if labels.count(c) == 1))
    return terms, output


def _einsum_consistent(terms, output, operands):
    labels = set("".join(terms))
    return (len(terms) == len(operands) and all(isinstance(t, torch.Tensor) for t in operands)
            and all(len(term) == t.dim() for term, t in zip(terms, operands))
            and set(output) <= labels and len(set(output)) == len(output) and "".join(terms + [output]).isalpha())


def einsum_as_matmuls(terms, output, operands):
    """torch.einsum(','.join(terms) + '->' + output, *operands) without einsum: operands contracted pairwise, left
    to right, each pair as one batched matmul. Labels are single letters, none repeated within a term."""
    term, tensor = terms[0], operands[0]
    for i in range(1, len(terms)):
        needed = set(output).union(*terms[i + 1:])
        term, tensor = _contract_pair(term, tensor, terms[i], operands[i], needed)
    term, tensor = _sum_away(term, tensor, set(output))
    return tensor if term == output else tensor.permute([term.index(c) for c in output])


def _contract_pair(left, a, right, b, needed):
    """(term, tensor) of the product of a and b summed over the shared labels not `needed` later."""
    left, a = _sum_away(left, a, needed | set(right))
    right, b = _sum_away(right, b, needed | set(left))
    a, b = _broadcast_shared(left, a, right, b)
    batch = [c for c in left if c in right and c in needed]
    contract = [c for c in left if c in right and c not in needed]
    left_only = [c for c in left if c not in right]
    right_only = [c for c in right if c not in left]
    size = {**dict(zip(right, b.shape)), **dict(zip(left, a.shape))}  # traced sizes in an export

    def product(labels):
        return math.prod(size[c] for c in labels)

    a = _permuted(left, a, batch + left_only + contract).reshape(product(batch), product(left_only), product(contract))
    b = _permuted(right, b, batch + contract + right_only).reshape(product(batch), product(contract),
                                                                   product(right_only))
    kept = batch + left_only + right_only
    return "".join(kept), torch.bmm(a, b).reshape([size[c] for c in kept])


def _sum_away(term, tensor, keep):
    """Labels of `term` not in `keep` summed over first: they occur in this operand only."""
    gone = [i for i, c in enumerate(term) if c not in keep]
    if not gone:
        return term, tensor
    return "".join(c for c in term if c in keep), tensor.sum(dim=gone)


def _broadcast_shared(left, a, right, b):
    """einsum broadcasts a shared label of size 1 against the other operand's size; bmm needs equal sizes."""
    sizes_a, sizes_b = _concrete(a.shape), _concrete(b.shape)
    grow_a = [-1] * a.dim()
    grow_b = [-1] * b.dim()
    for i, c in enumerate(left):
        j = right.find(c)
        if j >= 0 and sizes_a[i] != sizes_b[j]:
            if sizes_a[i] == 1:
                grow_a[i] = b.shape[j]
            else:
                grow_b[j] = a.shape[i]
    a = a.expand(grow_a) if grow_a != [-1] * a.dim() else a
    b = b.expand(grow_b) if grow_b != [-1] * b.dim() else b
    return a, b


def _permuted(term, tensor, order):
    perm = [term.index(c) for c in order]
    return tensor if perm == sorted(perm) else tensor.permute(perm)


# What exportable_calls swaps: (owner, attribute, rewrite(original, note, *args, **kwargs)). The nn.Adaptive*Pool2d
# modules look F.adaptive_*_pool2d up at call time, so patching F covers them.
_REWRITES = [
    (F, "adaptive_avg_pool2d", _adaptive_avg_pool2d),
    (F, "adaptive_max_pool2d", _adaptive_max_pool2d),
    (torch, "einsum", _einsum),
]


# ---- shape code -------------------------------------------------------------------------------------------------

def block_source_files(model, block_names):
    """{source file of the block's class: [block names]}: the files whose tracer warnings concern the blocks."""
    modules, files = dict(model.named_modules()), {}
    for name in block_names:
        path = inspect.getsourcefile(type(modules[name]))
        if path:
            files.setdefault(os.path.realpath(path), []).append(name)
    return files


def shape_code_warnings(caught, block_files):
    """Records for the TracerWarnings among `caught` (warnings.WarningMessage) raised from a line of one of
    `block_files`: code turning a traced tensor into a Python number, which the export freezes at the traced value."""
    files = {os.path.realpath(f) for f in block_files}
    found = []
    for warning in caught:
        if not issubclass(warning.category, torch.jit.TracerWarning):
            continue
        path = os.path.realpath(warning.filename)
        entry = {"block_file": path, "line": warning.lineno, "rewrite": "shape-code",
                 "detail": f"Python number computed from a tensor (line {warning.lineno}: "
                           f"{linecache.getline(path, warning.lineno).strip()}): the export fixes it to the traced "
                           "size; other input sizes may be wrong"}
        if path in files and entry not in found:
            found.append(entry)
    return found


def per_block(block_files, used, caught, replaced_nodes):
    """{block: [records]}: what `exportable_calls` used, the shape-code warnings among `caught`, and the ScatterND
    nodes `literal_slice_writes` replaced (charged to the block whose module path encloses the node)."""
    blocks = {name: [] for names in block_files.values() for name in names}

    def add(block, record):
        if record not in blocks[block]:
            blocks[block].append(record)

    for r in used:
        add(r["block"], {"rewrite": r["rewrite"], "detail": r["detail"]})
    for r in shape_code_warnings(caught, block_files):
        for block in block_files[r["block_file"]]:
            add(block, {"rewrite": r["rewrite"], "detail": r["detail"]})
    for node in replaced_nodes:
        scope = node_scope(node)
        for block in (b for b in blocks if scope == b or scope.startswith(b + ".")):
            add(block, {"rewrite": "slice-writes", "detail": "in-place slice write as Slice + Concat (was ScatterND)"})
    return blocks
