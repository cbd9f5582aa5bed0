"""`python -m export`: checkpoint -> export twins -> ONNX (-> lint, TensorRT engine, parity, report).

Exit codes: 0 ok, 2 bad input, 3 export or build failed, 4 parity or int8 accuracy failed (artifacts still written).
"""

import argparse
import functools
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm

import models
import plugins
from calib.demo import demo_dataset
from calib.int8 import Int8Job, make_int8
from calib.quantize import METHODS
from calib.rules import blocks as int8_blocks
from calib.rules import fp32_islands
from calib.source import DEFAULT_N, calibration_files
from export import generic, kinds
from export.accuracy import LabelledMAP
from export.build import PRECISIONS, BuildFailed, BuildUnavailable, build_engine
from export.lint import lint
from export.lint import summary as lint_summary
from export.load import CheckpointError, load
from export.images import MAX_IMAGES, parse_imgsz, read_images, tile
from export.bench import DEFAULT_ROUNDS, DEFAULT_WARMUP, Fresh, interleaved, module_costs, paired_ratios, \
    thread_settings, where_time_goes
from export.parity import MAX_PICTURED, OrtRunner, TorchRunner, TrtRunner, compare, engine_runtime, localize
from export.report import write_report
from export.rewrite import outermost_user_blocks, rewrite
from export.user_code import pickled_name
from export.to_onnx import export_yolo, node_scope
from models import fla

EXIT_OK, EXIT_BAD_INPUT, EXIT_EXPORT_FAILED, EXIT_PARITY_FAILED = 0, 2, 3, 4


class UsageError(CheckpointError):
    """Bad arguments: one line, exit code 2."""


class ExportFailed(Exception):
    exit_code = EXIT_EXPORT_FAILED


