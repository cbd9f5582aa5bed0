"""Triton kernel for S2Shift: one gather per output element, out[b,h,w,c] = x[b, clamp(h+dh), clamp(w+dw), c].

Argument order is the one TensorRT's AOT plugins launch with: tensor inputs, scalar extras, tensor outputs.
Run alone with torch on a CUDA device: `s2_shift_cuda(x, direction)`.
"""

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def s2_shift_kernel(x_ptr, H, W, C, n_elements, y_ptr, DIRECTION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    c = offs % C
    w = (offs // C) % W
    h = (offs // (C * W)) % H
    b = offs // (C * W * H)
    group = tl.where(c < C // 4, 0, tl.where(c < C // 2, 1, tl.where(c < (3 * C) // 4, 2, 3)))
    step = tl.where(group % 2 == 0, -1, 1)  # groups 0, 2 read the previous pixel (+ shift); 1, 3 the next
    if DIRECTION == 1:
        along_h = group < 2
    else:
        along_h = group >= 2
    src_h = tl.minimum(tl.maximum(h + tl.where(along_h, step, 0), 0), H - 1)
    src_w = tl.minimum(tl.maximum(w + tl.where(along_h, 0, step), 0), W - 1)
    value = tl.load(x_ptr + ((b * H + src_h) * W + src_w) * C + c, mask=mask)
    tl.store(y_ptr + offs, value, mask=mask)


def launch(x, y, direction, stream=None):
    """x, y: contiguous (B, H, W, C) CUDA tensors of one dtype."""
    b, h, w, c = x.shape
    n = x.numel()
    s2_shift_kernel[(triton.cdiv(n, BLOCK),)](x, h, w, c, n, y, DIRECTION=direction, BLOCK=BLOCK)


def s2_shift_cuda(x, direction):
    import torch

    x = x.contiguous()
    y = torch.empty_like(x)
    launch(x, y, direction)
    return y


def ptx(dtype, direction, arch=80):
    """Compile the kernel to PTX for (dtype 'fp32'|'fp16', direction): what the AOT plugin embeds."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=s2_shift_kernel,
                    signature={"x_ptr": f"*{dtype}", "H": "i32", "W": "i32", "C": "i32", "n_elements": "i32",
                               "y_ptr": f"*{dtype}"},
                    constexprs={"DIRECTION": direction, "BLOCK": BLOCK})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))
