"""Train the YOLOv5s + S2Attention demo checkpoint with YOLOv5's own train.py / val.py on CPU.

    python3 -m venv /tmp/y5venv
    /tmp/y5venv/bin/pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1
    /tmp/y5venv/bin/pip install -c constraints.txt yolov5==7.0.14 "setuptools<81"
    /tmp/y5venv/bin/python tools/make_demo_v5.py --out /tmp/attn-demo-v5 --epochs 32
    /tmp/y5venv/bin/python tools/make_demo_v5.py --out /tmp/attn-demo-v5c --epochs 30 --epochs-before 32 \
        --weights /tmp/attn-demo-v5/runs/s2/weights/best.pt --workers 1

(the shipped demo: 32 epochs from scratch, then 30 more from that best.pt, ~14 + ~13 min on 2 cores;
the second run writes the shipped file, its metrics entry and tests/data/yolov5s-s2-expected.pt)

The `yolov5` PyPI package (YOLOv5 7.0 code under `yolov5.*`) drags in sahi, roboflow, boto3,
tensorboard, pandas, ... so it lives in a throwaway venv, never in the project's .venv. setuptools<81
because yolov5.utils.general imports pkg_resources, which newer setuptools no longer ships. The package's
code runs unmodified; offline_env() sets the few things it needs offline and on torch 2.14/numpy 2.4.

Model: yolov5s.yaml with the seed-004 tutorial's `[-1, 1, S2Attention, [...]]` after the P5 C3 and
Detect reading [17, 20, 24]. The tutorial writes [1024], but parse_model calls an unknown module with
its YAML args verbatim (no width multiple) while recording c2 = ch[f]; yolov5s's P5 is 512 wide, so the
arg here is 512, the block's real input width. S2Attention/SplitAttention are the seed classes as
transcribed in tests/seed_code.py (imported, not copied).

Writes models/demo/yolov5s-s2.pt and the "yolov5s-s2" entry of models/demo/metrics.json (mAP50 and
mAP50-95 from yolov5.val on the synthetic val split of tools/make_demo.py, fixed seeds).

The shipped file is train.py's stripped best.pt with one change: the pip package pickles its classes as
`yolov5.models.yolo.DetectionModel`, `yolov5.models.common.C3`, ... while the YOLOv5 repository's own
train.py writes `models.yolo.DetectionModel`, `models.common.C3`, ...; the code is the same, only the
prefix differs. So the GLOBAL opcodes of data.pkl are rewritten `yolov5.models.` -> `models.` (and the
S2 classes, defined in tests.seed_code here, -> `models.common`, where the tutorial puts them), as are
the layers' `.type` strings parse_model records; the zip stays uncompressed and 64-byte aligned like
torch.save's. The tool then checks that no `yolov5.` global is left and that the renamed file, loaded
with repo-style `models.*` paths, computes exactly what train.py's best.pt computes.

    python tools/make_demo_v5.py --inspect models/demo/yolov5s-s2.pt

(in the project's environment) prints the checkpoint's pickle globals and the S2 block's width,
reading the file through the exporter's gated loader: no YOLOv5 code, nothing from the file run.
"""

import argparse
import io
import json
import os
import pickletools
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
S2_CLASSES = ("S2Attention", "SplitAttention")
SEED_MODULE = "tests.seed_code"  # where the S2 classes live in this process, hence in the raw best.pt


def offline_env(out):
    """Environment for running the pip package offline; must be set before yolov5 is imported."""
    # yolov5's check_dataset downloads Arial.ttf (plot labels) into its config dir unless it is there:
    # give it matplotlib's DejaVuSans under that name instead of a network fetch.
    cfg = out / "y5config"
    cfg.mkdir(parents=True, exist_ok=True)
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not (cfg / "Arial.ttf").exists():
        shutil.copyfile(font, cfg / "Arial.ttf")
    os.environ["YOLOV5_CONFIG_DIR"] = str(cfg)
    # train.main calls ultralytics' check_requirements() on a requirements.txt a wheel install lacks,
    # and would pip-install anything it thinks is missing: skip it (the venv was installed by hand).
    os.environ["ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS"] = "1"
    # torch >= 2.6 loads with weights_only=True by default; YOLOv5 7.0's strip_optimizer/attempt_load
    # call torch.load(f) on their own full-model checkpoints and predate that switch.
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    # YOLOv5 7.0's compute_ap integrates with np.trapz, removed in numpy 2.4 (our pin) after its rename
    # to np.trapezoid in 2.0: the same function under its old name.
    import numpy as np

    if not hasattr(np, "trapz"):
        np.trapz = np.trapezoid


