"""The synthetic demo dataset (circles, squares, triangles on textured backgrounds), in the package.

    data_yaml = demo_dataset()   # generated once, deterministically, then cached

The shipped demo checkpoints were trained on exactly this set (tools/make_demo.py calls
make_dataset with the same seed): 240 train / 60 val images at 320x320, ultralytics layout. The
cache lives under ~/.cache/yolo-attn-export/ (or $YOLO_ATTN_EXPORT_CACHE); it is generated in a temp
folder beside it and renamed into place, so an interrupted run never leaves a half-written set.
"""

import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

# Bump when the generator's output changes: a new version is a new cache folder.
VERSION = 1

CLASSES = ("circle", "square", "triangle")


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
    data.write_text(_yaml(root))
    return data


def cache_root():
    return Path(os.environ.get("YOLO_ATTN_EXPORT_CACHE", Path.home() / ".cache" / "yolo-attn-export"))


def demo_dataset(root=None):
    """The demo data YAML, generating the dataset on first use (about 5 s)."""
    final = Path(root or cache_root()) / f"demo-data-v{VERSION}"
    if (final / "data.yaml").is_file():
        return final / "data.yaml"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-data-", dir=final.parent))
    try:
        make_dataset(tmp)
        (tmp / "data.yaml").write_text(_yaml(final))  # paths as they will be after the rename
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race: use its copy
            if not (final / "data.yaml").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "data.yaml"


def _yaml(root):
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    return f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n"
