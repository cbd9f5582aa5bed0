"""Generic rewrites for attention blocks that have no hand-written export twin (CBAM, CoordAtt, BiFormer, ...).

Such blocks are exported as their PyTorch code is written. These things in that code export badly for TensorRT, and
each has an exact rewrite here:

- adaptive pooling (`F.adaptive_avg_pool2d` / `adaptive_max_pool2d`, and the nn modules calling them): torch exports
  it as a pool with a kernel fixed at the traced size, fails with dynamic H/W (output size 1 aside: Global*Pool) and
  for sizes that do not divide the input (larger ones included). Global pooling becomes a mean/max over the pooled
  axes; other sizes (ints, or sizes read from the input: x.shape[-2] is a 0-dim tensor while tracing) follow torch's
  bins (output i of O over an axis of length L covers inputs [floor(i*L/O), ceil((i+1)*L/O))), built from the traced
  sizes so that a dynamic export computes them from the runtime size: avg as two matmuls with per-axis averaging
  matrices, max as a masked max over one axis at a time. A static export keeps the cheaper reshape into equal bins +
  mean/max where the output size divides the input;
- `torch.einsum`: exported as an Einsum node; permutes, reshapes, sums and batched matmuls compute the same;
- torchvision's `deform_conv2d` (DeformConv2d): not exported by torch at all; GridSample per kernel tap and a grouped
  matmul compute the same (`_deform_conv2d`);
- in-place slice writes (`x[:, 2:5] = y`): exported as ScatterND, which TensorRT runs serialised; when the written
  region is a literal box, Slice + Concat assemble the same tensor (`literal_slice_writes`, on the ONNX graph).

`exportable_calls` swaps the torch calls only while a named block runs, and records per block what it rewrote (and
what it saw but could not cover: `NOT_COVERED`, and in-place ops on views, seen by a profile hook: `INPLACE_VIEW`). Python numbers computed from tensors ("shape code") cannot be
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
import torchvision.ops.deform_conv

from export.graph.onnx_passes import node_scope

NOT_COVERED = "not-covered"


@contextlib.contextmanager
def exportable_calls(model, block_names, dynamic=False):
    """While active, the calls listed in `_REWRITES` made inside the forward of one of the modules `block_names`
    (paths as in model.named_modules()) run as their export-friendly equivalents. Yields the list of records
    {"block", "rewrite", "detail"} (no duplicates), attributed to the innermost named block running. `dynamic`: the
    export has dynamic H/W, so no rewrite may rely on a property of the traced size (an output size dividing it)."""
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
        stack.enter_context(_inplace_views_seen(running, note))
        for name in block_names:
            stack.enter_context(_tracked(modules[name], name, running))
        block_modules = {sys.modules.get(type(modules[name]).__module__) for name in block_names}
        for owner, attribute, rewrite in _REWRITES:
            original = getattr(owner, attribute)
            switch = _switch(original, rewrite, running, note, dynamic)
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


def _switch(original, rewrite, running, note, dynamic):
    """`original` outside the named blocks, `rewrite` (told the original, how to note and whether the export is
    dynamic) inside them."""

    @functools.wraps(original)
    def call(*args, **kwargs):
        if not running:
            return original(*args, **kwargs)
        return rewrite(original, functools.partial(note, running[-1]), dynamic, *args, **kwargs)

    return call


def _concrete(sizes):
    """Python ints for `sizes`. While tracing, tensor sizes are 0-dim tensors and int() warns that the value is
    frozen: here it only picks the rewrite, the graph keeps computing from the traced sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        return [int(s) for s in sizes]


# ---- adaptive pooling ----------------------------------------------------------------------------------------

def _adaptive_avg_pool2d(original, note, dynamic, input, output_size):
    return _adaptive_pool(original, note, dynamic, "avg", input, output_size)


def _adaptive_max_pool2d(original, note, dynamic, input, output_size, return_indices=False):
    if return_indices:
        note(NOT_COVERED, "adaptive_max_pool2d with return_indices is exported as torch exports it")
        return original(input, output_size, return_indices)
    return _adaptive_pool(original, note, dynamic, "max", input, output_size)


