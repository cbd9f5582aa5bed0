"""S2-MLPv2 shift attention (seed 004).

The seed shifts in place between overlapping slices. Eager CPU PyTorch copies front to back, so its
+1 shifts smear the first row/column across the map; exports and (mostly) CUDA compute the clean
shift. This project defines the shift as the clean one (read everything, then write), and the
reference functions below implement that definition, not the seed's CPU-eager accident.

SplitAttention() keeps the seed's 512-channel default (the seed works only at C = 512); the export
twin reads its width from the weights. The branch sum over all H*W positions runs in fp32.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Channel-group moves (axis, step) of the two shift functions; axes index an NHWC tensor.
SHIFT1 = ((1, +1), (1, -1), (2, +1), (2, -1))
SHIFT2 = ((2, +1), (2, -1), (1, +1), (1, -1))


def _groups(c):
    return (0, c // 4, c // 2, c * 3 // 4, c)


def _shift_into(x, src, moves):
    """The seed's shift as slice assignments into x, reading from src (x itself: the seed; a copy: clean)."""
    b, w, h, c = x.size()
    g = _groups(c)
    for (axis, step), lo, hi in zip(moves, g[:-1], g[1:]):
        n = x.shape[axis]
        dst_ix, src_ix = [slice(None)] * 3 + [slice(lo, hi)], [slice(None)] * 3 + [slice(lo, hi)]
        dst_ix[axis], src_ix[axis] = (slice(1, n), slice(0, n - 1)) if step > 0 else (slice(0, n - 1), slice(1, n))
        x[tuple(dst_ix)] = src[tuple(src_ix)]
    return x


def seed_inplace_shift(x, moves):
    """The tutorial's in-place shift, as it runs: kept only to measure how far its eager-CPU output is from ours."""
    return _shift_into(x, x, moves)


def _shift_reference(x, moves):
    """Our definition: every group reads the map as it was before any write (the clean shift)."""
    return _shift_into(x, x.clone(), moves)


def spatial_shift1(x):
    return _shift_reference(x, SHIFT1)


def spatial_shift2(x):
    return _shift_reference(x, SHIFT2)


class SplitAttention(nn.Module):
    def __init__(self, channel=512, k=3):
        super().__init__()
        self.channel = channel
        self.k = k
        self.mlp1 = nn.Linear(channel, channel, bias=False)
        self.gelu = nn.GELU()
        self.mlp2 = nn.Linear(channel, channel * k, bias=False)
        self.softmax = nn.Softmax(1)

    def forward(self, x_all):
        b, k, h, w, c = x_all.shape
        x_all = x_all.reshape(b, k, -1, c)
        a = torch.sum(torch.sum(x_all, 1), 1)
        hat_a = self.mlp2(self.gelu(self.mlp1(a)))
        bar_a = self.softmax(hat_a.reshape(b, self.k, c))
        out = bar_a.unsqueeze(-2) * x_all
        return torch.sum(out, 1).reshape(b, h, w, c)


class S2Attention(nn.Module):
    def __init__(self, channels=512, split_channels=512):
        super().__init__()
        self.mlp1 = nn.Linear(channels, channels * 3)
        self.mlp2 = nn.Linear(channels, channels)
        # The seed builds SplitAttention() at 512 whatever `channels` is; our YAMLs pass split_channels=channels.
        self.split_attention = SplitAttention(split_channels)

    def forward(self, x, shift=None):
        """`shift(x, moves)` overrides the clean shift (used to measure the seed's in-place variant)."""
        b, c, w, h = x.size()
        x = self.mlp1(x.permute(0, 2, 3, 1))
        x1 = shift(x[:, :, :, :c], SHIFT1) if shift else spatial_shift1(x[:, :, :, :c])
        x2 = shift(x[:, :, :, c:c * 2], SHIFT2) if shift else spatial_shift2(x[:, :, :, c:c * 2])
        x3 = x[:, :, :, c * 2:]
        a = self.split_attention(torch.stack([x1, x2, x3], 1))
        return self.mlp2(a).permute(0, 3, 1, 2)


