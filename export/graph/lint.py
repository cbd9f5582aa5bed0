"""What TensorRT's ONNX parser rejects or runs badly, found in an ONNX graph before any engine build.

    findings = lint(onnx_model, dynamic=True)   # [{"severity", "rule", "node", "op", "message"}, ...]

severity "error": the parser refuses it (or a documented TensorRT limit); "warn": it parses but runs
badly (serialised scatters, host round trips) or only on some TensorRT versions.
"""

import onnx
from onnx import TensorProto

# Maximum ONNX opset per parser generation: TensorRT 11.x opset guide (25); TensorRT 8.5/8.6, the JetPack 5
# (Jetson) releases, parse opsets up to 17.
MAX_OPSET = {"TensorRT 11": 25, "TensorRT 8.5-8.6 (Jetson)": 17}
REJECTED_OPS = {"Col2Im": "TensorRT's parser has no Col2Im (F.fold): use shifted adds",
                "Im2Col": "no Im2Col in TensorRT's parser: use shifted slices",
                "Det": "TensorRT's parser has no Det (torch.det / linalg.det; TensorRT-RTX 1.x refuses it)"}
SLOW_OPS = {"ScatterND": "in-place slice writes become ScatterND: serialised and slow in TensorRT; use slices + Concat",
            "ScatterElements": "scatter writes run serialised in TensorRT; use slices + Concat",
            "NonZero": "data-dependent shape: forces a host round trip in TensorRT",
            "Unique": "data-dependent shape, not supported by TensorRT's parser"}
CONTROL_FLOW = {"If", "Loop", "Scan"}
COMPLEX = {TensorProto.COMPLEX64, TensorProto.COMPLEX128}
RESHAPING = {"Reshape", "Expand", "Tile"}


def lint(model, dynamic=False):
    findings = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    for parser, limit in MAX_OPSET.items():
        if opset > limit:
            findings.append(_finding("error" if parser == "TensorRT 11" else "warn", "opset", "", "",
                                     f"opset {opset} is above what {parser}'s ONNX parser reads ({limit})"))
    constants = _constant_values(model)
    functions = {(f.domain, f.name) for f in model.functions}
    for node in model.graph.node:
        findings.extend(_node_findings(node, constants, functions, dynamic))
    findings.extend(_type_findings(model))
    findings.extend(_qdq_findings(model))
    return findings


def _finding(severity, rule, node, op, message):
    return {"severity": severity, "rule": rule, "node": node, "op": op, "message": message}


def _node_findings(node, constants, functions, dynamic):
    name, op = node.name or node.output[0], node.op_type
    if op == "Einsum" and len(node.input) > 2:
        yield _finding("error", "einsum-inputs", name, op,
                       f"Einsum with {len(node.input)} inputs: TensorRT's parser takes at most two; lower to MatMul")
    elif op == "Einsum":
        yield _finding("warn", "einsum", name, op, "Einsum: supported by recent parsers only; MatMul is portable")
    if op in REJECTED_OPS:
        yield _finding("error", "unsupported-op", name, op, REJECTED_OPS[op])
    if op in SLOW_OPS:
        yield _finding("warn", "slow-op", name, op, SLOW_OPS[op])
    if op in CONTROL_FLOW:
        yield _finding("warn", "control-flow", name, op,
                       f"{op}: a Python branch or loop traced into the graph; it breaks constant folding and fusions")
    if node.domain not in ("", "ai.onnx") and (node.domain, op) not in functions:
        yield _finding("error", "custom-op", name, op,
                       f"custom op {node.domain}::{op} without a local function: needs a TensorRT plugin")
    if dynamic and op in RESHAPING and len(node.input) > 1 and node.input[1] in constants:
        shape = constants[node.input[1]]
        if len(shape) >= 3 and all(v > 0 for v in shape):
            yield _finding("warn", "frozen-shape", name, op,
                           f"{op} to a constant shape {shape} in a dynamic graph: other batch/H/W profiles break")
    if dynamic and op == "Resize" and len(node.input) > 3 and node.input[3] in constants:
        yield _finding("warn", "frozen-shape", name, op, "Resize to constant sizes in a dynamic graph: use scales")


def _constant_values(model):
    values = {init.name: onnx.numpy_helper.to_array(init).tolist() for init in model.graph.initializer
              if init.data_type == TensorProto.INT64 and len(init.dims) == 1}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].t.data_type == TensorProto.INT64:
            arr = onnx.numpy_helper.to_array(node.attribute[0].t)
            if arr.ndim == 1:
                values[node.output[0]] = arr.tolist()
    return values


def _type_findings(model):
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # inference is best-effort here; the parser is the judge
        graph = model.graph
    infos = list(graph.input) + list(graph.output) + list(graph.value_info)
    for info in infos:
        elem = info.type.tensor_type.elem_type
        if elem in COMPLEX:
            yield _finding("error", "complex", info.name, "", f"complex tensor {info.name}: no complex type in TensorRT")
        elif elem == TensorProto.DOUBLE:
            yield _finding("warn", "float64", info.name, "", f"float64 tensor {info.name}: TensorRT has no fp64")
    for init in graph.initializer:
        if init.data_type in COMPLEX:
            yield _finding("error", "complex", init.name, "", f"complex initializer {init.name}")


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
INT8_TYPES = {TensorProto.INT8}


def _qdq_findings(model):
    """TensorRT's explicit quantization: symmetric int8 only (zero points 0), no quantized bias (int32 DQ)."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        name = node.name or node.output[0]
        zero = inits.get(node.input[2]) if len(node.input) > 2 else None
        if zero is not None and zero.data_type not in INT8_TYPES:
            yield _finding("error", "qdq-type", name, node.op_type,
                           f"{node.op_type} with {TensorProto.DataType.Name(zero.data_type)} zero point: TensorRT "
                           "quantizes to int8 only (a quantized bias must stay float)")
        elif zero is not None and onnx.numpy_helper.to_array(zero).any():
            yield _finding("error", "qdq-asymmetric", name, node.op_type,
                           f"{node.op_type} with a non-zero zero point: TensorRT's parser accepts symmetric "
                           "quantization only")


def summary(findings):
    errors = sum(f["severity"] == "error" for f in findings)
    return f"{errors} error(s), {len(findings) - errors} warning(s)" if findings else "clean"
