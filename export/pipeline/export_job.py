"""`python -m export`: checkpoint -> graph -> engine -> verify -> report.

`run(args)` calls one function per stage in order; each returns a small typed result (the dataclasses below)
and prints its one-line outcome. The report is assembled from those results at the end (`assemble_report`),
so no stage writes into another's output. Family specifics reach this job only through the family registry
(`models`), checkpoint-kind specifics only through `Kind`.
"""

import ast
import functools
import math
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from tqdm import tqdm
from ultralytics.utils.nms import non_max_suppression

import models
import plugins
from calib.demo import demo_dataset
from calib.int8 import Int8Job, make_int8
from calib.rules import blocks as int8_blocks
from calib.rules import fp32_islands
from calib.source import calibration_files
from export.checkpoint import kinds, load
from export.checkpoint.user_code import pickled_name
from export.engine.build import BuildFailed, BuildUnavailable, build_engine
from export.engine.build import backend as engine_backend
from export.errors import EXIT_OK, EXIT_VERDICT_FAILED, BadInput, StageFailed
from export.graph import generic
from export.graph.lint import lint
from export.graph.lint import summary as lint_summary
from export.graph.onnx_passes import node_scope
from export.graph.rewrite import outermost_user_blocks, rewrite
from export.graph.nms import NMSParams, params_record, with_nms
from export.graph.to_onnx import export_yolo, save
from export.inputs.images import parse_imgsz, read_images, tile
from export.report.export_report import write_report
from export.text import shown
from export.verify.accuracy import LabelledMAP
from export.verify.block_check import block_errors
from export.verify.localize import localize
from export.verify.nms_check import check_end_to_end
from export.verify.parity import MAX_PICTURED, THRESHOLDS, compare, own_fp16_error, thresholds_for
from export.verify.profile import module_costs, where_time_goes
from export.verify.runners import ORT_TWICE, OrtRunner, TorchRunner, TrtRunner, engine_runtime, ort_installed_twice
from export.verify.timing import DEFAULT_WARMUP, Fresh, interleaved, paired_ratios, thread_settings

AS_WRITTEN = "no export twin: exported as written"


# ---- the typed results the stages hand on --------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Which ONNX files the run writes and which one is primary (the engine's, else the most reduced)."""
    files: tuple  # precisions, e.g. ("fp32", "fp16", "int8")
    primary: str

    @property
    def float_files(self):
        return tuple(p for p in self.files if p != "int8")

    def backend_key(self, precision):
        """Report key of the ONNX Runtime run of a file: `onnxruntime` for the primary one, else onnxruntime_<p>."""
        return "onnxruntime" if precision == self.primary else f"onnxruntime_{precision}"


@dataclass
class Inputs:
    """The checkpoint and everything the user handed us with it, read and checked before any work."""
    loaded: object  # LoadedCheckpoint
    kind: kinds.Kind
    imgsz: tuple
    images: object  # (N,3,H,W) float tensor, letterboxed
    accuracy: object  # LabelledMAP on --data (or the demo dataset), None without labelled data
    calibration: tuple  # (image files, source description) when the run makes an int8 file, else None
    out: Path


@dataclass
class Rewritten:
    twin: torch.nn.Module  # export twins in place of every family block
    checks: list  # ModuleCheck per replaced block
    user_blocks: dict  # --code blocks: {module path: {"class", "file", "export", "rewrites"}}
    plugin_blocks: int  # blocks whose ops became yolo_attn custom ops (--plugins)


@dataclass
class Exported:
    files: dict  # precision -> ONNX path ("int8" added by the int8 stage)
    plugins: dict = None  # --plugins: custom-op nodes and their functions
    nms: dict = field(default_factory=dict)  # --nms: precision -> end-to-end ONNX path


@dataclass
class Engine:
    path: Path
    build: dict  # build_engine's record: backend, version, precision, profile, seconds, notes


@dataclass
class Verified:
    parity: dict = field(default_factory=dict)  # backend -> metrics and verdict, or {"skipped": reason}
    localization: dict = None
    block_check: dict = None  # --code blocks, each compared on its own with PyTorch (see _block_check)
    images: object = None  # the parity images pictured in detections.png
    accuracy: dict = None
    speed: dict = None
    bench: dict = None
    blocks: dict = None
    nms: dict = None  # --nms: each end-to-end file's check against the NMS of its plain file
    runtime: dict = field(default_factory=dict)  # ONNX Runtime version and providers, the TensorRT flavour built with


