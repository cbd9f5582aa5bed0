"""`python -m export bench`: several models timed side by side on ONNX Runtime (CPU), in one run.

Each MODEL is a checkpoint (exported here, with its reference model for FLOPs and per-block profile), a model
YAML (untrained: architecture only) or an .onnx file (its precision read from its metadata). Timing is
export.verify.timing's interleaved rounds; ratios are paired against the first model of the same precision.
Writes bench.json, bench.md and bench.png to --out and prints the table.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

import models
from export.checkpoint import from_yaml, load
from export.errors import EXIT_OK
from export.graph import generic
from export.graph.rewrite import outermost_user_blocks, rewrite
from export.graph.to_onnx import export_yolo, onnx_metadata, onnx_precision
from export.inputs.images import parse_imgsz, read_images, tile
from export.report.bench_report import bench_table, write_bench
from export.verify.profile import module_costs, where_time_goes
from export.verify.runners import OrtRunner
from export.verify.timing import Fresh, interleaved, relative_to_first, thread_settings


def run(args):
    """Time, write the files, print the table; exit code 0."""
    result = measure(args)
    write_bench(result, args.out)
    print(bench_table(result))
    print(f"wrote {args.out / 'bench.json'}, bench.md, bench.png")
    return EXIT_OK


@dataclass
class Subject:
    """One model on the bench: its ONNX files by precision and, where we built them, the reference model."""
    name: str
    files: dict
    reference: object = None  # torch model (the checkpoint's own modules) for FLOPs and block paths


def measure(args):
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    imgsz = parse_imgsz(args.imgsz, 32)  # every YOLO stride divides 32
    images = tile(read_images(args.images, imgsz)[:1], args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    subjects = _subjects(args, imgsz, images)
    runners = {_key(s.name, p): Fresh(functools.partial(OrtRunner, f, threads))
               for s in subjects for p, f in s.files.items()}
    timing = interleaved(runners, images, args.iterations, args.rounds, args.warmup)
    rows = []
    for s in subjects:
        costs = module_costs(s.reference, imgsz, args.batch) if s.reference is not None else None
        blocks = where_time_goes(s.files["fp32"], images, threads, s.reference, costs) \
            if costs and "fp32" in s.files else None
        for precision in sorted(s.files, key=("fp32", "fp16", "int8").index):
            rows.append({"model": s.name, "precision": precision, "onnx": str(s.files[precision]),
                         **timing[_key(s.name, precision)], "flops": costs[""]["flops"] if costs else None,
                         "params": costs[""]["params"] if costs else None, "blocks": blocks})
    relative_to_first(rows)
    return {"imgsz": list(imgsz), "batch": args.batch, "threads": thread_settings(threads),
            "rounds": args.rounds, "iterations_per_round": args.iterations, "warmup": args.warmup,
            "input": f"first image of {args.images}, letterboxed", "rows": rows}


def _key(name, precision):
    return f"{name} {precision}"


def _subjects(args, imgsz, images):
    specs = [_spec(m) for m in args.models]
    checkpoints = {p: load(p, code=args.code) for _, p in specs if p.suffix not in (".onnx", ".yaml", ".yml")}
    nc = args.nc or next((c.nc for c in checkpoints.values()), 80)
    subjects = {}
    for name, path in specs:
        if path.suffix == ".onnx":
            subject = subjects.setdefault(name or path.stem, Subject(name or path.stem, {}))
            subject.files[onnx_precision(onnx_metadata(path))] = path
            continue
        loaded = checkpoints.get(path) or from_yaml(path, nc)
        name = _unique(name or path.stem, subjects)
        twin, _ = rewrite(loaded.model, imgsz, images=torch.from_numpy(images[:1]))
        files = {}
        for precision in ("fp32", "fp16") if args.half else ("fp32",):
            files[precision] = args.out / f"{name}{'' if precision == 'fp32' else '_fp16'}.onnx"
            with generic.exportable_calls(twin, outermost_user_blocks(twin)):  # --code blocks as the main job
                export_yolo(twin, loaded, files[precision], imgsz, batch=args.batch, half=precision == "fp16")
        subjects[name] = Subject(name, files, models.reference_at(loaded.model, *imgsz))
    return list(subjects.values())


def _spec(text):
    name, _, path = text.rpartition("=")
    return name or None, Path(path)


def _unique(name, taken):
    n, candidate = 2, name
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate
