"""Mamba-Like Linear Attention (MLLA, seeds 000/003) and the NCHW YOLO adapter MLLAttention.

Reference twins keep upstream's names (MLLABlock, LinearAttention, RoPE, Mlp and the buffer
`rope.rotations`) and rotate with complex numbers as upstream does. MLLAttention, as this project
defines it, takes NCHW and rotates with a RoPE table for the actual H x W. The export twin rotates
channel pairs in real arithmetic, builds the table in the graph from H and W, and keeps the
linear-attention core in fp32.
"""

import torch
from torch import nn


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth; identity in eval, which is all export ever sees."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def rope_angles(h, w, dim, base=10000, device=None):
    """(h, w, dim/2) angles: pairs j < dim/4 turn by row*theta_j, the rest by col*theta_(j-dim/4)."""
    k_max = dim // 4
    theta = 1 / (base ** (torch.arange(k_max, device=device) / k_max))
    rows = torch.arange(h, device=device).float()[:, None, None] * theta
    cols = torch.arange(w, device=device).float()[None, :, None] * theta
    return torch.cat([rows.expand(-1, w, -1), cols.expand(h, -1, -1)], dim=-1)


def rope_table(h, w, dim, base=10000, device=None):
    """The `rotations` buffer upstream builds at construction: (h, w, dim/2, 2) as (cos, sin)."""
    angles = rope_angles(h, w, dim, base, device)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


class RoPE(nn.Module):
    def __init__(self, shape, base=10000):
        super().__init__()
        channel_dims, feature_dim = shape[:-1], shape[-1]
        k_max = feature_dim // (2 * len(channel_dims))
        assert feature_dim % k_max == 0
        self.register_buffer("rotations", rope_table(*channel_dims, feature_dim, base))

    def forward(self, x, rotations=None):
        """x (B, H, W, C); upstream always returns fp32, whatever the input."""
        rotations = self.rotations if rotations is None else rotations
        x = x.to(torch.float32)
        x = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(torch.view_as_complex(rotations) * x).flatten(-2)


class LinearAttention(nn.Module):
    def __init__(self, dim, input_resolution, num_heads, qkv_bias=True, **kwargs):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.elu = nn.ELU()
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.rope = RoPE(shape=(input_resolution[0], input_resolution[1], dim))

    def forward(self, x):
        n = x.shape[1]
        side = int(n ** 0.5)  # upstream: square maps only
        return self.attend(x, side, side)

    def attend(self, x, h, w, rotations=None):
        b, n, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        qk = self.qk(x).reshape(b, n, 2, c).permute(2, 0, 1, 3)
        q, k, v = qk[0], qk[1], x
        q = self.elu(q) + 1.0
        k = self.elu(k) + 1.0
        q_rope = self.rope(q.reshape(b, h, w, c), rotations).reshape(b, n, heads, head_dim).permute(0, 2, 1, 3)
        k_rope = self.rope(k.reshape(b, h, w, c), rotations).reshape(b, n, heads, head_dim).permute(0, 2, 1, 3)
        q = q.reshape(b, n, heads, head_dim).permute(0, 2, 1, 3)
        k = k.reshape(b, n, heads, head_dim).permute(0, 2, 1, 3)
        v = v.reshape(b, n, heads, head_dim).permute(0, 2, 1, 3)
        z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        kv = (k_rope.transpose(-2, -1) * (n ** -0.5)) @ (v * (n ** -0.5))
        x = q_rope @ kv * z
        x = x.transpose(1, 2).reshape(b, n, c)
        v = v.transpose(1, 2).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.lepe(v).permute(0, 2, 3, 1).reshape(b, n, c)