def parser():
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0],
                                epilog="Also: python -m export parity --weights W --onnx F [--engine E] [--bench N]; "
                                       "python -m export bench MODEL [MODEL ...] (see its --help). "
                                       "Exit codes: 0 ok, 2 bad input, 3 export or build failed, 4 parity or int8 "
                                       "accuracy failed.")
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["parity"]:
        from export.parity import main as parity_main

        return parity_main(argv[1:])
    if argv[:1] == ["bench"]:
        from export.bench import main as bench_main

        return bench_main(argv[1:])
    args = parser().parse_args(argv)
    ort.set_default_logger_severity(0 if args.verbose else 2)  # 2 (warnings) is ONNX Runtime's own default
    try:
        return run(args)
    except (CheckpointError, ExportFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        ort.set_default_logger_severity(2)  # process-wide: a caller (a test) running main again starts quiet


def run(args):
    plan = _plan(args)
    loaded = load(args.weights, code=args.code)
    imgsz = parse_imgsz(args.imgsz if args.imgsz is not None else loaded.imgsz or 640, max(loaded.stride))
    images = read_images(args.images, imgsz)
    data = _labelled_data(args, plan)
    kind = kinds.of(loaded)
    accuracy = LabelledMAP(data, imgsz, args.batch, kind.to_v8_layout, loaded.names) if data else None
    calibration = calibration_files(args.calib, data, args.calib_n) if "int8" in plan.files else None
    out = args.out or Path("runs") / "export" / args.weights.stem
    _say(f"loaded {args.weights}: {kind.label} ({loaded.source}, {'fp16' if loaded.saved_half else 'fp32'} weights, "
         f"{loaded.nc} classes)" + (f"; remapped {len(loaded.remapped)} classes" if loaded.remapped else ""))
    for path, ours in loaded.remapped.items():
        _say(f"  {path} -> {ours}")
    for file in dict.fromkeys(loaded.user_code.values()):
        classes = ", ".join(q.rpartition(".")[2] for q, f in loaded.user_code.items() if f == file)
        _say(f"  --code: imported {classes} from {file}")
    twin, checks = rewrite(loaded.model, imgsz, images=images[:1])
    user_blocks = _as_written(twin, loaded)
    _check_excludes(twin, args.int8_exclude, kind)
    plugin_blocks = plugins.apply(twin) if args.plugins else 0
    for c in checks:
        _say(f"  {c.name}: {c.reference} -> {c.twin}, max abs diff {c.max_abs:.3g} ({c.rel:.2g} of scale)"
             + (f"; note: {c.note}" if c.note else ""))
    out.mkdir(parents=True, exist_ok=True)
    files = _export_float(args, plan, twin, loaded, imgsz, out, user_blocks)
    report = _new_report(args, loaded, files, imgsz, plan, checks)
    if user_blocks:
        report["user_blocks"], report["user_code"] = user_blocks, loaded.user_code
    if args.plugins:
        report["plugins"] = _plugin_summary(onnx.load(str(files[plan.float_files[0]])), plugin_blocks)
        _say(f"plugins: {report['plugins']['nodes']} custom-op nodes in {plugin_blocks} blocks, backed by local "
             f"functions {report['plugins']['functions']}" if plugin_blocks else
             "plugins: no block of this model has a custom op (STA and S2 do); exported with standard ops")
    if calibration:
        files["int8"] = out / f"{args.weights.stem}_int8.onnx"
        report["int8"] = _int8(args, loaded.model, kind, files, calibration, imgsz, accuracy)
    report["onnx_files"] = {p: str(f) for p, f in files.items()}
    report["onnx"] = str(files[plan.primary])
    _lint(report, files)
    if args.engine:
        _engine(args, report, loaded, imgsz, files, out)
    runners = _runners(loaded, twin, imgsz, {_backend_key(p, plan): f for p, f in files.items()},
                       report.get("engine"), report)
    batch_images = tile(images, args.batch)
    if not args.no_parity:
        _parity(report, runners, batch_images, plan, args.batch, twin, imgsz, kind.to_v8_layout)
    if accuracy:
        scored = {b: r for b, r in runners.items() if b != "torch"}  # the twin in PyTorch: parity covers it
        report["accuracy"] = accuracy.table(scored, _precision_of(report, plan))
        for row in report["accuracy"]["models"]:
            _say(f"mAP {row['backend']} {row['precision']}: mAP50 {row['map50']:.4f}, mAP50-95 {row['map50_95']:.4f} "
                 f"({row['images']} images, {row['instances']} labels)")
    if args.bench:
        _bench(report, args, runners, batch_images[:args.batch], files[plan.primary], imgsz)
    return _finish(report, out)


AS_WRITTEN = "no export twin: exported as written"


@dataclass(frozen=True)
class Plan:
    """Which ONNX files the run writes and which one is primary (the engine's, else the most reduced)."""
    files: tuple  # precisions, e.g. ("fp32", "fp16", "int8")
    primary: str

    @property
    def float_files(self):
        return tuple(p for p in self.files if p != "int8")


def _plan(args):
    if args.batch < 1 or args.bench_rounds < 1 or args.bench < 0 or args.calib_n < 0 or args.int8_tolerance < 0:
        raise UsageError("--batch and --bench-rounds must be >= 1, and --bench, --calib-n and --int8-tolerance >= 0")
    if args.half and args.engine == "fp32":
        raise UsageError("--engine fp32 builds from an fp32 ONNX: drop --half (or use --engine fp16)")
    int8 = args.int8 or args.engine == "int8"
    if not int8 and (args.calib or args.int8_exclude):
        raise UsageError("--calib and --int8-exclude configure the int8 model: add --int8 (or --engine int8)")
    half = args.half or args.engine == "fp16"
    files = ("fp32", "fp16", "int8") if int8 else ("fp16",) if half else ("fp32",)
    primary = args.engine or ("int8" if int8 else "fp16" if half else "fp32")
    return Plan(files, primary)


def _labelled_data(args, plan):
    """--data, else the demo dataset when an int8 run on a shipped demo model has no other calibration source."""
    if args.data is not None:
        return args.data
    if "int8" in plan.files and args.calib is None and _is_demo(args.weights):
        data = demo_dataset()
        _say(f"demo dataset: {data.parent} (calibration: train split, accuracy: val split)")
        return data
    return None


def _is_demo(weights):
    try:
        return Path(weights).resolve().parent == models.DEMO_DIR.resolve()
    except OSError:
        return False


def _check_excludes(model, names, kind):
    known = {n for n, _ in model.named_modules() if n}
    for name in names:
        if name not in known:
            example = ", ".join(b.path for b in int8_blocks(model, kind)[:3])
            raise UsageError(f"--int8-exclude {name}: no such module in the model; use module paths such as "
                             f"{example}")


def _export_float(args, plan, twin, loaded, imgsz, out, user_blocks):
    """Write the fp32 / fp16 ONNX files; the --code blocks go through the generic rewrites (recorded per block)."""
    files, sources = {}, generic.block_source_files(twin, list(user_blocks))
    for precision in plan.float_files:
        path = out / f"{args.weights.stem}{'' if precision == 'fp32' else '_' + precision}.onnx"
        log = {}
        with generic.exportable_calls(twin, list(user_blocks)) as used:
            _stage("ONNX export", lambda: export_yolo(
                twin, loaded, path, imgsz, batch=args.batch, dynamic=args.dynamic, half=precision == "fp16",
                opset=args.opset, simplify=not args.no_simplify, verbose=args.verbose, log=log))
        _say(f"wrote {path}")
        files[precision] = path
        for block, records in generic.per_block(sources, used, log["tracer_warnings"], log["slice_writes"]).items():
            for r in records:
                if r not in user_blocks[block]["rewrites"]:
                    user_blocks[block]["rewrites"].append(r)
                    _say(f"  {block}: {r['rewrite']}: {r['detail']}")
    return files


def _lint(report, files):
    report["lint"] = []
    for precision, path in files.items():
        findings = lint(onnx.load(str(path)), dynamic=report["dynamic"])
        _say(f"lint {path.name}: {lint_summary(findings)}")
        for f in findings:
            block = node_scope(f["node"])  # the module whose node it is: which block to look at
            _say(f"  {f['severity']}: {f['message']} ({f['node']})")
            report["lint"].append({**f, "onnx": precision, "block": block})


def _int8(args, model, kind, files, calibration, imgsz, accuracy):
    calib_files, source = calibration
    job = Int8Job(files["fp32"], files["int8"], model, kind, calib_files, source, imgsz, args.batch,
                  args.calib_method, list(args.int8_exclude), args.int8_tolerance)
    _say(f"int8: calibrating on {len(calib_files)} images ({source}, method {args.calib_method})")
    if accuracy:
        reference_map = accuracy.of({"onnxruntime fp32": OrtRunner(files["fp32"])})["onnxruntime fp32"]["map50_95"]
        section = _stage("INT8 quantization", lambda: make_int8(
            job, evaluate=lambda path: accuracy.measure({"trial": OrtRunner(path)})["trial"]["map50_95"],
            reference_map=reference_map))
    else:
        section = _stage("INT8 quantization", lambda: make_int8(job))
    _say(f"wrote {files['int8']}: {section['quantized_nodes']} int8 nodes, {section['float_nodes']} kept float"
         + (f", float blocks {section['float_blocks']}" if section["float_blocks"] else ""))
    if "drop_points" in section:
        _say(f"int8 mAP50-95 {section['map50_95_int8']:.4f} vs fp32 {section['map50_95_fp32']:.4f}: drop "
             f"{section['drop_points']:.2f} points (tolerance {args.int8_tolerance}) -> "
             f"{'pass' if section['pass'] else 'FAIL'}")
    else:
        section["note"] = "no labelled data (--data): the int8 accuracy drop was not measured"
        _say(f"int8: {section['note']}")
    return section


def _engine(args, report, loaded, imgsz, files, out):
    precision = args.engine
    onnx_path = files[precision]
    engine_path = out / f"{onnx_path.stem}.engine"
    islands = fp32_islands(onnx.load(str(files["fp16"]))) if precision == "int8" else ()
    info = _stage("TensorRT build", lambda: build_engine(
        onnx_path, engine_path, precision=precision, imgsz=imgsz, batch=args.batch, dynamic=args.dynamic,
        workspace_gib=args.workspace, metadata=_engine_metadata(loaded, imgsz, args, precision),
        plugins=args.plugins, fp32_layers=islands, verbose=args.verbose))
    report["engine"], report["engine_build"] = str(engine_path), info
    _say(f"wrote {engine_path} ({info['backend']} {info['tensorrt_version']}, {info['build_s']} s) "
         f"and {engine_path.name}.json")
    if info.get("int8"):
        _say(f"  note: {info['int8']}")


def _backend_key(precision, plan):
    """Report key of the ONNX Runtime run of a file: `onnxruntime` for the primary one, else onnxruntime_<precision>."""
    return "onnxruntime" if precision == plan.primary else f"onnxruntime_{precision}"


def _precision_of(report, plan):
    """Backend key -> the precision it runs."""
    keys = {_backend_key(p, plan): p for p in plan.files}
    return {"reference": "fp32", "torch": "fp32", **keys, "tensorrt": report.get("engine_build", {}).get("precision")}


def _finish(report, out):
    failed = [b for b, r in report["parity"].items() if r.get("pass") is False]
    if report.get("int8", {}).get("pass") is False:
        failed.append("int8 accuracy")
    report["exit_code"] = EXIT_PARITY_FAILED if failed else EXIT_OK
    write_report(report, out)
    _say(f"wrote {out / 'report.json'}, report.md" + "".join(f", {p}" for p in report["pictures"]))
    if failed:
        print(f"error: {', '.join(failed)} failed (see {out / 'report.md'})", file=sys.stderr)
    return report["exit_code"]


def _plugin_summary(proto, blocks):
    nodes = [n.op_type for n in proto.graph.node if n.domain == plugins.DOMAIN]
    return {"blocks": blocks, "nodes": len(nodes), "ops": {op: nodes.count(op) for op in sorted(set(nodes))},
            "functions": sorted(f.name for f in proto.functions)}


def _as_written(twin, loaded):
    """{module path: report entry} for the --code blocks, which have no export twin."""
    blocks = {}
    for name in outermost_user_blocks(twin):
        cls = type(twin.get_submodule(name))
        qual = pickled_name(cls)
        blocks[name] = {"class": qual, "file": loaded.user_code.get(qual, ""), "export": AS_WRITTEN, "rewrites": []}
        _say(f"  {name}: {cls.__name__}: {AS_WRITTEN}")
    return blocks


def _new_report(args, loaded, files, imgsz, plan, checks):
    return {"weights": str(args.weights), "onnx": None, "onnx_files": {}, "engine": None, "imgsz": list(imgsz),
            "batch": args.batch, "dynamic": args.dynamic, "precision": plan.primary, "lint": [],
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
    except CheckpointError:  # bad input found while working (an unreadable calibration image): exit 2
        raise
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


def _runners(loaded, twin, imgsz, onnx_files, engine_path, report):
    """reference (the checkpoint's own modules), torch (export twin), one ONNX Runtime runner per file, TensorRT."""
    runners = {"reference": TorchRunner(fla.defined_at(loaded.model, *imgsz)), "torch": TorchRunner(twin)}
    runners.update({key: OrtRunner(path) for key, path in onnx_files.items()})
    if engine_path:
        trt, reason = engine_runtime()
        if trt is None:
            report["parity"]["tensorrt"] = {"skipped": reason}
        else:
            runners["tensorrt"] = TrtRunner(engine_path, trt)
    return runners


def _parity(report, runners, images, plan, batch, twin, imgsz, to_v8_layout):
    reference = runners["reference"]
    precisions = _precision_of(report, plan)
    report["_images"] = images[:MAX_PICTURED]  # drawn in detections.png, not written to report.json
    for backend in tqdm([b for b in runners if b != "reference"], desc="parity", leave=False, disable=None):
        wanted = precisions[backend]
        r = report["parity"][backend] = compare(reference, runners[backend], images, wanted, batch, to_v8_layout)
        r["precision"] = wanted
        _say(f"parity {backend} ({wanted}): max abs {r['max_abs']:.3g}, cosine {r['cosine']:.7f}, box recall "
             f"{r['box_recall']:.3f}, precision {r['box_precision']:.3f}, mAP50-95 {r['map50_95']:.3f} -> "
             f"{'pass' if r['pass'] else 'FAIL'}")
    failed_float = [b for b in runners if b.startswith("onnxruntime") and precisions[b] != "int8"
                    and report["parity"][b]["pass"] is False]
    if failed_float:
        precision = precisions[failed_float[0]]
        with tempfile.TemporaryDirectory() as tmp:
            with generic.exportable_calls(twin, list(report.get("user_blocks", {}))):  # as the export traced them
                first, errors = localize(reference.model, twin, images, precision == "fp16", tmp, precision)
        report["localization"] = {"backend": failed_float[0], "first_divergent_block": first, "block_errors": errors}
        _say(f"localization: first diverging block in ONNX Runtime: {first}")


def _bench(report, args, runners, images, onnx_path, imgsz):
    """Interleaved timing of every backend, then where the time goes in the primary ONNX (ORT profile vs FLOPs)."""
    timed = {"torch" if b == "reference" else b: Fresh(functools.partial(OrtRunner, r.path)) if isinstance(r, OrtRunner)
             else r for b, r in runners.items() if b != "torch"}  # the twin in PyTorch times like the reference
    report["speed"] = interleaved(timed, images, args.bench, args.bench_rounds)
    report["bench"] = {"threads": thread_settings(torch.get_num_threads()), "rounds": args.bench_rounds,
                       "iterations_per_round": args.bench, "warmup": DEFAULT_WARMUP, "batch": len(images)}
    base = report["speed"]["torch"]
    for backend, s in report["speed"].items():
        s["speedup_vs_torch"] = statistics.median(paired_ratios(base, s))  # per round, then the median
        _say(f"speed {backend}: median {s['median_ms']:.2f} ms (rounds {s['min_ms']:.2f}-{s['max_ms']:.2f}), "
             f"{s['images_per_s']:.1f} images/s, {s['speedup_vs_torch']:.2f}x PyTorch eager")
    reference = runners["reference"].model
    blocks = where_time_goes(onnx_path, images, torch.get_num_threads(), reference,
                             module_costs(reference, imgsz, len(images)))
    report["blocks"] = {"onnx": onnx_path.name, **blocks}
    for r in blocks["rows"]:
        if r["kind"] == "attention":
            _say(f"  {r['module']} {r['type']}: {r['ms']:.2f} ms, {r['time_share']:.1%} of the time, "
                 f"{r['flop_share']:.1%} of the FLOPs")
