"""How the report names backends: report keys (`onnxruntime_fp16`) as readers know them."""

BACKEND_LABEL = {"torch": "PyTorch (export twin)", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


def backend_label(backend):
    base, _, precision = backend.partition("_")
    return BACKEND_LABEL.get(base, base) + (f" ({precision} file)" if precision else "")
