"""TensorRT plugins for yolo_attn::StokenUnfold / StokenFold through `tensorrt.plugin` (TensorRT >= 10.7).

Importing this module registers both. The AOT implementations embed the Triton kernels' PTX. Written
against NVIDIA's documented API; not run here (no GPU and no full TensorRT on the build machines).
"""

from typing import Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from plugins.sta_fold import kernel

UNFOLD_ID, FOLD_ID = "yolo_attn::StokenUnfold", "yolo_attn::StokenFold"


@trtp.register(UNFOLD_ID)
def unfold_desc(s: trtp.TensorDesc, w: trtp.TensorDesc) -> Tuple[trtp.TensorDesc]:
    b, c, hh, ww = s.shape_expr
    return trtp.from_shape_expr((b, c, 9, hh, ww), dtype=s.dtype)


@trtp.register(FOLD_ID)
def fold_desc(t: trtp.TensorDesc, w: trtp.TensorDesc) -> Tuple[trtp.TensorDesc]:
    b, c, _, hh, ww = t.shape_expr
    return trtp.from_shape_expr((b, c, hh, ww), dtype=t.dtype)


@trtp.impl(UNFOLD_ID)
def unfold_impl(s: trtp.Tensor, w: trtp.Tensor, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    _run(kernel.launch_unfold, s, w, outputs[0], stream)


@trtp.impl(FOLD_ID)
def fold_impl(t: trtp.Tensor, w: trtp.Tensor, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    _run(kernel.launch_fold, t, w, outputs[0], stream)


def _run(launch, inp, w, out, stream):
    import torch

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        launch(*(torch.as_tensor(t, device="cuda") for t in (inp, w, out)))


@trtp.aot_impl(UNFOLD_ID)
def unfold_aot(s: trtp.TensorDesc, w: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc], tactic: int
               ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    return _aot(kernel.unfold_kernel, s, outputs[0])


@trtp.aot_impl(FOLD_ID)
def fold_aot(t: trtp.TensorDesc, w: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    return _aot(kernel.fold_kernel, t, outputs[0])


def _aot(fn, inp, out):
    compiled = kernel.ptx(fn, "fp16" if inp.dtype == trt.float16 else "fp32")
    shape = inp.shape_expr
    n = out.shape_expr.numel()  # one program element per output element
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(n, kernel.BLOCK)
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    extra = trtp.SymIntExprs(3)  # HH, WW, n_elements: after the input pointers (data, bank), before the output
    for i, expr in enumerate((shape[-2], shape[-1], n)):
        extra[i] = trtp.SymInt32(expr)
    return compiled.metadata.name, compiled.asm["ptx"], launch, extra
