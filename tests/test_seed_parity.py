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
    "s2_512": (lambda: seed_code.S2Attention(512), lambda: s2.S2Attention(512), (6, 7)),
}


@pytest.mark.parametrize("name", PAIRS)
def test_reference_is_the_seed_code(name, monkeypatch):
    make_seed, make_ours, (h, w) = PAIRS[name]
    seed, ours = make_seed().eval(), make_ours().eval()
    randomize(seed, 1)
    assert list(ours.state_dict()) == list(seed.state_dict())
    ours.load_state_dict(seed.state_dict())
    if name.startswith("s2"):  # compare with the clean shift, our definition (see test_s2_shift.py)
        monkeypatch.setattr(seed_code, "spatial_shift1", s2.spatial_shift1)
        monkeypatch.setattr(seed_code, "spatial_shift2", s2.spatial_shift2)
    x = torch.randn(2, 512 if name.startswith("s2") else 32, h, w)
    with torch.no_grad():
        assert rel_err(ours(x), seed(x)) <= 1e-6
