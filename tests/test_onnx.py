"""Each export twin exports to ONNX (opset 17, dynamic batch/H/W) that TensorRT can take and ORT runs exactly."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import models
from export.to_onnx import MAX_IR_VERSION, export_module
from tests.cases import CASES, rel_err

FORBIDDEN_OPS = {"Einsum", "ScatterND", "ScatterElements", "Col2Im", "If", "Loop", "SequenceConstruct"}
COMPLEX = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
DYNAMIC = {"x": {0: "batch", 2: "height", 3: "width"}, "y": {0: "batch", 2: "height", 3: "width"}}


def _elem_types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    infos = list(g.input) + list(g.output) + list(g.value_info)
    return {i.type.tensor_type.elem_type for i in infos} | {t.data_type for t in g.initializer}


@pytest.mark.parametrize("name", CASES)
def test_twin_exports_clean_and_matches_in_ort(name, tmp_path):
    case = CASES[name]
    twin = models.to_export(case.build())
    h, w = case.sizes[0]
    model = export_module(twin, torch.randn(2, case.channels, h, w), tmp_path / f"{name}.onnx",
                          opset=17, dynamic_axes=DYNAMIC)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & FORBIDDEN_OPS, f"{name}: {sorted(ops & FORBIDDEN_OPS)}"
    assert not _elem_types(model) & COMPLEX
    assert model.opset_import[0].version >= 17 and model.ir_version <= MAX_IR_VERSION
    session = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    for batch, (h, w) in zip((2, 1, 3), case.sizes):  # other sizes than traced: nothing froze at trace time
        x = torch.randn(batch, case.channels, h, w)
        with torch.no_grad():
            expected = twin(x)
        (got,) = session.run(None, {"x": x.numpy()})
        assert got.shape == tuple(expected.shape)
        assert np.isfinite(got).all()
        assert rel_err(torch.from_numpy(got), expected) <= 1e-5, f"{name} at {batch}x{h}x{w}"


FP16_FAMILIES = ("fla", "c2f_fla", "mlla", "sta", "s2_c30")


@pytest.mark.parametrize("name", FP16_FAMILIES)
def test_fp16_twin_onnx_keeps_fp32_islands_and_matches(name, tmp_path):
    """Half weights and activations, with the overflow-prone parts cast to fp32 inside the graph."""
    case = CASES[name]
    twin = models.to_export(case.build()).half()
    x = torch.randn(1, case.channels, *case.sizes[1]).half()
    model = export_module(twin, x, tmp_path / "half.onnx", dynamic_axes=DYNAMIC)
    to_fp32 = [n for n in model.graph.node if n.op_type == "Cast"
               and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]
    assert to_fp32, "no explicit fp32 island in the fp16 graph"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    session = ort.InferenceSession(str(tmp_path / "half.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = twin(x)
    # Different fp16 kernels (ORT vs torch CPU): measured <= 3.2e-3 of the output scale.
    assert np.isfinite(got).all() and rel_err(torch.from_numpy(got), expected) <= 1e-2
