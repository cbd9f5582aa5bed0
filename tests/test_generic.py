"""Generic rewrites (export.graph.generic, export.graph.onnx_passes): inside named blocks only, exact, and what they leave alone."""

import inspect
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import onnxslim
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import einsum as bound_einsum

from export.graph.generic import (NOT_COVERED, adaptive_pool_as_bins, block_source_files, exportable_calls,
                                  shape_code_warnings)
from export.graph.onnx_passes import literal_slice_writes
from export.graph.to_onnx import export_module, trace
from tests.cases import rel_err

POOL_OPS = {"AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool"}
DYNAMIC_HW = {"x": {2: "height", 3: "width"}, "y": {2: "height", 3: "width"}}


class Pool(nn.Module):
    """One adaptive pooling, through the nn module or F."""

    def __init__(self, kind, size, functional=False):
        super().__init__()
        self.kind, self.size, self.functional = kind, size, functional
        self.pool = nn.AdaptiveAvgPool2d(size) if kind == "avg" else nn.AdaptiveMaxPool2d(size)

    def forward(self, x):
        if not self.functional:
            return self.pool(x) * 2
        pool = F.adaptive_avg_pool2d if self.kind == "avg" else F.adaptive_max_pool2d
        return pool(x, self.size) * 2


class Host(nn.Module):
    """A model around blocks, so that blocks have paths ('block', 'plain')."""

    def __init__(self, block, plain=None):
        super().__init__()
        self.block, self.plain = block, plain

    def forward(self, *inputs):
        y = self.block(*inputs)
        return y if self.plain is None else y + self.plain(*inputs)


def _session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _ops(proto):
    return {n.op_type for n in proto.graph.node}


POOLS = [("avg", 1, False), ("max", 1, False), ("avg", (1, 1), True), ("max", [1, 1], True),
         ("avg", (None, 1), False), ("avg", (1, None), True), ("max", (None, 1), True), ("max", (1, None), False),
         ("avg", (2, 2), False), ("max", (4, 4), True), ("avg", (3, None), True), ("max", 4, False),
         ("avg", (4, 1), False)]


@pytest.mark.parametrize("kind,size,functional", POOLS)
def test_adaptive_pooling_exports_without_pool_ops_at_any_size(kind, size, functional, tmp_path):
    model = Host(Pool(kind, size, functional)).eval()
    with exportable_calls(model, ["block"], dynamic=True) as used:
        proto = export_module(model, torch.randn(2, 3, 12, 8), tmp_path / "pool.onnx", dynamic_axes=DYNAMIC_HW)
    is_global = all(s in (None, 1) for s in (size if isinstance(size, (tuple, list)) else (size,)))
    assert not _ops(proto) & POOL_OPS
    # dynamic: a size dividing 12x8 need not divide the next input, so only global pooling stays a plain reduction
    assert ("ReduceMean" if kind == "avg" and is_global else "MatMul" if kind == "avg" else "ReduceMax") in _ops(proto)
    assert [(u["block"], u["rewrite"]) for u in used] == [("block", "adaptive-pool")]
    assert f"adaptive_{kind}_pool2d" in used[0]["detail"]
    assert ("exact at any input size" in used[0]["detail"]) == (not is_global)
    session = _session(proto)
    for h, w in ((12, 8), (24, 4), (13, 7), (3, 5)):  # the traced size, others, non-dividing and smaller ones
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            expected = model(x)  # outside the context: torch's own pooling
        (got,) = session.run(None, {"x": x.numpy()})
        assert got.shape == tuple(expected.shape)
        assert rel_err(torch.from_numpy(got), expected) <= 1e-6, (h, w)


