"""Export the FLA demo with its attention replaced by nothing: the speed floor of any FLA twin on a backend.

    python tools/fla_floor.py --out runs/floor [--imgsz 640]
    python -m export bench models/demo/yolov8n-plain.pt floor=runs/floor/yolov8n-fla-floor.onnx \
        floor=runs/floor/yolov8n-fla-floor_fp16.onnx models/demo/yolov8n-fla.pt --half

Every FLA block keeps its own convolutions (q, k, v, proj and the depth-wise conv, with the demo's weights) and
joins them by adds in the convolutions' layout: the focusing, kᵀv, q(kᵀv) and the normaliser cost nothing. No
twin can be faster than this on the same backend, so it says how much of FLA's time over plain yolov8n is the
arithmetic of its convolutions and how much is left to the attention itself. The outputs are not FLA's: this
file is for timing only.
"""

import argparse
import sys
from pathlib import Path

import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import models  # noqa: E402
from export.inputs.images import parse_imgsz  # noqa: E402
from export.checkpoint import load  # noqa: E402
from export.graph.to_onnx import export_yolo  # noqa: E402
from models.fla import FocusedLinearAttentionExport, _conv1x1  # noqa: E402


class ConvolutionsOnly(FocusedLinearAttentionExport):
    """FLA's convolutions, summed: relu(q) + relu(k) + v + dwc(v), then proj (sr_ratio 1, as in the demo)."""

    def forward(self, x):
        C = x.shape[1]
        q = F.relu(_conv1x1(x, self.q))
        k = F.relu(_conv1x1(x, self.kv, rows=slice(0, C)))
        v = _conv1x1(x, self.kv, rows=slice(C, 2 * C))
        return _conv1x1(q + k + v + self._dwc_heads(v), self.proj)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/floor"))
    ap.add_argument("--imgsz", default="640")
    args = ap.parse_args(argv)
    imgsz = parse_imgsz(args.imgsz, 32)
    loaded = load(models.demo_checkpoint("fla"))
    floor = models.to_export(loaded.model)
    swapped = 0
    for m in floor.modules():
        if type(m) is FocusedLinearAttentionExport:
            m.__class__ = ConvolutionsOnly
            swapped += 1
    args.out.mkdir(parents=True, exist_ok=True)
    for half in (False, True):
        path = args.out / f"yolov8n-fla-floor{'_fp16' if half else ''}.onnx"
        export_yolo(floor, loaded, path, imgsz, half=half)
        print(f"wrote {path} ({swapped} FLA blocks reduced to their convolutions)")


if __name__ == "__main__":
    main()
