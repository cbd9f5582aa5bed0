"""Super Token Attention (STViT, seed 002).

Reference twins keep the seed's names (StokenAttention with `unfold`/`fold` identity-kernel banks
and `stoken_refine`; StAttention is upstream's `Attention`). The export twin replaces the conv
banks by nine shifted slices (unfold) and nine shifted adds (fold), adaptive pooling by avg-pool
after explicit padding, and never branches on shapes; the clustering runs in fp32 because the
1e-12 normaliser is zero in fp16 and the affinity logits overflow it.
"""

import torch
import torch.nn.functional as F
from torch import nn


def identity_bank(kernel_size):
    """k*k one-hot kernels: as conv it gathers each pixel's k x k neighbourhood, as conv_transpose it scatters back."""
    eye = torch.eye(kernel_size ** 2).reshape(kernel_size ** 2, 1, kernel_size, kernel_size)
    return nn.Parameter(eye, requires_grad=False)


class Unfold(nn.Module):
    def __init__(self, kernel_size=3):
        super().__init__()
        self.kernel_size = kernel_size
        self.weights = identity_bank(kernel_size)

    def forward(self, x):
        b, c, h, w = x.shape
        x = F.conv2d(x.reshape(b * c, 1, h, w), self.weights, stride=1, padding=self.kernel_size // 2)
        return x.reshape(b, c * 9, h * w)


class Fold(nn.Module):
    def __init__(self, kernel_size=3):
        super().__init__()
        self.kernel_size = kernel_size
        self.weights = identity_bank(kernel_size)

    def forward(self, x):
        return F.conv_transpose2d(x, self.weights, stride=1, padding=self.kernel_size // 2)


class StAttention(nn.Module):
    """Multi-head attention over super tokens: qkv per head as [q|k|v] blocks, softmax over keys."""

    def __init__(self, dim, window_size=None, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.window_size = window_size
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Conv2d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, C, H, W = x.shape
        N = H * W
        q, k, v = self.qkv(x).reshape(B, self.num_heads, C // self.num_heads * 3, N).chunk(3, dim=2)
        attn = (k.transpose(-1, -2) @ q) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-2))
        x = (v @ attn).reshape(B, C, H, W)
        return self.proj_drop(self.proj(x))


class StokenAttention(nn.Module):
    def __init__(self, dim, stoken_size=(8, 8), n_iter=1, num_heads=8, qkv_bias=False, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.n_iter = n_iter
        self.stoken_size = list(stoken_size)
        self.scale = dim ** -0.5
        self.unfold = Unfold(3)
        self.fold = Fold(3)
        self.stoken_refine = StAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                         attn_drop=attn_drop, proj_drop=proj_drop)

    def stoken_forward(self, x):
        B, C, H0, W0 = x.shape
        h, w = self.stoken_size
        pad_r, pad_b = (w - W0 % w) % w, (h - H0 % h) % h
        if pad_r > 0 or pad_b > 0:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        _, _, H, W = x.shape
        hh, ww = H // h, W // w
        stoken_features = F.adaptive_avg_pool2d(x, (hh, ww))
        pixel_features = x.reshape(B, C, hh, h, ww, w).permute(0, 2, 4, 3, 5, 1).reshape(B, hh * ww, h * w, C)
        with torch.no_grad():
            for idx in range(self.n_iter):
                stoken_features = self.unfold(stoken_features)
                stoken_features = stoken_features.transpose(1, 2).reshape(B, hh * ww, C, 9)
                affinity_matrix = (pixel_features @ stoken_features * self.scale).softmax(-1)
                affinity_matrix_sum = affinity_matrix.sum(2).transpose(1, 2).reshape(B, 9, hh, ww)
                affinity_matrix_sum = self.fold(affinity_matrix_sum)
                if idx < self.n_iter - 1:
                    stoken_features = pixel_features.transpose(-1, -2) @ affinity_matrix
                    stoken_features = self.fold(stoken_features.permute(0, 2, 3, 1).reshape(B * C, 9, hh, ww)).reshape(B, C, hh, ww)
                    stoken_features = stoken_features / (affinity_matrix_sum + 1e-12)
        stoken_features = pixel_features.transpose(-1, -2) @ affinity_matrix
        stoken_features = self.fold(stoken_features.permute(0, 2, 3, 1).reshape(B * C, 9, hh, ww)).reshape(B, C, hh, ww)
        stoken_features = stoken_features / (affinity_matrix_sum.detach() + 1e-12)
        stoken_features = self.stoken_refine(stoken_features)
        stoken_features = self.unfold(stoken_features)
        stoken_features = stoken_features.transpose(1, 2).reshape(B, hh * ww, C, 9)
        pixel_features = stoken_features @ affinity_matrix.transpose(-1, -2)
        pixel_features = pixel_features.reshape(B, hh, ww, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        if pad_r > 0 or pad_b > 0:
            pixel_features = pixel_features[:, :, :H0, :W0]
        return pixel_features

    def direct_forward(self, x):
        return self.stoken_refine(x)

    def forward(self, x):
        if self.stoken_size[0] > 1 or self.stoken_size[1] > 1:
            return self.stoken_forward(x)
        return self.direct_forward(x)


def stoken_unfold(s):
    """3x3 neighbourhood gather: (..., hh, ww) -> (..., 9, hh, ww), zeros outside the grid.

    Index k = 3*dy + dx holds s[y + dy - 1, x + dx - 1], the order of the seed's identity conv bank.
    """
    hh, ww = s.shape[-2:]
    padded = F.pad(s, (1, 1, 1, 1))
    return torch.stack([padded[..., dy:dy + hh, dx:dx + ww] for dy in range(3) for dx in range(3)], dim=-3)


def stoken_fold(t):
    """3x3 scatter-add, the adjoint of stoken_unfold: (..., 9, hh, ww) -> (..., hh, ww)."""
    hh, ww = t.shape[-2:]
    padded = F.pad(t, (1, 1, 1, 1))
    out = padded[..., 0, 2:2 + hh, 2:2 + ww]
    for k in range(1, 9):
        dy, dx = divmod(k, 3)
        out = out + padded[..., k, 2 - dy:2 - dy + hh, 2 - dx:2 - dx + ww]
    return out


class StAttentionExport(StAttention):
    """Super-token attention with logits and softmax in fp32 and -1 reshapes for dynamic grids."""

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).float().reshape(B, self.num_heads, 3 * C // self.num_heads, -1).chunk(3, dim=2)
        attn = ((k.transpose(-1, -2) @ q) * self.scale).softmax(dim=-2)
        out = (v @ attn).reshape(B, C, H, W).to(x.dtype)
        return self.proj_drop(self.proj(out))


class StokenAttentionExport(StokenAttention):
    def forward(self, x):
        h, w = self.stoken_size
        if h == 1 and w == 1:
            return self.stoken_refine(x)
        return self._stoken(x, h, w)

    def _stoken(self, x, h, w):
        shape = x.shape
        B, C, H0, W0 = shape
        # Always pad and crop (by zero when aligned): no shape branch freezes at trace time.
        x = F.pad(x, (0, (w - W0 % w) % w, 0, (h - H0 % h) % h))
        H, W = x.shape[-2:]
        hh, ww = H // h, W // w
        pixels = x.float().reshape(B, C, hh, h, ww, w).permute(0, 2, 4, 3, 5, 1).reshape(B, hh * ww, h * w, C)
        stokens = F.avg_pool2d(x.float(), (h, w), (h, w))
        for _ in range(self.n_iter):
            affinity = (pixels @ self._neighbours(stokens) * self.scale).softmax(-1)
            affinity_sum = self._fold(affinity.sum(2).transpose(1, 2).reshape(B, 1, 9, hh, ww))
            gathered = (pixels.transpose(-1, -2) @ affinity).permute(0, 2, 3, 1).reshape(B, C, 9, hh, ww)
            stokens = self._fold(gathered) / (affinity_sum + 1e-12)
        refined = self.stoken_refine(stokens.to(x.dtype)).float()
        out = self._neighbours(refined) @ affinity.transpose(-1, -2)
        out = out.reshape(B, hh, ww, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)
        # Reshape to the input's own shape: the crop's size is then visibly the input's, which TensorRT's
        # shape analysis needs with dynamic H, W (it cannot reduce the pad-and-crop arithmetic).
        return out[:, :, :H0, :W0].reshape(shape).to(x.dtype)

    def _neighbours(self, stokens):
        """(B, C, hh, ww) -> (B, hh*ww, C, 9): each super token's 3x3 neighbourhood."""
        B, C = stokens.shape[:2]
        return self._unfold(stokens).flatten(3).permute(0, 3, 1, 2).reshape(B, -1, C, 9)

    def _unfold(self, s):
        """(B, C, hh, ww) -> (B, C, 9, hh, ww): slices when the bank is the identity, else the trained bank."""
        return stoken_unfold(s) if is_identity_bank(self.unfold.weights) else bank_unfold(s, self.unfold.weights)

    def _fold(self, t):
        """(B, C, 9, hh, ww) -> (B, C, hh, ww): shifted adds when the bank is the identity, else the trained bank."""
        return stoken_fold(t) if is_identity_bank(self.fold.weights) else bank_fold(t, self.fold.weights)


def is_identity_bank(weights):
    """Is this Unfold/Fold bank still the 3x3 identity? ultralytics' trainer resets requires_grad=True on frozen
    parameters, so banks of STA models trained there drift; then only the conv-bank form is exact."""
    return torch.equal(weights, torch.eye(9, dtype=weights.dtype, device=weights.device).reshape(9, 1, 3, 3))


def bank_unfold(s, weights):
    """The seed's unfold with whatever bank it holds: Conv over (B*C, 1, hh, ww) (TensorRT imports Conv)."""
    b, c, hh, ww = s.shape
    return F.conv2d(s.reshape(-1, 1, hh, ww), weights.to(s.dtype), padding=1).reshape(b, c, 9, hh, ww)


def bank_fold(t, weights):
    """The seed's fold with whatever bank it holds: ConvTranspose (TensorRT imports it; F.fold's Col2Im it does not)."""
    b, c, _, hh, ww = t.shape
    return F.conv_transpose2d(t.reshape(-1, 9, hh, ww), weights.to(t.dtype), padding=1).reshape(b, c, hh, ww)




def reference_output(block, x):
    """(the reference block's output on x, a note when its identity kernel banks were trained)."""
    if not isinstance(block, StokenAttention):
        return block(x), ""
    drift = max((bank.weights - identity_bank(3)).abs().max().item() for bank in (block.unfold, block.fold))
    if drift == 0:
        return block(x), ""
    return block(x), (f"the STA identity kernel banks were trained (max drift {drift:.3g}: ultralytics "
                      f"re-enables requires_grad on them); the twin computes with the trained banks "
                      f"(Conv/ConvTranspose, or the plugin ops with the bank as input)")


EXPORT_TWINS = {StokenAttention: StokenAttentionExport, StAttention: StAttentionExport}
YAML_MODULES = {"StokenAttention": ("attention", StokenAttention)}

# Names a checkpoint pickled from the tutorial code may reference, under any module path.
# INT8 (calib.rules): the refine block's qkv and proj convs go int8; the affinity softmax, its sums, the
# normalizing division and the unfold/fold kernel banks (data movement, trained near-identity) stay float.
INT8_LAYERS = ("stoken_refine.qkv", "stoken_refine.proj")

CHECKPOINT_NAMES = ("StokenAttention", "StAttention", "Unfold", "Fold")


# What each class looks like when built as the tutorial builds it (export twins are written for this structure).
TEMPLATES = {StokenAttention: lambda: StokenAttention(64), StAttention: lambda: StAttention(64),
             Unfold: lambda: Unfold(), Fold: lambda: Fold()}