def repo_imports():
    """make_demo's dataset writer and the seed S2 classes, imported from the project tree."""
    sys.path.insert(0, str(REPO))
    from tests.seed_code import S2Attention, SplitAttention
    from tools.make_demo import make_dataset

    return make_dataset, (S2Attention, SplitAttention)


def install_s2(s2_classes):
    """Make `S2Attention` resolvable where parse_model evals YAML names, and alias the repo's paths."""
    import yolov5.models.common
    import yolov5.models.experimental
    import yolov5.models.yolo

    for cls in s2_classes:
        setattr(yolov5.models.yolo, cls.__name__, cls)  # parse_model: eval(m) in yolo.py's globals
        setattr(yolov5.models.common, cls.__name__, cls)  # models.common.S2Attention after the rename
    # The repo's layout: `models` is yolov5/models. attempt_load itself does `from models.yolo import ...`,
    # and the renamed checkpoint names `models.*`; both must reach the same class objects.
    for name in ("", ".common", ".experimental", ".yolo"):
        sys.modules["models" + name] = sys.modules["yolov5.models" + name]


def write_cfg(out, nc):
    """yolov5s.yaml from the package plus the seed's S2Attention on P5 (width = its real input, 512)."""
    import yaml
    import yolov5

    cfg = yaml.safe_load((Path(yolov5.__file__).parent / "models" / "yolov5s.yaml").read_text())
    cfg["nc"] = nc
    p5 = 1024 * cfg["width_multiple"]  # the P5 C3's output width, which is S2Attention's input (ch[f])
    cfg["head"].insert(-1, [-1, 1, "S2Attention", [int(p5)]])  # 24
    cfg["head"][-1][0] = [17, 20, 24]  # Detect reads the attended P5, as in the seed YAML
    path = out / "yolov5s-s2.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train(data, cfg, out, epochs, imgsz, workers, weights=""):
    import yolov5.train

    sys.argv = sys.argv[:1]  # train.run() parses sys.argv first (parse_known_args): keep ours out of it
    t0 = time.time()
    opt = yolov5.train.run(data=str(data), cfg=str(cfg), weights=str(weights), imgsz=imgsz, batch_size=16, epochs=epochs,
                           workers=workers, device="cpu", seed=0, project=str(out / "runs"), name="s2",
                           exist_ok=True, noplots=True, patience=1000)
    return Path(opt.save_dir) / "weights" / "best.pt", time.time() - t0


def validate(best, data, imgsz, workers, out):
    """YOLOv5's val.py on the val split, on the stripped best.pt, at train.py's own val settings."""
    import yolov5.val

    results, *_ = yolov5.val.run(data=str(data), weights=str(best), imgsz=imgsz, batch_size=32, device="cpu",
                                 workers=workers, iou_thres=0.6, task="val", half=False, plots=False,
                                 project=str(out / "runs"), name="val", exist_ok=True)
    return round(float(results[2]), 4), round(float(results[3]), 4)


# ---- the rename ---------------------------------------------------------------------------------------
def _repo_path(module, name):
    if module == SEED_MODULE and name in S2_CLASSES:
        return "models.common"
    return "models." + module[len("yolov5.models."):] if module.startswith("yolov5.models.") else module


def _repo_type(s):
    """parse_model's `m.type` string ('yolov5.models.common.C3', 'tests.seed_code.S2Attention')."""
    module, _, name = s.rpartition(".")
    return f"{_repo_path(module, name)}.{name}" if module else s


