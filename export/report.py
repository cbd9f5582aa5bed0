"""Write the job's report into --out: report.json (schema in the README), report.md (the same as tables), parity.png."""

import json
import math

import numpy as np

from export.files import atomic_write
from export.kinds import KINDS

BACKEND_LABEL = {"torch": "PyTorch (export twin)", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


def write_report(report, out):
    """report.json, report.md and the pictures it embeds (those with something to show)."""
    parity = report.get("parity", {})
    samples = {b: r.pop("abs_diff_sample", None) for b, r in parity.items()}
    pictured = {b: r.pop("detections_sample", None) for b, r in parity.items()}
    images = report.pop("_images", None)
    report["pictures"] = []
    if any(samples.values()) or report.get("speed"):
        _plot(samples, report.get("speed", {}), out / "parity.png")
        report["pictures"].append("parity.png")
    if images is not None and any(pictured.values()):
        labels = {b: f"{_label(b)}, {r.get('precision', '')}" for b, r in parity.items()}
        _plot_detections(images, pictured, labels, report["checkpoint"]["names"], out / "detections.png")
        report["pictures"].append("detections.png")
    if report.get("modules"):
        _plot_block_errors(report, out / "errors.png")
        report["pictures"].append("errors.png")
    if report.get("blocks"):
        _plot_blocks(report["blocks"], out / "blocks.png")
        report["pictures"].append("blocks.png")
    atomic_write(out / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    atomic_write(out / "report.md", markdown(report).encode())


def write_bench(result, out):
    """`python -m export bench`: bench.json, bench.md (the table and where the time goes), bench.png."""
    atomic_write(out / "bench.json", (json.dumps(result, indent=2, default=str) + "\n").encode())
    atomic_write(out / "bench.md", bench_markdown(result).encode())
    _plot_bench(result, out / "bench.png")


def markdown(report):
    kind = KINDS[report["checkpoint"].get("kind", "ultralytics")]
    lines = [f"# Export report: {report['weights']}", "",
             f"- Checkpoint: {kind.label}, output `{kind.output_layout}`",
             f"- ONNX: {_files(report)} (imgsz {report['imgsz']}, batch {report['batch']}"
             f"{', dynamic' if report['dynamic'] else ''})",
             f"- Engine: {('`' + report['engine'] + '`') if report.get('engine') else _skipped(report.get('engine_build'))}",
             f"- Exit code: {report['exit_code']}", "", *verdicts(report), ""]
    if "detections.png" in report.get("pictures", []):
        lines += ["## Detections side by side", "", "PyTorch (the reference) and every backend on the parity images; "
                  "marked: PyTorch boxes a backend missed (MISSED), backend boxes PyTorch does not have (EXTRA), "
                  "class flips (FLIP).", "", "![detections](detections.png)", ""]
    if report["checkpoint"]["remapped"]:
        lines += ["## Classes remapped", "", "| in the checkpoint | reconstructed as |", "|---|---|"]
        lines += [f"| `{k}` | `{v}` |" for k, v in report["checkpoint"]["remapped"].items()] + [""]
    lines += ["## Rewritten blocks (export twin vs reference on this block's real input)", "",
              "| block | reference → twin | input | max abs | rel | note |", "|---|---|---|---|---|---|"]
    lines += [f"| `{m['name']}` | {m['reference']} → {m['twin']} | {'x'.join(map(str, m['input_shape']))} | "
              f"{m['max_abs']:.3g} | {m['rel']:.2g} | {m['note']} |" for m in report["modules"]] or ["| (none) |||||"]
    if "errors.png" in report.get("pictures", []):
        lines += ["", "![error per block](errors.png)"]
    lines += _as_written_lines(report.get("user_blocks"))
    lines += ["", "## Lint (TensorRT's ONNX parser)", ""]
    lines += [f"- **{f['severity']}** ({f.get('onnx', report['precision'])}) "
              f"{'block `' + f['block'] + '`, ' if f.get('block') else ''}`{f['op'] or f['rule']}` {f['node']}: "
              f"{f['message']}" for f in report["lint"]] or ["Clean: nothing TensorRT rejects or runs badly."]
    lines += _int8_lines(report.get("int8")) + _accuracy_lines(report.get("accuracy"))
    lines += ["", "## Parity against PyTorch (the loaded reference model)", ""]
    if report.get("parity"):
        lines += ["| backend | precision | max abs | mean abs | cosine | top-anchor rel | box recall | box precision | "
                  "mean IoU | mAP50-95 | pass |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for backend, r in report["parity"].items():
            if "skipped" in r:
                lines.append(f"| {_label(backend)} | skipped: {r['skipped']} ||||||||||")
                continue
            lines.append(f"| {_label(backend)} | {r.get('precision', '')} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | "
                         f"{r['cosine']:.7f} | {r['top_anchor_max_rel']:.3g} | {r['box_recall']:.3f} | "
                         f"{r['box_precision']:.3f} | {r['mean_iou']:.4f} | {r['map50_95']:.3f} | "
                         f"{'yes' if r['pass'] else '**NO**'} |")
        if report.get("localization"):
            loc = report["localization"]
            lines += ["", f"First diverging block ({loc['backend']}): `{loc['first_divergent_block']}`"]
    else:
        lines.append("Skipped (--no-parity).")
    if "parity.png" in report.get("pictures", []):
        lines += ["", "![parity](parity.png)"]
    if report.get("speed"):
        lines += ["", f"## Speed ({_bench_setting(report['bench'])})", "",
                  "| backend | min ms | median ms | max ms | images/s | vs PyTorch eager |", "|---|---|---|---|---|---|"]
        lines += [f"| {'PyTorch eager (reference)' if b == 'torch' else _label(b)} | {s['min_ms']:.2f} | {s['median_ms']:.2f} | {s['max_ms']:.2f} | "
                  f"{s['images_per_s']:.1f} | {s['speedup_vs_torch']:.2f}x |" for b, s in report["speed"].items()]
    lines += _blocks_lines(report.get("blocks"))
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


CRITERIA = (("rel_max_abs", "max abs / output scale", "<="), ("cosine", "cosine", ">="),
            ("box_recall", "box recall", ">="), ("box_precision", "box precision", ">="))


def verdicts(report):
    """One line per backend: pass / FAIL and the figure that decided it (the failing one, else the closest)."""
    lines = []
    for backend, r in report.get("parity", {}).items():
        if "skipped" in r:
            lines.append(f"- {_label(backend)}: not run ({r['skipped']})")
            continue
        lines.append(f"- {_label(backend)} ({r['precision']}): {'pass' if r['pass'] else '**FAIL**'}, "
                     f"{_deciding(r)}")
    if "int8" in report and "drop_points" in report["int8"]:
        i8 = report["int8"]
        lines.append(f"- INT8 accuracy: {'pass' if i8['pass'] else '**FAIL**'}, mAP50-95 drop "
                     f"{i8['drop_points']:.2f} points (tolerance {i8['tolerance_points']})")
    return lines


def _deciding(r):
    if not r["finite"]:
        return "non-finite outputs"
    limits = r["thresholds"]

    def margin(key, op):  # < 1: fails; the smaller, the closer to the limit
        value, limit = r[key], limits[key]
        return (limit / max(value, 1e-30)) if op == "<=" else (1 - limit) / max(1 - value, 1e-30)

    key, what, op = min(CRITERIA, key=lambda c: margin(c[0], c[2]))
    return f"{what} {r[key]:.7g} (limit {op} {limits[key]:.7g})"


def _bench_setting(b):
    t = b["threads"]
    return (f"{b['rounds']} interleaved rounds of {b['iterations_per_round']} calls after {b['warmup']} warm-up "
            f"calls; per backend the median of each round, then min / median / max across rounds; vs PyTorch eager: "
            f"per round, then the median; threads: "
            f"onnxruntime {t['onnxruntime_intra_op_threads']}, torch {t['torch_threads']}, {t['cpu_count']} CPUs")


def _blocks_lines(blocks):
    """Where the time goes: the attention blocks, then every top-level layer (ORT profile vs FLOPs and params)."""
    if not blocks:
        return []
    attributed = 1 - blocks["unattributed_ms"] / blocks["kernel_ms"]
    head = ["| module | type | ms | share of time | share of FLOPs | share of params |", "|---|---|---|---|---|---|"]

    def rows(kind):
        return [f"| `{r['module']}` | {r['type']} | {r['ms']:.2f} | {r['time_share']:.1%} | {r['flop_share']:.1%} | "
                f"{r['param_share']:.1%} |" for r in blocks["rows"] if r["kind"] == kind]

    attention = [r for r in blocks["rows"] if r["kind"] == "attention"]
    total = (f"All attention blocks: {sum(r['ms'] for r in attention):.2f} ms, "
             f"{sum(r['time_share'] for r in attention):.1%} of the time for "
             f"{sum(r['flop_share'] for r in attention):.1%} of the FLOPs and "
             f"{sum(r['param_share'] for r in attention):.1%} of the parameters.") if attention else \
        "No attention blocks in this model."
    return ["", f"## Where the time goes (ONNX Runtime profile of `{blocks['onnx']}`, {blocks['profiled_runs']} runs)",
            "", f"Kernels {blocks['kernel_ms']:.2f} ms per run of {blocks['run_ms']:.2f} ms (ORT's run; means over the "
            f"profiled runs; the profiler adds a few microseconds per node, so blocks of many small nodes read a "
            f"little high); "
            f"{attributed:.1%} of the kernel time is attributed to layers. FLOPs: {blocks['total_flops'] / 1e9:.2f} G "
            f"(convolutions and matmuls, of the reference model), parameters {blocks['total_params'] / 1e6:.2f} M.",
            "", total, "", *head, *rows("attention"), "", "![time vs FLOPs per layer](blocks.png)", "",
            "<details><summary>Every layer</summary>", "", *head, *rows("layer"), "", "</details>"]


def bench_markdown(result):
    t = result["threads"]
    lines = [f"# Benchmark: ONNX Runtime CPU, {result['imgsz'][0]}x{result['imgsz'][1]}, batch {result['batch']}", "",
             f"- {result['rounds']} interleaved rounds of {result['iterations_per_round']} calls per model after "
             f"{result['warmup']} warm-up calls; per model the median of each round, then min / median / max across "
             f"rounds. Time over first is paired: each round's median over the first model's median in the same round, "
             f"median across rounds (IQR beside it); the min- and median-based ratios are in bench.json.",
             f"- Threads: onnxruntime {t['onnxruntime_intra_op_threads']}, torch {t['torch_threads']}, "
             f"{t['cpu_count']} CPUs. Input: {result['input']}.",
             "- FLOPs: convolutions and matmuls of each reference model (torch FlopCounterMode). Bound: time over "
             "first <= max(1.5 x FLOPs over first, FLOPs over first + 2 points).", "",
             "| model | precision | min ms | median ms | max ms | time over first (IQR of rounds) | GFLOPs | FLOPs over "
             "first | bound | within |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        flops = f"{r['flops'] / 1e9:.2f}" if r["flops"] else "n/a"
        bound = (f"{r['flops_over_first']:+.1%} | {r['time_bound']:.1%} | "
                 f"{'yes' if r['within_bound'] else '**no**'}") if "flops_over_first" in r else "n/a | | "
        lines.append(f"| {r['model']} | {r['precision']} | {r['min_ms']:.2f} | {r['median_ms']:.2f} | "
                     f"{r['max_ms']:.2f} | {r['time_over_first']:+.1%} ({r['time_over_first_iqr'][0]:+.1%} .. "
                     f"{r['time_over_first_iqr'][1]:+.1%}) | {flops} | {bound} |")
    lines += ["", "## Where the time goes (fp32, ONNX Runtime profile)", "",
              "| model | attention blocks | their ms | share of time | share of FLOPs | share of params |",
              "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        b = r["blocks"]
        if r["precision"] != "fp32" or not b:
            continue
        att = [x for x in b["rows"] if x["kind"] == "attention"]
        lines.append(f"| {r['model']} | {len(att)} | {sum(x['ms'] for x in att):.2f} | "
                     f"{sum(x['time_share'] for x in att):.1%} | {sum(x['flop_share'] for x in att):.1%} | "
                     f"{sum(x['param_share'] for x in att):.1%} |")
    return "\n".join(lines + ["", "![time and FLOPs over the first model](bench.png)", ""])


def _label(backend):
    base, _, precision = backend.partition("_")
    return BACKEND_LABEL.get(base, base) + (f" ({precision} file)" if precision else "")


def _as_written_lines(blocks):
    """The --code blocks: no export twin, exported as written; what the generic rewrites changed in each."""
    if not blocks:
        return []
    lines = ["", "## Blocks exported as written (--code)", "",
             "No export twin: each block below is your fork's code, exported as written, with only the generic "
             "rewrites listed. Parity against PyTorch (and, when it fails, the per-block localisation) is what "
             "proves them.", "", "| block | class | source file | generic rewrites |", "|---|---|---|---|"]
    for name, b in blocks.items():
        rewrites = "; ".join(f"{r['rewrite']}: {r['detail']}" for r in b["rewrites"]) or "none"
        lines.append(f"| `{name}` | `{b['class']}` | `{b['file']}` | {rewrites} |")
    return lines


def _files(report):
    files = report.get("onnx_files") or {report["precision"]: report["onnx"]}
    return ", ".join(f"`{path}` ({precision})" for precision, path in files.items())


def _int8_lines(section):
    if not section:
        return []
    cal = section["calibration"]
    lines = ["", "## INT8 (QDQ, TensorRT explicit quantization)", "",
             f"- File: `{section['onnx']}`: {section['quantized_nodes']} int8 nodes, {section['float_nodes']} "
             f"quantizable nodes kept float, {section['quantize_linear']} QuantizeLinear / "
             f"{section['dequantize_linear']} DequantizeLinear",
             f"- Calibration: {cal['images']} images from {cal['source']}, method `{cal['method']}`, "
             f"{cal['seconds']} s",
             f"- Blocks kept entirely float: {', '.join(f'`{b}`' for b in section['float_blocks']) or 'none'}"]
    if "drop_points" in section:
        lines.append(f"- mAP50-95: fp32 {section['map50_95_fp32']:.4f}, int8 {section['map50_95_int8']:.4f}, drop "
                     f"{section['drop_points']:.2f} points (tolerance {section['tolerance_points']}): "
                     f"{'pass' if section['pass'] else '**FAIL**'}")
    else:
        lines.append(f"- {section.get('note', '')}")
    lines += ["", "| block | rule owner | layers that go int8 (the rest of the block stays float) |", "|---|---|---|"]
    lines += [f"| `{r['block']}` | {r['owner']} | {', '.join(r['int8_layers']) or '(none)'} |" for r in section["rules"]]
    if section.get("sensitivity"):
        lines += ["", f"Sensitivity (first int8 mAP50-95 {section['first_map50_95']:.4f}): each block left float "
                  "alone", "", "| block | owner | int8 mAP50-95 with it float | gain (points) | kept float |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{r['block']}` | {r['owner']} | {r['map50_95_with_block_float']:.4f} | {r['gain_points']:+.2f} | "
                  f"{'yes' if r.get('kept_float') else ''} |" for r in section["sensitivity"]]
    return lines


def _accuracy_lines(acc):
    if not acc:
        return []
    lines = ["", f"## Accuracy on labelled data (`{acc['data']}`, {acc['split']} split, ultralytics' metrics, conf "
             f"{acc['conf']}, NMS IoU {acc['iou']})", "",
             "| model | precision | mAP50 | mAP50-95 | drop vs PyTorch (points) | P | R | images | labels |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {BACKEND_LABEL.get(r['backend'], r['backend']) if r['backend'] != 'torch' else 'PyTorch'} | "
              f"{r['precision']} | {r['map50']:.4f} | {r['map50_95']:.4f} | {r['drop_points_vs_torch']:+.2f} | "
              f"{r['box_p']:.3f} | {r['box_r']:.3f} | {r['images']} | {r['instances']} |" for r in acc["models"]]
    return lines


def _skipped(info):
    return f"not built ({info['skipped']})" if isinstance(info, dict) and "skipped" in info else "not requested"


def _plot(samples, speed, path):
    plt = _pyplot()
    panels = 2 if speed and any(samples.values()) else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    if any(samples.values()):
        _plot_errors(axes[0][0], samples)
    if speed:
        _plot_speed(axes[0][-1], speed)
    _save(fig, path)


def _plot_errors(ax_err, samples):
    for backend, values in samples.items():
        if values:
            logs = [math.log10(v) if v > 0 else -12 for v in values]
            ax_err.hist(logs, bins=60, histtype="step", label=BACKEND_LABEL.get(backend, backend))
    ax_err.set(title="|backend - PyTorch| per output value", xlabel="log10 |difference| (exact matches at -12)",
               ylabel="count")
    ax_err.legend()


def _plot_speed(ax_speed, speed):
    names = list(speed)
    median = [speed[n]["median_ms"] for n in names]
    spread = [[m - speed[n]["min_ms"] for n, m in zip(names, median)],
              [speed[n]["max_ms"] - m for n, m in zip(names, median)]]
    ax_speed.bar(names, median, yerr=spread, capsize=4)
    ax_speed.set(title="latency per call (median of round medians, bar: min to max)", ylabel="ms")


def _plot_detections(images, pictured, labels, names, path):
    """One row per parity image, one column per backend: boxes with class and confidence (ultralytics'
    Annotator), the disagreements with PyTorch marked, and a one-line count per panel."""
    from ultralytics.utils.plotting import Annotator, colors

    from export.parity import disagreements

    plt = _pyplot()
    backends = [b for b, d in pictured.items() if d and b != "torch"]  # the twin in PyTorch: parity's table
    reference = next(d for d in pictured.values() if d)["reference"]
    rows = min(len(images), len(reference))
    fig, axes = plt.subplots(rows, 1 + len(backends), figsize=(3.3 * (1 + len(backends)), 3.5 * rows), squeeze=False)
    for i in range(rows):
        picture = np.ascontiguousarray((images[i].transpose(1, 2, 0) * 255).astype(np.uint8))  # RGB
        panels = [("PyTorch (reference)", reference[i], None)]
        panels += [(labels[b], pictured[b]["backend"][i], disagreements(reference[i], pictured[b]["backend"][i]))
                   for b in backends]
        for ax, (title, dets, diff) in zip(axes[i], panels):
            ann = Annotator(picture.copy(), line_width=1, example=str(names))
            _draw(ann, dets, reference[i], diff, names, colors)
            count = f"{len(dets)} boxes" + (f"; {len(diff['missed'])} missed, {len(diff['extra'])} extra, "
                                            f"{len(diff['flips'])} flips" if diff else "")
            ax.imshow(ann.result())
            ax.set_title(f"{title}\n{count}", fontsize=8)
            ax.set_axis_off()
    _save(fig, path)


MISSED, WRONG = (255, 0, 255), (255, 0, 0)  # RGB: magenta for a missed box, red for an extra or flipped one


def _draw(ann, dets, reference, diff, names, colors):
    flagged = set(diff["extra"]) | {d for _, d in diff["flips"]} if diff else set()
    for k, box in enumerate(dets):
        cls = int(box[5])
        label = f"{names.get(cls, names.get(str(cls), cls))} {box[4]:.2f}"
        if k in flagged:
            label = ("EXTRA " if k in diff["extra"] else "FLIP ") + label
        ann.box_label(box[:4], label, color=WRONG if k in flagged else colors(cls, False))
    for g in diff["missed"] if diff else []:
        cls = int(reference[g][5])
        ann.box_label(reference[g][:4], f"MISSED {names.get(cls, names.get(str(cls), cls))}", color=MISSED)


def _plot_block_errors(report, path):
    """Each rewritten block's twin-vs-reference error and, when localisation ran, its error in the backend."""
    plt = _pyplot()
    names = [m["name"] for m in report["modules"]]
    located = report.get("localization", {}).get("block_errors", {})
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.6))
    y = np.arange(len(names))
    ax.barh(y - (0.2 if located else 0), [max(m["rel"], 1e-12) for m in report["modules"]], height=0.4,
            label="export twin vs reference (PyTorch, fp32)")
    if located:
        backend = report["localization"]["backend"]
        ax.barh(y + 0.2, [max(located.get(n, 0), 1e-12) for n in names], height=0.4,
                label=f"{_label(backend)} vs reference")
    ax.set_xscale("log")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="max abs difference / output scale of the block", title="Where the error lives, per block")
    ax.legend(fontsize=8)
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    import io

    plt = _pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _plot_blocks(blocks, path):
    """Per top-level layer: share of kernel time beside share of FLOPs; layers holding attention starred."""
    plt = _pyplot()
    layers = [r for r in blocks["rows"] if r["kind"] == "layer"]
    labels = [f"{r['module']} {r['type']}{' *' if r['contains_attention'] else ''}" for r in layers]
    y = range(len(layers))
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(layers) + 1.5))
    ax.barh([i - 0.2 for i in y], [100 * r["time_share"] for r in layers], height=0.4, label="share of time")
    ax.barh([i + 0.2 for i in y], [100 * r["flop_share"] for r in layers], height=0.4, label="share of FLOPs")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="% of the model", title="Where the time goes (ONNX Runtime profile; * holds attention)")
    ax.legend()
    _save(fig, path)


def _plot_bench(result, path):
    plt = _pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows) + 2), 4))
    x = range(len(rows))
    iqr = [[100 * (r["time_over_first"] - r["time_over_first_iqr"][0]) for r in rows],
           [100 * (r["time_over_first_iqr"][1] - r["time_over_first"]) for r in rows]]
    ax.bar([i - 0.2 for i in x], [100 * r["time_over_first"] for r in rows], width=0.4, yerr=iqr, capsize=3,
           label="time over first (bar: IQR of rounds)")
    ax.bar([i + 0.2 for i in x], [100 * r.get("flops_over_first", 0) for r in rows], width=0.4,
           label="FLOPs over first")
    ax.set_xticks(list(x), [f"{r['model']}\n{r['precision']}" for r in rows], fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(ylabel="% over the first model", title="ONNX Runtime CPU, paired per-round ratios (median)")
    ax.legend()
    _save(fig, path)