@pytest.mark.parametrize("kind,op", [("avg", "ReduceMean"), ("max", "ReduceMax")])
def test_static_export_of_a_dividing_size_reshapes_into_equal_bins(kind, op, tmp_path):
    model = Host(Pool(kind, (4, 2))).eval()
    x = torch.randn(2, 3, 12, 8)
    with exportable_calls(model, ["block"]) as used:
        proto = export_module(model, x, tmp_path / "pool.onnx")
    assert used == [{"block": "block", "rewrite": "adaptive-pool",
                     "detail": f"adaptive_{kind}_pool2d to (4, 2) as Reshape into equal bins + {op} (static input "
                               "size, divisible by the output size)"}]
    assert op in _ops(proto) and not _ops(proto) & (POOL_OPS | {"MatMul", "Where"})
    (got,) = _session(proto).run(None, {"x": x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(got), model(x)) <= 1e-6


# Bin lengths 1..12 against output sizes 1..15 (so larger, smaller, equal, dividing or not), and far-apart pairs.
BIN_GRID = [(n, o) for n in range(1, 13) for o in range(1, 16)] + [(3, 40), (40, 3), (80, 5), (5, 80), (20, 7)]


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_bins_match_torch_for_any_output_size(kind):
    pool = F.adaptive_avg_pool2d if kind == "avg" else F.adaptive_max_pool2d
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for (h, oh), (w, ow) in zip(BIN_GRID, reversed(BIN_GRID)):  # each pair on both axes
        x = torch.randn(2, 3, h, w, generator=generator)
        for bins in ((oh, ow), (oh, None), (None, ow), (torch.tensor(oh), ow)):
            expected, got = pool(x, bins), adaptive_pool_as_bins(kind, x, bins)
            assert got.shape == expected.shape, (h, w, bins)
            if kind == "max":
                assert torch.equal(got, expected), (h, w, bins)  # a max picks an element: no rounding
            worst = max(worst, rel_err(got, expected))
    x = torch.randn(3, 1, 9, generator=generator)  # unbatched, 1xN
    assert rel_err(adaptive_pool_as_bins(kind, x, (4, 5)), pool(x, (4, 5))) <= 1e-6
    assert worst <= 1e-6


def test_eager_rewrite_matches_pooling():
    model = Host(Pool("avg", (2, 4), True)).eval()
    x = torch.randn(2, 3, 8, 12)
    with exportable_calls(model, ["block"]) as used:
        got = model(x)
    assert used and rel_err(got, model(x)) <= 1e-6


def test_calls_outside_the_named_blocks_run_unchanged(tmp_path):
    model = Host(Pool("avg", 1), Pool("avg", 1)).eval()
    with exportable_calls(model, ["block"]) as used:
        proto = export_module(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", dynamic_axes=DYNAMIC_HW)
    by_scope = {scope: {n.op_type for n in proto.graph.node if f"/{scope}/" in n.name} for scope in ("block", "plain")}
    assert "GlobalAveragePool" in by_scope["plain"] and "ReduceMean" not in by_scope["plain"]
    assert "ReduceMean" in by_scope["block"] and not by_scope["block"] & POOL_OPS
    assert {u["block"] for u in used} == {"block"}


def test_innermost_named_block_is_credited_and_hooks_go_away():
    inner = Pool("avg", (None, 1))
    outer = Host(inner, Pool("max", 1))
    model = Host(outer)
    original = F.adaptive_avg_pool2d
    with exportable_calls(model, ["block", "block.block"]) as used:
        model(torch.randn(1, 2, 4, 4))
    assert {(u["block"], u["detail"].split(" ")[0]) for u in used} == {
        ("block.block", "adaptive_avg_pool2d"), ("block", "adaptive_max_pool2d")}
    assert F.adaptive_avg_pool2d is original
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class Failing(nn.Module):
    def forward(self, x):
        raise RuntimeError("block failed")


def test_a_failing_block_leaves_no_block_running():
    model = Host(Failing())
    with exportable_calls(model, ["block"]) as used:
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 2, 4, 4))
        F.adaptive_avg_pool2d(torch.randn(1, 2, 4, 4), 1)  # outside any block again: not rewritten
    assert used == []


def test_unknown_block_names_are_refused():
    with pytest.raises(ValueError, match="nope"):
        with exportable_calls(Host(Pool("avg", 1)), ["nope"]):
            pass


class Fork(nn.Module):
    """A fork block's pooling: the map pooled to 5x5, mixed, pooled back up to the map's size (read from x.shape,
    tensors while tracing) as a gate; and a max pool to a size dividing neither axis."""

    def __init__(self, channels=3):
        super().__init__()
        self.mix = nn.Conv2d(channels, channels, 3, padding=1)
        self.peaks = nn.AdaptiveMaxPool2d((3, 7))

    def forward(self, x):
        h, w = x.shape[-2:]
        a = self.mix(F.adaptive_avg_pool2d(x, 5))
        return x * F.adaptive_avg_pool2d(a, (h, w)).sigmoid(), self.peaks(x)


