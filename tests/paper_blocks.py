"""Attention blocks of the kinds real tutorial forks hold, written here from their papers, saved as a fork would.

Each is the kind of code that broke exports as written: top-k window routing (BiFormer), deformable sampling with
`grid_sample` from reference points built with `linspace` and normalised by in-place writes into views (DAT),
local attention over `nn.Unfold` neighbourhoods after `nn.ReflectionPad2d` (ACmix / SASA, with dilations as in
multi-dilated local attention), and adaptive pooling to a fixed grid and back up to the map size (MLCA). The
helpers of tests.user_blocks lay them out as a fork and save a yolov8n holding them.
"""

from tests import user_blocks

SOURCES = {
    # Bi-level routing attention (Zhu et al., 2023): the map is cut into s x s regions; region-level queries and
    # keys (means over each region) give a region affinity; each region attends only to the tokens of its top-k
    # most related regions (gathered), per head; a depthwise conv of V adds local context (LePE).
    "RoutingAttention": '''
        import torch
        from torch import nn


        class RoutingAttention(nn.Module):
            def __init__(self, c, heads=4, regions=4, topk=4):
                super().__init__()
                self.heads, self.regions, self.topk = heads, regions, topk
                self.scale = (c // heads) ** -0.5
                self.qkv = nn.Conv2d(c, 3 * c, 1)
                self.lepe = nn.Conv2d(c, c, 5, padding=2, groups=c)
                self.proj = nn.Conv2d(c, c, 1)

            def forward(self, x):
                b, c, h, w = x.shape
                s, heads = self.regions, self.heads
                rh, rw = h // s, w // s
                q, k, v = self.qkv(x).chunk(3, 1)

                def regions(t):  # (b, s*s regions, tokens per region, c)
                    return t.reshape(b, c, s, rh, s, rw).permute(0, 2, 4, 3, 5, 1).reshape(b, s * s, rh * rw, c)

                qr, kr, vr = regions(q), regions(k), regions(v)
                affinity = qr.mean(2) @ kr.mean(2).transpose(-1, -2)
                index = affinity.topk(self.topk, dim=-1).indices  # (b, regions, topk)
                n = rh * rw
                picked = index[..., None, None].expand(b, s * s, self.topk, n, c)
                kg = torch.gather(kr.unsqueeze(1).expand(b, s * s, s * s, n, c), 2, picked)
                vg = torch.gather(vr.unsqueeze(1).expand(b, s * s, s * s, n, c), 2, picked)
                d = c // heads
                qh = qr.reshape(b, s * s, n, heads, d).transpose(2, 3)
                kh = kg.reshape(b, s * s, self.topk * n, heads, d).transpose(2, 3)
                vh = vg.reshape(b, s * s, self.topk * n, heads, d).transpose(2, 3)
                attn = (qh * self.scale) @ kh.transpose(-1, -2)
                out = (attn.softmax(-1) @ vh).transpose(2, 3).reshape(b, s, s, rh, rw, c)
                out = out.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
                return x + self.proj(out + self.lepe(v))
    ''',
    # Deformable attention (Xia et al., 2022): an offset network on the queries moves a grid of reference points
    # (the centres of a strided key grid, built with linspace of the grid's sizes and normalised to [-1, 1]); keys
    # and values are sampled there from the feature map with bilinear grid_sample, per offset group.
    # `DeformableAttentionInPlace` normalises the points as the paper's code does, by chains of in-place ops on
    # indexed views, which torch's ONNX exporter gets wrong (rewritten at import); `DeformableAttentionHeldView`
    # does it through a view held in a variable, which is not rewritten and fails the block check;
    # `DeformableAttentionFrozenScale` scales the offsets by a tensor made from the sizes, which a trace freezes:
    # right at the export size only.
    "DeformableAttention": '''
        import torch
        import torch.nn.functional as F
        from torch import nn


        class DeformableAttention(nn.Module):
            def __init__(self, c, heads=4, groups=2, stride=2, offset_range=2.0):
                super().__init__()
                self.heads, self.groups, self.offset_range = heads, groups, offset_range
                self.scale = (c // heads) ** -0.5
                cg = c // groups
                self.q = nn.Conv2d(c, c, 1)
                self.kv = nn.Conv2d(c, 2 * c, 1)
                self.offset = nn.Sequential(nn.Conv2d(cg, cg, 3, stride, 1, groups=cg), nn.GELU(),
                                            nn.Conv2d(cg, 2, 1, bias=False))
                self.proj = nn.Conv2d(c, c, 1)

            @staticmethod
            def centres(hk, wk, dtype, device):
                """The key grid's cell centres in pixels: (y, x), each (hk, wk)."""
                return torch.meshgrid(torch.linspace(0.5, hk - 0.5, hk, dtype=dtype, device=device),
                                      torch.linspace(0.5, wk - 0.5, wk, dtype=dtype, device=device), indexing="ij")

            @torch.no_grad()
            def reference(self, hk, wk, dtype, device):
                ref_y, ref_x = self.centres(hk, wk, dtype, device)
                return torch.stack((ref_y / hk * 2 - 1, ref_x / wk * 2 - 1), -1)[None]  # (1, hk, wk, 2) as (y, x)

            @staticmethod
            def normalised(offset, hk, wk):
                """(b, 2, hk, wk) key-grid pixels -> (b, hk, wk, 2) in grid_sample's [-1, 1] units."""
                return torch.stack((offset[:, 0] / hk, offset[:, 1] / wk), -1) * 2

            def forward(self, x):
                b, c, h, w = x.shape
                g, cg = self.groups, c // self.groups
                q = self.q(x)
                offset = self.offset(q.reshape(b * g, cg, h, w))  # (b*g, 2, hk, wk) in key-grid pixels
                hk, wk = offset.shape[2:]
                offset = self.normalised(offset.tanh() * self.offset_range, hk, wk)
                pos = (offset + self.reference(hk, wk, x.dtype, x.device)).clamp(-1, 1)
                sampled = F.grid_sample(x.reshape(b * g, cg, h, w), pos[..., (1, 0)], mode="bilinear",
                                        align_corners=True)
                k, v = self.kv(sampled.reshape(b, c, hk, wk)).reshape(b, 2, self.heads, c // self.heads,
                                                                       hk * wk).unbind(1)
                qh = q.reshape(b, self.heads, c // self.heads, h * w)
                attn = (qh.transpose(-1, -2) @ k * self.scale).softmax(-1)  # (b, heads, hw, hk*wk)
                out = (v @ attn.transpose(-1, -2)).reshape(b, c, h, w)
                return x + self.proj(out)


        class DeformableAttentionInPlace(DeformableAttention):
            @torch.no_grad()
            def reference(self, hk, wk, dtype, device):
                ref = torch.stack(self.centres(hk, wk, dtype, device), -1)
                ref[..., 1].div_(wk).mul_(2).sub_(1)
                ref[..., 0].div_(hk).mul_(2).sub_(1)
                return ref[None]


        class DeformableAttentionHeldView(DeformableAttention):
            @torch.no_grad()
            def reference(self, hk, wk, dtype, device):
                ref = torch.stack(self.centres(hk, wk, dtype, device), -1)
                xs = ref[..., 1]
                xs.div_(wk)
                xs.mul_(2).sub_(1)
                ref[..., 0] = ref[..., 0] / hk * 2 - 1
                return ref[None]


        class DeformableAttentionFrozenScale(DeformableAttention):
            @staticmethod
            def normalised(offset, hk, wk):  # as the paper's code: the sizes become a constant tensor in a trace
                scale = torch.tensor([1.0 / hk, 1.0 / wk], dtype=offset.dtype, device=offset.device)
                return (offset * scale.reshape(1, 2, 1, 1) * 2).permute(0, 2, 3, 1)
    ''',
    # Local self-attention over k x k neighbourhoods (SASA / ACmix's attention path), with heads split over
    # dilation rates as in multi-dilated local attention: reflection padding, then nn.Unfold gathers each pixel's
    # neighbourhood of keys and values; a softmax over the neighbourhood weights the values.
    "LocalUnfoldAttention": '''
        import torch
        from torch import nn


        class LocalUnfoldAttention(nn.Module):
            def __init__(self, c, heads=4, k=3, dilations=(1, 2)):
                super().__init__()
                self.heads, self.k, self.dilations = heads, k, dilations
                self.scale = (c // heads) ** -0.5
                self.qkv = nn.Conv2d(c, 3 * c, 1)
                self.pads = nn.ModuleList(nn.ReflectionPad2d(r * (k // 2)) for r in dilations)
                self.unfolds = nn.ModuleList(nn.Unfold(k, dilation=r) for r in dilations)
                self.proj = nn.Conv2d(c, c, 1)

            def forward(self, x):
                b, c, h, w = x.shape
                q, key, v = self.qkv(x).chunk(3, 1)
                parts, n = [], len(self.dilations)
                cd = c // n
                for i, (pad, unfold) in enumerate(zip(self.pads, self.unfolds)):
                    sl = slice(i * cd, (i + 1) * cd)
                    hd = self.heads // n
                    d = cd // hd
                    kk = unfold(pad(key[:, sl])).reshape(b * hd, d, self.k * self.k, h * w)
                    vv = unfold(pad(v[:, sl])).reshape(b * hd, d, self.k * self.k, h * w)
                    qq = q[:, sl].reshape(b * hd, d, 1, h * w) * self.scale
                    attn = (qq * kk).sum(1, keepdim=True).softmax(2)
                    parts.append((attn * vv).sum(2).reshape(b, cd, h, w))
                return x + self.proj(torch.cat(parts, 1))
    ''',
    # Mixed local channel attention (MLCA, Wan et al., 2023): the map is pooled to a fixed local grid and to one
    # value; 1-D convs across channels give local and global channel weights; the global one is spread over the
    # grid, mixed with the local one, and pooled back up to the map size to gate the input.
    "MixedLocalChannel": '''
        import math

        import torch.nn.functional as F
        from torch import nn


        class MixedLocalChannel(nn.Module):
            def __init__(self, c, local=5, mix=0.5):
                super().__init__()
                self.local, self.mix = local, mix
                t = int(abs(math.log(c, 2) + 1) / 2)
                k = t if t % 2 else t + 1
                self.conv_local = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
                self.conv_global = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

            def forward(self, x):
                b, c, m, n = x.shape
                s = self.local
                local = F.adaptive_avg_pool2d(x, s)
                glob = F.adaptive_avg_pool2d(local, 1)
                yl = self.conv_local(local.reshape(b, c, s * s).transpose(1, 2).reshape(b, 1, -1))
                yl = yl.reshape(b, s * s, c).transpose(1, 2).reshape(b, c, s, s)
                yg = self.conv_global(glob.reshape(b, 1, c)).reshape(b, c, 1, 1)
                att = F.adaptive_avg_pool2d(yg.sigmoid(), [s, s]) * (1 - self.mix) + yl.sigmoid() * self.mix
                return x * F.adaptive_avg_pool2d(att, [m, n])
    ''',
    # Deformable large-kernel attention (D-LKA, Azad et al., 2023): the large-kernel attention's depthwise 5x5
    # and dilated 7x7 convolutions made deformable (torchvision's DeformConv2d, offsets and a DCNv2 modulation
    # mask from plain convs), a 1x1 conv, and the result gating the input.
    "DeformableLKA": '''
        from torch import nn
        from torchvision.ops import DeformConv2d


        class DeformableDepthwise(nn.Module):
            def __init__(self, c, k, dilation=1):
                super().__init__()
                pad = dilation * (k - 1) // 2
                self.offset = nn.Conv2d(c, 2 * k * k, 3, padding=1)
                self.modulation = nn.Conv2d(c, k * k, 3, padding=1)
                self.dcn = DeformConv2d(c, c, k, padding=pad, dilation=dilation, groups=c)

            def forward(self, x):
                return self.dcn(x, self.offset(x), self.modulation(x).sigmoid())


        class DeformableLKA(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.conv0 = DeformableDepthwise(c, 5)
                self.conv_spatial = DeformableDepthwise(c, 7, dilation=3)
                self.conv1 = nn.Conv2d(c, c, 1)

            def forward(self, x):
                return x + x * self.conv1(self.conv_spatial(self.conv0(x)))
    ''',
    # A hand-written RMS gate whose sum of squares overflows fp16 (65504) on real activations: exact in fp32,
    # zero in fp16, the way hand-rolled norms in attention forks fail in half precision.
    "ScaledGate": '''
        import torch
        from torch import nn


        class ScaledGate(nn.Module):
            def __init__(self, c, gain=1e5):
                super().__init__()
                self.gain = gain
                self.mix = nn.Conv2d(c, c, 1)

            def forward(self, x):
                energy = (x * self.gain).pow(2).mean(1, keepdim=True)
                return self.mix(x) * torch.rsqrt(energy + 1.0) * self.gain
    ''',
}
# yolov8n at 128: layer 12 and 18 are P4 (8x8), 15 P3 (16x16), 21 P5 (4x4).
PLACEMENT = {9: ("DeformableLKA", 256), 12: ("MixedLocalChannel", 128), 15: ("RoutingAttention", 64),
             18: ("DeformableAttention:DeformableAttentionInPlace", 128), 21: ("LocalUnfoldAttention", 256)}