class MLLABlock(nn.Module):
    def __init__(self, dim, input_resolution, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, **kwargs):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = norm_layer(dim)
        self.in_proj = nn.Linear(dim, dim)
        self.act_proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.SiLU()
        self.attn = LinearAttention(dim=dim, input_resolution=input_resolution, num_heads=num_heads, qkv_bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x):
        H, W = self.input_resolution
        assert x.shape[1] == H * W, "input feature has wrong size"
        return self.block(x, H, W, lambda t: self.attn(t))

    def block(self, x, H, W, attend):
        B, L, C = x.shape
        x = x + self.cpe1(x.reshape(B, H, W, C).permute(0, 3, 1, 2)).flatten(2).permute(0, 2, 1)
        shortcut = x
        x = self.norm1(x)
        act_res = self.act(self.act_proj(x))
        x = self.in_proj(x).view(B, H, W, C)
        x = self.act(self.dwc(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1).reshape(B, L, C)
        x = attend(x)
        x = self.out_proj(x * act_res)
        x = shortcut + self.drop_path(x)
        x = x + self.cpe2(x.reshape(B, H, W, C).permute(0, 3, 1, 2)).flatten(2).permute(0, 2, 1)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MLLAttention(MLLABlock):
    """YOLO adapter: NCHW in and out, RoPE for the actual H x W (the stored table is the training size only)."""

    def __init__(self, c1, num_heads=8, mlp_ratio=4.0, qkv_bias=True, input_resolution=(20, 20)):
        super().__init__(dim=c1, input_resolution=tuple(input_resolution), num_heads=num_heads,
                         mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)

    def forward(self, x):
        B, C, H, W = x.shape
        rotations = rope_table(H, W, C, device=x.device)
        tokens = x.flatten(2).transpose(1, 2)
        out = self.block(tokens, H, W, lambda t: self.attn.attend(t, H, W, rotations))
        return out.transpose(1, 2).reshape(B, C, H, W)


class MLLAttentionExport(MLLAttention):
    """NCHW MLLA with no complex numbers, no square assumption, fp32 attention core."""

    def forward(self, x):
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.cpe1(x).flatten(2).transpose(1, 2)
        shortcut = tokens
        y = self.norm1(tokens)
        act_res = self.act(self.act_proj(y))
        y = self.act(self.dwc(_to_map(self.in_proj(y), H, W))).flatten(2).transpose(1, 2)
        y = self.out_proj(self._attend(y, H, W) * act_res)
        tokens = shortcut + y
        tokens = tokens + self.cpe2(_to_map(tokens, H, W)).flatten(2).transpose(1, 2)
        tokens = tokens + self.mlp(self.norm2(tokens))
        return _to_map(tokens, H, W)

    def _attend(self, x, h, w):
        attn, heads = self.attn, self.attn.num_heads
        b, n, c = x.shape
        # q and k stay stacked (B, N, 2C) through elu + 1 and RoPE: one node per step instead of two, and the
        # rotation is t * cos + swap(t) * sin, the pair swap a matmul with a 2x2 constant (on ONNX Runtime's CPU
        # provider a third of the time of a Gather on the channel axis), not per-pair slices and a stack
        qk = attn.elu(attn.qk(x).float()) + 1.0
        cos, sin = _rope_factors(h, w, c, x.device)
        rotated = qk * cos + _swap_pairs(qk) * sin
        q, k_mean = _heads(qk[..., :c], heads), _token_mean(qk[..., c:])
        q_rope, k_rope = (_heads(t, heads) for t in rotated.chunk(2, dim=-1))
        v = _heads(x.float(), heads)
        z = 1 / (q @ _heads(k_mean, heads).transpose(-2, -1) + 1e-6)
        kv = (k_rope.transpose(-2, -1) @ v) / n
        out = ((q_rope @ kv) * z).transpose(1, 2).reshape(b, n, c).to(x.dtype)
        return out + attn.lepe(_to_map(x, h, w)).flatten(2).transpose(1, 2)


def _rope_factors(h, w, c, device):
    """(1, N, 2C) cos and signed sin for rotating channel pairs of stacked q and k: pair (2j, 2j+1) becomes
    (e cos - o sin, e sin + o cos) = t * cos + swap(t) * (-sin, sin). Built in the graph from H and W;
    a static-size export folds them to constants."""
    angles = rope_angles(h, w, c, device=device).reshape(1, h * w, c // 2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    cos, sin = torch.stack([cos, cos], dim=-1).flatten(-2), torch.stack([-sin, sin], dim=-1).flatten(-2)
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def _token_mean(t):
    """Mean over the tokens of (B, N, C) as a matmul with 1/N: ONNX Runtime's CPU ReduceMean over the token axis
    took three times as long."""
    return torch.full((1, t.shape[1]), 1 / t.shape[1], dtype=t.dtype, device=t.device) @ t


def _swap_pairs(t):
    """t with each channel pair (2j, 2j+1) swapped: exact (one 1 and one 0 per output)."""
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=t.dtype, device=t.device)
    return (t.unflatten(-1, (-1, 2)) @ swap).flatten(-2)


def _heads(t, heads):
    b, n, c = t.shape
    return t.reshape(b, n, heads, c // heads).transpose(1, 2)


def _to_map(tokens, h, w):
    b, n, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, h, w)


EXPORT_TWINS = {MLLAttention: MLLAttentionExport}
YAML_MODULES = {"MLLAttention": ("attention", MLLAttention)}

# Names a checkpoint pickled from the tutorial/upstream code may reference, under any module path
# (DropPath: timm's, which upstream uses).
# INT8 (calib.rules): projections, MLP and the depth-wise convs go int8; the RoPE rotation, the LayerNorms,
# the linear-attention sums and normalizer stay float.
# Names are the ONNX node scopes inside the block (the twin calls attn's layers itself: `qk`, not `attn.qk`).
INT8_LAYERS = ("cpe1", "in_proj", "act_proj", "dwc", "qk", "lepe", "out_proj", "cpe2", "mlp.fc1", "mlp.fc2")

CHECKPOINT_NAMES = ("MLLAttention", "MLLABlock", "LinearAttention", "RoPE", "Mlp", "DropPath")


# What each class looks like when built as the tutorial builds it (export twins are written for this structure).
TEMPLATES = {MLLAttention: lambda: MLLAttention(64), MLLABlock: lambda: MLLABlock(64, (8, 8), 4),
             LinearAttention: lambda: LinearAttention(64, (8, 8), 4), RoPE: lambda: RoPE((8, 8, 64)),
             Mlp: lambda: Mlp(64), DropPath: lambda: DropPath()}
