"""Triton kernels for StokenUnfold / StokenFold with a 9x1x3x3 bank w (any values: trained banks are not the identity).

Both are gathers (no atomics), accumulated in fp32. Argument order is the one TensorRT's AOT plugins launch
with: tensor inputs, scalar extras, tensor outputs. Run alone with torch on a CUDA device:
`unfold_cuda(s, w)`, `fold_cuda(t, w)`.
"""

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def unfold_kernel(s_ptr, w_ptr, HH, WW, n_elements, y_ptr, BLOCK: tl.constexpr):
    """y[bc, k, y, x] = sum_ij w[k, i, j] * s[bc, y + i - 1, x + j - 1]; y is (BC, 9, HH, WW)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = offs % WW
    y = (offs // WW) % HH
    k = (offs // (WW * HH)) % 9
    bc = offs // (WW * HH * 9)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for tap in tl.static_range(9):
        sy = y + tap // 3 - 1
        sx = x + tap % 3 - 1
        inside = (sy >= 0) & (sy < HH) & (sx >= 0) & (sx < WW)
        value = tl.load(s_ptr + (bc * HH + sy) * WW + sx, mask=mask & inside, other=0.0).to(tl.float32)
        acc += value * tl.load(w_ptr + k * 9 + tap, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fold_kernel(t_ptr, w_ptr, HH, WW, n_elements, y_ptr, BLOCK: tl.constexpr):
    """y[bc, y, x] = sum_k sum_ij w[k, i, j] * t[bc, k, y - i + 1, x - j + 1]; y is (BC, HH, WW)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = offs % WW
    y = (offs // WW) % HH
    bc = offs // (WW * HH)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(9):
        for tap in tl.static_range(9):
            sy = y - tap // 3 + 1
            sx = x - tap % 3 + 1
            inside = (sy >= 0) & (sy < HH) & (sx >= 0) & (sx < WW)
            value = tl.load(t_ptr + ((bc * 9 + k) * HH + sy) * WW + sx, mask=mask & inside, other=0.0)
            acc += value.to(tl.float32) * tl.load(w_ptr + k * 9 + tap).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def launch_unfold(s, w, y):
    hh, ww = s.shape[-2:]
    n = y.numel()
    unfold_kernel[(triton.cdiv(n, BLOCK),)](s, w, hh, ww, n, y, BLOCK=BLOCK)


def launch_fold(t, w, y):
    hh, ww = t.shape[-2:]
    n = y.numel()
    fold_kernel[(triton.cdiv(n, BLOCK),)](t, w, hh, ww, n, y, BLOCK=BLOCK)


def unfold_cuda(s, w):
    s = s.contiguous()
    y = s.new_empty(*s.shape[:2], 9, *s.shape[2:])
    launch_unfold(s, w.contiguous(), y)
    return y


def fold_cuda(t, w):
    t = t.contiguous()
    y = t.new_empty(*t.shape[:2], *t.shape[3:])
    launch_fold(t, w.contiguous(), y)
    return y


def ptx(kernel, dtype, arch=80):
    """Compile `unfold_kernel` or `fold_kernel` to PTX for dtype 'fp32'|'fp16': what the AOT plugin embeds."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = "s_ptr" if kernel is unfold_kernel else "t_ptr"
    src = ASTSource(fn=kernel, signature={name: f"*{dtype}", "w_ptr": f"*{dtype}", "HH": "i32", "WW": "i32",
                                          "n_elements": "i32", "y_ptr": f"*{dtype}"}, constexprs={"BLOCK": BLOCK})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))
