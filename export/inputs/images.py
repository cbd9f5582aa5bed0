"""Parity and probe images: ultralytics' letterbox preprocessing into a float [0,1] NCHW batch."""

from pathlib import Path

import cv2
import numpy as np
import torch
from ultralytics.data.augment import LetterBox

from export.errors import BadInput

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
MAX_IMAGES = 32  # parity and probe use at most this many images of --images (sorted by name)


def read_images(folder, imgsz):
    """Letterboxed float [0,1] NCHW batch (ultralytics' preprocessing) of the images in `folder`."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:MAX_IMAGES] \
        if folder.is_dir() else []
    if not files:
        raise BadInput(f"--images {folder}: no images found (.jpg/.png/...); pass a folder of sample images")
    return torch.from_numpy(letterbox(files, imgsz))


def letterbox(files, imgsz):
    """(N,3,H,W) float32 [0,1] RGB: ultralytics' LetterBox as predict applies it to a fixed-size model.
    Unreadable files are skipped."""
    boxes = [LetterBox(imgsz, auto=False)(image=img) for img in (cv2.imread(str(p)) for p in files) if img is not None]
    if not boxes:
        return np.zeros((0, 3, *imgsz), np.float32)
    batch = np.stack(boxes)[..., ::-1].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.float32) / 255


def tile(images, batch):
    """At least `batch` images (repeated if the folder has fewer), a whole number of batches."""
    reps = -(-batch // len(images))
    images = torch.cat([images] * reps)
    return images[: len(images) - len(images) % batch].numpy()


def parse_imgsz(value, stride):
    """(h, w) from N or "H,W" (or a list), each a positive multiple of `stride`; bad values: exit 2, one line."""
    try:
        parts = [int(v) for v in str(value).strip("[]() ").replace(" ", "").split(",")] if not isinstance(value, (list, tuple)) \
            else [int(v) for v in value]
    except ValueError:
        raise BadInput(f"--imgsz must be N or H,W (integers), got {value!r}") from None
    h, w = (parts * 2)[:2] if len(parts) == 1 else parts[:2]
    if len(parts) > 2 or h <= 0 or w <= 0 or h % stride or w % stride:
        raise BadInput(f"--imgsz {value} must be one or two positive multiples of the model stride {stride} "
                              f"(e.g. {max(stride, (h // stride) * stride)})")
    return h, w
