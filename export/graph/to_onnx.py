"""Export a (rewritten) YOLO model to ONNX that ultralytics, ONNX Runtime and TensorRT's parsers read.

Layout as the checkpoint kind's own export (export.checkpoint.kinds): `images` float32 [0,1] NCHW in, `output0`
float32 out — (B, 4+nc, anchors) for ultralytics, (B, anchors, 5+nc) for YOLOv5 — and metadata props
(names, stride, imgsz, task, batch, ...; YOLOv5's DetectMultiBackend reads stride and names; `onnx_metadata` reads
them back, `onnx_precision` tells the precision from them). With half=True weights and activations
are fp16 and the families' fp32 islands are explicit Cast nodes; input and output stay fp32.
"""

import ast
import contextlib
import copy
import datetime
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from export.checkpoint import kinds
from export.errors import BadInput
from export.files import atomic_write
from export.graph.onnx_passes import float64_as_float32, grid_sample_one_type, literal_reshapes, literal_slice_writes
from plugins import attach_functions

# onnx >= 1.23 stamps IR 14 by default; onnxruntime 1.31 reads at most 13. IR 10 covers opsets <= 21.
MAX_IR_VERSION = 10


def trace(module, example, opset=17, input_names=("x",), output_names=("y",), dynamic_axes=None,
          tracer_warnings=None, passes=None):
    """Trace `module` on `example` (a tensor or tuple) into a ModelProto (custom yolo_attn ops get their functions;
    runtime-shaped Reshapes are literal, see literal_reshapes; float64 computed in float32 and GridSample's inputs of
    one type, see onnx_passes). `tracer_warnings`: a list that receives the tracer's warnings (Python numbers
    computed from tensors), which are otherwise dropped; `passes`: a dict that receives the names of the nodes the
    float64 and GridSample passes changed."""

    example = example if isinstance(example, tuple) else (example,)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(record=tracer_warnings is not None) as caught, torch.no_grad():
            warnings.simplefilter("ignore" if tracer_warnings is None else "always", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # Slice steps -1: harmless
            # The TorchScript-based exporter: the dynamo one needs onnxscript and gains nothing here.
            with _quiet_exporter_log():
                torch.onnx.export(module, example, str(raw), dynamo=False, opset_version=opset,
                                  input_names=list(input_names), output_names=list(output_names),
                                  dynamic_axes=dynamic_axes, do_constant_folding=True)
        if tracer_warnings is not None:
            tracer_warnings.extend(w for w in caught if issubclass(w.category, torch.jit.TracerWarning))
        proto = attach_functions(onnx.load(str(raw)))
    literal_reshapes(proto)
    passes = {} if passes is None else passes
    passes["float64"] = float64_as_float32(proto)  # before the GridSample types are compared
    passes["grid_sample"] = grid_sample_one_type(proto)
    return proto


@contextlib.contextmanager
def _quiet_exporter_log():
    """torch's TorchScript exporter prints its whole IR graph to stdout when it fails (its logging switch tests a
    function object for truth, so it is always on); the error itself is what the user needs."""
    log = torch._C._jit_onnx_log
    torch._C._jit_onnx_log = lambda *args: None
    try:
        yield
    finally:
        torch._C._jit_onnx_log = log


def save(model, path):
    """Check and write `model` to `path` atomically."""
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(model)
    atomic_write(path, model.SerializeToString())
    return model


def export_module(module, example, path, opset=17, input_names=("x",), output_names=("y",), dynamic_axes=None):
    """Trace and save one module (used for single blocks); returns the ModelProto."""
    return save(trace(module, example, opset, input_names, output_names, dynamic_axes), path)


def keep_fp32(block):
    """Run `block` in fp32 inside a half model: its weights float, its floating inputs cast up, its outputs cast
    back to half (the tracer records both casts)."""
    block.float()
    block.register_forward_pre_hook(lambda m, args: _cast(args, torch.float32))
    block.register_forward_hook(lambda m, args, out: _cast(out, torch.float16))


def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


class _Deployable(torch.nn.Module):
    """fp32 images in, fp32 predictions out, whatever precision runs inside."""

    def __init__(self, model, half):
        super().__init__()
        self.model, self.half = model, half

    def forward(self, images):
        y = self.model(images.half() if self.half else images)
        return (y[0] if isinstance(y, (list, tuple)) else y).float()


def export_yolo(twin, loaded, path, imgsz, batch=1, dynamic=False, half=False, opset=17, simplify=True,
                verbose=False, log=None, fp32_blocks=(), layout="native"):
    """Export the rewritten model `twin` of checkpoint `loaded` to `path`; returns the ModelProto.
    `verbose`: onnxslim logs its passes (it logs errors only otherwise). `log`: a dict that receives the tracer's
    warnings ("tracer_warnings") and the names of the nodes each graph pass changed ("float64", "grid_sample",
    "slice_writes"). `fp32_blocks`: module paths kept fp32 in a half export (Cast in, Cast out). `layout`: the output layout
    (export.checkpoint.kinds.LAYOUTS)."""
    log = {} if log is None else log
    kind = kinds.of(loaded, layout)
    model = copy.deepcopy(twin).eval()
    model = model.half() if half else model.float()
    for name in fp32_blocks if half else ():
        keep_fp32(model.get_submodule(name))
    for m in model.modules():
        if kinds.is_head(m):
            kind.export_head(m, dynamic)
    model = _Deployable(model, half)
    axes = {"images": {0: "batch", 2: "height", 3: "width"},
            "output0": {0: "batch", kind.anchors_axis: "anchors"}} if dynamic else None
    log["tracer_warnings"] = []
    proto = trace(model, torch.zeros(batch, 3, *imgsz), opset, ("images",), ("output0",), axes, log["tracer_warnings"],
                  log)
    if simplify:
        import onnxslim

        proto = onnxslim.slim(proto, verbose=verbose)
    log["slice_writes"] = literal_slice_writes(proto)  # exact; needs the folded indices slim leaves at static sizes
    _set_metadata(proto, loaded, imgsz, batch, dynamic, half, kind.layout)
    return save(proto, path)


def _set_metadata(proto, loaded, imgsz, batch, dynamic, half, layout):
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
        "args": {"batch": batch, "half": half, "dynamic": dynamic, "imgsz": list(imgsz), "nms": False,
                 "layout": layout},
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


def onnx_precision(meta):
    """The precision of an ONNX file `python -m export` wrote, from its metadata."""
    return "int8" if "quantization" in meta else \
        "fp16" if ast.literal_eval(meta.get("args", "{}")).get("half") else "fp32"


def onnx_metadata(path):
    """{key: value} of an ONNX file's metadata props; BadInput when it is missing or unreadable."""
    if not Path(path).is_file():
        raise BadInput(f"{path}: no such ONNX file; pass the .onnx that `python -m export` wrote")
    try:
        return {e.key: e.value for e in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # a damaged or foreign file: one line, exit 2
        raise BadInput(f"{path} is not a readable ONNX model") from None
