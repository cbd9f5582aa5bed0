"""Which nodes of the fp32 ONNX go int8, and which stay float: TensorRT's explicit-quantization scheme.

Quantized op types: Conv, Gemm, MatMul (their inputs: per-tensor int8 activations, per-channel int8
weights) and Add (both inputs, so residual adds stay int8 in TensorRT). Outside the blocks below,
every such node goes int8. Inside them, only the block's own rule decides:
- an attention block (models/<family>.py `INT8_LAYERS`): the weighted Conv/Gemm/MatMul of the listed
  layers go int8; its softmaxes, sums, normalizers, powers, RoPE and activation-by-activation
  matmuls stay float;
- the detection head (export.checkpoint.kinds `head_int8_layers`): the branch convs go int8; DFL, sigmoid and
  the box decode stay float;
- a block named by --int8-exclude, or chosen by the sensitivity fallback: all float.
Nodes are matched to blocks by their ONNX scope: torch names a node `/model/model.10/qk/Gemm`
after the modules whose calls enclose it, which we read as the dotted path `model.10.qk`.
"""

from dataclasses import dataclass

import models
from export.checkpoint import kinds
from export.graph.rewrite import outermost_family_modules
from export.graph.onnx_passes import node_scope as scope

QUANT_OPS = ("Conv", "Gemm", "MatMul", "Add")
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Block:
    path: str  # module path, e.g. "model.10"
    owner: str  # what it is: "STA (StokenAttentionExport)", "head (Detect)", ...
    int8_layers: tuple  # scopes inside the block whose weighted ops go int8


def blocks(model, kind):
    """The attention blocks and the detection head of `model`, with their int8 rules."""
    found = []
    for path in outermost_family_modules(model):
        module = model.get_submodule(path)
        family = models.family_of(module)
        found.append(Block(path, f"{family.__name__.split('.')[-1].upper()} ({type(module).__name__})",
                           tuple(family.INT8_LAYERS)))
    for path, module in model.named_modules():
        if kinds.is_head(module) and path:
            found.append(Block(path, f"head ({type(module).__name__})", tuple(kind.head_int8_layers)))
    return found


def float_nodes(proto, rules, forced=()):
    """{node name: why it stays float} for the quantizable nodes the rules keep out of int8.
    `rules` are Blocks; `forced` are module paths kept entirely float."""
    weights = {i.name for i in proto.graph.initializer}
    kept = {}
    for node in proto.graph.node:
        if node.op_type not in QUANT_OPS:
            continue
        where = scope(node.name)
        owner = _within(where, forced)
        if owner is not None:
            kept[node.name] = f"{owner}: kept float (excluded)"
            continue
        block = next((b for b in rules if _within(where, [b.path]) is not None), None)
        if block is None:
            continue
        inner = where[len(block.path) + 1:]
        weighted = node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in weights
        if not (weighted and _within(inner, block.int8_layers) is not None):
            kept[node.name] = f"{block.path} {block.owner}: float by its rule"
    return kept


def _within(path, prefixes):
    """The first of `prefixes` that `path` equals or lies under, else None."""
    return next((p for p in prefixes if path == p or path.startswith(p + ".")), None)


def fp32_islands(fp16_proto):
    """Names of the compute nodes an fp16 ONNX runs in fp32 (its islands): weakly typed TensorRT pins them."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(fp16_proto)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.output, *g.input]}
    types.update({i.name: i.data_type for i in g.initializer})
    return sorted(n.name for n in g.node if n.op_type not in ("Cast", "Constant") and n.output
                  and types.get(n.output[0]) == TensorProto.FLOAT)
