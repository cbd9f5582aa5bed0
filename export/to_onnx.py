"""Export a (rewritten) YOLO model to ONNX that ultralytics, ONNX Runtime and TensorRT's parsers read.

Layout as the checkpoint kind's own export (export.kinds): `images` float32 [0,1] NCHW in, `output0`
float32 out — (B, 4+nc, anchors) for ultralytics, (B, anchors, 5+nc) for YOLOv5 — and metadata props
(names, stride, imgsz, task, batch, ...; YOLOv5's DetectMultiBackend reads stride and names). With half=True weights and activations
are fp16 and the families' fp32 islands are explicit Cast nodes; input and output stay fp32.
"""

import copy
import datetime
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from export import kinds
from export.files import atomic_write
from export.generic import constant_tensors, literal_slice_writes
from plugins import attach_functions

# onnx >= 1.23 stamps IR 14 by default; onnxruntime 1.31 reads at most 13. IR 10 covers opsets <= 21.
MAX_IR_VERSION = 10


def trace(module, example, opset=17, input_names=("x",), output_names=("y",), dynamic_axes=None,
          tracer_warnings=None):
    """Trace `module` on `example` (a tensor or tuple) into a ModelProto (custom yolo_attn ops get their functions;
    runtime-shaped Reshapes are literal, see literal_reshapes). `tracer_warnings`: a list that receives the tracer's
    warnings (Python numbers computed from tensors), which are otherwise dropped."""

    example = example if isinstance(example, tuple) else (example,)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(record=tracer_warnings is not None) as caught, torch.no_grad():
            warnings.simplefilter("ignore" if tracer_warnings is None else "always", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # Slice steps -1: harmless
            # The TorchScript-based exporter: the dynamo one needs onnxscript and gains nothing here.
            torch.onnx.export(module, example, str(raw), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        if tracer_warnings is not None:
            tracer_warnings.extend(w for w in caught if issubclass(w.category, torch.jit.TracerWarning))
        proto = attach_functions(onnx.load(str(raw)))
    literal_reshapes(proto)
    return proto


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


def save(model, path):
    """Check and write `model` to `path` atomically."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(model)
    atomic_write(path, model.SerializeToString())
    return model


def export_module(module, example, path, opset=17, input_names=("x",), output_names=("y",), dynamic_axes=None):
    """Trace and save one module (used for single blocks); returns the ModelProto."""
    return save(trace(module, example, opset, input_names, output_names, dynamic_axes), path)


class _Deployable(torch.nn.Module):
    """fp32 images in, fp32 predictions out, whatever precision runs inside."""

    def __init__(self, model, half):
        super().__init__()
        self.model, self.half = model, half

    def forward(self, images):
        y = self.model(images.half() if self.half else images)
        return (y[0] if isinstance(y, (list, tuple)) else y).float()


def export_yolo(twin, loaded, path, imgsz, batch=1, dynamic=False, half=False, opset=17, simplify=True,
                verbose=False, log=None):
    """Export the rewritten model `twin` of checkpoint `loaded` to `path`; returns the ModelProto.
    `verbose`: onnxslim logs its passes (it logs errors only otherwise). `log`: a dict that receives the tracer's
    warnings ("tracer_warnings") and the in-place slice writes made literal ("slice_writes": node names)."""
    log = {} if log is None else log
    kind = kinds.of(loaded)
    model = copy.deepcopy(twin).eval()
    model = model.half() if half else model.float()
    for m in model.modules():
        if kinds.is_head(m):
            kind.export_head(m, dynamic)
    model = _Deployable(model, half)
    axes = {"images": {0: "batch", 2: "height", 3: "width"},
            "output0": {0: "batch", kind.anchors_axis: "anchors"}} if dynamic else None
    log["tracer_warnings"] = []
    proto = trace(model, torch.zeros(batch, 3, *imgsz), opset, ("images",), ("output0",), axes, log["tracer_warnings"])
    if simplify:
        import onnxslim

        proto = onnxslim.slim(proto, verbose=verbose)
    log["slice_writes"] = literal_slice_writes(proto)  # exact; needs the folded indices slim leaves at static sizes
    _set_metadata(proto, loaded, imgsz, batch, dynamic, half)
    return save(proto, path)


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
            node.attribute.append(onnx.helper.make_attribute("allowzero", 1))
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
    if any(p in constants and (onnx.numpy_helper.to_array(constants[p]) == 0).any() for p in pieces):
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


def _set_metadata(proto, loaded, imgsz, batch, dynamic, half):
    meta = {
        "description": f"attention-YOLO export of {loaded.path.name} (yolo-attn-export)",
        "author": "yolo-attn-export",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "version": _version(),
        "stride": int(max(loaded.stride)),
        "task": loaded.task,
        "batch": batch,
        "imgsz": list(imgsz),
        "names": loaded.names,
        "channels": 3,
        "args": {"batch": batch, "half": half, "dynamic": dynamic, "imgsz": list(imgsz), "nms": False},
    }
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)


def _version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("yolo-attn-export")
    except PackageNotFoundError:
        return "0+local"