# ---- the job ---------------------------------------------------------------------------------------------------
def run(args):
    """The main job; returns its exit code (0, or 4 when a verdict failed). Raises BadInput / StageFailed."""
    plan = make_plan(args)
    inputs = read_inputs(args, plan)
    rewritten = rewrite_blocks(args, inputs)
    inputs.out.mkdir(parents=True, exist_ok=True)
    exported = export_onnx(args, plan, inputs, rewritten)
    int8 = quantize(args, inputs, rewritten, exported) if inputs.calibration else None
    if args.nms:
        end_to_end(args, inputs, exported)
    findings = lint_files(exported.files, args.dynamic, rewritten.user_blocks)
    engine = build(args, inputs, exported) if args.engine else None
    verified = verify(args, plan, inputs, rewritten, exported, engine)
    islands = [{"block": name, "reason": "--fp32-keep"} for name in args.fp32_keep]
    while len(islands) < MAX_AUTO_ISLANDS and (island := fp16_island_needed(verified, plan, args.fp32_keep)):
        islands.append(island)
        args.fp32_keep.append(island["block"])
        say(f"fp16: keeping {island['block']} in fp32 ({island['reason']}); exporting and checking again")
        exported.files.update(export_onnx(args, plan, inputs, rewritten, precisions=("fp16",)).files)
        if args.nms:
            end_to_end(args, inputs, exported, ("fp16",))
        findings = lint_files(exported.files, args.dynamic, rewritten.user_blocks)
        engine = build(args, inputs, exported) if args.engine == "fp16" else engine
        verified = verify(args, plan, inputs, rewritten, exported, engine)
    report = assemble_report(args, plan, inputs, rewritten, exported, int8, findings, engine, verified)
    report["fp32_islands"] = islands
    return finish(report, inputs.out)


MAX_AUTO_ISLANDS = 3


def fp16_island_needed(verified, plan, kept):
    """{"block", "reason"} when the fp16 ONNX failed parity and localisation named a block not yet kept fp32 (what
    the int8 sensitivity fallback does for int8: found, not guessed), else None."""
    located = verified.localization
    if not located or located["backend"] != plan.backend_key("fp16") or "fp16" not in plan.files:
        return None
    block = located["first_divergent_block"]
    if block is None or block in kept:
        return None
    error = located["block_errors"][block]
    how = f"{error:.2g} of its output scale" if math.isfinite(error) else "non-finite output"
    return {"block": block, "reason": f"fp16 parity failed and the block was the first to diverge ({how})"}


def make_plan(args):
    int8 = args.int8 or args.engine == "int8"
    half = args.half or args.engine == "fp16"
    files = ("fp32", "fp16", "int8") if int8 else ("fp16",) if half else ("fp32",)
    return Plan(files, args.engine or ("int8" if int8 else "fp16" if half else "fp32"))


def read_inputs(args, plan):
    loaded = load(args.weights, code=args.code)
    imgsz = parse_imgsz(args.imgsz if args.imgsz is not None else loaded.imgsz or 640, max(loaded.stride))
    images = read_images(args.images, imgsz)
    data = _labelled_data(args, plan)
    kind = kinds.of(loaded, args.layout)
    accuracy = LabelledMAP(data, imgsz, args.batch, kind.to_v8_layout, loaded.names) if data else None
    calibration = calibration_files(args.calib, data, args.calib_n) if "int8" in plan.files else None
    say(f"loaded {args.weights}: {kind.label} ({loaded.source}, {'fp16' if loaded.saved_half else 'fp32'} weights, "
        f"{loaded.nc} classes)" + (f"; remapped {len(loaded.remapped)} classes" if loaded.remapped else ""))
    for path, ours in loaded.remapped.items():
        say(f"  {path} -> {ours}")
    for file in dict.fromkeys(loaded.user_code.values()):
        classes = ", ".join(q.rpartition(".")[2] for q, f in loaded.user_code.items() if f == file)
        say(f"  --code: imported {classes} from {file}")
    out = args.out or Path("runs") / "export" / args.weights.stem
    return Inputs(loaded, kind, imgsz, images, accuracy, calibration, out)


def _labelled_data(args, plan):
    """--data, else the demo dataset when an int8 run on a shipped demo model has no other calibration source."""
    if args.data is not None:
        return args.data
    if "int8" in plan.files and args.calib is None and _is_demo(args.weights):
        data = demo_dataset()
        say(f"demo dataset: {data.parent} (calibration: train split, accuracy: val split)")
        return data
    return None


def _is_demo(weights):
    try:
        return Path(weights).resolve().parent == models.DEMO_DIR.resolve()
    except OSError:
        return False


# ---- graph -----------------------------------------------------------------------------------------------------
def rewrite_blocks(args, inputs):
    """Export twins for the family blocks (each checked on its real input), the --code blocks as written."""
    _first_forward(inputs)
    twin, checks = _stage("rewrite", lambda: rewrite(inputs.loaded.model, inputs.imgsz, images=inputs.images[:1]))
    user_blocks = _as_written(twin, inputs.loaded)
    _check_excludes(twin, args.int8_exclude, inputs.kind, "--int8-exclude")
    _check_excludes(twin, args.fp32_keep, inputs.kind, "--fp32-keep")
    plugin_blocks = plugins.apply(twin) if args.plugins else 0
    for c in checks:
        say(f"  {c.name}: {c.reference} -> {c.twin}, max abs diff {c.max_abs:.3g} ({c.rel:.2g} of scale)"
            + (f"; note: {c.note}" if c.note else ""))
    return Rewritten(twin, checks, user_blocks, plugin_blocks)


