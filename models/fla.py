"""Focused Linear Attention (FLatten Transformer) as used in YOLO tutorials (seed 001).

Reference twins keep the seed's class, attribute and submodule names so pickled checkpoints
reconstruct into them, and its number-changing quirks: the token-count test that picks the
einsum order, the dtype branch, and the square-only `int(N ** 0.5)` layout of the dwc branch.
Export twins compute the same function with matmuls, H and W taken from the input, and the
overflow-prone sums in fp32.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules import Conv


class FocusedLinearAttention(nn.Module):
    def __init__(self, dim, num_patches=64, num_heads=8, qkv_bias=True, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0, sr_ratio=1, focusing_factor=3.0, kernel_size=5):
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} should be divided by num_heads {num_heads}."
        self.dim = dim
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.focusing_factor = focusing_factor
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, groups=head_dim, padding=kernel_size // 2)
        self.scale = nn.Parameter(torch.zeros(size=(1, 1, dim)))

    def _seed_dwc_grid(self, n, h, w):
        """The seed lays v out as a square int(n ** 0.5) grid: wrong or crashing when H != W."""
        side = int(n ** 0.5)
        return side, side

    def _focus(self, t, scale):
        t = F.relu(t) + 1e-6
        t = t / scale
        t_norm = t.norm(dim=-1, keepdim=True)
        t = t ** self.focusing_factor
        return (t / t.norm(dim=-1, keepdim=True)) * t_norm

    def forward(self, x):
        B, C, H, W = x.shape
        dtype = x.dtype
        x = x.flatten(2).transpose(1, 2)
        q = self.q(x)
        if self.sr_ratio > 1:
            x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
            x_ = self.norm(self.sr(x_).reshape(B, C, -1).permute(0, 2, 1))
            kv = self.kv(x_).reshape(B, -1, 2, C).permute(2, 0, 1, 3)
        else:
            kv = self.kv(x).reshape(B, -1, 2, C).permute(2, 0, 1, 3)
        k, v = kv[0], kv[1]
        # The seed adds a fresh fp32 zero Parameter here: numerically nothing, but it promotes k to fp32 under
        # .half(). The seed sizes it H*W, which crashes for sr_ratio > 1 (no seed checkpoint can have used that);
        # sizing it by k's tokens, as upstream FLatten does, defines that case.
        k = k + torch.zeros(1, k.shape[1], self.dim, device=x.device)
        scale = F.softplus(self.scale)
        q, k = self._focus(q, scale), self._focus(k, scale)
        half = dtype == torch.float16
        if half:
            q, k, v = q.float(), k.float(), v.float()
        q, k, v = (_split_heads(t, self.num_heads) for t in (q, k, v))
        i, j, c, d = q.shape[-2], k.shape[-2], k.shape[-1], v.shape[-1]
        z = 1 / (torch.einsum("bic,bc->bi", q, k.sum(dim=1)) + 1e-6)
        if i * j * (c + d) > c * d * (i + j):
            kv = torch.einsum("bjc,bjd->bcd", k, v)
            x = torch.einsum("bic,bcd,bi->bid", q, kv, z)
        else:
            qk = torch.einsum("bic,bjc->bij", q, k)
            x = torch.einsum("bij,bjd,bi->bid", qk, v, z)
        if self.sr_ratio > 1:
            v = F.interpolate(v.permute(0, 2, 1), size=x.shape[1], mode="linear").permute(0, 2, 1)
        if half:
            v, x = v.half(), x.half()
        gh, gw = self._seed_dwc_grid(v.shape[1], H, W)
        fmap = v.transpose(1, 2).reshape(v.shape[0], -1, gh, gw)
        x = x + self.dwc(fmap).flatten(2).transpose(1, 2)
        x = _merge_heads(x, self.num_heads)
        x = self.proj_drop(self.proj(x))
        return x.transpose(1, 2).reshape(B, C, H, W)


class FocusedLinearAttentionHW(FocusedLinearAttention):
    """The seed computation with only the dwc layout corrected to the real H x W.

    This is the reference semantics off-square (where the seed itself crashes or scrambles the map),
    and what the export twin is checked against there.
    """

    def _seed_dwc_grid(self, n, h, w):
        return h, w


def defined_at(model, h, w):
    """`model` as the reference to compare with at h x w: the seed FLA is square-only, so off-square every
    FocusedLinearAttention inside is the HW-layout variant (a copy; `model` itself is untouched)."""
    if h == w or not any(type(m) is FocusedLinearAttention for m in model.modules()):
        return model
    fixed = copy.deepcopy(model)
    for m in fixed.modules():
        if type(m) is FocusedLinearAttention:
            m.__class__ = FocusedLinearAttentionHW
    return fixed


def _split_heads(t, heads):
    """(B, N, heads*d) -> (B*heads, N, d), heads channel-contiguous as in the seed."""
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2).reshape(b * heads, n, c // heads)


def _merge_heads(t, heads):
    bh, n, d = t.shape
    return t.reshape(bh // heads, heads, n, d).transpose(1, 2).reshape(bh // heads, n, heads * d)


class Bottleneck_FLA(nn.Module):
    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.FLA = FocusedLinearAttention(c_)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        # FLA runs only without the shortcut (C2f_FLA's default): the seed's quirk, kept.
        return x + self.cv2(self.cv1(x)) if self.add else self.FLA(self.cv2(self.cv1(x)))


class C2f_FLA(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck_FLA(self.c, self.c, shortcut, g, k=((3, 3), (3, 3)), e=1.0) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))

    def forward_split(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class FocusedLinearAttentionExport(FocusedLinearAttention):
    """Matmul-only FLA for any H x W; focusing, sums and kv product in fp32."""

    def forward(self, x):
        B, C, H, W = x.shape
        dtype = x.dtype
        t = x.flatten(2).transpose(1, 2)
        q = self.q(t)
        if self.sr_ratio > 1:
            kv_in = self.norm(self.sr(x).flatten(2).transpose(1, 2))
        else:
            kv_in = t
        k, v = self.kv(kv_in).chunk(2, dim=-1)
        scale = F.softplus(self.scale.float())
        q = _split_heads_4d(_focus_overflow_free(q.float(), scale, self.focusing_factor), self.num_heads)
        k = _split_heads_4d(_focus_overflow_free(k.float(), scale, self.focusing_factor), self.num_heads)
        v32 = _split_heads_4d(v.float(), self.num_heads)
        z = 1 / (q @ k.sum(dim=2, keepdim=True).transpose(-2, -1) + 1e-6)
        out = (q @ (k.transpose(-2, -1) @ v32)) * z
        vmap = _split_heads_4d(v, self.num_heads)
        if self.sr_ratio > 1:
            vmap = _interp_tokens(vmap, H * W)
        out = out.to(dtype) + self._dwc_tokens(vmap, H, W)
        out = out.transpose(1, 2).flatten(2)
        out = self.proj_drop(self.proj(out))
        return out.transpose(1, 2).reshape(B, C, H, W)

    def _dwc_tokens(self, v, h, w):
        """v (B, heads, N, d) -> dwc over each head's (d, H, W) map -> (B, heads, N, d)."""
        b, heads, n, d = v.shape
        fmap = v.transpose(-2, -1).reshape(b * heads, d, h, w)
        return self.dwc(fmap).reshape(b, heads, d, n).transpose(-2, -1)


