"""StokenUnfold / StokenFold: STA's 3x3 bank gather and its adjoint scatter-add, as custom ONNX ops (domain yolo_attn).

The seed's Unfold/Fold convolve with a 9x1x3x3 kernel bank that starts as the identity. ultralytics'
trainer re-enables requires_grad on it, so in trained checkpoints the bank has moved: the ops take the
bank as their second input and compute exactly what the seed computes, identity or not.

StokenUnfold(x: (B, C, hh, ww), w: (9, 1, 3, 3)) -> (B, C, 9, hh, ww):
    y[k, y, x] = sum_ij w[k, 0, i, j] * x[y + i - 1, x + j - 1]        (conv2d, padding 1, zeros outside)
StokenFold(t: (B, C, 9, hh, ww), w: (9, 1, 3, 3)) -> (B, C, hh, ww):
    y[y, x] = sum_k sum_ij w[k, 0, i, j] * t[k, y - i + 1, x - j + 1]    (conv_transpose2d: the adjoint)
Bodies: the seed's own form, Reshape to (B*C, ...) + Conv / ConvTranspose + Reshape, which TensorRT imports
(F.fold's Col2Im it does not). With the identity bank the ops are F.unfold / F.fold.
"""

import torch.nn.functional as F

from models.sta import StokenAttentionExport
from plugins.body import Body, custom_op

UNFOLD, FOLD = "StokenUnfold", "StokenFold"


def reference_unfold(s, w):
    """The truth in tests: conv2d of each channel with the bank."""
    b, c, hh, ww = s.shape
    return F.conv2d(s.reshape(b * c, 1, hh, ww), w, padding=1).reshape(b, c, 9, hh, ww)


def reference_fold(t, w):
    """The truth in tests: conv_transpose2d with the bank (the adjoint of reference_unfold)."""
    b, c, _, hh, ww = t.shape
    return F.conv_transpose2d(t.reshape(b * c, 9, hh, ww), w, padding=1).reshape(b, c, hh, ww)


# Eager: the references; traced to ONNX: one yolo_attn node each, the bank as the second input.
stoken_unfold = custom_op("stoken_unfold", UNFOLD, reference_unfold, out_sizes=lambda s: s[:2] + [9] + s[2:],
                          tensors=2)
stoken_fold = custom_op("stoken_fold", FOLD, reference_fold, out_sizes=lambda s: s[:2] + s[3:], tensors=2)


def unfold_function():
    b = Body(UNFOLD)
    shape = b.node("Shape", ["x"])
    rows = b.node("Reshape", ["x", b.node("Concat", [b.ints([-1, 1]), b.slice(shape, [2], [4], [0])], axis=0)])
    conv = b.node("Conv", [rows, "w"], pads=[1, 1, 1, 1])
    target = b.node("Concat", [b.slice(shape, [0], [2], [0]), b.ints([9]), b.slice(shape, [2], [4], [0])], axis=0)
    b.node("Reshape", [conv, target], out="y")
    return b.function(["x", "w"], ["y"])


def fold_function():
    b = Body(FOLD)
    shape = b.node("Shape", ["x"])
    grid = b.slice(shape, [3], [5], [0])
    rows = b.node("Reshape", ["x", b.node("Concat", [b.ints([-1, 9]), grid], axis=0)])
    deconv = b.node("ConvTranspose", [rows, "w"], pads=[1, 1, 1, 1])
    target = b.node("Concat", [b.slice(shape, [0], [2], [0]), grid], axis=0)
    b.node("Reshape", [deconv, target], out="y")
    return b.function(["x", "w"], ["y"])


class StokenAttentionPlugin(StokenAttentionExport):
    """The STA export twin with each unfold / fold as one yolo_attn node carrying the block's own bank."""

    def _unfold(self, s):
        return stoken_unfold(s, self.unfold.weights.to(s.dtype))

    def _fold(self, t):
        return stoken_fold(t, self.fold.weights.to(t.dtype))


PLUGIN_TWINS = {StokenAttentionExport: StokenAttentionPlugin}
