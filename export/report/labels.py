"""How the report names backends: report keys (`onnxruntime_fp16`) as readers know them."""

BACKEND_LABEL = {"torch": "PyTorch (export twin)", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


def backend_label(backend, precision=None):
    """'onnxruntime_fp16' -> 'ONNX Runtime (fp16)'; `precision` names the primary file's too. One precision, once."""
    base, _, own = backend.partition("_")
    shown = own or precision
    return BACKEND_LABEL.get(base, base) + (f" ({shown})" if shown else "")
