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

from export.graph.generic import NOT_COVERED, block_source_files, exportable_calls, shape_code_warnings
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
def test_adaptive_pooling_exports_as_reductions_at_any_size(kind, size, functional, tmp_path):
    model = Host(Pool(kind, size, functional)).eval()
    with exportable_calls(model, ["block"]) as used:
        proto = export_module(model, torch.randn(2, 3, 12, 8), tmp_path / "pool.onnx", dynamic_axes=DYNAMIC_HW)
    assert not _ops(proto) & POOL_OPS
    assert ("ReduceMean" if kind == "avg" else "ReduceMax") in _ops(proto)
    assert [(u["block"], u["rewrite"]) for u in used] == [("block", "adaptive-pool")]
    assert f"adaptive_{kind}_pool2d" in used[0]["detail"]
    session = _session(proto)
    for h, w in ((12, 8), (24, 4)):  # the traced size and another: nothing froze
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            expected = model(x)  # outside the context: torch's own pooling
        (got,) = session.run(None, {"x": x.numpy()})
        assert got.shape == tuple(expected.shape)
        assert rel_err(torch.from_numpy(got), expected) <= 1e-6, (h, w)


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


def test_non_dividing_pooling_is_left_to_torch_and_reported():
    model = Host(Pool("avg", 3)).eval()
    x = torch.randn(1, 2, 8, 8)
    with exportable_calls(model, ["block"]) as used:
        got = model(x)
        try:
            proto = trace(model, x)
        except Exception:  # torch's exporter rejects output sizes that do not divide the input
            proto = None
    assert torch.equal(got, model(x))
    assert used == [{"block": "block", "rewrite": NOT_COVERED, "detail": used[0]["detail"]}]
    assert "non-dividing" in used[0]["detail"]
    assert proto is None or "ReduceMean" not in _ops(proto)


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
