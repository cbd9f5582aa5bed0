"""`python -m export`: checkpoint -> export twins -> ONNX (-> lint, TensorRT engine, parity, report).

Exit codes: 0 ok, 2 bad input, 3 export or build failed, 4 parity failed (artifacts still written).
"""

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

import models
from export.load import CheckpointError, load
from export.rewrite import rewrite
from export.to_onnx import export_yolo

EXIT_OK, EXIT_BAD_INPUT, EXIT_EXPORT_FAILED, EXIT_PARITY_FAILED = 0, 2, 3, 4
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class UsageError(CheckpointError):
    """Bad arguments: one line, exit code 2."""


class ExportFailed(Exception):
    exit_code = EXIT_EXPORT_FAILED


def parser():
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0],
                                epilog="Exit codes: 0 ok, 2 bad input, 3 export or build failed, 4 parity failed.")
    p.add_argument("--weights", type=Path, default=models.demo_checkpoint("sta"),
                   help="checkpoint to export (default: the shipped STA demo model)")
    p.add_argument("--imgsz", default=None, help="N or H,W, multiples of the model stride (default: training imgsz)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and spatial axes")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--half", action="store_true", help="fp16 ONNX with explicit fp32 islands")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/export/<weights stem>/)")
    p.add_argument("--images", type=Path, default=models.DEMO_DIR / "images",
                   help="images for the probe and parity runs (default: the shipped samples)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity harness")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, ExportFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def run(args):
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    loaded = load(args.weights)
    imgsz = parse_imgsz(args.imgsz if args.imgsz is not None else loaded.imgsz or 640, max(loaded.stride))
    images = read_images(args.images, imgsz)
    out = args.out or Path("runs") / "export" / args.weights.stem
    print(f"loaded {args.weights} ({loaded.source}, {'fp16' if loaded.saved_half else 'fp32'} weights, "
          f"{loaded.nc} classes)" + (f"; remapped {len(loaded.remapped)} fork classes" if loaded.remapped else ""))
    twin, checks = rewrite(loaded.model, imgsz, images=images[:1])
    for c in checks:
        print(f"  {c.name}: {c.reference} -> {c.twin}, max abs diff {c.max_abs:.3g} ({c.rel:.2g} of scale)"
              + (f"; note: {c.note}" if c.note else ""))
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / f"{args.weights.stem}{'_fp16' if args.half else ''}.onnx"
    try:
        export_yolo(twin, loaded, onnx_path, imgsz, batch=args.batch, dynamic=args.dynamic, half=args.half,
                    opset=args.opset, simplify=not args.no_simplify)
    except Exception as e:
        raise ExportFailed(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    print(f"wrote {onnx_path}")
    return EXIT_OK


def parse_imgsz(value, stride):
    try:
        parts = [int(v) for v in str(value).strip("[]() ").replace(" ", "").split(",")] if not isinstance(value, (list, tuple)) \
            else [int(v) for v in value]
    except ValueError:
        raise UsageError(f"--imgsz must be N or H,W (integers), got {value!r}") from None
    h, w = (parts * 2)[:2] if len(parts) == 1 else parts[:2]
    if len(parts) > 2 or h <= 0 or w <= 0 or h % stride or w % stride:
        raise UsageError(f"--imgsz {value} must be one or two positive multiples of the model stride {stride} "
                         f"(e.g. {max(stride, (h // stride) * stride)})")
    return h, w


def read_images(folder, imgsz):
    """Letterboxed float [0,1] NCHW batch (ultralytics' preprocessing) of the images in `folder`."""
    from ultralytics.data.augment import LetterBox

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise UsageError(f"--images {folder}: no images found (.jpg/.png/...); pass a folder of sample images")
    boxes = [LetterBox(imgsz, auto=False)(image=img) for img in (cv2.imread(str(p)) for p in files) if img is not None]
    batch = np.stack(boxes)[..., ::-1].transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(batch)).float() / 255
