"""End-to-end detection graphs (`--nms`): NMS appended to an exported ONNX file, in one of two layouts.

Every file we write ends in `output0` (B, 4+nc, anchors): xywh pixels and class scores (a YOLOv5 model with
`--layout ultralytics`). A small "tail" model is traced once from torch and merged onto that output with
onnx.compose, so the fp32, fp16 and int8 files get the same tail, in float32 (the network's output is float32 in
all of them), with dynamic batch and anchors:

- `ultralytics`: standard ONNX ops (NonMaxSuppression). Output `output0` (B, max_det, 6): x1, y1, x2, y2, score,
  class, zero rows after the detections, as ultralytics' own `nms=True` export; its YOLO() reads it (metadata
  args.nms). One label per box (the best class), per-class NMS unless agnostic, the best `max_det` kept: what
  ultralytics' `non_max_suppression` does.
- `trt`: one `EfficientNMS_TRT` node (TensorRT's plugin library, JetPack included; domain "TRT") with the
  TensorRT world's four outputs `num_dets` (B, 1) int32, `det_boxes` (B, K, 4) x1y1x2y2, `det_scores` (B, K),
  `det_classes` (B, K) int32. The scores fed to it keep only each box's best class, so it decides as ultralytics
  does. `efficient_nms` is a numpy implementation of the plugin's documented semantics, for checking.
"""

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import torch
import torchvision

LAYOUTS = ("ultralytics", "trt")
TRT_DOMAIN = "TRT"
TRT_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")
TAIL_PREFIX = "nms/"


@dataclass(frozen=True)
class NMSParams:
    """ultralytics' option names and defaults."""
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    agnostic: bool = False


def with_nms(proto, layout, params, nc, yolov5_rows=False, opset=17):
    """`proto` (ending in output0 (B, 4+nc, anchors), or YOLOv5's (B, anchors, 5+nc) with `yolov5_rows`) with the
    `layout` tail merged onto output0."""
    tail_cls = _UltralyticsTail if layout == "ultralytics" else _TrtTail
    tail = _trace(tail_cls(nc, params, yolov5_rows), nc, opset, ("output0",) if layout == "ultralytics" else TRT_OUTPUTS,
                  yolov5_rows)
    tail = onnx.compose.add_prefix(tail, TAIL_PREFIX, rename_outputs=False, rename_inputs=True)
    body = onnx.ModelProto()
    body.CopyFrom(proto)
    body.graph.output[0].name = "output0"
    _rename_output(body, "output0", "predictions")
    merged = onnx.compose.merge_models(body, _with_opsets(tail, body), io_map=[("predictions", TAIL_PREFIX + "raw")],
                                       outputs=[o.name for o in tail.graph.output])
    merged.ir_version = proto.ir_version
    if layout == "trt":
        _declare_trt_outputs(merged, params, proto.graph.input[0].type.tensor_type.shape.dim[0])
    del merged.metadata_props[:]
    merged.metadata_props.extend(proto.metadata_props)
    return merged


def _declare_trt_outputs(proto, params, batch_dim):
    """The plugin's output shapes, which torch cannot infer for a custom op: the batch as the images' batch."""
    dims = {"num_dets": [1], "det_boxes": [params.max_det, 4], "det_scores": [params.max_det],
            "det_classes": [params.max_det]}
    for output in proto.graph.output:
        shape = output.type.tensor_type.shape
        del shape.dim[:]
        shape.dim.add().CopyFrom(batch_dim)
        for d in dims[output.name]:
            shape.dim.add().dim_value = d