def _adaptive_pool(original, note, dynamic, kind, x, output_size):
    function = f"adaptive_{kind}_pool2d"
    if x.dim() not in (3, 4):
        return original(x, output_size)  # torch reports the error
    bins = _output_bins(output_size)
    if bins is None:
        note(NOT_COVERED, f"{function} to {output_size!r}: an output size other than ints (or sizes read from "
                          "tensors) and None is exported as torch exports it")
        return original(x, output_size)
    traced = tuple(None if b is None else _concrete([b])[0] for b in bins)
    if any(b is not None and b < 1 for b in traced):
        note(NOT_COVERED, f"{function} to {_size_text(bins, traced)}: an empty output is exported as torch exports it")
        return original(x, output_size)
    reduce, onnx_op = (torch.mean, "ReduceMean") if kind == "avg" else (torch.amax, "ReduceMax")
    # A size read from a tensor may differ from its traced value in a dynamic export: only a literal 1 is global there.
    fixed = traced if not dynamic else tuple(None if b is None else b if _is_int(b) else 0 for b in bins)
    if all(b in (None, 1) for b in fixed):  # global pooling over some axes: a plain reduction
        axes = [axis for axis, b in zip((-2, -1), bins) if b is not None]
        note("adaptive-pool", f"{function} to {_size_text(bins, traced)} as {onnx_op} over "
                              f"{', '.join('HW'[a] for a in axes) or 'nothing'}")
        return reduce(x, dim=axes, keepdim=True) if axes else x.clone()  # dim=[] would reduce everything
    if not dynamic and all(b is None or n % b == 0 for b, n in zip(traced, _concrete(x.shape[-2:]))):
        note("adaptive-pool", f"{function} to {_size_text(bins, traced)} as Reshape into equal bins + {onnx_op} "
                              "(static input size, divisible by the output size)")
        return _equal_bins(reduce, x, traced)
    how = "bin-averaging matmuls" if kind == "avg" else f"a masked {onnx_op} per axis"
    note("adaptive-pool", f"{function} to {_size_text(bins, traced)} as {how} (exact at any input size)")
    return adaptive_pool_as_bins(kind, x, bins)


