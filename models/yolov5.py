"""YOLOv5-repository checkpoints: the classes their pickles name, as our own compat classes.

A YOLOv5 `best.pt` pickles `models.yolo.DetectionModel` (older releases: `models.yolo.Model`),
`models.yolo.Detect` (anchor-based) and `models.common.*` layers; the `yolov5` pip package pickles the
same classes under `yolov5.models.*`. The loader maps those paths, by name, to the classes below.
Where ultralytics' class has the same attribute names and forward (Conv, C3, Bottleneck, ...), it is
used as is; YOLOv5's Detect, DetectionModel and SPPF differ and are written here from YOLOv5's
definitions (attribute names kept, so a pickled instance reconstructs into them unchanged).
Our package is also called `models`: YOLOv5 paths are only ever looked up in this table (never
imported), and none of them is the path of a module of ours.
"""

import numpy as np
import torch
from torch import nn
from ultralytics.nn.modules import block, conv
from ultralytics.utils.torch_utils import fuse_conv_and_bn


# INT8: the head's output convs go int8; the sigmoid and the grid/anchor decode (an fp32 island) stay float.
HEAD_INT8_LAYERS = ("m",)


class SPPF(block.SPPF):
    """YOLOv5's SPPF: three chained 5x5 max-pools; ultralytics' adds `n` and `add`, which YOLOv5's lacks."""

    n = 3  # pooling iterations, fixed in YOLOv5
    add = False  # no shortcut in YOLOv5


class Detect(nn.Module):
    """YOLOv5's anchor-based head. Attributes as pickled: nc, no, nl, na, anchors (buffer, in stride
    units, shape (nl, na, 2)), stride (tensor), grid / anchor_grid (lists of per-level tensors), m, inplace."""

    stride = None
    dynamic = False  # rebuild the grids on every call
    export = False  # return only the decoded predictions
    ultralytics_layout = False  # exported: (B, 4+nc, anchors) with objectness folded in (export_head_ultralytics)

    def forward(self, x):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.dynamic or self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
                # exported, the decode is an fp32 island: pixel coordinates up to the image size and the
                # grid's Range op (which ONNX does not define for fp16) stay in fp32 in an fp16 model
                p = x[i].float() if self.export else x[i]
                z.append(self._decode(p, self.grid[i], self.anchor_grid[i], self.stride[i].to(p.dtype)))
        if self.training:
            return x
        if self.export and self.ultralytics_layout:
            return (ultralytics_layout(torch.cat(z, 1)),)
        return (torch.cat(z, 1),) if self.export else (torch.cat(z, 1), x)

    def _decode(self, p, grid, anchor_grid, stride):
        """(B, na, ny, nx, no) raw -> (B, na*ny*nx, no): xywh in pixels, objectness and class scores sigmoided."""
        xy, wh, conf = p.sigmoid().split((2, 2, self.nc + 1), 4)
        xy = (xy * 2 + grid) * stride
        wh = (wh * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, conf), 4).view(p.shape[0], -1, self.no)

    def _make_grid(self, nx, ny, i):
        d, t = self.anchors[i].device, torch.float32 if self.export else self.anchors[i].dtype
        shape = 1, self.na, ny, nx, 2
        yv, xv = torch.meshgrid(torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t),
                                indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5  # cell centre offset: xy = 2 * sigmoid - 0.5
        anchor_grid = (self.anchors[i].to(t) * self.stride[i].to(t)).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid


class DetectionModel(nn.Module):
    """YOLOv5's model: `model` (Sequential of layers with .f / .i), `save`, `names`, `stride`, `yaml`."""

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    def fuse(self, verbose=False):
        """Fold each Conv's BatchNorm into its convolution, as YOLOv5's fuse() does."""
        for m in self.model.modules():
            if isinstance(m, conv.Conv) and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse
        return self

    def _apply(self, fn):
        """Casts and moves reach the head's stride and grids, which are plain attributes, not buffers."""
        self = super()._apply(fn)
        head = self.model[-1]
        if isinstance(head, Detect):
            head.stride = fn(head.stride)
            head.grid = [fn(g) for g in head.grid]
            head.anchor_grid = [fn(g) for g in head.anchor_grid]
        return self


# Class name -> our class, for every YOLOv5 path prefix below.
CLASSES = {
    "models.yolo": {"DetectionModel": DetectionModel, "Model": DetectionModel, "Detect": Detect},
    "models.common": {"Conv": conv.Conv, "DWConv": conv.DWConv, "Focus": conv.Focus, "GhostConv": conv.GhostConv,
                      "Concat": conv.Concat, "Bottleneck": block.Bottleneck, "BottleneckCSP": block.BottleneckCSP,
                      "C3": block.C3, "C3Ghost": block.C3Ghost, "GhostBottleneck": block.GhostBottleneck,
                      "SPP": block.SPP, "SPPF": SPPF},
}
PATH_PREFIXES = ("", "yolov5.")  # the repository's own paths, and the pip package's


def class_table():
    """{"models.common.C3": class, "yolov5.models.common.C3": class, ...}"""
    return {f"{prefix}{module}.{name}": cls for prefix in PATH_PREFIXES for module, names in CLASSES.items()
            for name, cls in names.items()}


# ---- what the exporter needs to know about this checkpoint kind (see export/kinds.py) ------------------
OUTPUT_LAYOUT = "output0 float32 (B, anchors, 5+nc): xywh pixels, objectness, class probabilities (sigmoid)"
ANCHORS_AXIS = 1


def export_head(head, dynamic):
    """Export mode: only the decoded predictions, with the grids built in the graph from the feature maps'
    H and W on every call (never a grid frozen at the traced size), as YOLOv5's own export does."""
    head.export, head.dynamic = True, True


ULTRALYTICS_OUTPUT_LAYOUT = ("output0 float32 (B, 4+nc, anchors): xywh pixels, class scores = objectness x class "
                             "probability (ultralytics' layout)")


def export_head_ultralytics(head, dynamic):
    """Export mode writing ultralytics' layout, which its YOLO() and `yolo predict` read."""
    export_head(head, dynamic)
    head.ultralytics_layout = True


def ultralytics_layout(pred):
    """(B, anchors, 5+nc) tensor -> (B, 4+nc, anchors): to_v8_layout in the graph."""
    boxes, objectness, classes = pred[..., :4], pred[..., 4:5], pred[..., 5:]
    return torch.cat((boxes, objectness * classes), -1).transpose(1, 2)


def to_v8_layout(pred):
    """(B, anchors, 5+nc) -> (B, 4+nc, anchors) with YOLOv5's score = objectness x class probability, so the
    parity harness runs the same NMS and metrics on both kinds."""
    boxes, objectness, classes = pred[..., :4], pred[..., 4:5], pred[..., 5:]
    return np.concatenate((boxes, objectness * classes), axis=-1).transpose(0, 2, 1)
