"""TensorRT plugin for yolo_attn::S2Shift through `tensorrt.plugin` (TensorRT >= 10.7): register, JIT impl, AOT impl.

Importing this module registers the plugin. With the AOT implementation the engine embeds the Triton
kernel's PTX and runs without Python. Written against NVIDIA's documented API; not run here (no GPU
and no full TensorRT on the machines this was built on).
"""

from typing import Tuple, Union

import numpy as np
import numpy.typing as npt
import tensorrt as trt
import tensorrt.plugin as trtp

from plugins.s2_shift import kernel

PLUGIN_ID = "yolo_attn::S2Shift"


@trtp.register(PLUGIN_ID)
def s2_shift_desc(x: trtp.TensorDesc, direction: int, perm: npt.NDArray[np.int32]) -> Tuple[trtp.TensorDesc]:
    return x.like()


@trtp.impl(PLUGIN_ID)
def s2_shift_impl(x: trtp.Tensor, direction: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    import torch

    x_t, y_t = torch.as_tensor(x, device="cuda"), torch.as_tensor(outputs[0], device="cuda")
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        kernel.launch(x_t, y_t, direction)


@trtp.aot_impl(PLUGIN_ID)
def s2_shift_aot(x: trtp.TensorDesc, direction: int, outputs: Tuple[trtp.TensorDesc], tactic: int
                 ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
    compiled = kernel.ptx("fp16" if x.dtype == trt.float16 else "fp32", direction)
    shape = x.shape_expr
    n = shape.numel()
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(n, kernel.BLOCK)
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    extra = trtp.SymIntExprs(4)  # H, W, C, n_elements: between the input and output pointers
    for i, expr in enumerate((shape[1], shape[2], shape[3], n)):
        extra[i] = trtp.SymInt32(expr)
    return compiled.metadata.name, compiled.asm["ptx"], launch, extra
