"""Each --code block exported on its own and run on the input the PyTorch reference gives it.

The model's output can hide a wrong block, and localisation (export/verify/localize.py) compares every block inside
one exported model, where an upstream block's error flows into the blocks after it. Here each block is traced alone
(with the generic rewrites, as the main export does), fed the reference model's own input to that block, and its
ONNX Runtime output compared with the reference block's output: a block fails only for its own error.
"""

from pathlib import Path

import numpy as np
import torch

from export.graph import generic
from export.graph.to_onnx import trace
from export.verify.runners import OrtRunner


def block_errors(reference_model, twin, names, images, tmpdir, dynamic=False, run=None):
    """{block: rel max abs error (max |onnx - torch| / max |torch|), or None where the block's input is not one
    tensor}. `run`: (reference model at another size, images of that size): the block is then traced with dynamic
    H/W on its input at `images`' size and run on its input at the other size."""
    traced_on = _block_io(reference_model, names, images[:1])
    checked_on = _block_io(run[0], names, run[1][:1]) if run else traced_on
    errors = {}
    for i, name in enumerate(names):
        (example, _), (given, expected) = traced_on[name], checked_on[name]
        if example is None or given is None:
            errors[name] = None
            continue
        path = Path(tmpdir) / f"block{i}.onnx"
        path.write_bytes(_export(twin.get_submodule(name), example, dynamic or run is not None).SerializeToString())
        got = OrtRunner(path).session.run(None, {"x": given.numpy()})[0]
        scale = float(np.abs(expected).max()) or 1.0
        errors[name] = float(np.abs(got.astype(np.float64) - expected).max() / scale)
    return errors


def _export(block, example, dynamic):
    holder = _Holder(block)
    axes = {"x": {2: "height", 3: "width"}, "y": {2: "height", 3: "width"}} if dynamic else None
    with generic.exportable_calls(holder, ["block"], dynamic=dynamic):
        return trace(holder, example, input_names=("x",), output_names=("y",), dynamic_axes=axes)


class _Holder(torch.nn.Module):
    """The block under one name, so the generic rewrites apply to it as in the model."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def _block_io(model, names, images):
    """{block: (its input, its output as float64 numpy)} in one reference forward; input None unless one tensor."""
    seen = {}

    def keep(name):
        def hook(module, args, out):  # returns None: the output is not replaced
            if name not in seen:
                single = len(args) == 1 and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)
                seen[name] = (args[0].detach().float().clone() if single else None,
                              out.detach().double().numpy() if single else None)
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            model(torch.from_numpy(images) if isinstance(images, np.ndarray) else images)
    finally:
        for h in hooks:
            h.remove()
    return seen