def _first_forward(inputs):
    """The checkpoint's own model on one probe image, before anything of ours runs on it: a failure here comes
    from the checkpoint's values, so it is bad input (exit 2), in one line."""
    h, w = inputs.imgsz
    try:
        with torch.no_grad():
            models.reference_at(inputs.loaded.model, h, w)(inputs.images[:1])
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise BadInput(f"{inputs.loaded.path}: the checkpoint's model fails on a {h}x{w} image ({type(e).__name__}: "
                       f"{shown(detail)}); pass the best.pt that training wrote, or another --imgsz") from None


def _as_written(twin, loaded):
    """{module path: report entry} for the --code blocks, which have no export twin."""
    blocks = {}
    for name in outermost_user_blocks(twin):
        cls = type(twin.get_submodule(name))
        qual = pickled_name(cls)
        file, differs = loaded.user_code.get(qual, ""), loaded.not_family.get(qual)
        export = AS_WRITTEN if not differs else (f"named like a family class but built differently "
                                                 f"({', '.join(differs[:4])}{', ...' if len(differs) > 4 else ''}): "
                                                 f"{AS_WRITTEN}")
        blocks[name] = {"class": qual, "file": file, "export": export, "rewrites": [
            {"rewrite": "inplace-chain", "detail": f"line {line}: {code} as an indexed assignment, rewritten at import "
                                                   "(same values; torch's exporter loses chained in-place ops on views)"}
            for line, code in loaded.code_rewrites.get(file, [])]}
        say(f"  {name}: {cls.__name__}: {export}")
        for r in blocks[name]["rewrites"]:
            say(f"    {r['rewrite']}: {r['detail']}")
    return blocks


def _check_excludes(model, names, kind, flag):
    known = {n for n, _ in model.named_modules() if n}
    for name in names:
        if name not in known:
            example = ", ".join(b.path for b in int8_blocks(model, kind)[:3])
            raise BadInput(f"{flag} {shown(name, 80)}: no such module in the model; use module paths such as "
                           f"{example}")


def export_onnx(args, plan, inputs, rewritten, precisions=None):
    """The fp32 / fp16 ONNX files (`precisions`: only these); the --code blocks go through the generic rewrites
    (recorded per block); the --fp32-keep blocks stay fp32 in the fp16 file."""
    files, user_blocks = {}, rewritten.user_blocks
    sources = generic.block_source_files(rewritten.twin, list(user_blocks))
    class_lines = generic.block_class_lines(rewritten.twin, list(user_blocks))
    for precision in precisions or plan.float_files:
        path = inputs.out / f"{args.weights.stem}{'' if precision == 'fp32' else '_' + precision}.onnx"
        log = {}
        with generic.exportable_calls(rewritten.twin, list(user_blocks), dynamic=args.dynamic) as used:
            _stage("ONNX export", lambda: export_yolo(
                rewritten.twin, inputs.loaded, path, inputs.imgsz, batch=args.batch, dynamic=args.dynamic,
                half=precision == "fp16", opset=args.opset, simplify=not args.no_simplify, verbose=args.verbose,
                log=log, fp32_blocks=args.fp32_keep, layout=args.layout))
        say(f"wrote {path}")
        files[precision] = path
        for block, records in generic.per_block(sources, used, log["tracer_warnings"],
                                                    {k: log[k] for k in generic.GRAPH_PASSES}, class_lines).items():
            for r in records:
                if r not in user_blocks[block]["rewrites"]:
                    user_blocks[block]["rewrites"].append(r)
                    say(f"  {block}: {r['rewrite']}: {r['detail']}")
    return Exported(files, _plugin_summary(files[plan.float_files[0]], rewritten.plugin_blocks) if args.plugins
                    else None)


def _plugin_summary(path, blocks):
    proto = onnx.load(str(path))
    nodes = [n.op_type for n in proto.graph.node if n.domain == plugins.DOMAIN]
    summary = {"blocks": blocks, "nodes": len(nodes), "ops": {op: nodes.count(op) for op in sorted(set(nodes))},
               "functions": sorted(f.name for f in proto.functions)}
    say(f"plugins: {summary['nodes']} custom-op nodes in {blocks} blocks, backed by local functions "
        f"{summary['functions']}" if blocks else
        "plugins: no block of this model has a custom op (STA and S2 do); exported with standard ops")
    return summary


