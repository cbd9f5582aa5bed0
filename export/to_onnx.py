"""Export a torch module to an ONNX file that the installed onnxruntime and TensorRT parsers read."""

import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

# onnx >= 1.23 stamps IR 14 by default; onnxruntime 1.31 reads at most 13. IR 10 covers opsets <= 21.
MAX_IR_VERSION = 10


def export_module(module, example, path, opset=17, input_names=("x",), output_names=("y",), dynamic_axes=None):
    """Trace `module` on `example` (a tensor or tuple) into `path`, written atomically; returns the ModelProto."""
    example = example if isinstance(example, tuple) else (example,)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # Slice steps -1: harmless
            # The TorchScript-based exporter: the dynamo one needs onnxscript and gains nothing here.
            torch.onnx.export(module, example, str(raw), dynamo=False, opset_version=opset,
                              input_names=list(input_names), output_names=list(output_names),
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        model = onnx.load(str(raw))
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        onnx.checker.check_model(model)
        staged = Path(tmp) / "final.onnx"
        onnx.save(model, str(staged))
        os.replace(staged, path)
    return model
