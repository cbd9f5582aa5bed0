"""What differs between checkpoint kinds, in one place each: ultralytics 8.x vs the YOLOv5 repository.

The loader tells which kind a checkpoint is (LoadedCheckpoint.kind); every later stage asks this
module, never `if yolov5:` of its own:
- `export_head(head, dynamic)`: put the detection head in export mode;
- `anchors_axis` / `output_layout`: where the predictions lie in `output0` (dynamic axes, engine metadata);
- `to_v8_layout(pred)`: raw output -> (B, 4+nc, anchors) class scores, for the shared NMS and metrics;
- `label`: how the CLI and the report name the checkpoint;
- `head_int8_layers`: the head's layers (ONNX scopes inside it) that go int8; its decode stays float;
- `layout` / `reference_to_export`: the ONNX layout (`native`: the checkpoint's own; `ultralytics`: a YOLOv5
  checkpoint written in ultralytics' layout, `--layout ultralytics`) and how the PyTorch model's output maps to it.
The YOLOv5 side lives in models/yolov5.py with its compat classes.
"""

from dataclasses import dataclass, replace

from models import yolov5


@dataclass(frozen=True)
class Kind:
    name: str
    label: str
    output_layout: str
    anchors_axis: int
    export_head: object
    to_v8_layout: object
    head_int8_layers: tuple
    layout: str = "native"
    reference_to_export: object = None  # numpy fn: PyTorch output -> this layout (None: the same layout)


def _ultralytics_export_head(head, dynamic):
    head.export, head.format, head.dynamic = True, "onnx", dynamic


# INT8: the box and class branches' convs go int8; DFL (softmax + its fixed conv), the sigmoid and the box decode
# stay float.
ULTRALYTICS = Kind("ultralytics", "ultralytics checkpoint", "output0 float32 (B, 4+nc, anchors)", 2,
                   _ultralytics_export_head, lambda pred: pred, ("cv2", "cv3", "one2one_cv2", "one2one_cv3"))
YOLOV5 = Kind("yolov5", "YOLOv5 checkpoint", yolov5.OUTPUT_LAYOUT, yolov5.ANCHORS_AXIS, yolov5.export_head,
              yolov5.to_v8_layout, yolov5.HEAD_INT8_LAYERS)
# A YOLOv5 checkpoint written in ultralytics' layout: the PyTorch model still gives YOLOv5's, mapped for comparison.
YOLOV5_AS_ULTRALYTICS = replace(YOLOV5, output_layout=yolov5.ULTRALYTICS_OUTPUT_LAYOUT, anchors_axis=2,
                                export_head=yolov5.export_head_ultralytics, to_v8_layout=lambda pred: pred,
                                layout="ultralytics", reference_to_export=yolov5.to_v8_layout)
KINDS = {k.name: k for k in (ULTRALYTICS, YOLOV5)}
LAYOUTS = ("native", "ultralytics")


def of(loaded, layout="native"):
    """The Kind of a LoadedCheckpoint exported in `layout` (LAYOUTS; "ultralytics" is native for ultralytics)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    return YOLOV5_AS_ULTRALYTICS if (loaded.kind, layout) == ("yolov5", "ultralytics") else KINDS[loaded.kind]


def is_head(module):
    """Detection heads of either kind (they carry stride, nc and an export switch)."""
    return hasattr(module, "export") and hasattr(module, "stride") and hasattr(module, "nc")