def quantize(args, inputs, rewritten, exported):
    """The int8 QDQ file (adds exported.files["int8"]); its accuracy drop measured when labelled data is given."""
    files = exported.files
    files["int8"] = inputs.out / f"{args.weights.stem}_int8.onnx"
    calib_files, source = inputs.calibration
    job = Int8Job(files["fp32"], files["int8"], inputs.loaded.model, inputs.kind, calib_files, source, inputs.imgsz,
                  args.batch, args.calib_method, list(args.int8_exclude), args.int8_tolerance)
    say(f"int8: calibrating on {len(calib_files)} images ({source}, method {args.calib_method})")
    accuracy = inputs.accuracy
    if accuracy:
        reference_map = accuracy.of({"onnxruntime fp32": OrtRunner(files["fp32"])})["onnxruntime fp32"]["map50_95"]
        section = _stage("INT8 quantization", lambda: make_int8(
            job, evaluate=lambda path: accuracy.measure({"trial": OrtRunner(path)})["trial"]["map50_95"],
            reference_map=reference_map))
    else:
        section = _stage("INT8 quantization", lambda: make_int8(job))
    say(f"wrote {files['int8']}: {section['quantized_nodes']} int8 nodes, {section['float_nodes']} kept float"
        + (f", float blocks {section['float_blocks']}" if section["float_blocks"] else ""))
    if "drop_points" in section:
        say(f"int8 mAP50-95 {section['map50_95_int8']:.4f} vs fp32 {section['map50_95_fp32']:.4f}: drop "
            f"{section['drop_points']:.2f} points (tolerance {args.int8_tolerance}) -> "
            f"{'pass' if section['pass'] else 'FAIL'}")
    else:
        section["note"] = "no labelled data (--data): the int8 accuracy drop was not measured"
        say(f"int8: {section['note']}")
    return section


def nms_params(args):
    """--conf, --iou, --max-det, --agnostic-nms; ultralytics' defaults for those not given."""
    given = {"conf": args.conf, "iou": args.iou, "max_det": args.max_det}
    return NMSParams(**{k: v for k, v in given.items() if v is not None}, agnostic=args.agnostic_nms)


def end_to_end(args, inputs, exported, precisions=None):
    """The --nms file of each ONNX file (`precisions`: only these): its NMS tail merged onto output0."""
    params, layout = nms_params(args), args.nms
    for precision in precisions or list(exported.files):
        plain = exported.files[precision]
        path = plain.with_name(f"{plain.stem}_{'nms' if layout == 'ultralytics' else 'trt-nms'}.onnx")
        proto = _stage("end-to-end export", lambda: with_nms(
            onnx.load(str(plain)), layout, params, inputs.loaded.nc, yolov5_rows=inputs.kind.anchors_axis == 1,
            opset=args.opset))
        _mark_end_to_end(proto, layout, params)
        save(proto, path)
        exported.nms[precision] = path
        say(f"wrote {path} (NMS in the graph, {layout} layout: conf {params.conf}, iou {params.iou}, max_det "
            f"{params.max_det}{', class-agnostic' if params.agnostic else ''})")


def _mark_end_to_end(proto, layout, params):
    """Metadata: ultralytics' YOLO() reads args.nms (the output is final detections, no NMS of its own)."""
    meta = {p.key: p for p in proto.metadata_props}
    args = ast.literal_eval(meta["args"].value)
    args.update(nms=True, conf=params.conf, iou=params.iou, max_det=params.max_det, agnostic_nms=params.agnostic)
    meta["args"].value = str(args)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "nms_layout", layout


def lint_files(files, dynamic, user_blocks=None):
    """Lint findings of every file, each tagged with its file's precision and the block its node belongs to. In a
    dynamic export, the --code blocks' shape code (values the trace froze at the export size) is a finding too."""
    found = []
    for precision, path in files.items():
        findings = lint(onnx.load(str(path)), dynamic=dynamic) + (frozen_shape_findings(user_blocks) if dynamic
                                                                  else [])
        say(f"lint {path.name}: {lint_summary(findings)}")
        for f in findings:
            say(f"  {f['severity']}: {f['message']}" + (f" ({f['node']})" if f["node"] else ""))
            found.append({"block": node_scope(f["node"]), **f, "onnx": precision})
    return found


def frozen_shape_findings(user_blocks):
    """Lint findings for the shape-code records of the --code blocks: the line the trace froze, per block."""
    return [{"severity": "warn", "rule": "frozen-shape", "node": "", "op": "", "block": block,
             "message": f"{block}: {r['detail']}"}
            for block, entry in (user_blocks or {}).items() for r in entry["rewrites"] if r["rewrite"] == "shape-code"]


# ---- engine ----------------------------------------------------------------------------------------------------
def build(args, inputs, exported):
    precision, files = args.engine, exported.files
    if args.nms and not _full_tensorrt():
        say(_nms_engine_note(args.nms, exported.nms[precision].name))
    onnx_path = files[precision]
    engine_path = inputs.out / f"{onnx_path.stem}.engine"
    islands = fp32_islands(onnx.load(str(files["fp16"]))) if precision == "int8" else ()
    info = _stage("TensorRT build", lambda: build_engine(
        onnx_path, engine_path, precision=precision, imgsz=inputs.imgsz, batch=args.batch, dynamic=args.dynamic,
        workspace_gib=args.workspace, metadata=_engine_metadata(args, inputs, precision), plugins=args.plugins,
        fp32_layers=islands, verbose=args.verbose))
    say(f"wrote {engine_path} ({info['backend']} {info['tensorrt_version']}, {info['build_s']} s) "
        f"and {engine_path.name}.json")
    if args.nms and _full_tensorrt():  # full TensorRT has the NMS layer and the plugin: the end-to-end engine too
        e2e = exported.nms[precision]
        e2e_engine = inputs.out / f"{e2e.stem}.engine"
        _stage("TensorRT build (end-to-end)", lambda: build_engine(
            e2e, e2e_engine, precision=precision, imgsz=inputs.imgsz, batch=args.batch, dynamic=args.dynamic,
            workspace_gib=args.workspace, metadata=_engine_metadata(args, inputs, precision), plugins=args.plugins,
            fp32_layers=islands, verbose=args.verbose))
        say(f"wrote {e2e_engine} (end-to-end, {args.nms} layout)")
    if info.get("int8"):
        say(f"  note: {info['int8']}")
    return Engine(engine_path, info)


