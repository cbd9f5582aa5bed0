"""Our reference twins are the tutorial code: same state_dict keys, same outputs (seed code in tests/seed_code.py)."""

import pytest
import torch

from models import fla, mlla, s2, sta
from tests import seed_code
from tests.cases import randomize, rel_err

PAIRS = {  # name: (seed module, our reference, input H x W where the seed is defined)
    "fla": (lambda: seed_code.FocusedLinearAttention(32), lambda: fla.FocusedLinearAttention(32), (16, 16)),
    "c2f_fla": (lambda: seed_code.C2f_FLA(32, 64, 2), lambda: fla.C2f_FLA(32, 64, 2), (12, 12)),
    "mlla": (lambda: seed_code.MLLAttention(32, 4, input_resolution=(16, 16)),
             lambda: mlla.MLLAttention(32, 4, input_resolution=(16, 16)), (16, 16)),
    "sta": (lambda: seed_code.StokenAttention(32, [4, 4], 2, 4), lambda: sta.StokenAttention(32, [4, 4], 2, 4), (20, 12)),
    "sta_direct": (lambda: seed_code.StokenAttention(32, [1, 1], 1, 4), lambda: sta.StokenAttention(32, [1, 1], 1, 4),
                   (6, 5)),
    # S2 twice: the seed's shift copies between overlapping slices in place, and the clean shift is our definition
    # (test_s2_shift.py). With the clean shift on both sides, the rest of the block is the seed's; with the seed's
    # own in-place shift on both sides, our reference computes exactly what the seed code computes.
    "s2_512_clean_shift": (lambda: seed_code.S2Attention(512), lambda: s2.S2Attention(512), (6, 7)),
    "s2_512_seed_shift": (lambda: seed_code.S2Attention(512), lambda: s2.S2Attention(512), (6, 7)),
}
SHIFTS = ("spatial_shift1", "spatial_shift2")


@pytest.mark.parametrize("name", PAIRS)
def test_reference_is_the_seed_code(name, monkeypatch):
    make_seed, make_ours, (h, w) = PAIRS[name]
    seed, ours = make_seed().eval(), make_ours().eval()
    randomize(seed, 1)
    assert list(ours.state_dict()) == list(seed.state_dict())
    ours.load_state_dict(seed.state_dict())
    if name == "s2_512_clean_shift":
        for shift in SHIFTS:
            monkeypatch.setattr(seed_code, shift, getattr(s2, shift))
    if name == "s2_512_seed_shift":
        for shift in SHIFTS:
            monkeypatch.setattr(s2, shift, getattr(seed_code, shift))
    x = torch.randn(2, 512 if name.startswith("s2") else 32, h, w)
    with torch.no_grad():
        assert rel_err(ours(x), seed(x)) <= 1e-6
