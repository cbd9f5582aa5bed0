"""How small a real fault does each precision's parity verdict see? Faults planted in an exported ONNX the way
bugs happen, and the verdict on each.

    python tools/parity_sensitivity.py --out runs/sensitivity [--weights models/demo/yolov8n-sta.pt]

Exports the checkpoint (fp32, fp16 and int8 QDQ, on the demo's own calibration data), then for each file scales
one attention weight (the STA block's output projection, `model.10`) by 1 + e for a range of e, and runs the
parity verdict of that file's precision against the PyTorch reference on the sample images. Prints a Markdown
table: for each precision, the verdict and the deciding figure per e, and the smallest e it fails. The other
planted faults (two channels swapped, one bias dropped, boxes shifted one stride) are in
tests/test_parity_verdict.py, which imports the planting functions from here.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import models  # noqa: E402
from export.checkpoint import kinds, load  # noqa: E402
from export.cli import main as export_main  # noqa: E402
from export.graph.onnx_passes import node_scope  # noqa: E402
from export.inputs.images import read_images, tile  # noqa: E402
from export.graph.rewrite import rewrite  # noqa: E402
from export.verify.parity import compare, own_fp16_error, thresholds_for  # noqa: E402
from export.verify.runners import OrtRunner, TorchRunner  # noqa: E402

EPSILONS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2)


def conv_weights(proto, scope):
    """[(Conv node, the initializer its weight comes from)] inside module `scope`, in graph order. In a QDQ file
    the weight is a DequantizeLinear's output: its scale initializer stands for the weight (scaling it scales
    the dequantized weight)."""
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    found = []
    for n in proto.graph.node:
        if n.op_type != "Conv" or not (node_scope(n.name) + ".").startswith(scope + "."):
            continue
        weight = n.input[1]
        while weight not in inits and weight in producer and producer[weight].op_type in ("Cast", "DequantizeLinear"):
            dq = producer[weight]
            weight = dq.input[1] if dq.op_type == "DequantizeLinear" else dq.input[0]
        if weight in inits:
            found.append((n, inits[weight]))
    return found


def replace(tensor, array):
    tensor.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(tensor).dtype), tensor.name))


def scale_attention_weight(proto, factor=1.02, scope="model.10"):
    _, w = conv_weights(proto, scope)[-1]  # the block's last convolution: STA's output projection
    replace(w, numpy_helper.to_array(w) * factor)


def swap_two_channels(proto, scope="model.10"):
    _, w = conv_weights(proto, scope)[0]
    array = numpy_helper.to_array(w).copy()
    array[[0, 1]] = array[[1, 0]]
    replace(w, array)


def drop_one_bias(proto, scope="model.23.cv2"):
    inits = {t.name: t for t in proto.graph.initializer}
    node = next(n for n, _ in conv_weights(proto, scope) if len(n.input) > 2 and n.input[2] in inits)
    bias = inits[node.input[2]]
    replace(bias, np.zeros_like(numpy_helper.to_array(bias)))


def shift_boxes_by_one_stride(proto):
    """The box decode's anchor points (2, anchors): every point of the first level (stride 8) moved one grid cell in
    x. Three levels of strides 8, 16, 32 hold n, n/4 and n/16 points: the first is 16/21 of them."""
    anchors = next(t for t in proto.graph.initializer if len(t.dims) >= 2 and t.dims[-2] == 2
                   and t.dims[-1] > 1000 and numpy_helper.to_array(t).min() >= 0)
    array = numpy_helper.to_array(anchors).copy()
    array[..., 0, : array.shape[-1] * 16 // 21] += 1.0
    replace(anchors, array)


def verdict(path, precision, reference, images, kind, own_fp16=None):
    """The main job's verdict on one file: fp16 held to what PyTorch's own fp16 run costs the model."""
    r = compare(reference, OrtRunner(path), images, precision, 1, kind.to_v8_layout,
                thresholds_for(precision, own_fp16))
    return r["pass"], r


def verdict_setup(weights, imgsz):
    """(PyTorch reference runner, the sample images, the checkpoint's kind, PyTorch's own fp16 error) for verdicts
    on exports of `weights` at `imgsz`, as the main job sets them up."""
    loaded = load(weights)
    images = tile(read_images(models.DEMO_DIR / "images", imgsz), 1)
    reference, kind = TorchRunner(models.reference_at(loaded.model, *imgsz)), kinds.of(loaded)
    twin, _ = rewrite(loaded.model, imgsz, images=torch.from_numpy(images[:1]))
    return reference, images, kind, own_fp16_error(reference, twin, images)


def planted_copy(path, out, plant=None):
    """`path` with a fault planted by `plant(proto)` (none: unchanged), saved as `out`."""
    proto = onnx.load(str(path))
    if plant:
        plant(proto)
    onnx.save(proto, str(out))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=models.demo_checkpoint("sta"))
    p.add_argument("--out", type=Path, default=Path("runs") / "sensitivity")
    args = p.parse_args(argv)
    assert export_main(["--weights", str(args.weights), "--out", str(args.out), "--int8", "--no-parity"]) == 0
    report = json.loads((args.out / "report.json").read_text())
    reference, images, kind, own = verdict_setup(args.weights, tuple(report["imgsz"]))
    print(f"PyTorch's own fp16 run: rel max abs {own:.3g}; fp16 limit {thresholds_for('fp16', own).rel_max_abs:.3g}\n")
    print("| precision | e | pass | rel max abs | cosine | box recall | box precision |\n|---|---|---|---|---|---|---|")
    smallest = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision, path in report["onnx_files"].items():
            for e in (0.0, *EPSILONS):
                planted = planted_copy(path, Path(tmp) / f"{precision}.onnx",
                                       (lambda proto, e=e: scale_attention_weight(proto, 1 + e)) if e else None)
                ok, r = verdict(planted, precision, reference, images, kind, own)
                if e and not ok:
                    smallest.setdefault(precision, e)
                print(f"| {precision} | {e:g} | {'yes' if ok else 'FAIL'} | {r['rel_max_abs']:.3g} | {r['cosine']:.7f} "
                      f"| {r['box_recall']:.3f} | {r['box_precision']:.3f} |")
    print("\nsmallest scale error failed:", {p: f"{e:g}" for p, e in smallest.items()})


if __name__ == "__main__":
    main()