def _full_tensorrt():
    try:
        return engine_backend()[1] == "tensorrt"
    except BuildUnavailable:
        return False


def _nms_engine_note(layout, name):
    """One line before building without full TensorRT: the engine is the plain graph's; what builds the end-to-end
    file."""
    needs = "a NonMaxSuppression layer" if layout == "ultralytics" else "the EfficientNMS_TRT plugin"
    return (f"engine: built from the plain graph; {name} needs {needs}, which TensorRT-RTX has no runner for: build "
            f"it with full TensorRT on the device, e.g. trtexec --onnx={name}")


def _engine_metadata(args, inputs, precision):
    loaded = inputs.loaded
    return {"weights": str(args.weights), "names": loaded.names, "stride": max(loaded.stride),
            "imgsz": list(inputs.imgsz), "batch": args.batch, "task": loaded.task, "precision": precision,
            "dynamic": args.dynamic, "input": "images float32 [0,1] NCHW", "output": inputs.kind.output_layout}


# ---- verify ----------------------------------------------------------------------------------------------------
def verify(args, plan, inputs, rewritten, exported, engine):
    """Parity of every backend against PyTorch, labelled accuracy, speed: whatever the arguments ask for."""
    verified = Verified()
    runners = _runners(inputs, rewritten.twin, plan, exported.files, engine, verified.parity, verified.runtime)
    precisions = precision_of(plan, engine)
    batch_images = tile(inputs.images, args.batch)
    if not args.no_parity:
        _parity(verified, runners, batch_images, precisions, args.batch, inputs, rewritten, args)
        if exported.nms:
            verified.nms = _check_end_to_end(args, inputs, exported, batch_images, runners["reference"])
    if inputs.accuracy:
        scored = {b: r for b, r in runners.items() if b != "torch"}  # the twin in PyTorch: parity covers it
        verified.accuracy = inputs.accuracy.table(scored, precisions)
        for row in verified.accuracy["models"]:
            say(f"mAP {row['backend']} {row['precision']}: mAP50 {row['map50']:.4f}, mAP50-95 "
                f"{row['map50_95']:.4f} ({row['images']} images, {row['instances']} labels)")
    if args.bench:
        _bench(verified, args, runners, batch_images[:args.batch], exported.files[plan.primary], inputs.imgsz,
               _nms_timed(args, inputs, exported, plan))
    return verified


def _check_end_to_end(args, inputs, exported, images, reference):
    """Each --nms file against ultralytics' NMS on its plain file's output (export/verify/nms_check.py)."""
    params = nms_params(args)
    checks = {}
    for precision, path in exported.nms.items():
        r = checks[precision] = _stage(f"end-to-end check of {path.name}", functools.partial(
            check_end_to_end, exported.files[precision], path, args.nms, params, images, args.batch, precision,
            inputs.kind.to_v8_layout, reference))
        say(f"end-to-end {path.name}: {r['detections']} detections on {r['images']} images, max diff "
            f"{r['max_box_diff']:.2g} px / score {r['max_score_diff']:.2g} from the plain file's NMS"
            + (f" ({r['borderline']} at the threshold not counted)" if r["borderline"] else "")
            + (f"; vs PyTorch: box recall {r['vs_pytorch']['box_recall']:.3f}, precision "
               f"{r['vs_pytorch']['box_precision']:.3f}" if "vs_pytorch" in r else "")
            + f" -> {'pass' if r['pass'] else 'FAIL'}" + "".join(f"\n  {p}" for p in r["problems"][:5]))
    return {"layout": args.nms, "params": params_record(params), "files": checks,
            "pass": all(r["pass"] for r in checks.values())}


def _nms_timed(args, inputs, exported, plan):
    """--bench with --nms: the end-to-end file beside the plain file + ultralytics' NMS in Python (what NMS in the
    graph saves here). Only the ultralytics layout runs in ONNX Runtime."""
    if args.nms != "ultralytics" or plan.primary not in exported.nms:
        return {}
    params, plain = nms_params(args), exported.files[plan.primary]
    e2e = exported.nms[plan.primary]

    def plain_then_nms(runner):
        def run(images):
            pred = torch.from_numpy(inputs.kind.to_v8_layout(runner(images)))
            return non_max_suppression(pred, params.conf, params.iou, agnostic=params.agnostic,
                                       max_det=params.max_det)
        return run

    return {"onnxruntime + python nms": Fresh(lambda: plain_then_nms(OrtRunner(plain))),
            "onnxruntime end-to-end": Fresh(functools.partial(OrtRunner, e2e))}


