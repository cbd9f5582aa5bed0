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
    """FLA for any H x W, laid out for where it runs: NCHW end to end, no token transposes.

    At the 80x80 neck level of a YOLO, with 4-channel heads, moving tokens between NCHW, (B, N, C) and
    head layouts cost more than the attention's arithmetic (measured: six times its FLOP share). Here
    the linear layers are 1x1 convolutions on the map, heads are a reshape of the channel axis (the
    seed's heads are channel-contiguous), kᵀv and q(kᵀv) are batched matmuls on channel-major
    (B, heads, d, N) tensors, and the per-head depth-wise conv is one grouped conv with the head kernel
    tiled over the heads, on the v map as it already is. q and k share one conv and one focusing pass
    and one split straight into heads; the normalizer divides once. On ONNX Runtime's CPU provider at
    these sizes every node costs tens of microseconds whatever its arithmetic, so the node count is
    kept low. Focusing, the normalizer and both products stay in fp32.
    """

    def forward(self, x):
        B, C, H, W = x.shape
        dtype, heads = x.dtype, self.num_heads
        inv_scale = 1 / F.softplus(self.scale.float()).reshape(C)
        q, k, v = self._qkv(x, inv_scale)  # q, k: focused fp32 (B, heads, d, N or M)
        den = k.sum(dim=-1, keepdim=True).transpose(-2, -1) @ q + 1e-6  # (B, heads, 1, N)
        out = ((_heads(v.float(), heads) @ k.transpose(-2, -1)) @ q) / den  # (kᵀv)ᵀ q, channel-major
        vmap = v if self.sr_ratio == 1 else F.interpolate(v.flatten(2), size=H * W, mode="linear")
        # cast after the reshape: ONNX Runtime then drops the fp16 round trip into its fp32 Add (a Cast pair per block)
        out = out.reshape(B, C, H, W).to(dtype) + self._dwc_heads(vmap.reshape(B, C, H, W))
        return self.proj_drop(_conv1x1(out, self.proj))

    def _qkv(self, x, inv_scale):
        """Focused q and k (fp32, (B, heads, d, N) / (B, heads, d, M)) and v (input dtype, NCHW).
        relu(t) / scale == relu(t / scale) (scale > 0): the division is folded into the q and k weights."""
        C, heads = x.shape[1], self.num_heads
        # ReLU right after the conv (before the cast and reshape, which it commutes with) fuses into it
        if self.sr_ratio == 1:  # q and k in one conv and one focusing pass, stacked as (B, 2, C, N)
            qk = F.relu(_conv1x1(x, self.q, inv_scale, also=(self.kv, slice(0, C))))
            qk = _focus(qk.float().reshape(x.shape[0], 2, C, -1), inv_scale, self.focusing_factor, dim=2)
            # one split straight into heads: (B, 2 * heads, d, N) -> 2 x (B, heads, d, N), no squeezes
            q, k = qk.reshape(x.shape[0], 2 * heads, C // heads, -1).split(heads, dim=1)
            return q, k, _conv1x1(x, self.kv, rows=slice(C, 2 * C))
        kv_in = self._kv_input(x)
        q = F.relu(_conv1x1(x, self.q, inv_scale)).float().flatten(2)
        k = F.relu(_conv1x1(kv_in, self.kv, inv_scale, rows=slice(0, C))).float().flatten(2)
        q, k = (_heads(_focus(t, inv_scale, self.focusing_factor, dim=1), heads) for t in (q, k))
        return q, k, _conv1x1(kv_in, self.kv, rows=slice(C, 2 * C))

    def _kv_input(self, x):
        if self.sr_ratio == 1:
            return x
        reduced = self.sr(x)
        b, c, h, w = reduced.shape
        tokens = self.norm(reduced.flatten(2).transpose(1, 2))  # LayerNorm over channels, as the seed
        return tokens.transpose(1, 2).reshape(b, c, h, w)

    def _dwc_heads(self, v):
        """The seed's dwc (one head_dim-channel kernel shared by all heads) as one grouped conv over C channels."""
        heads = self.num_heads
        weight = self.dwc.weight.repeat(heads, 1, 1, 1)
        bias = self.dwc.bias.repeat(heads) if self.dwc.bias is not None else None
        return F.conv2d(v, weight, bias, padding=self.dwc.padding, groups=v.shape[1])


def _conv1x1(x, linear, out_scale=None, rows=slice(None), also=None):
    """nn.Linear over the channels of an NCHW map as a 1x1 convolution: output channels `rows` of `linear`
    (followed by rows `also[1]` of linear `also[0]`), optionally times `out_scale` per output channel of each
    part, folded into the weights. At export the weights are constants: all of this folds away."""
    parts = [(linear, rows)] + ([also] if also else [])
    weights, biases = [], []
    for layer, r in parts:
        w, b = layer.weight[r], layer.bias[r] if layer.bias is not None else torch.zeros_like(layer.weight[r, 0])
        if out_scale is not None:
            w, b = w * out_scale.to(w.dtype)[:, None], b * out_scale.to(b.dtype)
        weights.append(w)
        biases.append(b)
    return F.conv2d(x, torch.cat(weights)[:, :, None, None], torch.cat(biases))


def _heads(t, heads):
    """(B, C, H, W) -> (B, heads, C // heads, H*W): the seed's channel-contiguous heads, channel-major."""
    b, c = t.shape[:2]
    return t.reshape(b, heads, c // heads, -1)  # also takes (B, C, N)


def _focus(t, inv_scale, power, dim):
    """The seed's focusing over the channel axis `dim` (C channels, the axes after it spatial), `t` already
    relu(x / scale): u = t + 1e-6 / scale; u ** p rescaled to the norm of u. In fp32 (the caller casts),
    where u ** 3 does not overflow as the seed's fp16 does; the per-token factor is a (.., 1, N) tensor."""
    eps = (1e-6 * inv_scale).reshape(-1, *([1] * (t.dim() - dim - 1)))
    u = t + eps
    powered = u ** power
    return powered * (u.norm(dim=dim, keepdim=True) / powered.norm(dim=dim, keepdim=True))


# Bottleneck_FLA and C2f_FLA need no twin: their forward is export-clean once FLA inside is swapped.
def reference_output(block, x):
    """(the reference block's output on x, a note where the seed is ill-defined there): off-square maps are
    compared with the seed computation laid out as h x w (the seed FLA is square-only)."""
    h, w = x.shape[-2:]
    if h == w:
        return block(x), ""
    return defined_at(block, h, w)(x), (f"the seed FLA is square-only (int(N**0.5) layout); at {h}x{w} compared "
                                        f"with the seed computation laid out as {h}x{w}")


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
# The twin runs q, k, v, proj and the dwc as convolutions of the block itself (scope ""), the optional sr conv as `sr`.
INT8_LAYERS = ("", "sr")


# What each class looks like when built as the tutorial builds it (export twins are written for this structure).
TEMPLATES = {FocusedLinearAttention: lambda: FocusedLinearAttention(64), Bottleneck_FLA: lambda: Bottleneck_FLA(64, 64),
             C2f_FLA: lambda: C2f_FLA(64, 64)}
