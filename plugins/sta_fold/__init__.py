"""StokenUnfold / StokenFold: STA's 3x3 neighbourhood gather and its adjoint scatter-add, as custom ONNX ops.

StokenUnfold: (B, C, hh, ww) -> (B, C, 9, hh, ww), index k = 3*dy + dx holds s[y + dy - 1, x + dx - 1]
(zero outside the grid): the seed's identity-kernel conv bank. StokenFold: (B, C, 9, hh, ww) ->
(B, C, hh, ww), out[y, x] = sum_k t[k, y - dy + 1, x - dx + 1]: the seed's conv_transpose2d (F.fold).
Bodies: Pad and nine Slices with static negative ends, so any grid (1x1 and rectangular included)
needs no shape arithmetic.
"""

import torch.nn.functional as F

from models.sta import StokenAttentionExport
from plugins.body import INT64_MAX, Body, custom_op

UNFOLD, FOLD = "StokenUnfold", "StokenFold"
OFFSETS = [divmod(k, 3) for k in range(9)]  # (dy, dx) per neighbour index


def reference_unfold(s):
    """The truth in tests: F.unfold (im2col) with a 3x3 window and padding 1, reshaped."""
    b, c, hh, ww = s.shape
    return F.unfold(s.reshape(b * c, 1, hh, ww), 3, padding=1).reshape(b, c, 9, hh, ww)


def reference_fold(t):
    """The truth in tests: F.fold (col2im), the adjoint of reference_unfold."""
    b, c, _, hh, ww = t.shape
    return F.fold(t.reshape(b * c, 9, hh * ww), (hh, ww), 3, padding=1).reshape(b, c, hh, ww)


# Eager: the references; traced to ONNX: one yolo_attn node each.
stoken_unfold = custom_op("stoken_unfold", UNFOLD, reference_unfold)
stoken_fold = custom_op("stoken_fold", FOLD, reference_fold)


def _end(offset):
    """Slice end that stops `offset` short of the padded axis' end (INT64_MAX when it runs to the end)."""
    return -offset if offset > 0 else INT64_MAX


def unfold_function():
    b = Body(UNFOLD)
    padded = b.node("Pad", ["x", b.ints([0, 0, 1, 1, 0, 0, 1, 1])])
    axis2 = b.ints([2])
    shifted = [b.node("Unsqueeze", [b.slice(padded, [dy, dx], [_end(2 - dy), _end(2 - dx)], [2, 3]), axis2])
               for dy, dx in OFFSETS]
    b.node("Concat", shifted, out="y", axis=2)
    return b.function(["x"], ["y"])


def fold_function():
    b = Body(FOLD)
    padded = b.node("Pad", ["x", b.ints([0, 0, 0, 1, 1, 0, 0, 0, 1, 1])])
    terms = [b.slice(padded, [k, 2 - dy, 2 - dx], [k + 1, _end(dy), _end(dx)], [2, 3, 4])
             for k, (dy, dx) in enumerate(OFFSETS)]
    b.node("Squeeze", [b.node("Sum", terms), b.ints([2])], out="y")
    return b.function(["x"], ["y"])


class StokenAttentionPlugin(StokenAttentionExport):
    """The STA export twin with each unfold / fold as one yolo_attn node."""

    def _unfold(self, s):
        return stoken_unfold(s)

    def _fold(self, t):
        return stoken_fold(t)


PLUGIN_TWINS = {StokenAttentionExport: StokenAttentionPlugin}
