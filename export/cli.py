"""`python -m export`: parse the arguments, run a job (export.pipeline), map its errors to exit codes.

    python -m export [--weights best.pt] [--engine fp16] ...      the main job (export.pipeline.export_job)
    python -m export parity --weights W --onnx F [--engine E]      an existing export against its checkpoint
    python -m export bench MODEL [MODEL ...]                       several models timed side by side

Exit codes: 0 ok, 2 bad input, 3 export or build failed, 4 parity or int8 accuracy failed (artifacts still written),
130 interrupted (Ctrl-C).
"""

import argparse
import os
import sys
import traceback
from pathlib import Path

import onnxruntime as ort

import models
from calib.quantize import METHODS
from calib.source import DEFAULT_N
from export.checkpoint.kinds import LAYOUTS
from export.graph.nms import LAYOUTS as NMS_LAYOUTS
from export.engine.build import PRECISIONS
from export.errors import EXIT_INTERRUPTED, EXIT_STAGE_FAILED, BadInput, StageFailed
from export.inputs.images import MAX_IMAGES
from export.pipeline import bench_job, export_job, parity_job
from export.text import shown
from export.verify.timing import DEFAULT_ROUNDS, DEFAULT_WARMUP

MAX_MESSAGE = 2000  # characters of one error line


def main(argv=None):
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # artifacts are written atomically: none is left half-written under its final name
        print("error: interrupted; nothing half-written (artifacts appear whole or not at all)", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv):
    if argv[:1] == ["parity"]:
        return _guarded(parity_job.run, parity_parser().parse_args(argv[1:]), check=check_parity)
    if argv[:1] == ["bench"]:
        return _guarded(bench_job.run, bench_parser().parse_args(argv[1:]), check=check_bench)
    args = parser().parse_args(argv)
    ort.set_default_logger_severity(0 if args.verbose else 2)  # 2 (warnings) is ONNX Runtime's own default
    try:
        return _guarded(export_job.run, args, check=check)
    finally:
        ort.set_default_logger_severity(2)  # process-wide: a caller (a test) running main again starts quiet


