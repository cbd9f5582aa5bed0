"""A small builder for ONNX function bodies (model-local functions in our custom domain)."""

from onnx import AttributeProto, TensorProto, helper

DOMAIN = "yolo_attn"
OPSET = 17
INT64_MAX = 2 ** 63 - 1


def custom_op(name, onnx_name, eager, attrs=(), out_sizes=lambda sizes: sizes, tensors=1):
    """A torch op `yolo_attn::<name>` that runs `eager` and exports as one `yolo_attn::<onnx_name>` node.

    torch.library ops are opaque to the tracer (an autograd.Function would drag its traced body along);
    `attrs` maps each int argument to the node attributes it becomes: [(arg, fn(value) -> {attr: value})];
    `out_sizes` maps the first input's sizes to the output's, so the exporter's shape inference knows the result;
    `tensors` is how many tensor inputs come first (e.g. data and a weight bank).
    """
    import torch
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import _get_const, _get_tensor_sizes

    int_args = list(dict(attrs))
    schema_args = ", ".join([*(f"Tensor x{i}" for i in range(tensors)), *(f"int {a}" for a in int_args)])
    qualname = f"{DOMAIN}::{name}"
    torch.library.define(qualname, f"({schema_args}) -> Tensor")
    torch.library.impl(qualname, "default")(lambda *args: eager(*args).contiguous())

    def symbolic(g, *args):  # no parse_args: it maps arguments by signature names, and *args has one
        inputs, values = args[:tensors], args[tensors:]
        node_attrs = {}
        for (arg, to_attrs), value in zip(attrs, values):
            node_attrs.update(to_attrs(_get_const(value, "i", arg)))
        x = inputs[0]
        out = g.op(f"{DOMAIN}::{onnx_name}", *inputs, **node_attrs)
        sizes = _get_tensor_sizes(x)
        if sizes is not None:
            out.setType(x.type().with_sizes(out_sizes(list(sizes))))
        return out

    register_custom_op_symbolic(qualname, symbolic, OPSET)
    return getattr(getattr(torch.ops, DOMAIN), name)


class Body:
    """Collects nodes of one function body; every helper returns the name of its output."""

    def __init__(self, name):
        self.name, self.nodes, self._n = name, [], 0

    def _out(self, hint):
        self._n += 1
        return f"{hint}_{self._n}"

    def node(self, op, inputs, out=None, **attrs):
        out = out or self._out(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def ints(self, values):
        out = self._out("c")
        tensor = helper.make_tensor(out, TensorProto.INT64, [len(values)], list(values))
        self.nodes.append(helper.make_node("Constant", [], [out], value=tensor))
        return out

    def slice(self, x, starts, ends, axes):
        args = [self.ints(v) if isinstance(v, (list, tuple)) else v for v in (starts, ends, axes)]
        return self.node("Slice", [x, *args])

    def transpose_by_attr(self, x, attr, out=None):
        """Transpose whose perm is the calling node's attribute `attr`."""
        out = out or self._out("transpose")
        node = helper.make_node("Transpose", [x], [out])
        node.attribute.append(AttributeProto(name="perm", ref_attr_name=attr, type=AttributeProto.INTS))
        self.nodes.append(node)
        return out

    def function(self, inputs, outputs, attributes=()):
        """The FunctionProto: `inputs`/`outputs` name the body's own values."""
        return helper.make_function(DOMAIN, self.name, list(inputs), list(outputs), self.nodes,
                                    [helper.make_opsetid("", OPSET)], list(attributes))
