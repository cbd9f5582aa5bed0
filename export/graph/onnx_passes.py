"""Exact passes over exported ONNX graphs, and the names that tie its nodes back to modules.

- `node_scope`: the module path a node came from (torch names nodes after the module calls enclosing them);
  lint findings, the per-block profile and the generic rewrites' records are charged to blocks through it;
- `literal_slice_writes`: ScatterND writing a literal box -> Slice + Concat (bit-identical: only copies);
- `literal_reshapes`: runtime-shaped Reshapes marked `allowzero=1`, torch's literal meaning;
- `float64_as_float32`: the tracer's float64 (shape arithmetic like `H - 0.5`, `linspace` of sizes) computed in
  float32, which is what PyTorch computed: no runtime we target has fp64 kernels for most ops;
- `grid_sample_one_type`: GridSample's grid cast to its input's type (TensorRT requires one type);
- `constant_tensors`: the initializers and Constant nodes of a graph or a local function.
"""

import numpy as np
import onnx
from onnx import helper, numpy_helper


def node_scope(node_name):
    """The dotted module path of the calls enclosing an ONNX node ('' for nodes outside the model's modules).
    torch names a node after the modules whose calls enclose it; the export wrapper adds the leading `model`.
    A child of a container scope is named by its path from the model root (`/model/model.21/model.21.1/Einsum`):
    that component then replaces the path so far instead of extending it."""
    parts = node_name.split("/")[1:-1]  # '/model/model.10/qk/Gemm' -> ['model', 'model.10', 'qk']
    if parts[:1] != ["model"]:
        return ""
    path = ""
    for part in parts[1:]:
        path = part if path and part.startswith(path + ".") else f"{path}.{part}" if path else part
    return path


# Ops that assemble a shape tensor element by element: a constant 0 inside one of them is a placeholder.
_SHAPE_ASSEMBLY = {"Concat", "Unsqueeze", "Squeeze", "Cast", "Identity"}


def literal_reshapes(proto):
    """Mark Reshapes whose target shape is computed at run time from tensor sizes `allowzero=1` (in the graph and
    in local functions); returns how many. torch's reshape sizes are literal, never ONNX's "0 copies the input
    dimension" placeholder, so for these shapes allowzero=1 is the traced meaning (and the same result whenever
    no size is 0). TensorRT's parser (>= 8.5, opset >= 14) maps allowzero=0 to zeroIsPlaceHolder and warns for
    every runtime-shaped Reshape that a dimension "might or might not be zero". Shapes with a constant 0 among
    their assembled elements keep the placeholder meaning; constant shapes are left as they are."""
    marked = _literal_reshapes_in(proto.graph.node, proto.graph.initializer, proto.opset_import)
    for function in proto.functions:
        marked += _literal_reshapes_in(function.node, (), function.opset_import)
    return marked


def _literal_reshapes_in(nodes, initializers, opset_import):
    if next((o.version for o in opset_import if o.domain in ("", "ai.onnx")), 0) < 14:
        return 0  # allowzero exists from opset 14
    producer = {out: n for n in nodes for out in n.output}
    constants = constant_tensors(nodes, initializers)
    marked = 0
    for node in nodes:
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and _runtime_sizes(node.input[1], producer,
                                                                                          constants):
            for a in [a for a in node.attribute if a.name == "allowzero"]:
                node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("allowzero", 1))
            marked += 1
    return marked


def _runtime_sizes(name, producer, constants):
    """True when shape tensor `name` is assembled from pieces computed from tensor sizes (a Shape upstream) and
    constants with no 0 element; False for a constant shape, a placeholder 0, or a piece from anywhere else."""
    pieces, stack = [], [name]
    while stack:
        value = stack.pop()
        node = producer.get(value)
        if node is not None and node.op_type in _SHAPE_ASSEMBLY:
            stack.extend(node.input if node.op_type == "Concat" else node.input[:1])  # not Unsqueeze's axes
        else:
            pieces.append(value)
    if any(p in constants and (numpy_helper.to_array(constants[p]) == 0).any() for p in pieces):
        return False
    computed = [p for p in pieces if p not in constants]
    return bool(computed) and all(_from_sizes(p, producer) for p in computed)


def _from_sizes(name, producer):
    """Whether a Shape node lies upstream of `name`: the value is arithmetic on tensor sizes."""
    seen, stack = set(), [name]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.output[0] in seen:
            continue
        if node.op_type == "Shape":
            return True
        seen.add(node.output[0])
        stack.extend(node.input)
    return False


