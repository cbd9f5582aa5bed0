"""The S2 shift: our definition (the clean shift) versus what the seed's in-place code does on CPU.

The seed writes `x[:, 1:, ...] = x[:, :w-1, ...]` between overlapping slices of one tensor. On
eager CPU PyTorch the copy runs front to back, so a +1 shift reads rows it has already written and
the first row is smeared across the whole map. ONNX exporters (and, racily, CUDA) produce the clean
shift, which is what this project's reference and export twins compute. These tests pin both facts.
"""

import torch

import models
from models import s2
from tests.seed_code import spatial_shift1 as seed_spatial_shift1  # the tutorial's code


def test_reference_shift_is_the_clean_shift():
    x = torch.randn(2, 6, 5, 8)
    out = s2.spatial_shift1(x.clone())
    assert torch.equal(out[:, 1:, :, :2], x[:, :-1, :, :2])  # +H
    assert torch.equal(out[:, 0, :, :2], x[:, 0, :, :2])  # the unwritten row keeps its value
    assert torch.equal(out[:, :-1, :, 2:4], x[:, 1:, :, 2:4])  # -H
    assert torch.equal(out[:, :, 1:, 4:6], x[:, :, :-1, 4:6])  # +W
    assert torch.equal(out[:, :, :-1, 6:], x[:, :, 1:, 6:])  # -W


def test_seed_cpu_eager_smears_the_first_row_and_differs_from_ours():
    x = torch.randn(1, 6, 5, 8)
    seed = seed_spatial_shift1(x.clone())
    ours = s2.spatial_shift1(x.clone())
    # The +H group: every row of the seed's output is the input's first row.
    assert all(torch.equal(seed[:, i, :, :2], x[:, 0, :, :2]) for i in range(6))
    assert not torch.equal(seed, ours)
    # The -H and -W groups read ahead of what they write, so there the seed happens to be clean.
    assert torch.equal(seed[..., 2:4], ours[..., 2:4]) and torch.equal(seed[..., 6:], ours[..., 6:])


def test_seed_inplace_shift_reproduces_the_tutorial_code():
    x = torch.randn(2, 6, 5, 12)
    assert torch.equal(s2.seed_inplace_shift(x.clone(), s2.SHIFT1), seed_spatial_shift1(x.clone()))


def test_export_shift_matches_reference_for_any_channel_count():
    for c in (4, 7, 30, 64):
        x = torch.randn(2, 5, 6, c)
        assert torch.equal(s2.shift_clean(x, s2.SHIFT1), s2.spatial_shift1(x.clone()))
        assert torch.equal(s2.shift_clean(x, s2.SHIFT2), s2.spatial_shift2(x.clone()))


def test_whole_block_seed_vs_clean_difference_is_large():
    """A block running the seed's eager shift gives visibly different outputs: not a rounding matter."""
    torch.manual_seed(0)
    block = s2.S2Attention(32, split_channels=32).eval()
    x = torch.randn(1, 32, 10, 10)
    with torch.no_grad():
        clean = models.to_export(block)(x)
        seed = block(x, shift=s2.seed_inplace_shift)
    assert (seed - clean).abs().max() > 1e-2 * clean.abs().max()
