"""Stage 1, checkpoint: a `best.pt` read safely into a LoadedCheckpoint, without the fork it was trained in.

- torch_zip: the zip container, read with its limits before anything is unpickled;
- safe_pickle: the gated unpickler, which reconstructs only the classes of an explicit table;
- object_graph: validation of everything the pickle built, before any method is called on it;
- schema: bounds on every value later stages use (fields of each module class, layer indices, names, sizes);
- user_code: `--code`, the opt-in import of a fork's own block classes;
- loader: the stage itself (`load`), and `from_yaml` for architecture-only models;
- kinds: what differs between checkpoint kinds (ultralytics, the YOLOv5 repository), one place each.
"""

from export.checkpoint.loader import CheckpointError, LoadedCheckpoint, UnknownBlocksError, from_yaml, load

__all__ = ["CheckpointError", "LoadedCheckpoint", "UnknownBlocksError", "from_yaml", "load"]