def write_fork(root):
    return user_blocks.write_fork(root, sources=SOURCES)


def save_checkpoint(root, path, placement=PLACEMENT):
    return user_blocks.save_checkpoint(root, path, placement=placement)


# Blocks named like our four families but built differently, as forks reuse the tutorial names for variants
# (an attention core without the block's convolutions, another formulation). Each file is named after the fork's
# own module, not ours.
LOOKALIKES = {
    # MLLA's attention core only (no cpe1/cpe2, norms or MLP): linear attention with ELU+1 features and a rotary
    # embedding by rotate-half on q and k.
    "MLLAcore": '''
        import torch
        import torch.nn.functional as F
        from torch import nn


        class MLLAttention(nn.Module):
            def __init__(self, c1, num_heads=4):
                super().__init__()
                self.num_heads = num_heads
                self.qkv = nn.Linear(c1, 3 * c1)
                self.proj = nn.Linear(c1, c1)

            @staticmethod
            def rotate(t, n):
                half = t.shape[-1] // 2
                freq = 1.0 / 10000 ** (torch.arange(half, dtype=t.dtype, device=t.device) / half)
                angle = torch.arange(n, dtype=t.dtype, device=t.device)[:, None] * freq
                cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
                return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

            def forward(self, x):
                b, c, h, w = x.shape
                n, heads = h * w, self.num_heads
                q, k, v = self.qkv(x.flatten(2).transpose(1, 2)).reshape(b, n, 3, heads, c // heads).unbind(2)
                q, k = F.elu(q) + 1, F.elu(k) + 1
                q, k, v = (t.transpose(1, 2) for t in (q, k, v))
                qr, kr = self.rotate(q, n), self.rotate(k, n)
                z = 1 / (q @ k.mean(2, keepdim=True).transpose(-1, -2) + 1e-6)
                out = (qr @ (kr.transpose(-1, -2) @ v / n)) * z
                return x + self.proj(out.transpose(1, 2).reshape(b, n, c)).transpose(1, 2).reshape(b, c, h, w)
    ''',
    # Focused linear attention without the depthwise conv and positional encoding: focusing power 3 on ReLU
    # features, computed with 1x1 convs.
    "FLAlite": '''
        import torch
        from torch import nn


        class FocusedLinearAttention(nn.Module):
            def __init__(self, dim, num_heads=4, focusing_factor=3):
                super().__init__()
                self.num_heads, self.focusing_factor = num_heads, focusing_factor
                self.qkv = nn.Conv2d(dim, 3 * dim, 1)
                self.out = nn.Conv2d(dim, dim, 1)

            def focus(self, t):
                t = torch.relu(t) + 1e-6
                norm = t.norm(dim=-1, keepdim=True)
                t = t ** self.focusing_factor
                return t / t.norm(dim=-1, keepdim=True) * norm

            def forward(self, x):
                b, c, h, w = x.shape
                q, k, v = self.qkv(x).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
                q, k = self.focus(q.transpose(-1, -2)), self.focus(k.transpose(-1, -2))
                kv = k.transpose(-1, -2) @ v.transpose(-1, -2)
                z = 1 / (q @ k.sum(-2, keepdim=True).transpose(-1, -2) + 1e-6)
                out = (q @ kv * z).transpose(-1, -2).reshape(b, c, h, w)
                return x + self.out(out)
    ''',
    # Super tokens by average pooling and one cross attention from pixels to them (no iterations, no refine).
    "STAlite": '''
        import torch.nn.functional as F
        from torch import nn


        class StokenAttention(nn.Module):
            def __init__(self, dim, stoken=4):
                super().__init__()
                self.stoken = stoken
                self.q, self.kv = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, 2 * dim, 1)

            def forward(self, x):
                b, c, h, w = x.shape
                tokens = F.adaptive_avg_pool2d(x, self.stoken)
                k, v = self.kv(tokens).flatten(2).chunk(2, 1)
                q = self.q(x).flatten(2)
                attn = (q.transpose(1, 2) @ k * c ** -0.5).softmax(-1)
                return x + (v @ attn.transpose(1, 2)).reshape(b, c, h, w)
    ''',
    # S2-MLP's shift without the split attention: a channel MLP, four one-pixel shifts by torch.roll, another MLP.
    "S2lite": '''
        import torch
        from torch import nn


        class S2Attention(nn.Module):
            def __init__(self, channels):
                super().__init__()
                self.mlp1, self.mlp2 = nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1)

            def forward(self, x):
                y = self.mlp1(x)
                g = y.shape[1] // 4
                parts = [torch.roll(y[:, :g], 1, 2), torch.roll(y[:, g:2 * g], -1, 2),
                         torch.roll(y[:, 2 * g:3 * g], 1, 3), torch.roll(y[:, 3 * g:], -1, 3)]
                return x + self.mlp2(torch.cat(parts, 1))
    ''',
}
LOOKALIKE_PLACEMENT = {12: ("MLLAcore:MLLAttention", 128), 15: ("FLAlite:FocusedLinearAttention", 64),
                       18: ("STAlite:StokenAttention", 128), 21: ("S2lite:S2Attention", 256)}
