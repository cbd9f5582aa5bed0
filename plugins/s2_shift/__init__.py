"""S2Shift: S2-MLPv2's four-group, one-pixel clean shift as one custom ONNX op (domain yolo_attn).

Layout: channels-last (B, H, W, C), the layout S2 computes in after `mlp1`, so no transposes are
added around the op. Channel groups split at C//4, C//2, 3C//4 (C need not divide by 4).
direction 1 (spatial_shift1): +H, -H, +W, -W; direction 2 (spatial_shift2): +W, -W, +H, -H. The row
or column a shift leaves unwritten keeps its value, i.e. out[h] = in[clamp(h - step)].

Attributes on the node: `direction` (1 or 2) for the plugin, and `perm`, the body's form of the same
thing: direction 2 is direction 1 with H and W swapped, so the body transposes by `perm`, shifts as
direction 1, and transposes back (identity perm for direction 1). No If, no ScatterND.
"""

import torch

from models.s2 import S2AttentionExport
from plugins.body import INT64_MAX, Body, custom_op

NAME = "S2Shift"
PERM = {1: [0, 1, 2, 3], 2: [0, 2, 1, 3]}
# (dh, dw) source offsets per channel group: out[h, w] = in[clamp(h + dh), clamp(w + dw)]
OFFSETS = {1: ((-1, 0), (1, 0), (0, -1), (0, 1)), 2: ((0, -1), (0, 1), (-1, 0), (1, 0))}


def reference(x, direction):
    """The truth in tests: a gather with clamped source indices (independent of the slice/concat twin)."""
    b, h, w, c = x.shape
    bounds = (0, c // 4, c // 2, c * 3 // 4, c)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    parts = []
    for (dh, dw), lo, hi in zip(OFFSETS[direction], bounds[:-1], bounds[1:]):
        part = x[..., lo:hi]
        part = part.index_select(1, (rows + dh).clamp(0, h - 1)).index_select(2, (cols + dw).clamp(0, w - 1))
        parts.append(part)
    return torch.cat(parts, dim=-1)


# Eager: the reference; traced to ONNX: one yolo_attn::S2Shift node carrying direction and perm.
s2_shift = custom_op("s2_shift", NAME, reference,
                     attrs=[("direction", lambda d: {"direction_i": d, "perm_i": PERM[d]})])


def function():
    """The op's ONNX body: transpose by perm, shift groups with slices + concat, transpose back."""
    b = Body(NAME)
    t = b.transpose_by_attr("x", "perm")
    c = b.slice(b.node("Shape", [t]), [3], [4], [0])
    four, two, three = b.ints([4]), b.ints([2]), b.ints([3])
    bounds = [b.ints([0]), b.node("Div", [c, four]), b.node("Div", [c, two]),
              b.node("Div", [b.node("Mul", [c, three]), four]), b.ints([INT64_MAX])]
    axis3 = b.ints([3])
    groups = [b.slice(t, bounds[i], bounds[i + 1], axis3) for i in range(4)]
    shifted = [_shift(b, g, axis, step) for g, (axis, step) in zip(groups, ((1, 1), (1, -1), (2, 1), (2, -1)))]
    out = b.node("Concat", shifted, axis=3)
    b.transpose_by_attr(out, "perm", out="y")
    return b.function(["x"], ["y"], ["direction", "perm"])


def _shift(b, part, axis, step):
    """Clean one-pixel shift along axis: +1 repeats the first slice on top, -1 repeats the last below."""
    if step > 0:
        head, tail = b.slice(part, [0], [1], [axis]), b.slice(part, [0], [-1], [axis])
    else:
        head, tail = b.slice(part, [1], [INT64_MAX], [axis]), b.slice(part, [-1], [INT64_MAX], [axis])
    return b.node("Concat", [head, tail], axis=axis)


class S2AttentionPlugin(S2AttentionExport):
    """The S2 export twin with each shift as one yolo_attn::S2Shift node."""

    def _shift(self, t, direction):
        return s2_shift(t, direction)


PLUGIN_TWINS = {S2AttentionExport: S2AttentionPlugin}
