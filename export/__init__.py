"""The exporter, one stage a module: load (safe checkpoint loading), rewrite (export twins, per-block checks),
to_onnx, lint, build (TensorRT / TensorRT-RTX), parity (ONNX Runtime / TensorRT vs PyTorch), report.
`python -m export` runs them all (export.cli)."""

from export.build import build_engine
from export.lint import lint
from export.load import CheckpointError, LoadedCheckpoint, load
from export.rewrite import ModuleCheck, rewrite
from export.to_onnx import export_yolo

__all__ = ["CheckpointError", "LoadedCheckpoint", "ModuleCheck", "build_engine", "export_yolo", "lint", "load",
           "rewrite"]
