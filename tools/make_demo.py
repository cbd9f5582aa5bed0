"""Generate the synthetic demo dataset and train yolov8n with each attention family on CPU.

    python tools/make_demo.py --out /tmp/attn-demo --minutes 9

Writes models/demo/yolov8n-<family>.pt (`--families plain`: stock yolov8n, the speed baseline) (half-precision ultralytics checkpoints), a few sample
images to models/demo/images/, and models/demo/metrics.json with each model's mAP50 / mAP50-95
on the synthetic val split. Fixed seeds: re-running gives the same dataset.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from calib.demo import make_dataset  # noqa: E402  (the generator lives in the package)


def train(family, data, out, minutes, imgsz):
    import models  # noqa: F401  registers the families with ultralytics
    from ultralytics import YOLO

    # "plain": stock yolov8n, the baseline of the speed table (README), trained the same way
    model = YOLO("yolov8n.yaml" if family == "plain" else str(REPO / "models" / "cfg" / f"yolov8n-{family}.yaml"))
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
    ap.add_argument("--families", default="fla,mlla,sta,s2", help="comma-separated; `plain` is stock yolov8n")
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