def precision_of(plan, engine):
    """Backend key -> the precision it runs."""
    keys = {plan.backend_key(p): p for p in plan.files}
    return {"reference": "fp32", "torch": "fp32", **keys, "tensorrt": engine.build.get("precision") if engine else None}


def _runners(inputs, twin, plan, files, engine, parity, runtime):
    """reference (the checkpoint's own modules), torch (export twin), one ONNX Runtime runner per file, TensorRT.
    An engine that cannot run here is recorded in `parity` as skipped, with the reason; what runs them, in
    `runtime`."""
    reference = models.reference_at(inputs.loaded.model, *inputs.imgsz)
    layout = inputs.kind.reference_to_export  # PyTorch's output in the file's layout (--layout)
    runners = {"reference": TorchRunner(reference, to_layout=layout), "torch": TorchRunner(twin, to_layout=layout)}
    runners.update({plan.backend_key(p): _stage(f"ONNX Runtime session for {path.name}", functools.partial(
        OrtRunner, path)) for p, path in files.items()})
    providers = next(r.providers for b, r in runners.items() if b.startswith("onnxruntime"))
    runtime["onnxruntime"], runtime["providers"] = ort.__version__, providers
    runtime["tensorrt"] = engine.build["backend"] if engine else None
    say(f"ONNX Runtime {ort.__version__}: providers {', '.join(providers)}"
        + ("; " + ORT_TWICE if ort_installed_twice() else ""))
    if engine:
        trt, reason = engine_runtime()
        if trt is None:
            parity["tensorrt"] = {"skipped": reason}
            say(f"parity tensorrt: skipped ({reason})")
        else:
            runners["tensorrt"] = TrtRunner(engine.path, trt)
    return runners


def _parity(verified, runners, images, precisions, batch, inputs, rewritten, args):
    reference = runners["reference"]
    verified.images = images[:MAX_PICTURED]
    own = _own_fp16_error(reference, rewritten.twin, images, batch) if "fp16" in precisions.values() else None
    for backend in tqdm([b for b in runners if b != "reference"], desc="parity", leave=False, disable=None):
        wanted = precisions[backend]
        r = verified.parity[backend] = _stage(f"parity run of {backend}", functools.partial(
            compare, reference, runners[backend], images, wanted, batch, inputs.kind.to_v8_layout,
            thresholds_for(wanted, own)))
        r["precision"] = wanted
        if wanted == "fp16":
            r["fp16_own_rel_max_abs"], r["fixed_rel_max_abs_limit"] = own, THRESHOLDS["fp16"].rel_max_abs
        borderline = sum(r["borderline"].values())
        say(f"parity {backend} ({wanted}): max abs {r['max_abs']:.3g}, cosine {r['cosine']:.7f}, box recall "
            f"{r['box_recall']:.3f}, precision {r['box_precision']:.3f}"
            + (f" ({borderline} borderline decisions not counted)" if borderline else "")
            + f", mAP50-95 {r['map50_95']:.3f} -> {'pass' if r['pass'] else 'FAIL'}")
    second = _second_size_parity(verified, runners, precisions, inputs, args, own) if args.dynamic else None
    if rewritten.user_blocks:
        verified.block_check = _block_check(reference, rewritten, images, args.dynamic, second)
    failed_float = [b for b in runners if b.startswith("onnxruntime") and precisions[b] != "int8"
                    and verified.parity[b]["pass"] is False]
    if failed_float:
        precision = precisions[failed_float[0]]
        twin, user_blocks = rewritten.twin, list(rewritten.user_blocks)
        with tempfile.TemporaryDirectory() as tmp:
            with generic.exportable_calls(twin, user_blocks, dynamic=args.dynamic):  # as the export traced them
                first, errors = localize(reference.model, twin, images, precision == "fp16", tmp, precision,
                                         fp32_blocks=args.fp32_keep)
        verified.localization = {"backend": failed_float[0], "first_divergent_block": first, "block_errors": errors}
        say(f"localization: first diverging block in ONNX Runtime: {first}")


def second_size(imgsz, stride):
    """The size a dynamic export is also proven at: one stride step smaller on each axis (larger where that would
    leave less than two steps), so window counts, padding branches and pooled sizes all change."""
    return tuple(side - stride if side >= 3 * stride else side + stride for side in imgsz)