def literal_slice_writes(proto):
    """Replace each ScatterND of the main graph that writes a literal box (constant indices enumerating contiguous
    ranges of the leading axes in row-major order, data of static shape) by Slice + Concat; returns the names of the
    replaced nodes. torch exports `x[:, 2:5] = y` as ScatterND with indices computed from sizes: run this after
    constant folding (onnxslim.slim at static sizes folds them). The result is bit-identical: only copies."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    graph = proto.graph
    if opset < 13 or not any(n.op_type == "ScatterND" for n in graph.node):
        return []  # the common case: no slice write, no shape inference over the whole model
    shapes = _static_shapes(proto)
    constants = constant_tensors(graph.node, graph.initializer)
    replaced, indices, nodes = [], [], []
    for node in graph.node:
        box = _literal_box(node, shapes, constants)
        if box is None:
            nodes.append(node)
            continue
        nodes += _slices_and_concats(node, box, shapes[node.input[0]], constants[node.input[1]].dims[:-1], graph)
        replaced.append(node.name or node.output[0])
        indices.append(node.input[1])
    if replaced:
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused_constants(graph, indices)
    return replaced


def _static_shapes(proto):
    """{value name: tuple of ints} for every value whose shape is fully known."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except onnx.shape_inference.InferenceError:  # an inconsistent graph: only the declared shapes
        inferred = proto.graph
    shapes = {t.name: tuple(t.dims) for t in inferred.initializer}
    for info in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(d.dim_value for d in dims)
    return shapes


def constant_tensors(nodes, initializers=()):
    """{name: TensorProto} of `initializers` and the Constant nodes among `nodes` (a graph's, or a local function's,
    which has no initializers); converted to arrays only when read: weights are big."""
    tensors = {t.name: t for t in initializers}
    for node in nodes:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def _literal_box(node, shapes, constants):
    """[(start, stop) per leading axis] when `node` is a ScatterND writing exactly that box in row-major order."""
    reduction = next((a.s for a in node.attribute if a.name == "reduction"), b"none")
    if node.op_type != "ScatterND" or node.domain not in ("", "ai.onnx") or reduction != b"none":
        return None
    tensor, dims = constants.get(node.input[1]), shapes.get(node.input[0])
    if tensor is None or dims is None or len(tensor.dims) < 1 or not 0 < tensor.dims[-1] <= len(dims):
        return None
    indices = numpy_helper.to_array(tensor)
    k = indices.shape[-1]
    tuples = indices.reshape(-1, k).astype(np.int64)
    bounds = np.array(dims[:k])
    if not len(tuples) or ((tuples < -bounds) | (tuples >= bounds)).any():
        return None
    tuples = tuples % bounds  # negative indices count from the end
    box = [(int(tuples[:, a].min()), int(tuples[:, a].max()) + 1) for a in range(k)]
    grid = np.meshgrid(*[np.arange(start, stop) for start, stop in box], indexing="ij")
    enumerated = np.stack(grid, axis=-1).reshape(-1, k)
    return box if np.array_equal(enumerated, tuples) else None


def _slices_and_concats(node, box, dims, written_shape, graph):
    """Nodes computing node's output from its data and updates: the box's middle replaced recursively, the parts
    before and after it on each partially written axis sliced from the data, concatenated back."""
    emit = _Emitter(node.name or node.output[0], graph)
    data, _, updates = node.input
    box_shape = [stop - start for start, stop in box]
    if list(written_shape) != box_shape:  # updates laid out as the index tuples: same order, box shape
        updates = emit.node("Reshape", [updates, emit.constant(box_shape + list(dims[len(box):]))])
    result = _assembled(emit, data, box, dims, updates, 0)
    emit.finish(result, node.output[0])
    return emit.nodes


def _assembled(emit, data, box, dims, updates, axis):
    """`data` (sliced on the axes before `axis`) with box[axis:] replaced by `updates`."""
    if _covered(box, dims, axis):
        return updates
    start, stop = box[axis]
    if not _covered(box, dims, axis + 1):  # the middle is itself partly written
        updates = _assembled(emit, emit.slice(data, axis, start, stop, dims[axis]), box, dims, updates, axis + 1)
    before = [emit.slice(data, axis, 0, start, dims[axis])] if start > 0 else []
    after = [emit.slice(data, axis, stop, dims[axis], dims[axis])] if stop < dims[axis] else []
    return emit.node("Concat", before + [updates] + after, axis=axis) if before or after else updates


def _covered(box, dims, axis):
    """Whether the box spans the whole of every axis from `axis` on."""
    return all(span == (0, d) for span, d in zip(box[axis:], dims[axis:]))