def _fork_errors(proto, model, sizes):
    """Worst rel_err of the ONNX outputs against torch's own pooling (outside exportable_calls), per input size."""
    session, errors = _session(proto), []
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            expected = model(x)
        got = session.run(None, {"x": x.numpy()})
        assert [g.shape for g in got] == [tuple(e.shape) for e in expected], (h, w)
        errors.append(max(rel_err(torch.from_numpy(g), e) for g, e in zip(got, expected)))
    return errors


GATE = "adaptive_avg_pool2d to (20, 20) (read from tensors; traced values) as bin-averaging matmuls (exact at any " \
       "input size)"
PEAKS = "adaptive_max_pool2d to (3, 7) as a masked ReduceMax per axis (exact at any input size)"


def test_pooling_to_larger_and_non_dividing_sizes_exports_exactly(tmp_path):
    model = Host(Fork()).eval()
    with exportable_calls(model, ["block"]) as used:
        proto = export_module(model, torch.randn(2, 3, 20, 20), tmp_path / "fork.onnx", output_names=("y", "peaks"))
    assert used == [{"block": "block", "rewrite": "adaptive-pool", "detail": detail} for detail in (
        "adaptive_avg_pool2d to (5, 5) as Reshape into equal bins + ReduceMean (static input size, divisible by the "
        "output size)", GATE, PEAKS)]
    assert not _ops(proto) & POOL_OPS
    assert max(_fork_errors(proto, model, [(20, 20)])) <= 1e-6


def test_pooling_to_larger_and_non_dividing_sizes_follows_a_dynamic_input(tmp_path):
    model = Host(Fork()).eval()
    with exportable_calls(model, ["block"], dynamic=True) as used:
        proto = export_module(model, torch.randn(2, 3, 20, 20), tmp_path / "fork.onnx", output_names=("y", "peaks"),
                              dynamic_axes={"x": {2: "height", 3: "width"}, "y": {2: "height", 3: "width"}})
    assert used == [{"block": "block", "rewrite": "adaptive-pool", "detail": detail} for detail in (
        "adaptive_avg_pool2d to (5, 5) as bin-averaging matmuls (exact at any input size)", GATE, PEAKS)]
    assert not _ops(proto) & POOL_OPS and "Range" in _ops(proto)  # bins computed from the runtime size
    errors = _fork_errors(proto, model, [(20, 20), (19, 19), (24, 17), (4, 3)])
    assert max(errors) <= 1e-6, errors