def _guarded(job, args, check=None):
    """Run `job(args)`; a BadInput or StageFailed becomes its one-line message on stderr and its exit code, any
    other exception one line and exit code 3 (its traceback with -v). Messages are escaped: they may quote
    names from the checkpoint."""
    try:
        if check:
            check(args)
        return job(args)
    except (BadInput, StageFailed) as e:
        print(f"error: {shown(e, MAX_MESSAGE)}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a failure of ours, not of the input: still one line
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {shown(str(e).splitlines()[0] if str(e) else '', MAX_MESSAGE)} (an "
              f"internal error; rerun with -v for the traceback)", file=sys.stderr)
        return EXIT_STAGE_FAILED


def check(args):
    """Argument combinations that cannot work: BadInput (exit 2) before any work."""
    if args.batch < 1 or args.bench_rounds < 1 or args.bench < 0 or args.calib_n < 0 or args.int8_tolerance < 0:
        raise BadInput("--batch and --bench-rounds must be >= 1, and --bench, --calib-n and --int8-tolerance >= 0")
    if args.half and args.engine == "fp32":
        raise BadInput("--engine fp32 builds from an fp32 ONNX: drop --half (or use --engine fp16)")
    if not (args.int8 or args.engine == "int8") and (args.calib or args.int8_exclude):
        raise BadInput("--calib and --int8-exclude configure the int8 model: add --int8 (or --engine int8)")
    if args.fp32_keep and not (args.half or args.engine in ("fp16", "int8") or args.int8):
        raise BadInput("--fp32-keep configures the fp16 model: add --half (or --engine fp16)")
    check_nms(args)
    check_out(args.out)
    check_code(args.code)


def check_nms(args):
    given = [f for f, v in (("--conf", args.conf), ("--iou", args.iou), ("--max-det", args.max_det)) if v is not None]
    if not args.nms and (given or args.agnostic_nms):
        raise BadInput(f"{', '.join(given) or '--agnostic-nms'} configure(s) the end-to-end file: add --nms")
    if not (0 <= (args.conf if args.conf is not None else 0.25) <= 1 and 0 <= (args.iou if args.iou is not None
                                                                              else 0.7) <= 1):
        raise BadInput("--conf and --iou must lie in 0..1")
    if args.max_det is not None and not 1 <= args.max_det <= 10_000:
        raise BadInput("--max-det must lie in 1..10000")


def check_out(out):
    """--out must be a folder we can create or write: checked before loading, so nothing is written first."""
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder; pass a folder (it is created if missing)")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir():
        raise BadInput(f"--out {out}: {existing} is a file, so the folder cannot be created; pass another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: {existing} is not writable; pass a folder you can write to")


def check_code(folders):
    for folder in folders:
        if not folder.is_dir():
            raise BadInput(f"--code {folder}: not a folder; pass your fork's root folder (the one holding its "
                           f"ultralytics/ or models/ package)")
        if next(folder.rglob("*.py"), None) is None:
            raise BadInput(f"--code {folder}: no Python files under it; pass your fork's root folder")


def check_bench(args):
    if min(args.batch, args.rounds, args.iterations) < 1 or args.warmup < 0 or (args.threads or 1) < 1:
        raise BadInput("--batch, --rounds, --iterations and --threads must be >= 1, --warmup >= 0")
    check_out(args.out)
    check_code(args.code)


def check_parity(args):
    check_code(args.code)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (the usage is one --help away), exit code 2 as argparse's."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _prog(sub=""):
    """How the user called us: the console script or `python -m export`."""
    name = "yolo-attn-export" if Path(sys.argv[0]).name == "yolo-attn-export" else "python -m export"
    return f"{name} {sub}".strip()


def parser():
    p = _Parser(prog=_prog(), description=__doc__.splitlines()[0],
                                epilog="Also: python -m export parity --weights W --onnx F [--engine E] [--bench N]; "
                                       "python -m export bench MODEL [MODEL ...] (see its --help). "
                                       "Exit codes: 0 ok, 2 bad input, 3 export or build failed, 4 parity or int8 "
                                       "accuracy failed, 130 interrupted.")
    p.add_argument("--weights", type=Path, default=models.demo_checkpoint("sta"),
                   help="checkpoint to export (default: the shipped STA demo model)")
    p.add_argument("--code", type=Path, action="append", default=[], metavar="DIR",
                   help="opt-in: import the classes of unknown blocks from your fork's source under DIR (its root "
                        "folder, e.g. the one holding ultralytics/nn/...) and export them as written; this runs that "
                        "code (repeatable)")
    p.add_argument("--imgsz", default=None, help="N or H,W, multiples of the model stride (default: training imgsz)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and spatial axes")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--half", action="store_true", help="fp16 ONNX with explicit fp32 islands")
    p.add_argument("--int8", action="store_true",
                   help="also write <stem>_int8.onnx: int8 QDQ (TensorRT explicit quantization), calibrated on --calib "
                        "or the train split of --data (the demo models: their own synthetic dataset)")
    p.add_argument("--engine", choices=PRECISIONS, default=None,
                   help="build a TensorRT engine from the ONNX of that precision (int8 implies --int8)")
    p.add_argument("--calib", type=Path, default=None, help="folder of INT8 calibration images")
    p.add_argument("--calib-n", type=int, default=DEFAULT_N, help="calibration images used, spread evenly (0: all)")
    p.add_argument("--calib-method", choices=tuple(METHODS), default="max", help="activation range calibration")
    p.add_argument("--data", type=Path, default=None,
                   help="dataset YAML (ultralytics or YOLOv5): labelled mAP50 / mAP50-95 on its val split for every "
                        "model the run produces")
    p.add_argument("--int8-tolerance", type=float, default=1.0, metavar="POINTS",
                   help="largest int8 mAP50-95 drop against fp32 (points) before blocks are kept float")
    p.add_argument("--int8-exclude", action="append", default=[], metavar="NAME",
                   help="module path kept float in the int8 model, e.g. model.10 (repeatable)")
    p.add_argument("--nms", nargs="?", const="ultralytics", choices=NMS_LAYOUTS, default=None,
                   help="also write end-to-end files with NMS in the graph: `--nms` / `--nms ultralytics` (standard "
                        "ONNX ops, output (B, max_det, 6), run by ultralytics' YOLO()) or `--nms trt` (TensorRT's "
                        "EfficientNMS_TRT plugin: num_dets, det_boxes, det_scores, det_classes)")
    p.add_argument("--conf", type=float, default=None, help="--nms: confidence threshold (default 0.25)")
    p.add_argument("--iou", type=float, default=None, help="--nms: NMS IoU threshold (default 0.7)")
    p.add_argument("--max-det", type=int, default=None, help="--nms: detections kept per image (default 300)")
    p.add_argument("--agnostic-nms", action="store_true", help="--nms: class-agnostic NMS")
    p.add_argument("--layout", choices=LAYOUTS, default="native",
                   help="ONNX output layout: native (the checkpoint's own; for YOLOv5 checkpoints YOLOv5's (B, "
                        "anchors, 5+nc), read by YOLOv5's DetectMultiBackend) or ultralytics ((B, 4+nc, anchors), "
                        "a YOLOv5 model's objectness folded into its class scores, read by ultralytics' YOLO() and "
                        "`yolo predict`); the same for ultralytics checkpoints")
    p.add_argument("--fp32-keep", action="append", default=[], metavar="NAME",
                   help="module path kept fp32 inside the fp16 model (an fp32 island), e.g. model.18.1 (repeatable); "
                        "when fp16 parity fails in one block, the run finds and keeps it by itself")
    p.add_argument("--workspace", type=float, default=4.0, help="TensorRT workspace limit, GiB")
    p.add_argument("--plugins", action="store_true",
                   help="emit STA unfold/fold and the S2 shift as yolo_attn custom ops backed by local ONNX functions "
                        "(TensorRT >= 10.7 runs our plugins for them when `tensorrt` is present)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/export/<weights stem>/)")
    p.add_argument("--images", type=Path, default=models.DEMO_DIR / "images",
                   help=f"images for the probe and parity runs, the first {MAX_IMAGES} by name (default: the shipped samples)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity harness")
    p.add_argument("--bench", type=int, default=0, metavar="N",
                   help="benchmark: N timed calls per backend per round, backends interleaved; also profiles the "
                        "ONNX to charge time to each block (0: no benchmark)")
    p.add_argument("--bench-rounds", type=int, default=DEFAULT_ROUNDS, metavar="R", help="benchmark rounds")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show everything the tools log below warning level: TensorRT's parser and builder, ONNX "
                        "Runtime's sessions, onnxslim's passes")
    return p



