"""Labelled datasets (ultralytics or YOLOv5 data YAMLs), read with ultralytics' own checks, never downloading.

`read_dataset` gives the parsed dict, `split_images` the image files of one split: the val split scores
models (export.verify.accuracy), the train split calibrates INT8 (calib.source).
"""

import contextlib
import io
import logging
from pathlib import Path

from export.errors import BadInput


class DatasetError(BadInput):
    """A --data / --calib problem the user fixes: one line, exit code 2."""


def read_dataset(data_yaml):
    """The parsed dataset dict (ultralytics' check_det_dataset, never downloading), or DatasetError."""
    from ultralytics.data.utils import check_det_dataset

    path = Path(data_yaml)
    if not path.is_file():
        raise DatasetError(f"--data {path}: no such dataset YAML; pass an ultralytics/YOLOv5 data YAML "
                           "(path, train, val, names)")
    try:
        with quiet():
            return check_det_dataset(str(path), autodownload=False)
    except Exception as e:  # ultralytics raises FileNotFoundError / SyntaxError / TypeError with its own text
        detail = " ".join(str(e).split())[:300]
        raise DatasetError(f"--data {path}: {detail}") from None


def split_images(data, split):
    """Image files of a dataset split ('train' or 'val'), sorted, as ultralytics lists them."""
    from ultralytics.data.dataset import YOLODataset

    if not data.get(split):
        return []
    lister = YOLODataset.__new__(YOLODataset)  # only its file lister: folders, list files, lists of either
    lister.fraction, lister.prefix = 1.0, ""
    try:
        with quiet():
            return sorted(lister.get_img_files(data[split]))
    except Exception:  # a split without images
        return []


@contextlib.contextmanager
def quiet():
    """ultralytics logs dataset scans and warnings at INFO; the CLI prints its own one-line results."""
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        LOGGER.setLevel(level)