def _second_size_parity(verified, runners, precisions, inputs, args, own):
    """A dynamic ONNX at a second input size against the reference run at that size: shape code the trace froze
    (a window count, a padding branch, a size read as a Python number) is right at the export size only. Returns
    (the reference runner, the images) at that size."""
    size = second_size(inputs.imgsz, int(max(inputs.loaded.stride)))
    images = tile(read_images(args.images, size), args.batch)
    reference = TorchRunner(models.reference_at(inputs.loaded.model, *size), to_layout=inputs.kind.reference_to_export)
    for backend in [b for b in runners if b.startswith("onnxruntime")]:
        wanted = precisions[backend]
        r = _stage(f"parity at {size[0]}x{size[1]}", lambda: compare(
            reference, runners[backend], images, wanted, args.batch, inputs.kind.to_v8_layout,
            thresholds_for(wanted, own)))
        r["precision"], r["imgsz"] = wanted, list(size)
        verified.parity[f"{backend}@{size[0]}x{size[1]}"] = r
        say(f"parity {backend} ({wanted}) at {size[0]}x{size[1]} (dynamic: a second size): max abs "
            f"{r['max_abs']:.3g}, cosine {r['cosine']:.7f}, box recall {r['box_recall']:.3f}, precision "
            f"{r['box_precision']:.3f} -> {'pass' if r['pass'] else 'FAIL'}")
    return reference, images


def _block_check(reference, rewritten, images, dynamic, second=None):
    """Each --code block exported on its own, fed the reference's input to it, against the reference block's output
    (export/verify/block_check.py). The model's output can hide a wrong block (in our test model a block 3.6e-3
    off moved the boxes by 4.3e-4 px), and torch's exporter gets some code wrong with no error at all (in-place ops on
    views): so every block is held to the fp32 limit on its own, and a failure names the block and what in its
    code is known to export wrong. `second`: (reference runner, images) at a dynamic export's second size, where
    the blocks are checked again, traced at the export size."""
    names = list(rewritten.user_blocks)
    with tempfile.TemporaryDirectory() as tmp:
        errors = block_errors(reference.model, rewritten.twin, names, images, tmp, dynamic)
        again = block_errors(reference.model, rewritten.twin, names, images, tmp, dynamic,
                             (second[0].model, second[1])) if second is not None else {}
    check = {"precision": "fp32", "limit": THRESHOLDS["fp32"].rel_max_abs, "errors": errors}
    if second is not None:
        check["second_imgsz"], check["errors_second"] = list(second[1].shape[2:]), again
    checked = [b for b in names if errors[b] is not None]
    worst = {b: max(errors[b], again.get(b) or 0.0, key=lambda e: (e != e, e)) for b in checked}
    check["failed"] = [b for b in checked if not worst[b] <= check["limit"]]  # NaN fails
    check["unchecked"] = [b for b in names if b not in checked]
    check["pass"] = not check["failed"]
    at = f" (worst of {images.shape[2]}x{images.shape[3]} and {second[1].shape[2]}x{second[1].shape[3]})" \
        if second is not None else ""
    for block in names:
        entry = rewritten.user_blocks[block]
        head = f"block check {block} ({entry['class'].rpartition('.')[2]}): "
        if block not in checked:
            say(head + "not checked on its own (its input or output is not one tensor); the model's parity covers it")
            continue
        say(head + f"{worst[block]:.2g} of its output scale from PyTorch{at} (limit {check['limit']:.0e}) -> "
                   f"{'FAIL' if block in check['failed'] else 'pass'}")
        for r in (r for r in entry["rewrites"] if block in check["failed"] and r["rewrite"] == generic.INPLACE_VIEW):
            say(f"  likely cause: {r['detail']}; write it out of place (t = t.op(...)) or as t[i] = t[i].op(...)")
    return check


def _own_fp16_error(reference, twin, images, batch):
    """What fp16 itself costs this model (PyTorch's fp16 run of the twin): the fp16 verdict's yardstick."""
    own = own_fp16_error(reference, twin, images, batch)
    if own is None:
        say("parity: PyTorch has no fp16 CPU kernel for some op of this model: fp16 is held to the fixed limit")
    else:
        say(f"parity: PyTorch's own fp16 run of the twin is {own:.3g} (rel max abs) from fp32; fp16 backends are "
            f"held to {thresholds_for('fp16', own).rel_max_abs:.3g}")
    return own


def _bench(verified, args, runners, images, onnx_path, imgsz, extra=None):
    """Interleaved timing of every backend (and `extra` {name: runner}), then where the time goes in the primary
    ONNX (ORT profile vs FLOPs)."""
    timed = {"torch" if b == "reference" else b: Fresh(functools.partial(OrtRunner, r.path)) if isinstance(r, OrtRunner)
             else r for b, r in runners.items() if b != "torch"}  # the twin in PyTorch times like the reference
    timed.update(extra or {})
    verified.speed = interleaved(timed, images, args.bench, args.bench_rounds)
    verified.bench = {"threads": thread_settings(torch.get_num_threads()), "rounds": args.bench_rounds,
                      "iterations_per_round": args.bench, "warmup": DEFAULT_WARMUP, "batch": len(images)}
    base = verified.speed["torch"]
    for backend, s in verified.speed.items():
        s["speedup_vs_torch"] = statistics.median(paired_ratios(base, s))  # per round, then the median
        say(f"speed {backend}: median {s['median_ms']:.2f} ms (rounds {s['min_ms']:.2f}-{s['max_ms']:.2f}), "
            f"{s['images_per_s']:.1f} images/s, {s['speedup_vs_torch']:.2f}x PyTorch eager")
    reference = runners["reference"].model
    blocks = where_time_goes(onnx_path, images, torch.get_num_threads(), reference,
                             module_costs(reference, imgsz, len(images)))
    verified.blocks = {"onnx": onnx_path.name, **blocks}
    for r in blocks["rows"]:
        if r["kind"] == "attention":
            say(f"  {r['module']} {r['type']}: {r['ms']:.2f} ms, {r['time_share']:.1%} of the time, "
                f"{r['flop_share']:.1%} of the FLOPs")