def _split_heads_4d(t, heads):
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _interp_tokens(v, n):
    b, heads, m, d = v.shape
    flat = v.reshape(b * heads, m, d).transpose(1, 2)
    return F.interpolate(flat, size=n, mode="linear").transpose(1, 2).reshape(b, heads, n, d)


def _focus_overflow_free(t, scale, power):
    """(t/|t|)-direction focusing with t divided by its per-token max first: exact, never overflows."""
    t = (F.relu(t) + 1e-6) / scale
    peak = t.amax(dim=-1, keepdim=True)
    unit = t / peak
    norm = unit.norm(dim=-1, keepdim=True) * peak
    powered = unit ** power
    return powered / powered.norm(dim=-1, keepdim=True) * norm


# Bottleneck_FLA and C2f_FLA need no twin: their forward is export-clean once FLA inside is swapped.
EXPORT_TWINS = {FocusedLinearAttention: FocusedLinearAttentionExport}
# C2f_FLA takes (c1, c2, n, shortcut, ...) like ultralytics' C2f: width- and depth-scaled.
# FocusedLinearAttention alone (the tutorial's "FLAttention" in the neck) keeps C and takes c1 first.
YAML_MODULES = {
    "C2f_FLA": ("csp", C2f_FLA),
    "FocusedLinearAttention": ("attention", FocusedLinearAttention),
    "FLAttention": ("attention", FocusedLinearAttention),
}

# Names a checkpoint pickled from the tutorial code may reference, under any module path.
CHECKPOINT_NAMES = ("FocusedLinearAttention", "Bottleneck_FLA", "C2f_FLA")

# INT8 (calib.rules): the linear layers and the depth-wise conv go int8; the focusing power, the norms, the
# kᵀv and q(kᵀv) sums and the normalizer (the parts the fp16 path keeps in fp32) stay float.
INT8_LAYERS = ("q", "kv", "proj", "dwc", "sr")