def shift_clean(x, moves, axis_offset=0):
    """Clean shift of channel groups of a channels-last tensor by slices and concat (no ScatterND)."""
    c = x.shape[-1]
    g = _groups(c)
    parts = []
    for (axis, step), lo, hi in zip(moves, g[:-1], g[1:]):
        part = x[..., lo:hi]
        ax = axis + axis_offset
        n = part.shape[ax]
        if step > 0:  # out[1:] = in[:-1]; row 0 keeps its value
            part = torch.cat([part.narrow(ax, 0, 1), part.narrow(ax, 0, n - 1)], dim=ax)
        else:  # out[:-1] = in[1:]; the last row keeps its value
            part = torch.cat([part.narrow(ax, 1, n - 1), part.narrow(ax, n - 1, 1)], dim=ax)
        parts.append(part)
    return torch.cat(parts, dim=-1)


class S2AttentionExport(S2Attention):
    def forward(self, x):
        c = x.shape[1]
        y = self.mlp1(x.permute(0, 2, 3, 1))
        x1 = self._shift(y[..., :c], 1)
        x2 = self._shift(y[..., c:2 * c], 2)
        x3 = y[..., 2 * c:]
        return self.mlp2(_split_attend(self.split_attention, (x1, x2, x3))).permute(0, 3, 1, 2)

    def _shift(self, t, direction):
        """The clean shift of a channels-last map; `direction` 1 or 2 as spatial_shift1 / spatial_shift2."""
        return shift_clean(t, SHIFT1 if direction == 1 else SHIFT2)


def _split_attend(sa, branches):
    """SplitAttention with the k*H*W sum and the gating MLP in fp32 (the sum overflows fp16)."""
    dtype = branches[0].dtype
    a = sum(t.float().sum(dim=(1, 2)) for t in branches)
    hat = F.linear(sa.gelu(F.linear(a, sa.mlp1.weight.float())), sa.mlp2.weight.float())
    weights = hat.reshape(a.shape[0], len(branches), -1).softmax(1).to(dtype)
    out = branches[0] * weights[:, 0, None, None, :]
    for i in range(1, len(branches)):
        out = out + branches[i] * weights[:, i, None, None, :]
    return out


def s2_for_yaml(c1):
    """How our YAMLs build S2Attention: SplitAttention as wide as the block, so every scale works."""
    return S2Attention(c1, split_channels=c1)


def reference_output(block, x):
    """(the reference block's output on x, a note on how far the seed's in-place shift is from the clean one)."""
    expected = block(x)
    seed = block(x, shift=seed_inplace_shift)
    diff = (seed - expected).abs().max().item()
    scale = expected.abs().max().item()
    return expected, (f"the seed's in-place shift (eager CPU) differs from the clean shift by max abs {diff:.4g} "
                      f"({diff / max(scale, 1e-12):.1%} of the output scale) here; the clean shift is this "
                      f"project's definition and what every export computes")


EXPORT_TWINS = {S2Attention: S2AttentionExport}
YAML_MODULES = {"S2Attention": ("attention", s2_for_yaml)}

# Names a checkpoint pickled from the tutorial code may reference, under any module path.
# INT8 (calib.rules): mlp1 and mlp2 go int8; the split attention (its k*H*W sum, gating MLP and softmax,
# fp32 in the fp16 path) stays float.
INT8_LAYERS = ("mlp1", "mlp2")

CHECKPOINT_NAMES = ("S2Attention", "SplitAttention", "spatial_shift1", "spatial_shift2")


# What each class looks like when built as the tutorial builds it (export twins are written for this structure).
TEMPLATES = {S2Attention: lambda: S2Attention(64, 64), SplitAttention: lambda: SplitAttention(64)}