def rename_pickle(pkl):
    """Re-emit a protocol-2 pickle with GLOBAL targets (and the layer .type strings) renamed.

    Protocol 2 has no frames and the memo is indexed, not addressed, so each opcode can be copied or
    re-encoded on its own."""
    assert pkl[:2] == b"\x80\x02", "torch.save writes pickle protocol 2"
    buf, ops = io.BytesIO(), list(pickletools.genops(pkl))
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(pkl)
        if op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            buf.write(b"c" + f"{_repo_path(module, name)}\n{name}\n".encode())
        elif op.name == "BINUNICODE" and arg.startswith(("yolov5.models.", SEED_MODULE + ".")):
            data = _repo_type(arg).encode()
            buf.write(b"X" + struct.pack("<I", len(data)) + data)
        else:
            buf.write(pkl[pos:end])
    return buf.getvalue()


def _aligned_info(zf, name, alignment=64):
    """A ZipInfo whose data starts on an `alignment` boundary (torch.save aligns records for mmap)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = zf.fp.tell() + 30 + len(name.encode()) + 4  # local header + name + the extra field's header
    pad = -start % alignment
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding record, as torch writes it
    return info


def rename_checkpoint(src, dst):
    """Copy a torch.save zip, renaming data.pkl's globals; every other record is copied byte for byte."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                data = rename_pickle(data)
            zout.writestr(_aligned_info(zout, info.filename), data)
    with zipfile.ZipFile(dst) as z:
        assert z.testzip() is None and all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())


# ---- checks -------------------------------------------------------------------------------------------
def pickle_globals(path):
    """Every GLOBAL a checkpoint's data.pkl imports, in first-use order (pickletools only, nothing loaded)."""
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    names = [arg.replace(" ", ".") for op, arg, _ in pickletools.genops(pkl) if op.name == "GLOBAL"]
    return list(dict.fromkeys(names))


def s2_width_from_pickle(path):
    """S2Attention's mlp1.in_features read off the opcode stream with pickletools only: the int after the
    first literal `in_features` key following the S2Attention GLOBAL. mlp1 is the model's first Linear,
    so that key is spelled out there (later uses are memo lookups)."""
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    ops = iter(pickletools.genops(pkl))
    for op, arg, _ in ops:
        if op.name == "GLOBAL" and arg.endswith(" S2Attention"):
            break
    for op, arg, _ in ops:
        if arg == "in_features":
            return next(a for o, a, _ in ops if isinstance(a, int) and o.name.startswith("BININT"))


def load_gated(path):
    """The checkpoint as the exporter's gated unpickler rebuilds it (nothing in the file runs, no YOLOv5 code)."""
    sys.path.insert(0, str(REPO))
    from export.checkpoint.loader import read

    return read(Path(path))[0]


def inspect(path):
    ckpt = load_gated(path)
    model = ckpt["model"]
    s2 = [m for m in model.modules() if type(m).__name__ == "S2Attention"]
    print("globals:", *pickle_globals(path), sep="\n  ")
    print("S2Attention mlp1.in_features per pickletools:", s2_width_from_pickle(path))
    for m in s2:
        print(f"S2Attention (layer {m.i}, from {m.f}, type {m.type!r}): mlp1 {m.mlp1.in_features}->"
              f"{m.mlp1.out_features}, mlp2 {m.mlp2.in_features}->{m.mlp2.out_features}, "
              f"split_attention.channel {m.split_attention.channel}")
    prev = model.model[s2[0].i - 1]
    print(f"input of S2 = layer {prev.i} ({prev.type}) output width {prev.cv3.conv.out_channels}")


