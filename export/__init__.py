"""The exporter: load a checkpoint safely, rewrite it to export twins, export ONNX (more to come)."""

from export.load import CheckpointError, LoadedCheckpoint, load
from export.rewrite import ModuleCheck, rewrite

__all__ = ["CheckpointError", "LoadedCheckpoint", "ModuleCheck", "load", "rewrite"]
