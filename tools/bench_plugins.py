"""Benchmark the custom ops' forms in ONNX Runtime (CPU), same inputs and threads:

    python tools/bench_plugins.py [--iterations 200] [--threads 2]

- seed: what the tutorial code exports to (S2: in-place slice writes -> ScatterND; STA: identity-kernel
  Conv / ConvTranspose banks);
- plain: our export twin's decomposition inlined in the graph (slices + concat / shifted adds);
- function: one yolo_attn node backed by its local function (what --plugins writes; ORT inlines it).
Prints a Markdown table of median ms per call.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export.graph.to_onnx import export_module  # noqa: E402
from models import s2, sta  # noqa: E402
from plugins import s2_shift, sta_fold  # noqa: E402


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


EYE = torch.eye(9).reshape(9, 1, 3, 3)


def _seed_unfold(s):
    b, c, hh, ww = s.shape
    return sta.Unfold(3)(s).reshape(b, c, 9, hh, ww)


def _seed_fold(t):
    b, c, _, hh, ww = t.shape
    return sta.Fold(3)(t.reshape(b * c, 9, hh, ww)).reshape(b, c, hh, ww)


def cases():
    """(op, size label, input, {form: callable})."""
    out = []
    for h, c in ((20, 512), (40, 256)):  # S2 on P5 of yolov8s at 640 / a P4-sized map
        x = torch.randn(1, h, h, c)
        out.append(("S2Shift", f"1x{h}x{h}x{c}", x, {
            "seed (ScatterND)": lambda t: s2.seed_inplace_shift(t.clone(), s2.SHIFT1),
            "plain (slices)": lambda t: s2.shift_clean(t, s2.SHIFT1),
            "function node": lambda t: s2_shift.s2_shift(t, 1)}))
    for g, c in ((5, 256), (20, 256)):  # STA grid at 640 with 4x4 super tokens on P5 / a finer grid
        s, t = torch.randn(1, c, g, g), torch.randn(1, c, 9, g, g)
        out.append(("StokenUnfold", f"1x{c}x{g}x{g}", s, {
            "seed (conv bank)": _seed_unfold, "plain (slices)": sta.stoken_unfold,
            "function node": lambda x: sta_fold.stoken_unfold(x, EYE)}))
        out.append(("StokenFold", f"1x{c}x9x{g}x{g}", t, {
            "seed (conv_transpose bank)": _seed_fold, "plain (slices)": sta.stoken_fold,
            "function node": lambda x: sta_fold.stoken_fold(x, EYE)}))
    return out


def time_onnx(path, x, iterations, threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    for _ in range(10):
        session.run(None, feed)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times)), session.run(None, feed)[0]


def measure(iterations=200, threads=2):
    """[{op, input, form, nodes, ms, vs_seed}]: every form of every case, timed; all forms of a case must agree."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for op, label, x, forms in cases():
            seed_ms, expected = None, None
            for form, fn in forms.items():
                path = Path(tmp) / "op.onnx"
                proto = export_module(_Fn(fn), x, path)
                ms, got = time_onnx(path, x, iterations, threads)
                expected = got if expected is None else expected
                assert np.allclose(got, expected, atol=1e-5), f"{op} {form} disagrees"
                seed_ms = seed_ms or ms
                rows.append({"op": op, "input": label, "form": form, "nodes": len(proto.graph.node), "ms": ms,
                             "vs_seed": seed_ms / ms})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    rows = ["| op | input | form | ONNX nodes | median ms | vs seed |", "|---|---|---|---|---|---|"]
    rows += [f"| {r['op']} | {r['input']} | {r['form']} | {r['nodes']} | {r['ms']:.3f} | {r['vs_seed']:.2f}x |"
             for r in measure(args.iterations, args.threads)]
    print("\n".join(rows))


if __name__ == "__main__":
    main()