# ---- report ----------------------------------------------------------------------------------------------------
def assemble_report(args, plan, inputs, rewritten, exported, int8, lint_findings, engine, verified):
    """The report (report.json's schema, docs/report-format.md) from the stages' results."""
    loaded, checks = inputs.loaded, rewritten.checks
    report = {"weights": str(args.weights), "onnx": str(exported.files[plan.primary]),
              "onnx_files": {p: str(f) for p, f in exported.files.items()},
              "engine": str(engine.path) if engine else None, "imgsz": list(inputs.imgsz), "batch": args.batch,
              "dynamic": args.dynamic, "precision": plan.primary, "lint": lint_findings,
              "modules": [c.as_dict() for c in checks], "parity": verified.parity, "speed": verified.speed or {},
              "notes": _notes(checks), "runtime": verified.runtime,
              "checkpoint": {"kind": loaded.kind, "source": loaded.source, "saved_half": loaded.saved_half,
                             "remapped": loaded.remapped, "names": loaded.names, "nc": loaded.nc,
                             "stride": loaded.stride, "train_imgsz": loaded.imgsz}}
    optional = {"user_blocks": rewritten.user_blocks or None,
                "user_code": loaded.user_code if rewritten.user_blocks else None, "plugins": exported.plugins,
                "int8": int8, "engine_build": engine.build if engine else None,
                "localization": verified.localization, "block_check": verified.block_check, "nms": verified.nms,
                "nms_files": {p: str(f) for p, f in exported.nms.items()} or None, "accuracy": verified.accuracy, "bench": verified.bench,
                "blocks": verified.blocks}
    report.update({key: value for key, value in optional.items() if value is not None})
    if verified.images is not None:
        report["_images"] = verified.images  # drawn in detections.png, not written to report.json
    return report


def _notes(checks):
    notes = ["PyTorch reference: the checkpoint's own modules (reference twins), fp32 on CPU."]
    notes += sorted({c.note for c in checks if c.note})
    return notes


def finish(report, out):
    """Write the report; the exit code says whether every verdict passed."""
    failed = [b for b, r in report["parity"].items() if r.get("pass") is False]
    if report.get("nms", {}).get("pass") is False:
        failed.append("end-to-end NMS check")
    if report.get("block_check", {}).get("pass") is False:
        failed.append("block check (" + ", ".join(report["block_check"]["failed"]) + ")")
    if report.get("int8", {}).get("pass") is False:
        failed.append(_int8_failure(report["int8"]))
    report["exit_code"] = EXIT_VERDICT_FAILED if failed else EXIT_OK
    write_report(report, out)
    say(f"wrote {out / 'report.json'}, report.md" + "".join(f", {p}" for p in report["pictures"]))
    if failed:
        print(f"error: {', '.join(failed)} failed (see {out / 'report.md'})", file=sys.stderr)
    return report["exit_code"]


def _int8_failure(section):
    """Why int8 failed, in the words of its acceptance rule: the drop, the tolerance, what was kept float."""
    kept = section["float_blocks"]
    return (f"int8 accuracy (mAP50-95 drop {section['drop_points']:.2f} points > tolerance "
            f"{section['tolerance_points']}" + (f", with {', '.join(kept)} kept float" if kept else "") + ")")


# ---- console and stage failures ---------------------------------------------------------------------------------
def say(text):
    """One console line, escaped: it may quote names from the checkpoint. tqdm.write keeps progress bars and
    messages on separate lines."""
    tqdm.write(shown(text, 10_000))


def _stage(name, fn):
    try:
        return fn()
    except (BuildUnavailable, BuildFailed) as e:
        raise StageFailed(f"{name} failed: {e}") from e
    except BadInput:  # bad input found while working (an unreadable calibration image): exit 2
        raise
    except Exception as e:  # the stage's own failure, reported in one line with exit code 3
        detail = str(e).splitlines()[0].partition("  [Caused by")[0] if str(e) else ""  # torch appends its IR
        block = _block_named_in(str(e))
        raise StageFailed(f"{name} failed: {type(e).__name__}: {shown(detail, 400)}"
                          + (f" (in block {block})" if block else "")) from e


def _block_named_in(message):
    """The module path of the first ONNX node an error message names (ONNX Runtime quotes node names), or None."""
    for match in re.finditer(r"(/model/[\w./-]+)", message):
        block = node_scope(match.group(1))
        if block:
            return block
    return None