class _Emitter:
    """New nodes and constants replacing one node, named after it."""

    def __init__(self, prefix, graph):
        self.prefix, self.graph, self.nodes = prefix, graph, []

    def _name(self, what):
        return f"{self.prefix}/literal_slice_write/{what}_{len(self.nodes) + len(self.graph.initializer)}"

    def constant(self, values):
        tensor = numpy_helper.from_array(np.array(values, dtype=np.int64), self._name("const"))
        self.graph.initializer.append(tensor)
        return tensor.name

    def node(self, op_type, inputs, **attributes):
        name = self._name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [name + "_output"], name=name, **attributes))
        return name + "_output"

    def slice(self, data, axis, start, stop, size):
        if (start, stop) == (0, size):
            return data
        return self.node("Slice", [data, self.constant([start]), self.constant([stop]), self.constant([axis])])

    def finish(self, result, output):
        """Make `result` the replaced node's output (consumers and graph outputs keep their name)."""
        if self.nodes and self.nodes[-1].output[0] == result:
            self.nodes[-1].output[0] = output
        else:  # the write covers the whole tensor: the output is the updates
            self.nodes.append(helper.make_node("Identity", [result], [output], name=self._name("Identity")))


def _drop_unused_constants(graph, names):
    """The replaced nodes' index tensors (initializers or Constant nodes) that nothing reads any more."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in _subgraph_nodes(graph):
        read.update(node.input)
    inputs = {i.name for i in graph.input}
    gone = set(names) - read - inputs
    for tensor in [t for t in graph.initializer if t.name in gone]:
        graph.initializer.remove(tensor)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in gone]:
        graph.node.remove(node)


def _subgraph_nodes(graph):
    """Nodes of If/Loop bodies: they may read outer values implicitly."""
    for node in graph.node:
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from body.node
                yield from _subgraph_nodes(body)


# ---- float64 -------------------------------------------------------------------------------------------------
DOUBLE, FLOAT = onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT
_DTYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target; the dtype of EyeLike, Random*, ...


def float64_as_float32(proto):
    """Make every float64 tensor of the main graph (and its subgraphs) float32: Cast targets, dtype attributes,
    Constant / ConstantOfShape values, initializers, declared value types. Returns the names of the nodes that
    made or held float64 values. torch's tracer types Python floats mixed with traced sizes as float64 (`H - 0.5`,
    `linspace(0.5, H - 0.5, H)`) though PyTorch computed them in float32 (the default dtype); ONNX Runtime has no
    float64 kernel for GridSample and many others, TensorRT none at all. The main graph's inputs are left as
    declared (images: float32)."""
    changed = []
    _float64_in(proto.graph, changed, top=True)
    return list(dict.fromkeys(changed))


def _float64_in(graph, changed, top=False):
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name or node.output[0])
        if _float64_node(node):
            changed.append(node.name or node.output[0])
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                _float64_in(body, changed)
    for tensor in graph.initializer:
        if tensor.data_type == DOUBLE:
            _as_float32(tensor)
            changed.extend(consumers.get(tensor.name, []))
    declared = list(graph.value_info) + list(graph.output) + ([] if top else list(graph.input))
    for info in declared:
        if info.type.tensor_type.elem_type == DOUBLE:
            info.type.tensor_type.elem_type = FLOAT


def _float64_node(node):
    """Rewrite one node's float64 attributes in place; whether it had any."""
    found = False
    for attribute in node.attribute:
        if attribute.name in _DTYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT and attribute.i == DOUBLE:
            attribute.i, found = FLOAT, True
        elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == DOUBLE:
            _as_float32(attribute.t)
            found = True
    return found


def _as_float32(tensor):
    values = numpy_helper.to_array(tensor).astype(np.float32)
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


# ---- GridSample ----------------------------------------------------------------------------------------------
def grid_sample_one_type(proto):
    """Cast the grid of each GridSample of the main graph whose grid type differs from its input's to the input's
    type; returns the names of those nodes. ONNX lets them differ (T1, T2); TensorRT's IGridSampleLayer does not
    ("input and grid must be of same type"). The input's type is what PyTorch samples in (grid_sample requires one
    dtype there), so the cast reproduces it."""
    samplers = [n for n in proto.graph.node if n.op_type == "GridSample" and n.domain in ("", "ai.onnx")]
    if not samplers:
        return []
    types = _elem_types(proto)
    fixed = []
    for node in samplers:
        x, grid = types.get(node.input[0]), types.get(node.input[1])
        if x and grid and x != grid:
            name = f"{node.name or node.output[0]}/grid_cast"
            cast = helper.make_node("Cast", [node.input[1]], [name + "_output"], name=name, to=x)
            proto.graph.node.insert(list(proto.graph.node).index(node), cast)
            node.input[1] = cast.output[0]
            fixed.append(node.name or node.output[0])
    return fixed


def _elem_types(proto):
    """{value name: ONNX element type} as shape inference finds them."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto).graph
    except onnx.shape_inference.InferenceError:
        inferred = proto.graph
    types = {t.name: t.data_type for t in inferred.initializer}
    for info in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        types[info.name] = info.type.tensor_type.elem_type
    return types