class Call(nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


@pytest.mark.parametrize("function,why", [
    (lambda x: F.adaptive_max_pool2d(x, 3, return_indices=True)[0], "return_indices"),
    (lambda x: F.adaptive_avg_pool2d(x, torch.tensor([3, 3])), "other than ints"),
    (lambda x: F.adaptive_avg_pool2d(x, (0, 2)), "empty output")])
def test_uncovered_pooling_forms_are_left_to_torch_and_reported(function, why):
    model = Host(Call(function))
    x = torch.randn(1, 2, 8, 8)
    with exportable_calls(model, ["block"]) as used:
        got = model(x)
    assert torch.equal(got, function(x))
    assert [(u["block"], u["rewrite"]) for u in used] == [("block", NOT_COVERED)] and why in used[0]["detail"]


class Contract(nn.Module):
    def __init__(self, equation, as_list=False):
        super().__init__()
        self.equation, self.as_list = equation, as_list

    def forward(self, *operands):
        return torch.einsum(self.equation, list(operands)) if self.as_list else torch.einsum(self.equation, *operands)


EINSUMS = [
    ("bhnd,bhmd,bhme->bhne", [(2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7)], False),
    ("bij,bjk,bkl->bil", [(2, 3, 4), (2, 4, 5), (2, 5, 6)], True),
    ("bij,bjk,bkl->bi", [(2, 3, 4), (2, 4, 5), (2, 5, 6)], False),  # l summed away before its pair
    ("ij,jk,kl", [(3, 4), (4, 5), (5, 6)], False),  # implicit output 'il'
    ("bij,bjk,bkl,blm->bmi", [(2, 3, 4), (2, 4, 5), (2, 5, 6), (2, 6, 3)], True),
    ("bnc,bmc->bnm", [(2, 5, 4), (2, 6, 4)], False),
    ("bij,jk->bki", [(1, 3, 4), (4, 5)], False),
]


@pytest.mark.parametrize("equation,shapes,as_list", EINSUMS)
def test_einsum_exports_as_matmuls(equation, shapes, as_list, tmp_path):
    model = Host(Contract(equation, as_list))
    operands = tuple(torch.randn(*s) for s in shapes)
    names = tuple("abcd"[:len(operands)])
    expected = torch.einsum(equation, *operands)
    with exportable_calls(model, ["block"]) as used:
        eager = model(*operands)
        proto = export_module(model, operands, tmp_path / "e.onnx", input_names=names)
    assert used == [{"block": "block", "rewrite": "einsum-matmul",
                     "detail": f"einsum '{equation}' ({len(shapes)} operands) as matmuls"}]
    assert rel_err(eager, expected) <= 1e-6
    assert "Einsum" not in _ops(proto) and "MatMul" in _ops(proto)
    (got,) = _session(proto).run(None, {n: t.numpy() for n, t in zip(names, operands)})
    assert rel_err(torch.from_numpy(got), expected) <= 1e-6


def test_einsum_lowering_follows_dynamic_sizes(tmp_path):
    equation = "bhnd,bhmd,bhme->bhne"
    model = Host(Contract(equation))
    axes = {"a": {0: "b", 2: "n"}, "b": {0: "b", 2: "m"}, "c": {0: "b", 2: "m"}}
    shapes = [(2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7)]
    with exportable_calls(model, ["block"]):
        proto = export_module(model, tuple(torch.randn(*s) for s in shapes), tmp_path / "e.onnx",
                              input_names=("a", "b", "c"), dynamic_axes=axes)
    operands = [torch.randn(3, 3, 9, 5), torch.randn(3, 3, 2, 5), torch.randn(3, 3, 2, 7)]
    (got,) = _session(proto).run(None, {n: t.numpy() for n, t in zip("abc", operands)})
    assert rel_err(torch.from_numpy(got), torch.einsum(equation, *operands)) <= 1e-6


def test_einsum_outside_blocks_and_diagonals_are_left_alone(tmp_path):
    model = Host(Contract("bii->bi"), Contract("bij->bi"))
    x = torch.randn(2, 3, 3)
    with exportable_calls(model, ["block"]) as used:
        got = model(x)
    assert torch.equal(got, torch.einsum("bii->bi", x) + torch.einsum("bij->bi", x))
    assert [(u["block"], u["rewrite"]) for u in used] == [("block", NOT_COVERED)]
    assert "diagonal" in used[0]["detail"]


class BoundContract(nn.Module):
    """einsum bound at import time (`from torch import einsum`), not looked up on torch."""

    def forward(self, a, b):
        return bound_einsum("bij,bjk->bik", a, b)


def test_einsum_bound_in_the_block_module_is_rewritten_too():
    model = Host(BoundContract())
    operands = (torch.randn(2, 3, 4), torch.randn(2, 4, 5))
    with exportable_calls(model, ["block"]) as used:
        proto = trace(model, operands, input_names=("a", "b"))
    assert [u["rewrite"] for u in used] == ["einsum-matmul"] and "Einsum" not in _ops(proto)
    assert bound_einsum is torch.functional.einsum


class Write(nn.Module):
    """x with a slice overwritten by y (or by 0.5 without y)."""

    def __init__(self, where):
        super().__init__()
        self.where = where

    def forward(self, x, y=None):
        x = x.clone()
        x[self.where] = 0.5 if y is None else y
        return x


WRITES = {
    "channels": ((slice(None), slice(2, 5)), (2, 8, 4, 4), (2, 3, 4, 4)),
    "box": ((slice(None), slice(None), slice(1, 3), slice(4, 6)), (2, 3, 8, 8), (2, 3, 2, 2)),
    "last": ((Ellipsis, 0), (2, 3, 4, 5), (2, 3, 4)),
    "row": ((0, slice(1, 3)), (2, 8, 4), (2, 4)),
    "fill": ((slice(None), slice(2, 5)), (2, 8, 4), None),
    "negative": ((slice(None), slice(-3, None)), (2, 8, 4), (2, 3, 4)),
}


@pytest.mark.filterwarnings("ignore:ONNX Preprocess - Removing mutation")  # torch's note on x[...] = y
@pytest.mark.parametrize("name", WRITES)
def test_slice_writes_become_slices_and_concats(name):
    where, x_shape, y_shape = WRITES[name]
    inputs = {"x": torch.randn(*x_shape)} | ({"y": torch.randn(*y_shape)} if y_shape else {})
    traced = trace(Write(where), tuple(inputs.values()), input_names=tuple(inputs), output_names=("out",))
    assert "ScatterND" in _ops(traced)
    assert literal_slice_writes(traced) == []  # indices computed from sizes: constant only once folded
    folded = onnxslim.slim(traced)
    before = onnx.ModelProto()
    before.CopyFrom(folded)
    replaced = literal_slice_writes(folded)
    assert len(replaced) == 1 and "ScatterND" not in _ops(folded)
    onnx.checker.check_model(folded, full_check=True)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    (expected,) = _session(before).run(None, feeds)
    (got,) = _session(folded).run(None, feeds)
    assert np.array_equal(got, expected)
    assert np.array_equal(got, Write(where)(*inputs.values()).numpy())


def _scatter_model(indices, as_constant=False):
    """data (4, 3) with rows `indices` ([[row], ...]) replaced by updates."""
    indices = np.array(indices, dtype=np.int64)
    updates_shape = list(indices.shape[:-1]) + [3]
    node = helper.make_node("ScatterND", ["data", "indices", "updates"], ["out"], name="scatter")
    constant = numpy_helper.from_array(indices, "indices")
    nodes = [helper.make_node("Constant", [], ["indices"], value=constant), node] if as_constant else [node]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [4, 3]),
                                           helper.make_tensor_value_info("updates", TensorProto.FLOAT, updates_shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 3])],
                              initializer=[] if as_constant else [constant])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, updates_shape


