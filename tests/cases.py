"""Module configurations shared by the twin, fp16 and ONNX tests."""

from dataclasses import dataclass, field

import torch

from models import fla, mlla, s2, sta


@dataclass
class Case:
    cls: type
    args: tuple
    kwargs: dict = field(default_factory=dict)
    channels: int = 32
    sizes: tuple = ((16, 16), (20, 12), (15, 20))
    bank_drift: float = 0.0  # STA: ultralytics' trainer re-enables grads on the identity banks, so they move

    def build(self, seed=0):
        torch.manual_seed(seed)
        module = self.cls(*self.args, **self.kwargs)
        randomize(module, seed)
        if self.bank_drift:
            with torch.no_grad():
                for bank in (module.unfold.weights, module.fold.weights):
                    bank.add_(torch.randn(bank.shape, generator=torch.Generator().manual_seed(seed)) * self.bank_drift)
        return module.eval()


CASES = {
    "fla": Case(fla.FocusedLinearAttention, (32,)),
    "fla_sr2": Case(fla.FocusedLinearAttention, (32,), {"sr_ratio": 2}, sizes=((16, 16), (20, 12))),
    "c2f_fla": Case(fla.C2f_FLA, (32, 64, 2)),
    "mlla": Case(mlla.MLLAttention, (32, 4), {"input_resolution": (16, 16)}),
    "sta": Case(sta.StokenAttention, (32, [4, 4], 1, 4)),
    "sta_iter2": Case(sta.StokenAttention, (32, [4, 3], 2, 4)),
    "sta_trained_banks": Case(sta.StokenAttention, (32, [4, 4], 1, 4), bank_drift=0.03),
    "sta_grid1x1": Case(sta.StokenAttention, (32, [8, 8], 1, 4), sizes=((8, 8), (5, 7))),
    "sta_direct": Case(sta.StokenAttention, (32, [1, 1], 1, 4), sizes=((6, 6), (5, 7))),
    "s2_seed512": Case(s2.S2Attention, (512,), channels=512, sizes=((6, 6), (5, 7))),
    "s2_c30": Case(s2.S2Attention, (30,), {"split_channels": 30}, channels=30),
}


def randomize(module, seed):
    """Non-trivial values for every trainable tensor (zero-initialised ones like FLA's scale included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:  # STA's identity banks are frozen and must stay identities
                std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.1  # fan-in scaled, as trained weights are
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)


def reference_at(model, h, w):
    """The reference to compare with at h x w: FLA's seed code is defined for square maps only."""
    return fla.defined_at(model, h, w)


def rel_err(a, b):
    """max |a - b| relative to b's scale."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
