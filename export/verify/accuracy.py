"""Labelled accuracy: mAP50 and mAP50-95 of every model the run produced, on the val split of a dataset YAML.

    results = labelled_map({"torch fp32": runner, "onnxruntime int8": runner2}, "data.yaml", (640, 640))

The dataset, letterboxing, NMS, matching and metrics are ultralytics' own (YOLODataset in val mode,
DetectionValidator.postprocess / update_metrics / get_stats with its default conf 0.001 and IoU 0.7);
we only feed it each backend's raw output in the (B, 4+nc, anchors) layout. One pass over the
images, every runner on the same batch, one validator per runner.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from export.inputs.datasets import DatasetError, quiet, read_dataset


def labelled_map(runners, data_yaml, imgsz, batch=1, to_v8_layout=None, names=None, desc="mAP"):
    """{runner name: {map50, map50_95, box_p, box_r, images, instances}} on the val split of `data_yaml`.
    `runners` map names to callables (B,3,H,W) float32 numpy -> raw output; `batch` is the batch the exported
    graphs take (the last batch is padded with copies and the padding's outputs dropped)."""
    return LabelledMAP(data_yaml, imgsz, batch, to_v8_layout, names).measure(runners, desc)


class LabelledMAP:
    """Scores models on one dataset: the dataset is read and its loader built once; `of` caches per label, so
    a model the int8 stage already scored is not scored again for the report's table."""

    def __init__(self, data_yaml, imgsz, batch=1, to_v8_layout=None, names=None):
        self.data_yaml, self.imgsz, self.batch, self.to_v8_layout = data_yaml, imgsz, batch, to_v8_layout
        self.data = read_dataset(data_yaml)
        if names is not None and len(self.data["names"]) != len(names):
            raise DatasetError(f"--data {data_yaml}: the dataset has {len(self.data['names'])} classes, the model "
                               f"{len(names)}; pass the dataset the model was trained on")
        self.names = names or self.data["names"]
        self.loader = _val_loader(self.data, imgsz, batch)
        self.done = {}

    def measure(self, runners, desc="mAP"):
        """One pass over the val split, every runner on the same batch."""
        validators = {name: _validator(self.data, self.names) for name in runners}
        for b in tqdm(self.loader, desc=desc, leave=False, disable=None):
            images = (b["img"].float() / 255).numpy()
            for name, runner in runners.items():
                raw = _run_padded(runner, images, self.batch)
                raw = self.to_v8_layout(raw) if self.to_v8_layout else raw
                v = validators[name]
                v.update_metrics(v.postprocess(torch.from_numpy(np.ascontiguousarray(raw))), b)
        return {name: _summary(v) for name, v in validators.items()}

    def of(self, runners):
        """measure(), skipping (and returning the cached result of) labels already scored."""
        pending = {label: r for label, r in runners.items() if label not in self.done}
        if pending:
            self.done.update(self.measure(pending, desc=f"mAP ({len(pending)} models)"))
        return {label: self.done[label] for label in runners}

    def table(self, runners, precisions):
        """The report's `accuracy` section: one row per model (backend key -> runner; its precision from
        `precisions`), with each row's mAP50-95 drop in points against the PyTorch reference."""
        labelled = {f"{_backend_name(b)} {precisions[b]}": (b, r) for b, r in runners.items()}
        scores = self.of({label: r for label, (_, r) in labelled.items()})
        rows = [{"backend": _backend_name(b), "precision": precisions[b], **scores[label]}
                for label, (b, _) in labelled.items()]
        base = next(r["map50_95"] for r in rows if r["backend"] == "torch")
        for r in rows:
            r["drop_points_vs_torch"] = round((base - r["map50_95"]) * 100, 3)
        return {"data": str(self.data_yaml), "split": "val", "conf": 0.001, "iou": 0.7, "models": rows}


def _backend_name(key):
    """'reference' -> 'torch'; 'onnxruntime_fp16' -> 'onnxruntime'."""
    return "torch" if key == "reference" else key.split("_")[0]


def _val_loader(data, imgsz, batch):
    from ultralytics.cfg import get_cfg
    from ultralytics.data.augment import LetterBox
    from ultralytics.data.build import build_dataloader, build_yolo_dataset
    from ultralytics.utils import DEFAULT_CFG

    h, w = imgsz
    cfg = get_cfg(DEFAULT_CFG, {"task": "detect", "imgsz": max(h, w), "rect": False, "cache": False,
                                "single_cls": False, "fraction": 1.0})
    with quiet():
        dataset = build_yolo_dataset(cfg, data["val"], batch, data, mode="val", stride=32)
    if not len(dataset):
        raise DatasetError(f"--data: the val split {data['val']} has no images")
    for t in dataset.transforms.transforms:  # ultralytics letterboxes square; a H x W export needs H x W
        if isinstance(t, LetterBox):
            t.new_shape = (h, w)
    return build_dataloader(dataset, batch, workers=0, shuffle=False, rank=-1)


def _validator(data, names):
    from ultralytics.cfg import get_cfg
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils import DEFAULT_CFG

    args = get_cfg(DEFAULT_CFG, {"task": "detect", "plots": False, "save_json": False, "save_txt": False,
                                 "verbose": False})
    with tempfile.TemporaryDirectory() as scratch:  # without a save_dir it makes runs/detect/train-N in the cwd
        v = DetectionValidator(save_dir=Path(scratch), args=args)
    v.data, v.device, v.training = data, torch.device("cpu"), True  # training=True: no dataset max_det probing
    v.dataloader = None
    v.init_metrics(_Names(dict(enumerate(names)) if isinstance(names, (list, tuple)) else names))
    return v


class _Names:
    def __init__(self, names):
        self.names = names


def _run_padded(runner, images, batch):
    n = len(images)
    if n % batch:
        images = np.concatenate([images, np.repeat(images[-1:], batch - n % batch, 0)])
    outs = [runner(np.ascontiguousarray(images[i:i + batch])) for i in range(0, len(images), batch)]
    return np.concatenate(outs)[:n]


def _summary(validator):
    with quiet():
        stats = validator.get_stats()
    return {"map50": float(stats["metrics/mAP50(B)"]), "map50_95": float(stats["metrics/mAP50-95(B)"]),
            "box_p": float(stats["metrics/precision(B)"]), "box_r": float(stats["metrics/recall(B)"]),
            "images": int(validator.seen), "instances": int(validator.metrics.nt_per_class.sum())}
