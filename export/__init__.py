"""The exporter as stage packages that import only downward:

    checkpoint -> graph -> engine -> verify -> report, run in order by pipeline; cli maps errors to exit codes.

`python -m export` runs the main job (export.pipeline.export_job); docs/architecture.md maps where each kind
of change goes. The names below are the library entry points of the stages.
"""

from export.checkpoint import CheckpointError, LoadedCheckpoint, load
from export.engine.build import build_engine
from export.graph.lint import lint
from export.graph.rewrite import ModuleCheck, rewrite
from export.graph.to_onnx import export_yolo

__all__ = ["CheckpointError", "LoadedCheckpoint", "ModuleCheck", "build_engine", "export_yolo", "lint", "load",
           "rewrite"]
