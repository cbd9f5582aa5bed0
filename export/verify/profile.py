"""Where the time goes at deployment, and what each block costs in arithmetic.

- `profile_onnx`: ONNX Runtime's profiler on one file. Kernel time per node is charged to the module whose
  call made the node (node names carry it: `/model/model.15/m.0/FLA/MatMul`). The layout reorders ORT
  inserts around its blocked-layout (NCHWc) convolutions have no scope: each is charged to the neighbour
  that forces it, the op on its plain-layout side.
- `module_costs`: FLOPs (torch's FlopCounterMode: convolutions and matmuls) and parameters per module.
- `block_costs`: per layer (`model.N`) and per attention block, milliseconds and share of the time beside
  share of FLOPs and of parameters.
"""

import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

import models
from export.graph.onnx_passes import node_scope
from export.verify.timing import DEFAULT_WARMUP

PROFILE_RUNS = 10
_KERNEL_SUFFIX = "_kernel_time"


def profile_onnx(path, images, threads, runs=PROFILE_RUNS, warmup=DEFAULT_WARMUP):
    """Mean kernel ms per module path over `runs` profiled calls (after `warmup`), with the run totals.

    Returns {"modules": {path: ms}, "kernel_ms": sum of all node kernels per run, "run_ms": wall time of ORT's
    run, "unattributed_ms": kernels with no module}, all means over the profiled runs. Module ms and unattributed
    ms add up to kernel_ms; kernel_ms <= run_ms (ORT runs one node at a time; the rest is its own overhead).
    The profiler itself adds a few microseconds per node: blocks of many small nodes read a little high."""
    with tempfile.TemporaryDirectory() as tmp:
        options = _session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")  # the graph that runs: reorders
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: images}
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
        owners = _reorder_owners(onnx.load(options.optimized_model_filepath))
    return _charge(events, owners, warmup)


def _session_options(threads):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # the profile run saves the optimized graph: ORT warns that it is CPU-specific
    return options


def _reorder_owners(optimized):
    """{reorder node name: module path it is charged to}: ReorderOutput (blocked -> plain layout) to its
    consumer, ReorderInput (plain -> blocked) to its producer; the other side when that one has no scope."""
    producer = {out: n for n in optimized.graph.node for out in n.output}
    consumers = defaultdict(list)
    for n in optimized.graph.node:
        for name in n.input:
            consumers[name].append(n)
    owners = {}
    for n in optimized.graph.node:
        if not n.op_type.startswith("Reorder"):
            continue
        before = [producer[n.input[0]]] if n.input[0] in producer else []
        after = consumers.get(n.output[0], [])
        sides = (after, before) if n.op_type == "ReorderOutput" else (before, after)
        scopes = [node_scope(m.name) for side in sides for m in side]
        owners[n.name] = next((s for s in scopes if s), "")
    return owners


def _charge(events, owners, skip_runs):
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[skip_runs:]
    if not runs:
        raise RuntimeError("ONNX Runtime's profile recorded no runs")
    start = runs[0]["ts"]
    modules, unattributed, kernel = defaultdict(float), 0.0, 0.0
    for e in events:
        if e.get("cat") != "Node" or e["ts"] < start or not e["name"].endswith(_KERNEL_SUFFIX):
            continue
        name = e["name"][:-len(_KERNEL_SUFFIX)]
        where = node_scope(name) or owners.get(name, "")
        ms = e["dur"] / 1000 / len(runs)
        kernel += ms
        if where:
            modules[where] += ms
        else:
            unattributed += ms
    return {"modules": dict(modules), "kernel_ms": kernel, "unattributed_ms": unattributed,
            "run_ms": statistics.fmean(e["dur"] / 1000 for e in runs), "runs": len(runs)}


# ---- what each block costs in arithmetic --------------------------------------------------------------
def module_costs(model, imgsz, batch=1):
    """{module path: {"flops", "params"}} for every module of `model` (fp32, CPU) at imgsz, plus "" for the
    whole model. FLOPs count convolutions and matmuls (torch's FlopCounterMode), as model FLOPs usually are."""
    model = model.float().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(batch, 3, *imgsz))
    flops = {}
    for key, per_op in counter.get_flop_counts().items():
        path = key.partition(".")[2] if key != "Global" else ""  # "DetectionModel.model.15.m.0" -> "model.15.m.0"
        if key != type(model).__name__:
            flops[path] = sum(per_op.values())
    costs = {}
    for path, module in model.named_modules():
        costs[path] = {"flops": int(flops.get(path, 0)), "params": sum(p.numel() for p in module.parameters())}
    return costs


def attention_blocks(model):
    """Module paths of the attention blocks (reference or export twins of a family) no other one contains."""
    found = []
    for path, module in model.named_modules():
        if models.family_of(module) is not None and not any(path.startswith(f + ".") for f in found):
            found.append(path)
    return found


def layers(model):
    """(path, type name) of the model's top-level layers: model.0, model.1, ..."""
    return [(f"model.{i}", type(m).__name__) for i, m in enumerate(model.model)]


def block_costs(profile, costs, model):
    """Rows per top-level layer and per attention block: ms, share of kernel time, share of FLOPs and params.
    Layers partition the model: their ms plus the unattributed ms is the profiled kernel total."""
    total_ms, total = profile["kernel_ms"], costs[""]
    attention = attention_blocks(model)

    def row(path, kind, what):
        ms = sum(v for p, v in profile["modules"].items() if p == path or p.startswith(path + "."))
        c = costs.get(path, {"flops": 0, "params": 0})
        return {"module": path, "kind": kind, "type": what, "ms": ms, "time_share": ms / total_ms,
                "flops": c["flops"], "flop_share": c["flops"] / max(total["flops"], 1),
                "params": c["params"], "param_share": c["params"] / max(total["params"], 1),
                "contains_attention": [a for a in attention if a == path or a.startswith(path + ".")]}

    rows = [row(path, "layer", what) for path, what in layers(model)]
    rows += [row(path, "attention", type(model.get_submodule(path)).__name__) for path in attention]
    return {"rows": rows, "kernel_ms": total_ms, "run_ms": profile["run_ms"],
            "unattributed_ms": profile["unattributed_ms"], "total_flops": total["flops"],
            "total_params": total["params"], "profiled_runs": profile["runs"]}


def where_time_goes(onnx_path, images, threads, reference, costs):
    """block_costs of `onnx_path` profiled on `images`, against the FLOPs and params `costs` of `reference`."""
    return block_costs(profile_onnx(onnx_path, images, threads), costs, reference)