def _equal_bins(reduce, x, bins):
    """`reduce` over equal bins: the input sizes are multiples of the output sizes (None: keep the axis)."""
    th, tw = x.shape[-2:]
    rows = (th, 1) if bins[0] is None else (bins[0], th // bins[0])
    cols = (tw, 1) if bins[1] is None else (bins[1], tw // bins[1])
    return reduce(x.reshape(*x.shape[:-2], *rows, *cols), dim=(-3, -1))


def adaptive_pool_as_bins(kind, x, bins):
    """F.adaptive_{kind}_pool2d(x, bins) for any output sizes (ints or 0-dim integer tensors; None keeps the axis),
    without pooling ops: one axis at a time, so no intermediate holds more than one axis' bins."""
    for axis, size in zip((-2, -1), bins):
        if size is not None:
            x = (_bin_average if kind == "avg" else _bin_max)(x, axis, size)
    return x


def _bin_masks(length, size, device):
    """(size, length) bool, row i marking torch's bin [floor(i*L/O), ceil((i+1)*L/O)), and the bin lengths. While
    tracing, `length` (and a size read from a tensor) are 0-dim tensors: the graph computes the bins from them
    (Range, Mul, Div), so a dynamic export follows the input size."""
    i = torch.arange(size, device=device)
    start = i * length // size
    end = ((i + 1) * length + size - 1) // size  # ceil for non-negative integers
    j = torch.arange(length, device=device)
    return (j >= start[:, None]) & (j < end[:, None]), end - start


def _bin_average(x, axis, size):
    """Mean over each bin along `axis` (-2 or -1): a matmul with a matrix holding 1/len over each bin."""
    mask, count = _bin_masks(x.shape[axis], size, x.device)
    weights = mask.to(x.dtype) / count[:, None].to(x.dtype)
    return weights @ x if axis == -2 else x @ weights.transpose(0, 1)


def _bin_max(x, axis, size):
    """Max over each bin along `axis` (-2 or -1): the input broadcast against the masks, -inf outside the bin."""
    mask, _ = _bin_masks(x.shape[axis], size, x.device)
    if axis == -2:  # (..., 1, L, W) against (O, L, 1)
        return torch.where(mask[:, :, None], x.unsqueeze(-3), float("-inf")).amax(dim=-2)
    return torch.where(mask, x.unsqueeze(-2), float("-inf")).amax(dim=-1)  # (..., H, 1, L) against (O, L)


def _output_bins(output_size):
    """(rows, cols), each an int, a 0-dim integer tensor (a size read from a tensor: x.shape[-1] while tracing) or
    None for 'keep'; None for a form not covered (other tensors, wrong length)."""
    if _is_size(output_size):
        return (output_size, output_size)
    if isinstance(output_size, (tuple, list)) and len(output_size) == 2 and all(
            s is None or _is_size(s) for s in output_size):
        return tuple(output_size)
    return None


def _is_size(value):
    return _is_int(value) or (isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype in _INT_TYPES)


_INT_TYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _size_text(bins, traced):
    """'(5, None)'; a size read from a tensor shows its traced value and says so."""
    text = "(" + ", ".join(str(b) for b in traced) + ")"
    return text if all(b is None or _is_int(b) for b in bins) else text + " (read from tensors; traced values)"


# ---- einsum -----------------------------------------------------------------------------------------------------

def _einsum(original, note, dynamic, *args):  # the lowering follows the traced sizes: dynamic or not
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


# ---- deformable convolution ----------------------------------------------------------------------------------

def _deform_conv2d(original, note, dynamic, input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                   dilation=(1, 1), mask=None):
    """torchvision's deform_conv2d (DCNv1, DCNv2 with `mask`) in standard ops: every kernel tap's sampling
    points (the regular grid plus the learned offsets) sampled bilinearly with GridSample (align_corners, zero
    padding: torchvision's own bilinear rule, corners outside the map count 0), masked, then one grouped matmul
    with the weights. Measured: torch's TorchScript exporter does not export deform_conv2d at all, and an ONNX
    DeformConv node (opset 19) is rejected by TensorRT-RTX's parser. The sampling runs in fp32 in an fp16 model."""
    note("deform-conv", "torchvision deform_conv2d as GridSample per kernel tap + grouped MatMul (exact; "
                        "sampling in fp32)")
    b, cin, h, w = input.shape
    cout, cin_g, kh, kw = weight.shape
    k, groups = kh * kw, cin // cin_g
    og = offset.shape[1] // (2 * k)
    ho, wo = offset.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = (_pair(v) for v in (stride, padding, dilation))
    off = offset.float().reshape(b, og, k, 2, ho, wo)
    taps_y = (torch.arange(kh, device=input.device) * dh).repeat_interleave(kw).float()
    taps_x = (torch.arange(kw, device=input.device) * dw).repeat(kh).float()
    rows = (torch.arange(ho, device=input.device) * sh - ph).float()
    cols = (torch.arange(wo, device=input.device) * sw - pw).float()
    y = rows.view(1, 1, 1, -1, 1) + taps_y.view(1, 1, -1, 1, 1) + off[:, :, :, 0]  # (b, og, k, ho, wo) pixels
    x = cols.view(1, 1, 1, 1, -1) + taps_x.view(1, 1, -1, 1, 1) + off[:, :, :, 1]
    grid = torch.stack((x / (w - 1).clamp(min=1) * 2 - 1, y / (h - 1).clamp(min=1) * 2 - 1), -1) if isinstance(
        w, torch.Tensor) else torch.stack((x / max(w - 1, 1) * 2 - 1, y / max(h - 1, 1) * 2 - 1), -1)
    grid = grid.reshape(b * og, k * ho, wo, 2)
    sampled = F.grid_sample(input.float().reshape(b * og, cin // og, h, w), grid, mode="bilinear",
                            padding_mode="zeros", align_corners=True)  # (b*og, cin/og, k*ho, wo)
    sampled = sampled.reshape(b, og, cin // og, k, ho, wo)
    if mask is not None:
        sampled = sampled * mask.float().reshape(b, og, 1, k, ho, wo)
    columns = sampled.reshape(b, groups, cin_g * k, ho * wo)  # channel-major, then kernel tap: the weight's order
    out = torch.matmul(weight.float().reshape(1, groups, cout // groups, cin_g * k), columns)
    out = out.reshape(b, cout, ho, wo)
    out = out + bias.float().view(1, -1, 1, 1) if bias is not None else out
    return out.to(input.dtype)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# ---- in-place ops on views ---------------------------------------------------------------------------------------

# Tensor methods that write into `self`.
INPLACE_METHODS = frozenset((
    "add_", "sub_", "mul_", "div_", "pow_", "neg_", "abs_", "clamp_", "clamp_min_", "clamp_max_", "exp_", "log_",
    "sqrt_", "rsqrt_", "sigmoid_", "tanh_", "relu_", "floor_", "ceil_", "round_", "fill_", "zero_", "masked_fill_",
    "addcmul_", "addcdiv_", "lerp_", "reciprocal_", "sign_", "copy_", "index_put_", "scatter_", "masked_scatter_"))
INPLACE_VIEW = "inplace-view"


@contextlib.contextmanager
def _inplace_views_seen(running, note):
    """Record every in-place op on a view (a tensor with a `_base`) that block code makes, with its line, and leave
    it as written. torch's ONNX exporter writes such an op back into the viewed tensor right only in some forms: a
    fresh view written once is right; a chain (`ref[..., 0].div_(W).mul_(2).sub_(1)`, as deformable attention
    normalises its reference points) or a second op on one view object exports with the later ops lost, wrong at
    every size. No rewrite in Python helps, and even wrapping the methods or indexing changes what the exporter
    does; a profile hook sees the calls without touching them. The block check (export_job) then decides: exact,
    or the run fails naming the block and these lines."""
    previous = sys.getprofile()

    def profile(frame, event, arg):
        if event == "c_call" and running and getattr(arg, "__name__", "") in INPLACE_METHODS:
            target = getattr(arg, "__self__", None)
            if isinstance(target, torch.Tensor) and target._base is not None:
                code = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
                note(running[-1], INPLACE_VIEW, f"in-place op on a view (line {frame.f_lineno}: {code}): torch's "
                                                "ONNX exporter loses some of these (chains, a second op on one view)")

    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)


# What exportable_calls swaps: (owner, attribute, rewrite(original, note, dynamic, *args, **kwargs)). The
# nn.Adaptive*Pool2d modules look F.adaptive_*_pool2d up at call time, so patching F covers them.
_REWRITES = [
    (F, "adaptive_avg_pool2d", _adaptive_avg_pool2d),
    (F, "adaptive_max_pool2d", _adaptive_max_pool2d),
    (torch, "einsum", _einsum),
    (torchvision.ops.deform_conv, "deform_conv2d", _deform_conv2d),  # DeformConv2d.forward looks it up there
    (torchvision.ops, "deform_conv2d", _deform_conv2d),
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


def block_class_lines(model, block_names):
    """{block: [(source file, first line, last line)] of its class and the classes it inherits from}."""
    modules, lines = dict(model.named_modules()), {}
    for name in block_names:
        for cls in type(modules[name]).__mro__[:-1]:  # not object
            try:
                path, (source, first) = inspect.getsourcefile(cls), inspect.getsourcelines(cls)
            except (OSError, TypeError):  # builtins, classes without a source file
                continue
            if path:
                lines.setdefault(name, []).append((os.path.realpath(path), first, first + len(source) - 1))
    return lines


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


def per_block(block_files, used, caught, graph_passes, class_lines=None):
    """{block: [records]}: what `exportable_calls` used, the shape-code warnings among `caught`, and the nodes each
    ONNX graph pass changed (`graph_passes`: {pass: node names}, see GRAPH_PASSES), charged to the block whose
    module path encloses the node. A shape-code line goes to the blocks whose classes (`class_lines`, from
    block_class_lines) hold it, or to every block of its file when it is in none (a module-level helper)."""
    blocks = {name: [] for names in block_files.values() for name in names}

    def add(block, record):
        if record not in blocks[block]:
            blocks[block].append(record)

    for r in used:
        add(r["block"], {"rewrite": r["rewrite"], "detail": r["detail"]})
    for r in shape_code_warnings(caught, block_files):
        of_file = block_files[r["block_file"]]
        owners = [b for b in of_file if any(path == r["block_file"] and first <= r["line"] <= last
                                             for path, first, last in (class_lines or {}).get(b, ()))]
        for block in owners or of_file:
            add(block, {"rewrite": r["rewrite"], "detail": r["detail"]})
    for graph_pass, nodes in graph_passes.items():
        rewrite, detail = GRAPH_PASSES[graph_pass]
        for node in nodes:
            scope = node_scope(node)
            for block in (b for b in blocks if scope == b or scope.startswith(b + ".")):
                add(block, {"rewrite": rewrite, "detail": detail})
    return blocks


# The ONNX graph passes of export.graph.to_onnx.export_yolo (its log key: record) whose nodes are charged to blocks.
GRAPH_PASSES = {
    "float64": ("float64", "float64 values (the tracer's typing of shape arithmetic) computed in float32, as "
                           "PyTorch computed them"),
    "grid_sample": ("grid-sample-type", "GridSample's grid cast to its input's type (TensorRT needs one type)"),
    "slice_writes": ("slice-writes", "in-place slice write as Slice + Concat (was ScatterND)"),
}