@pytest.mark.parametrize("indices", [[[0], [2]], [[1], [0]], [[1], [1]], [[0, 0], [1, 1]]])
def test_scatters_not_writing_a_box_are_left_alone(indices):
    model, _ = _scatter_model(indices)
    assert literal_slice_writes(model) == [] and _ops(model) == {"ScatterND"}


@pytest.mark.parametrize("indices,as_constant", [([[1], [2]], True), ([[-2], [-1]], False), ([[[0], [1]]], True),
                                                 ([[0], [1], [2], [3]], False)])
def test_scatter_box_from_a_constant_node_or_initializer(indices, as_constant):
    model, updates_shape = _scatter_model(indices, as_constant)
    feeds = {"data": np.random.rand(4, 3).astype(np.float32),
             "updates": np.random.rand(*updates_shape).astype(np.float32)}
    (expected,) = _session(model).run(None, feeds)
    assert literal_slice_writes(model) == ["scatter"]
    assert "ScatterND" not in _ops(model) and "Constant" not in _ops(model)
    assert "indices" not in {t.name for t in model.graph.initializer}
    onnx.checker.check_model(model, full_check=True)
    (got,) = _session(model).run(None, feeds)
    assert np.array_equal(got, expected)


class ShapeCode(nn.Module):
    def forward(self, x):
        n = x.shape[2] * x.shape[3]
        s = int(n ** 0.5)
        return x.reshape(x.shape[0], x.shape[1], s, -1)


def test_shape_code_in_blocks_is_reported_with_its_line():
    model = Host(ShapeCode())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(model, torch.randn(1, 2, 4, 4))
    files = block_source_files(model, ["block"])
    assert list(files.values()) == [["block"]]
    lines, first = inspect.getsourcelines(ShapeCode.forward)
    line = first + next(i for i, text in enumerate(lines) if "int(n ** 0.5)" in text)
    records = shape_code_warnings(caught, files)
    assert [(r["line"], r["rewrite"]) for r in records] == [(line, "shape-code")]
    assert "s = int(n ** 0.5)" in records[0]["detail"]
    assert shape_code_warnings(caught, [torch.__file__]) == []
