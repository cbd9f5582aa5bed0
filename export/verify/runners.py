"""Every backend behind one call: images (B,3,H,W) float32 numpy -> output0 as the model emits it, float32 numpy.

A new backend is one more runner here: parity, labelled accuracy and timing take any callable of that form.
"""

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch


class TorchRunner:
    """A PyTorch model on the CPU; `half`: a copy of it run in fp16 (fp16 weights and inputs), what fp16 itself
    costs the model; `to_layout`: a numpy fn mapping its output to the exported file's layout (Kind.reference_to_export),
    so every runner of a job gives one layout."""

    name = "torch"

    def __init__(self, model, half=False, to_layout=None):
        self.model, self.half = (copy.deepcopy(model).half() if half else model).eval(), half
        self.to_layout = to_layout

    def __call__(self, images):
        x = torch.from_numpy(images)
        with torch.no_grad():
            y = self.model(x.half() if self.half else x)
        y = (y[0] if isinstance(y, (list, tuple)) else y).float().numpy()
        return self.to_layout(y) if self.to_layout else y


class OrtRunner:
    """An ONNX file (or a ModelProto built in memory) run by ONNX Runtime, GPU providers first when present."""

    name = "onnxruntime"

    def __init__(self, path, threads=None):
        self.path = path
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # same threads as torch
        available = ort.get_available_providers()
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        model = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
        self.session = ort.InferenceSession(model, options, providers=providers + ["CPUExecutionProvider"])
        self.providers = self.session.get_providers()
        self.input = self.session.get_inputs()[0].name

    def __call__(self, images):
        return self.session.run(None, {self.input: images})[0].astype(np.float32)


class TrtRunner:
    """A TensorRT engine run through the `tensorrt` (or `tensorrt_rtx`) runtime on a CUDA device."""

    name = "tensorrt"

    def __init__(self, path, trt):
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def __call__(self, images):
        x = torch.from_numpy(images).cuda().contiguous()
        self.context.set_input_shape("images", tuple(x.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape("output0")), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("images", x.data_ptr())
        self.context.set_tensor_address("output0", y.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return y.cpu().numpy()


def engine_runtime():
    """(trt module, None) when an engine can run here, else (None, reason)."""
    if not torch.cuda.is_available():
        return None, "no CUDA GPU on this machine: the engine was built but cannot be run here"
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            return __import__(name), None
        except ImportError:
            continue
    return None, "neither tensorrt nor tensorrt_rtx is installed"


ORT_TWICE = ("onnxruntime and onnxruntime-gpu are both installed: they share one module and break each other; keep "
             "one: `pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu` (GPU) or "
             "`... && pip install onnxruntime` (CPU)")


def ort_installed_twice():
    """Whether both ONNX Runtime distributions are installed (the second silently overwrites the first's files)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return bool(version(name))
        except PackageNotFoundError:
            return False
    return installed("onnxruntime") and installed("onnxruntime-gpu")