def check_parity(raw, renamed):
    """Both files, loaded through their own paths, give identical outputs on a fixed random input."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(1, 3, 256, 256)
    outs = []
    for path in (raw, renamed):
        model = torch.load(path, map_location="cpu", weights_only=False)["model"].float().eval()
        with torch.no_grad():
            pred, feats = model(x.clone())
        outs.append([pred, *feats])
    same = all(torch.equal(a, b) for a, b in zip(*outs))
    return same, float(outs[1][0][..., 4].max()), float(outs[1][0].abs().sum())


def check_renamed(raw, renamed):
    names = pickle_globals(renamed)
    assert not [n for n in names if n.startswith("yolov5.") or n.startswith(SEED_MODULE)], names
    assert {"models.yolo.DetectionModel", "models.yolo.Detect", "models.common.S2Attention"} <= set(names), names
    same, max_obj, abs_sum = check_parity(raw, renamed)
    assert same, "renamed checkpoint computes something else"
    print(f"parity: identical outputs (max objectness {max_obj:.6f}, sum|pred| {abs_sum:.4f})")
    return names


EXPECTED = REPO / "tests" / "data" / "yolov5s-s2-expected.pt"


def write_expected(raw, dest=EXPECTED, imgsz=320, seed=7):
    """YOLOv5's own export-mode output of train.py's best.pt on a seeded input, for the tests to compare
    our loading and ONNX against without the yolov5 package. The S2 shift is the clean one: the seed's
    in-place copy smears on eager CPU, and the clean shift is the project's definition (models/s2.py)."""
    import torch
    import models.s2
    import tests.seed_code
    from yolov5.models.yolo import Detect

    tests.seed_code.spatial_shift1, tests.seed_code.spatial_shift2 = models.s2.spatial_shift1, models.s2.spatial_shift2
    model = torch.load(raw, map_location="cpu", weights_only=False)["model"].float().fuse().eval()
    for m in model.modules():
        if isinstance(m, Detect):
            m.export, m.inplace = True, False
    x = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x)[0]
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"seed": seed, "imgsz": imgsz, "x_sum": float(x.sum()), "y": y}, dest)
    print(f"wrote {dest}: YOLOv5 export-mode output {tuple(y.shape)}, max {float(y.abs().max()):.4g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/attn-demo-v5"))
    ap.add_argument("--epochs", type=int, default=32, help="train.py epochs (~15 min on 2 CPU cores)")
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--weights", default="", help="continue training from this (un-renamed) best.pt; '' = scratch")
    ap.add_argument("--epochs-before", type=int, default=0, help="epochs --weights was trained for (recorded)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--inspect", type=Path, help="only print a checkpoint's globals and S2 width")
    ap.add_argument("--expected", type=Path, metavar="RAW_BEST_PT",
                    help="only write tests/data/yolov5s-s2-expected.pt from train.py's (un-renamed) best.pt")
    args = ap.parse_args()
    if args.inspect:
        return inspect(args.inspect)
    if args.expected:
        offline_env(args.out.resolve())
        repo_imports()
        return write_expected(args.expected)
    out = args.out.resolve()
    offline_env(out)
    make_dataset, s2_classes = repo_imports()
    install_s2(s2_classes)
    data = make_dataset(out / "data")  # the same synthetic set as tools/make_demo.py (same seed)
    cfg = write_cfg(out, nc=3)
    best, seconds = train(data, cfg, out, args.epochs, args.imgsz, args.workers, args.weights)
    map50, map50_95 = validate(best, data, args.imgsz, args.workers, out)
    dest = REPO / "models" / "demo" / "yolov5s-s2.pt"
    rename_checkpoint(best, dest)
    names = check_renamed(best, dest)
    print("globals:", *names, sep="\n  ")
    # a fresh process: this one aliases the repo's `models.*` paths to yolov5's, hiding the project's models
    subprocess.run([sys.executable, __file__, "--expected", str(best), "--out", str(out)], check=True)
    import yolov5

    entry = {"checkpoint": dest.name, "epochs": args.epochs_before + args.epochs, "imgsz": args.imgsz, "mAP50": map50,
             "mAP50-95": map50_95, "size_mb": round(dest.stat().st_size / 2 ** 20, 2),
             "trained_with": f"yolov5 {yolov5.__version__} train.py"}
    metrics_file = REPO / "models" / "demo" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    metrics["yolov5s-s2"] = entry
    metrics_file.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"yolov5s-s2 {entry} (train.py wall-clock {seconds / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
