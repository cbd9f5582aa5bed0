"""How the report names backends: report keys (`onnxruntime_fp16`) as readers know them."""

BACKEND_LABEL = {"torch": "PyTorch (export twin)", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


def backend_label(backend, precision=None):
    """'onnxruntime_fp16' -> 'ONNX Runtime (fp16)'; `precision` names the primary file's too. One precision, once.
    A dynamic export's check at a second size: 'onnxruntime@96x96' -> 'ONNX Runtime at 96x96'."""
    name, _, size = backend.partition("@")
    base, _, own = name.partition("_")
    shown = own or precision
    return BACKEND_LABEL.get(base, base) + (f" ({shown})" if shown else "") + (f" at {size}" if size else "")