def _trace(tail, nc, opset, outputs, yolov5_rows):
    from export.graph.to_onnx import trace  # the shared tracer (float64 and GridSample passes are no-ops here)

    columns = 5 + nc if yolov5_rows else 4 + nc
    example = torch.rand(1, columns, 64) * torch.tensor([64.0] * 2 + [16.0] * 2 + [1.0] * (columns - 4)).view(1, -1, 1)
    example = example.transpose(1, 2).contiguous() if yolov5_rows else example
    axes = {"raw": {0: "batch", 1 if yolov5_rows else 2: "anchors"}, **{name: {0: "batch"} for name in outputs}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the exporter's note on indexing with a mask: handled
        return trace(tail, example, opset, ("raw",), outputs, axes)


def _rename_output(proto, old, new):
    for node in proto.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
    proto.graph.output[0].name = new


def _with_opsets(tail, body):
    """The tail declaring the body's default opset (merge_models wants one version per domain)."""
    version = next(o.version for o in body.opset_import if o.domain in ("", "ai.onnx"))
    for o in tail.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = version
    return tail


def _split(raw, yolov5_rows):
    """(B, 4+nc, A) -> boxes (B, A, 4) x1y1x2y2, best score (B, A), best class (B, A), scores (B, A, nc). YOLOv5's
    (B, A, 5+nc): its score is objectness x class probability."""
    pred = raw.float() if yolov5_rows else raw.float().transpose(1, 2)
    xy, wh, scores = pred[..., :2], pred[..., 2:4], pred[..., 4:]
    scores = scores[..., :1] * scores[..., 1:] if yolov5_rows else scores
    best, cls = scores.max(-1)
    return torch.cat((xy - wh / 2, xy + wh / 2), -1), best, cls, scores


class _UltralyticsTail(torch.nn.Module):
    def __init__(self, nc, params, yolov5_rows):
        super().__init__()
        self.nc, self.params, self.yolov5_rows = nc, params, yolov5_rows

    def forward(self, raw):
        p = self.params
        boxes, best, cls, scores = _split(raw, self.yolov5_rows)
        # one label per box: NMS per class over the best scores (agnostic: one "class")
        single = best.unsqueeze(1) if p.agnostic else (scores * (scores == best.unsqueeze(-1))).transpose(1, 2)
        picked = _NonMaxSuppression.apply(boxes, single, p.max_det, p.iou, p.conf)  # (K, 3): batch, class, box
        b, i = picked[:, 0], picked[:, 2]
        score, label = best[b, i], cls[b, i].float()
        dets = torch.cat((boxes[b, i], score.unsqueeze(1), label.unsqueeze(1)), 1)
        return _packed(dets, b, score, raw.shape[0], p.max_det)


def _packed(dets, b, score, batch, max_det):
    """(B, max_det, 6): each image's detections, best score first, zero rows after them."""
    order = torch.argsort(b.float() * 2 - score)  # by image, then score descending (scores lie in [0, 1])
    dets, b = dets[order], b[order]
    images = torch.arange(batch, device=b.device)
    counts = (b.unsqueeze(1) == images.unsqueeze(0)).sum(0)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(b.shape[0], device=b.device) - starts[b]
    keep = rank < max_det
    out = torch.zeros(batch, max_det, 6, dtype=dets.dtype, device=dets.device)
    out[b[keep], rank[keep]] = dets[keep]
    return out


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX NonMaxSuppression (corner boxes, scores (B, C, N), score > threshold) traced as one node; eager:
    torchvision's nms per image and class, in ONNX's output order."""

    @staticmethod
    def forward(ctx, boxes, scores, max_per_class, iou, conf):
        picked = []
        for b in range(boxes.shape[0]):
            for c in range(scores.shape[1]):
                candidates = torch.nonzero(scores[b, c] > conf).flatten()
                kept = candidates[torchvision.ops.nms(boxes[b, candidates], scores[b, c, candidates], iou)]
                kept = kept[:max_per_class]
                picked.append(torch.stack((torch.full_like(kept, b), torch.full_like(kept, c), kept), 1))
        return torch.cat(picked) if picked else torch.zeros(0, 3, dtype=torch.int64)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou, conf):
        return g.op("NonMaxSuppression", boxes, scores,
                    g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
                    g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32)),
                    g.op("Constant", value_t=torch.tensor([conf], dtype=torch.float32)), center_point_box_i=0)


class _TrtTail(torch.nn.Module):
    def __init__(self, nc, params, yolov5_rows):
        super().__init__()
        self.nc, self.params, self.yolov5_rows = nc, params, yolov5_rows

    def forward(self, raw):
        boxes, best, _, scores = _split(raw, self.yolov5_rows)
        single = scores * (scores == best.unsqueeze(-1))  # one label per box, as ultralytics decides
        p = self.params
        return _EfficientNMS.apply(boxes, single, p.conf, p.iou, p.max_det, p.agnostic)


class _EfficientNMS(torch.autograd.Function):
    """TensorRT's EfficientNMS_TRT plugin node; eager: efficient_nms (its documented semantics)."""

    @staticmethod
    def forward(ctx, boxes, scores, conf, iou, max_det, agnostic):
        outputs = efficient_nms(boxes.numpy(), scores.numpy(), NMSParams(conf, iou, max_det, agnostic))
        return tuple(torch.from_numpy(o) for o in outputs)

    @staticmethod
    def symbolic(g, boxes, scores, conf, iou, max_det, agnostic):
        attributes = trt_attributes(NMSParams(conf, iou, max_det, agnostic))
        outputs = g.op(f"{TRT_DOMAIN}::EfficientNMS_TRT", boxes, scores, outputs=4, **attributes)
        for value, dtype, rank in zip(outputs, (torch.int32, torch.float32, torch.float32, torch.int32), (2, 3, 2, 2)):
            value.setType(boxes.type().with_dtype(dtype).with_sizes([None] * rank))  # torch cannot infer a plugin's
        return outputs


def trt_attributes(params):
    """The plugin's fields as ONNX attributes (the suffix is the attribute type, as torch's g.op wants it)."""
    return {"background_class_i": -1, "box_coding_i": 0, "iou_threshold_f": params.iou,
            "max_output_boxes_i": params.max_det, "plugin_version_s": "1", "score_activation_i": 0,
            "class_agnostic_i": int(params.agnostic), "score_threshold_f": params.conf}


def efficient_nms(boxes, scores, params):
    """EfficientNMS_TRT's documented semantics in numpy, corner boxes (B, N, 4), scores (B, N, C): scores above the
    threshold are candidates (box, class), sorted by score, the highest 4096 kept, greedy NMS per class (or across
    classes when agnostic) at IoU above the threshold, the best max_output_boxes output, corners, zero-padded.
    Returns num_dets (B, 1) int32, det_boxes (B, K, 4), det_scores (B, K), det_classes (B, K) int32."""
    batch, k = boxes.shape[0], params.max_det
    num = np.zeros((batch, 1), np.int32)
    out_boxes, out_scores = np.zeros((batch, k, 4), np.float32), np.zeros((batch, k), np.float32)
    out_classes = np.zeros((batch, k), np.int32)
    for b in range(batch):
        box_i, cls_i = np.nonzero(scores[b] > params.conf)
        s = scores[b, box_i, cls_i]
        order = np.argsort(-s, kind="stable")[:4096]
        kept = _greedy(boxes[b], box_i[order], cls_i[order], params)[:k]
        num[b, 0] = len(kept)
        picked = order[kept]
        out_boxes[b, :len(kept)] = boxes[b, box_i[picked]]
        out_scores[b, :len(kept)] = s[picked]
        out_classes[b, :len(kept)] = cls_i[picked]
    return num, out_boxes, out_scores, out_classes


def _greedy(boxes, box_i, cls_i, params):
    """Positions (into the score-sorted candidates) that survive greedy NMS."""
    kept = []
    for j in range(len(box_i)):
        same = [m for m in kept if params.agnostic or cls_i[m] == cls_i[j]]
        if not same or _iou(boxes[box_i[j]], boxes[box_i[same]]).max() <= params.iou:
            kept.append(j)
    return kept


def _iou(box, others):
    lt, rb = np.maximum(box[:2], others[:, :2]), np.minimum(box[2:], others[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area = lambda b: np.clip(b[..., 2:] - b[..., :2], 0, None).prod(-1)  # noqa: E731
    return inter / (area(box) + area(others) - inter + 1e-12)


def params_record(params):
    return asdict(params)


def trt_inputs_model(proto):
    """The TensorRT-layout file with its EfficientNMS_TRT node cut off: outputs the boxes and scores that feed it,
    so ONNX Runtime (which has no such op) runs everything up to the plugin."""
    cut = onnx.ModelProto()
    cut.CopyFrom(proto)
    node = next(n for n in cut.graph.node if n.op_type == "EfficientNMS_TRT")
    cut.graph.node.remove(node)
    del cut.graph.output[:]
    cut.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                            for name in node.input)
    del cut.opset_import[:]
    cut.opset_import.extend(o for o in proto.opset_import if o.domain != TRT_DOMAIN)
    return cut


def check_trt_node(proto, params, batch):
    """Problems (strings) with the EfficientNMS_TRT node against NVIDIA's documented plugin interface."""
    nodes = [n for n in proto.graph.node if n.op_type == "EfficientNMS_TRT"]
    if len(nodes) != 1:
        return [f"{len(nodes)} EfficientNMS_TRT nodes (one expected)"]
    node, problems = nodes[0], []
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    expected = {k.rpartition("_")[0]: v for k, v in trt_attributes(params).items()}
    for name, value in expected.items():
        got = attributes.get(name)
        got = got.decode() if isinstance(got, bytes) else got
        if got is None or (abs(got - value) > 1e-6 if isinstance(value, float) else got != value):
            problems.append(f"attribute {name} = {got!r}, expected {value!r}")
    if len(node.input) != 2 or list(node.output) != list(TRT_OUTPUTS):
        problems.append(f"inputs {list(node.input)} / outputs {list(node.output)}: expected boxes, scores -> "
                        f"{', '.join(TRT_OUTPUTS)}")
    problems += _output_problems(proto, params, batch)
    return problems


def _output_problems(proto, params, batch):
    k = params.max_det
    want = {"num_dets": (onnx.TensorProto.INT32, [batch, 1]), "det_boxes": (onnx.TensorProto.FLOAT, [batch, k, 4]),
            "det_scores": (onnx.TensorProto.FLOAT, [batch, k]), "det_classes": (onnx.TensorProto.INT32, [batch, k])}
    problems = []
    for output in proto.graph.output:
        kind, shape = want.get(output.name, (None, None))
        t = output.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        if kind is None or t.elem_type != kind or dims[1:] != shape[1:] or dims[0] not in (batch, "batch"):
            problems.append(f"output {output.name}: type {t.elem_type}, shape {dims}; expected type {kind}, shape "
                            f"{shape}")
    return problems
