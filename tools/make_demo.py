"""Generate the synthetic demo dataset and train yolov8n with each attention family on CPU.

    python tools/make_demo.py --out /tmp/attn-demo --minutes 9

Writes models/demo/yolov8n-<family>.pt (half-precision ultralytics checkpoints), a few sample
images to models/demo/images/, and models/demo/metrics.json with each model's mAP50 / mAP50-95
on the synthetic val split. Fixed seeds: re-running gives the same dataset.
"""

import argparse
import json
import shutil
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("circle", "square", "triangle")
REPO = Path(__file__).resolve().parents[1]


def textured_background(rng, size):
    """Smooth colour gradient + blurred noise + random strokes, so objects are not trivially separable."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(40, 200, 3)[None, None, :] + rng.uniform(-60, 60, 3)[None, None, :] * (xx + yy)[..., None] / 2
    noise = cv2.GaussianBlur(rng.normal(0, 40, (size, size, 3)).astype(np.float32), (0, 0), rng.uniform(1, 4))
    img = np.clip(base + noise, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(3, 9)):
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.line(img, tuple(int(v) for v in p1), tuple(int(v) for v in p2), color, int(rng.integers(1, 4)))
    return img


def draw_shape(img, rng, cls, box):
    x0, y0, x1, y1 = box
    color = tuple(int(c) for c in rng.integers(0, 256, 3))
    if cls == 0:
        cv2.ellipse(img, ((x0 + x1) // 2, (y0 + y1) // 2), ((x1 - x0) // 2, (y1 - y0) // 2), 0, 0, 360, color, -1)
    elif cls == 1:
        cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
    else:
        pts = np.array([[(x0 + x1) // 2, y0], [x0, y1], [x1, y1]], np.int32)
        cv2.fillPoly(img, [pts], color)


def make_image(rng, size):
    img = textured_background(rng, size)
    labels, boxes = [], []
    for _ in range(rng.integers(1, 5)):
        side = int(rng.integers(size // 10, size // 3))
        w, h = side, int(side * rng.uniform(0.7, 1.3))
        x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
        box = (x0, y0, x0 + w, min(y0 + h, size - 1))
        if any(_iou(box, b) > 0.1 for b in boxes):
            continue
        cls = int(rng.integers(0, len(CLASSES)))
        draw_shape(img, rng, cls, box)
        boxes.append(box)
        cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
        labels.append(f"{cls} {cx:.6f} {cy:.6f} {(box[2] - box[0]) / size:.6f} {(box[3] - box[1]) / size:.6f}")
    return img, labels


def _iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_dataset(root, n_train=240, n_val=60, size=320, seed=0):
    """Write an ultralytics detection dataset under root; returns the data YAML path."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, labels = make_image(rng, size)
            cv2.imwrite(str(root / "images" / split / f"{i:04d}.jpg"), img)
            (root / "labels" / split / f"{i:04d}.txt").write_text("\n".join(labels) + "\n")
    data = root / "data.yaml"
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data


def train(family, data, out, minutes, imgsz):
    import models  # noqa: F401  registers the families with ultralytics
    from ultralytics import YOLO

    model = YOLO(str(REPO / "models" / "cfg" / f"yolov8n-{family}.yaml"))
    model.train(data=str(data), imgsz=imgsz, epochs=300, time=minutes / 60, batch=16, workers=2, device="cpu",
                seed=0, deterministic=True, project=str(out / "runs"), name=family, exist_ok=True, plots=False,
                amp=False, patience=1000, verbose=False)
    best = Path(model.trainer.best)
    metrics = YOLO(str(best)).val(data=str(data), imgsz=imgsz, batch=16, device="cpu", plots=False, verbose=False)
    dest = REPO / "models" / "demo" / f"yolov8n-{family}.pt"
    shutil.copyfile(best, dest)
    return {"checkpoint": dest.name, "epochs": model.trainer.epoch + 1, "imgsz": imgsz,
            "mAP50": round(float(metrics.box.map50), 4), "mAP50-95": round(float(metrics.box.map), 4),
            "size_mb": round(dest.stat().st_size / 2 ** 20, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/attn-demo"))
    ap.add_argument("--families", default="fla,mlla,sta,s2")
    ap.add_argument("--minutes", type=float, default=9.0, help="training wall-clock per family")
    ap.add_argument("--imgsz", type=int, default=256)
    args = ap.parse_args()
    data = make_dataset(args.out / "data")
    samples = REPO / "models" / "demo" / "images"
    samples.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        shutil.copyfile(args.out / "data" / "images" / "val" / f"{i:04d}.jpg", samples / f"sample{i}.jpg")
    metrics_file = REPO / "models" / "demo" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    for family in args.families.split(","):
        metrics[family] = train(family, data, args.out, args.minutes, args.imgsz)
        metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
        print(family, metrics[family], flush=True)


if __name__ == "__main__":
    main()
