"""Which block diverges first? When a float ONNX fails parity, every block that is not stock ultralytics (the
attention families, the --code blocks) becomes an extra ONNX output, and each is compared with the same block
in the PyTorch reference."""

import copy
from pathlib import Path

import numpy as np
import torch

from export.graph.rewrite import watched_blocks
from export.graph.to_onnx import keep_fp32, trace
from export.verify.parity import THRESHOLDS
from export.verify.runners import OrtRunner


def localize(reference_model, twin, images, half, tmpdir, precision, fp32_blocks=(), run_images=None):
    """Export the twin with every block that is not stock ultralytics (attention families, --code blocks) as an
    extra ONNX output; name the first whose ONNX Runtime output diverges from the PyTorch reference's.
    `fp32_blocks`: kept fp32 in a half export, as the fp16 file has them. `run_images`: images of another size to
    run instead: the export then has dynamic H/W, traced on `images` (what a --dynamic file does at another
    size), and `reference_model` must run at that size. Returns (name or None, per-block rel errors)."""
    names = watched_blocks(reference_model)
    twin = copy.deepcopy(twin)
    twin = twin.half() if half else twin.float()
    for name in fp32_blocks if half else ():
        keep_fp32(twin.get_submodule(name))
    # at another size, the blocks' outputs only: the head's anchors are fixed at the traced size
    probe = _BlockTap(twin, names, half, with_output=run_images is None)
    axes = {"images": {2: "height", 3: "width"}} if run_images is not None else None
    outputs = (["output0"] if run_images is None else []) + list(names)
    proto = trace(probe, torch.from_numpy(images[:1]), input_names=["images"], output_names=outputs,
                  dynamic_axes=axes)
    path = Path(tmpdir) / "localize.onnx"
    path.write_bytes(proto.SerializeToString())
    images = images if run_images is None else run_images
    outs = OrtRunner(path).session.run(None, {"images": images[:1]})[-len(names):] if names else []
    expected = _BlockTap(reference_model, names, False)(torch.from_numpy(images[:1]))[1:]
    limit = THRESHOLDS[precision].rel_max_abs
    errors = {}
    for name, got, exp in zip(names, outs, expected):
        exp = exp.detach().float().numpy()
        errors[name] = float(np.abs(got.astype(np.float64) - exp).max() / (np.abs(exp).max() or 1.0))
    first = next((n for n in names if not np.isfinite(errors[n]) or errors[n] > limit), None)
    return first, errors


class _BlockTap(torch.nn.Module):
    """The model, returning its output followed by each named block's output."""

    def __init__(self, model, names, half, with_output=True):
        super().__init__()
        self.model, self.names, self.half, self.with_output = model, names, half, with_output

    def forward(self, images):
        captured = {}

        def keep(name):
            def hook(module, args, out):  # returns None: a hook's return value would replace the output
                captured.setdefault(name, out)
            return hook

        hooks = [self.model.get_submodule(n).register_forward_hook(keep(n)) for n in self.names]
        try:
            with torch.no_grad():
                y = self.model(images.half() if self.half else images)
        finally:
            for h in hooks:
                h.remove()
        y = y[0] if isinstance(y, (list, tuple)) else y
        blocks = tuple(captured[n].float() for n in self.names)
        return (y.float(), *blocks) if self.with_output else blocks
