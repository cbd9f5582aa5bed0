"""Triton kernels for StokenUnfold (3x3 gather) and StokenFold (its adjoint, written as a 9-term gather: no atomics).

Argument order is the one TensorRT's AOT plugins launch with: tensor inputs, scalar extras, tensor outputs.
Run alone with torch on a CUDA device: `unfold_cuda(s)`, `fold_cuda(t)`.
"""

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def unfold_kernel(s_ptr, HH, WW, n_elements, y_ptr, BLOCK: tl.constexpr):
    """y[bc, k, y, x] = s[bc, y + k//3 - 1, x + k%3 - 1] (0 outside the grid); y is (BC, 9, HH, WW)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = offs % WW
    y = (offs // WW) % HH
    k = (offs // (WW * HH)) % 9
    bc = offs // (WW * HH * 9)
    sy = y + k // 3 - 1
    sx = x + k % 3 - 1
    inside = (sy >= 0) & (sy < HH) & (sx >= 0) & (sx < WW)
    value = tl.load(s_ptr + (bc * HH + sy) * WW + sx, mask=mask & inside, other=0.0)
    tl.store(y_ptr + offs, value, mask=mask)


@triton.jit
def fold_kernel(t_ptr, HH, WW, n_elements, y_ptr, BLOCK: tl.constexpr):
    """y[bc, y, x] = sum_k t[bc, k, y - k//3 + 1, x - k%3 + 1], accumulated in fp32; y is (BC, HH, WW)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = offs % WW
    y = (offs // WW) % HH
    bc = offs // (WW * HH)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(9):
        sy = y - k // 3 + 1
        sx = x - k % 3 + 1
        inside = (sy >= 0) & (sy < HH) & (sx >= 0) & (sx < WW)
        acc += tl.load(t_ptr + ((bc * 9 + k) * HH + sy) * WW + sx, mask=mask & inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def launch_unfold(s, y):
    hh, ww = s.shape[-2:]
    n = y.numel()
    unfold_kernel[(triton.cdiv(n, BLOCK),)](s, hh, ww, n, y, BLOCK=BLOCK)


def launch_fold(t, y):
    hh, ww = t.shape[-2:]
    n = y.numel()
    fold_kernel[(triton.cdiv(n, BLOCK),)](t, hh, ww, n, y, BLOCK=BLOCK)


def unfold_cuda(s):
    s = s.contiguous()
    y = s.new_empty(*s.shape[:2], 9, *s.shape[2:])
    launch_unfold(s, y)
    return y


def fold_cuda(t):
    t = t.contiguous()
    y = t.new_empty(*t.shape[:2], *t.shape[3:])
    launch_fold(t, y)
    return y


def ptx(kernel, dtype, arch=80):
    """Compile `unfold_kernel` or `fold_kernel` to PTX for dtype 'fp32'|'fp16': what the AOT plugin embeds."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = "s_ptr" if kernel is unfold_kernel else "t_ptr"
    src = ASTSource(fn=kernel, signature={name: f"*{dtype}", "HH": "i32", "WW": "i32", "n_elements": "i32",
                                          "y_ptr": f"*{dtype}"}, constexprs={"BLOCK": BLOCK})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))
