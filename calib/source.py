"""Calibration images: where they come from and how they reach ONNX Runtime's calibrator.

Source: --calib DIR (images, searched recursively), else the train split of --data. At most
--calib-n of them (default 512, ultralytics' and ModelOpt's choice), spread evenly over the sorted
list so that a dataset sorted by scene is sampled across scenes. They are letterboxed exactly as
inference letterboxes (export.inputs.images.letterbox), in batches of the exported graph's batch size.
"""

from pathlib import Path

import cv2
import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from tqdm import tqdm

from export.inputs.datasets import DatasetError, read_dataset, split_images
from export.inputs.images import IMAGE_SUFFIXES, letterbox

DEFAULT_N = 512


def calibration_files(calib_dir=None, data_yaml=None, n=DEFAULT_N):
    """(image files, description of the source). DatasetError when there is no source or no image in it."""
    if calib_dir is not None:
        folder = Path(calib_dir)
        if not folder.is_dir():
            raise DatasetError(f"--calib {folder}: not a folder; pass a folder of calibration images")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        source = f"--calib {folder}"
    elif data_yaml is not None:
        files = [Path(f) for f in split_images(read_dataset(data_yaml), "train")]
        source = f"train split of {data_yaml}"
    else:
        raise DatasetError("INT8 needs calibration images: pass --calib DIR (images like those you deploy on) or "
                           "--data DATA.yaml (its train split is used)")
    if not files:
        raise DatasetError(f"{source}: no images (.jpg/.png/...) found for INT8 calibration")
    chosen = spread(files, n)
    unreadable = next((f for f in chosen if cv2.imread(str(f), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None), None)
    if unreadable is not None:  # found now, before the run writes anything, not in the middle of calibration
        raise DatasetError(f"{source}: {unreadable} cannot be read as an image; remove it or pass other images")
    return chosen, source


def spread(files, n):
    """At most n of `files`, evenly spaced, in order."""
    if n <= 0 or n >= len(files):
        return list(files)
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


class ImageReader(CalibrationDataReader):
    """Feeds letterboxed image batches to ONNX Runtime's calibrator, with a progress bar."""

    def __init__(self, files, imgsz, batch=1, input_name="images"):
        self.files, self.imgsz, self.batch, self.input_name = list(files), tuple(imgsz), batch, input_name
        usable = len(self.files) - len(self.files) % batch
        # fewer images than one batch: repeat them
        self.groups = [self.files[i:i + batch] for i in range(0, usable, batch)] or [(self.files * batch)[:batch]]
        self.position, self.bar = 0, None

    def get_next(self):
        if self.bar is None:
            self.bar = tqdm(total=len(self.groups) * self.batch, desc="calibration", unit="img", leave=False,
                            disable=None)
        if self.position >= len(self.groups):
            self.bar.close()
            return None
        group = self.groups[self.position]
        self.position += 1
        images = letterbox(group, self.imgsz)
        if len(images) < len(group):
            raise DatasetError(f"calibration: one of {', '.join(str(p) for p in group)} cannot be read as an "
                               "image; remove it")
        self.bar.update(len(group))
        return {self.input_name: images}

    def __len__(self):
        return len(self.groups)
