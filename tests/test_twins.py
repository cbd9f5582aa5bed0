"""Export twins compute what the reference twins compute, carry the same weights, and survive fp16."""

import pytest
import torch

import models
from models import fla, mlla
from tests import seed_code
from tests.cases import CASES, reference_at, rel_err


@pytest.mark.parametrize("name", CASES)
def test_twin_matches_reference_fp32(name):
    case = CASES[name]
    ref = case.build()
    twin = models.to_export(ref)
    for h, w in case.sizes:
        x = torch.randn(3, case.channels, h, w)
        with torch.no_grad():
            expected = reference_at(ref, h, w)(x)
            got = twin(x)
        assert got.shape == expected.shape
        assert rel_err(got, expected) <= 1e-5, f"{name} at {h}x{w}"


@pytest.mark.parametrize("name", CASES)
def test_twin_built_from_reference_state_dict(name):
    """Same keys both ways: a twin constructed fresh loads the reference's state_dict strictly."""
    case = CASES[name]
    ref = case.build()
    converted = models.to_export(ref)
    assert list(converted.state_dict()) == list(ref.state_dict())
    fresh = models.to_export(case.cls(*case.args, **case.kwargs)).eval()
    fresh.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, case.channels, *case.sizes[0])
    with torch.no_grad():
        assert torch.equal(fresh(x), converted(x))


def test_every_family_class_has_an_export_twin_or_is_export_clean():
    twins = models.EXPORT_TWINS
    assert twins[fla.FocusedLinearAttention] is fla.FocusedLinearAttentionExport
    assert twins[mlla.MLLAttention] is mlla.MLLAttentionExport
    for ref, twin in twins.items():
        assert issubclass(twin, ref) and twin.forward is not ref.forward


def test_fla_twin_matches_reference_on_dead_tokens():
    """Tokens whose q and k are negative in every channel before the ReLU: the focusing then runs on the
    1e-6 / scale floor alone, where only the per-channel eps decides the output (a uniform eps is off by 5e-2)."""
    ref = CASES["fla"].build()
    with torch.no_grad():
        for bias in (ref.q.bias, ref.kv.bias[: ref.dim]):
            bias.copy_(-bias.abs() - 0.1)
    x = torch.randn(3, 32, 16, 16) * 3
    x[..., 8:] = 0  # right half: pre-activations are the (negative) biases
    with torch.no_grad():
        assert rel_err(models.to_export(ref)(x), ref(x)) <= 1e-5


def test_mllattention_is_upstream_block_at_training_size():
    """The NCHW adapter equals upstream's token MLLABlock (stored RoPE table) when H x W is the training size."""
    adapter = CASES["mlla"].build()
    block = mlla.MLLABlock(32, (16, 16), 4).eval()
    block.load_state_dict(adapter.state_dict())
    x = torch.randn(2, 32, 16, 16)
    with torch.no_grad():
        tokens = block(x.flatten(2).transpose(1, 2))
        out = adapter(x)
    assert rel_err(out, tokens.transpose(1, 2).reshape(x.shape)) <= 1e-6


# fp16: half weights and inputs on 80x80 maps with values up to +-30 (P3-sized maps at strong activations).
# Compared with fp32 run on the *same half-rounded weights*, so only activation precision is measured:
# measured (torch 2.14.1 CPU): FLA 3.0e-3, C2f_FLA 3.2e-3, MLLA 1.0e-3, STA 2.4e-3, S2 4.2e-4 of the output
# scale. Stated tolerance: 1e-2 of the output scale (about ten fp16 ulps).
FP16_TOLERANCE = 1e-2
FP16_CASES = {
    "fla": (fla.FocusedLinearAttention, (64,), {}),
    "c2f_fla": (fla.C2f_FLA, (64, 64, 1), {}),
    "mlla": (mlla.MLLAttention, (64, 8), {"input_resolution": (20, 20)}),
    "sta": (models.sta.StokenAttention, (64, [4, 4], 1, 8), {}),
    "s2": (models.s2.S2Attention, (64,), {"split_channels": 64}),
}


@pytest.mark.parametrize("name", FP16_CASES)
def test_twin_fp16_finite_and_close(name):
    cls, args, kwargs = FP16_CASES[name]
    torch.manual_seed(0)
    ref = cls(*args, **kwargs).eval()
    x = ((torch.rand(1, args[0], 80, 80) * 2 - 1) * 30).half()
    half_twin = models.to_export(ref).half()
    with torch.no_grad():
        got = half_twin(x)
        expected = models.to_export(ref).half().float()(x.float())
    assert got.dtype == torch.float16
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) <= FP16_TOLERANCE


def test_the_seed_code_cannot_run_in_half_as_written():
    """The seed FLA adds a fresh fp32 Parameter to k, so under .half() its einsum mixes fp32 and fp16; upstream
    MLLA's RoPE keeps fp32 tensors: as transcribed from the tutorials, neither runs in fp16 at all (CPU)."""
    x = torch.randn(1, 64, 20, 20).half()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="expected scalar type Float but found Half"):
            seed_code.FocusedLinearAttention(64).eval().half()(x)
        with pytest.raises(RuntimeError, match="same dtype"):
            seed_code.MLLAttention(64, 8).eval().half()(x)


def test_the_seed_fla_arithmetic_overflows_fp16_once_its_dtypes_agree():
    """Our reference FLA is the seed's arithmetic (test_seed_parity) with the dtype mix resolved after the focusing
    power: in fp16 that power overflows at these values, while the export twin stays finite."""
    torch.manual_seed(0)
    x = ((torch.rand(1, 64, 80, 80) * 2 - 1) * 30).half()
    reference = fla.FocusedLinearAttention(64).eval()
    twin = models.to_export(reference).half()
    with torch.no_grad():
        assert not torch.isfinite(reference.half()(x)).all()
        assert torch.isfinite(twin(x)).all()
