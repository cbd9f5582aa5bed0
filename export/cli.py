"""`python -m export`: checkpoint -> export twins -> ONNX (-> lint, TensorRT engine, parity, report).

Exit codes: 0 ok, 2 bad input, 3 export or build failed, 4 parity failed (artifacts still written).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

import models
import plugins
from export import kinds
from export.build import BuildFailed, BuildUnavailable, build_engine
from export.lint import lint
from export.lint import summary as lint_summary
from export.load import CheckpointError, load
from export.images import MAX_IMAGES, read_images, tile
from export.parity import OrtRunner, TorchRunner, TrtRunner, bench, compare, engine_runtime, localize
from export.report import write_report
from export.rewrite import rewrite
from export.to_onnx import export_yolo
from models import fla

EXIT_OK, EXIT_BAD_INPUT, EXIT_EXPORT_FAILED, EXIT_PARITY_FAILED = 0, 2, 3, 4


class UsageError(CheckpointError):
    """Bad arguments: one line, exit code 2."""


class ExportFailed(Exception):
    exit_code = EXIT_EXPORT_FAILED


def parser():
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0],
                                epilog="Also: python -m export parity --weights W --onnx F [--engine E] [--bench N]. "
                                       "Exit codes: 0 ok, 2 bad input, 3 export or build failed, 4 parity failed.")
    p.add_argument("--weights", type=Path, default=models.demo_checkpoint("sta"),
                   help="checkpoint to export (default: the shipped STA demo model)")
    p.add_argument("--imgsz", default=None, help="N or H,W, multiples of the model stride (default: training imgsz)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and spatial axes")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--half", action="store_true", help="fp16 ONNX with explicit fp32 islands")
    p.add_argument("--engine", choices=("fp32", "fp16"), default=None,
                   help="build a TensorRT engine (fp16 builds from the fp16 ONNX)")
    p.add_argument("--workspace", type=float, default=4.0, help="TensorRT workspace limit, GiB")
    p.add_argument("--plugins", action="store_true",
                   help="emit STA unfold/fold and the S2 shift as yolo_attn custom ops backed by local ONNX functions "
                        "(TensorRT >= 10.7 runs our plugins for them when `tensorrt` is present)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/export/<weights stem>/)")
    p.add_argument("--images", type=Path, default=models.DEMO_DIR / "images",
                   help=f"images for the probe and parity runs, the first {MAX_IMAGES} by name (default: the shipped samples)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity harness")
    p.add_argument("--bench", type=int, default=0, metavar="N", help="timed iterations per backend (0: no benchmark)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["parity"]:
        from export.parity import main as parity_main

        return parity_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, ExportFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def run(args):
    if args.batch < 1 or args.bench < 0:
        raise UsageError("--batch must be >= 1 and --bench >= 0")
    if args.half and args.engine == "fp32":
        raise UsageError("--engine fp32 builds from an fp32 ONNX: drop --half (or use --engine fp16)")
    precision = "fp16" if args.half or args.engine == "fp16" else "fp32"
    loaded = load(args.weights)
    imgsz = parse_imgsz(args.imgsz if args.imgsz is not None else loaded.imgsz or 640, max(loaded.stride))
    images = read_images(args.images, imgsz)
    out = args.out or Path("runs") / "export" / args.weights.stem
    kind = kinds.of(loaded)
    _say(f"loaded {args.weights}: {kind.label} ({loaded.source}, {'fp16' if loaded.saved_half else 'fp32'} weights, "
         f"{loaded.nc} classes)" + (f"; remapped {len(loaded.remapped)} classes" if loaded.remapped else ""))
    for path, ours in loaded.remapped.items():
        _say(f"  {path} -> {ours}")
    twin, checks = rewrite(loaded.model, imgsz, images=images[:1])
    plugin_blocks = plugins.apply(twin) if args.plugins else 0
    for c in checks:
        _say(f"  {c.name}: {c.reference} -> {c.twin}, max abs diff {c.max_abs:.3g} ({c.rel:.2g} of scale)"
             + (f"; note: {c.note}" if c.note else ""))
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / f"{args.weights.stem}{'_fp16' if precision == 'fp16' else ''}.onnx"
    proto = _stage("ONNX export", lambda: export_yolo(
        twin, loaded, onnx_path, imgsz, batch=args.batch, dynamic=args.dynamic, half=precision == "fp16",
        opset=args.opset, simplify=not args.no_simplify))
    _say(f"wrote {onnx_path}")
    findings = lint(proto, dynamic=args.dynamic)
    _say(f"lint: {lint_summary(findings)}")
    for f in findings:
        _say(f"  {f['severity']}: {f['message']} ({f['node']})")
    report = _new_report(args, loaded, onnx_path, imgsz, precision, findings, checks)
    if args.plugins:
        report["plugins"] = _plugin_summary(proto, plugin_blocks)
        _say(f"plugins: {report['plugins']['nodes']} custom-op nodes in {plugin_blocks} blocks, backed by local "
             f"functions {report['plugins']['functions']}")
    if args.engine:
        engine_path = out / f"{args.weights.stem}{'_fp16' if precision == 'fp16' else ''}.engine"
        info = _stage("TensorRT build", lambda: build_engine(
            onnx_path, engine_path, half=precision == "fp16", imgsz=imgsz, batch=args.batch, dynamic=args.dynamic,
            workspace_gib=args.workspace, metadata=_engine_metadata(loaded, imgsz, args, precision),
            plugins=args.plugins))
        report["engine"], report["engine_build"] = str(engine_path), info
        _say(f"wrote {engine_path} ({info['backend']} {info['tensorrt_version']}, {info['build_s']} s) "
             f"and {engine_path.name}.json")
    batch_images = tile(images, args.batch)
    runners = _runners(loaded, twin, imgsz, onnx_path, report.get("engine"), report)
    if not args.no_parity:
        _parity(report, runners, batch_images, precision, args.batch, twin, imgsz, kind.to_v8_layout)
    if args.bench:
        _bench(report, runners, batch_images[:args.batch], args.bench)
    failed = [b for b, r in report["parity"].items() if r.get("pass") is False]
    report["exit_code"] = EXIT_PARITY_FAILED if failed else EXIT_OK
    write_report(report, out)
    _say(f"wrote {out / 'report.json'}, report.md, parity.png")
    if failed:
        print(f"error: parity failed for {', '.join(failed)} (see {out / 'report.md'})", file=sys.stderr)
    return report["exit_code"]


def _plugin_summary(proto, blocks):
    nodes = [n.op_type for n in proto.graph.node if n.domain == plugins.DOMAIN]
    return {"blocks": blocks, "nodes": len(nodes), "ops": {op: nodes.count(op) for op in sorted(set(nodes))},
            "functions": sorted(f.name for f in proto.functions)}


def _new_report(args, loaded, onnx_path, imgsz, precision, findings, checks):
    return {"weights": str(args.weights), "onnx": str(onnx_path), "engine": None, "imgsz": list(imgsz),
            "batch": args.batch, "dynamic": args.dynamic, "precision": precision, "lint": findings,
            "modules": [c.as_dict() for c in checks], "parity": {}, "speed": {}, "notes": _notes(checks),
            "checkpoint": {"kind": loaded.kind, "source": loaded.source, "saved_half": loaded.saved_half,
                           "remapped": loaded.remapped,
                           "names": loaded.names, "nc": loaded.nc, "stride": loaded.stride,
                           "train_imgsz": loaded.imgsz}}


def _say(text):
    tqdm.write(text)  # keeps progress bars and messages on separate lines


def _stage(name, fn):
    try:
        return fn()
    except (BuildUnavailable, BuildFailed) as e:
        raise ExportFailed(f"{name} failed: {e}") from e
    except Exception as e:  # the stage's own failure, reported in one line with exit code 3
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ExportFailed(f"{name} failed: {type(e).__name__}: {detail}") from e


def _notes(checks):
    notes = ["PyTorch reference: the checkpoint's own modules (reference twins), fp32 on CPU."]
    notes += sorted({c.note for c in checks if c.note})
    return notes


def _engine_metadata(loaded, imgsz, args, precision):
    return {"weights": str(args.weights), "names": loaded.names, "stride": max(loaded.stride), "imgsz": list(imgsz),
            "batch": args.batch, "task": loaded.task, "precision": precision, "dynamic": args.dynamic,
            "input": "images float32 [0,1] NCHW", "output": kinds.of(loaded).output_layout}


def _runners(loaded, twin, imgsz, onnx_path, engine_path, report):
    runners = {"reference": TorchRunner(fla.defined_at(loaded.model, *imgsz)), "torch": TorchRunner(twin),
               "onnxruntime": OrtRunner(onnx_path)}
    if engine_path:
        trt, reason = engine_runtime()
        if trt is None:
            report["parity"]["tensorrt"] = {"skipped": reason}
        else:
            runners["tensorrt"] = TrtRunner(engine_path, trt)
    return runners


def _parity(report, runners, images, precision, batch, twin, imgsz, to_v8_layout):
    reference = runners["reference"]
    for backend in tqdm([b for b in runners if b != "reference"], desc="parity", leave=False):
        wanted = "fp32" if backend == "torch" else precision
        report["parity"][backend] = compare(reference, runners[backend], images, wanted, batch, to_v8_layout)
        r = report["parity"][backend]
        _say(f"parity {backend}: max abs {r['max_abs']:.3g}, cosine {r['cosine']:.7f}, box recall {r['box_recall']:.3f}"
             f", precision {r['box_precision']:.3f}, mAP50-95 {r['map50_95']:.3f} -> {'pass' if r['pass'] else 'FAIL'}")
    if report["parity"].get("onnxruntime", {}).get("pass") is False:
        with tempfile.TemporaryDirectory() as tmp:
            first, errors = localize(reference.model, twin, images, precision == "fp16", tmp, precision)
        report["localization"] = {"backend": "onnxruntime", "first_divergent_block": first, "block_errors": errors}
        _say(f"localization: first diverging block in ONNX Runtime: {first}")


def _bench(report, runners, images, iterations):
    timed = {b: r for b, r in runners.items() if b in ("reference", "onnxruntime", "tensorrt")}
    for backend, runner in timed.items():
        report["speed"]["torch" if backend == "reference" else backend] = bench(runner, images, iterations)
    base = report["speed"]["torch"]["p50_ms"]
    for backend, s in report["speed"].items():
        s["speedup_vs_torch"] = base / s["p50_ms"]
        _say(f"speed {backend}: p50 {s['p50_ms']:.2f} ms, p90 {s['p90_ms']:.2f} ms, {s['images_per_s']:.1f} images/s, "
             f"{s['speedup_vs_torch']:.2f}x PyTorch eager")


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