def parity_parser():
    p = _Parser(prog=_prog("parity"), description="Compare ONNX/TensorRT with PyTorch.")
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--onnx", type=Path, required=True)
    p.add_argument("--engine", type=Path, default=None)
    p.add_argument("--images", type=Path, default=models.DEMO_DIR / "images")
    p.add_argument("--imgsz", default=None, help="N or H,W (default: the size the ONNX file was exported at)")
    p.add_argument("--code", type=Path, action="append", default=[], metavar="DIR",
                   help="as for the main job: import unknown blocks' classes from your fork's source (runs that code)")
    p.add_argument("--bench", type=int, default=0, help="timed calls per backend per round, backends interleaved")
    return p


def bench_parser():
    p = _Parser(
        prog=_prog("bench"),
        description="Time several models side by side on ONNX Runtime (CPU): interleaved rounds, one run. Each "
                    "MODEL is a checkpoint (.pt, exported here), a model YAML (yolov8n.yaml, untrained: "
                    "architecture only) or an .onnx file (its precision read from its metadata). Ratios are "
                    "against the first MODEL of the same precision.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="PATH or NAME=PATH (NAME labels the row; .onnx files given under one NAME with different "
                        "precisions share a row group)")
    p.add_argument("--imgsz", default="640", help="N or H,W (default 640)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--nc", type=int, default=None, help="classes of YAML models (default: the first checkpoint's)")
    p.add_argument("--half", action="store_true", help="also time the fp16 ONNX of every checkpoint and YAML")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--iterations", type=int, default=20, help="timed calls per model per round")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: torch's)")
    p.add_argument("--images", type=Path, default=models.DEMO_DIR / "images", help="input: the first image here")
    p.add_argument("--code", type=Path, action="append", default=[], metavar="DIR",
                   help="as for the main job: import unknown blocks' classes from your fork's source (runs that code)")
    p.add_argument("--out", type=Path, default=Path("runs") / "bench")
    return p
