"""The main job's report in --out: report.json (schema: docs/report-format.md), report.md (the same as tables,
opening with a verdict line per backend) and the pictures it embeds (those with something to show)."""

import json

from export.checkpoint.kinds import KINDS
from export.files import atomic_write
from export.text import shown
from export.report.labels import BACKEND_LABEL, backend_label
from export.report.pictures import block_errors_plot, blocks_plot, detections_plot, parity_plot

def write_report(report, out):
    """report.json, report.md and the pictures it embeds (those with something to show)."""
    parity = report.get("parity", {})
    samples = {b: r.pop("abs_diff_sample", None) for b, r in parity.items()}
    pictured = {b: r.pop("detections_sample", None) for b, r in parity.items()}
    images = report.pop("_images", None)
    report["pictures"] = []
    if any(samples.values()) or report.get("speed"):
        parity_plot(samples, report.get("speed", {}), out / "parity.png")
        report["pictures"].append("parity.png")
    if images is not None and any(pictured.values()):
        labels = {b: backend_label(b, r.get("precision")) for b, r in parity.items()}
        detections_plot(images, pictured, labels, report["checkpoint"]["names"], out / "detections.png")
        report["pictures"].append("detections.png")
    if report.get("modules"):
        block_errors_plot(report, out / "errors.png")
        report["pictures"].append("errors.png")
    if report.get("blocks"):
        blocks_plot(report["blocks"], out / "blocks.png")
        report["pictures"].append("blocks.png")
    atomic_write(out / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    atomic_write(out / "report.md", markdown(report).encode())


def markdown(report):
    kind = KINDS[report["checkpoint"].get("kind", "ultralytics")]
    lines = [f"# Export report: {report['weights']}", "",
             f"- Checkpoint: {kind.label}, output `{kind.output_layout}`",
             f"- ONNX: {_files(report)} (imgsz {report['imgsz']}, batch {report['batch']}"
             f"{', dynamic' if report['dynamic'] else ''})",
             f"- Engine: {('`' + report['engine'] + '`') if report.get('engine') else _skipped(report.get('engine_build'))}",
             *_runtime_line(report.get("runtime")), f"- Exit code: {report['exit_code']}", "", *verdicts(report), ""]
    if "detections.png" in report.get("pictures", []):
        lines += ["## Detections side by side", "", "PyTorch (the reference) and every backend on the parity images; "
                  "marked: PyTorch boxes a backend missed (MISSED), backend boxes PyTorch does not have (EXTRA), "
                  "class flips (FLIP).", "", "![detections](detections.png)", ""]
    if report["checkpoint"]["remapped"]:
        lines += ["## Classes remapped", "", "| in the checkpoint | reconstructed as |", "|---|---|"]
        lines += [f"| `{shown(k)}` | `{v}` |" for k, v in report["checkpoint"]["remapped"].items()] + [""]
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
                  "borderline (conf / class / NMS or cap) | mean IoU | mAP50-95 | pass |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for backend, r in report["parity"].items():
            if "skipped" in r:
                lines.append(f"| {backend_label(backend)} | skipped: {r['skipped']} |||||||||||")
                continue
            lines.append(f"| {BACKEND_LABEL.get(backend.partition('_')[0], backend)} | {r.get('precision', '')} | "
                         f"{r['max_abs']:.3g} | {r['mean_abs']:.3g} | "
                         f"{r['cosine']:.7f} | {r['top_anchor_max_rel']:.3g} | {r['box_recall']:.3f} | "
                         f"{r['box_precision']:.3f} | {_borderline(r)} | {r['mean_iou']:.4f} | {r['map50_95']:.3f} | "
                         f"{'yes' if r['pass'] else '**NO**'} |")
        lines += ["", "Box recall and precision count real disagreements only: a box one side keeps and the other drops "
                  "is borderline, not a failure, when the backend's box and class scores at that anchor are PyTorch's "
                  "within the precision's anchor tolerance (a decision flipped at the confidence threshold, on a "
                  "near-tied class, or by NMS / the max-detections cut among near-equal boxes). mAP50-95 and mean "
                  "IoU count every decision."]
        notes = sorted({r["boxes_note"] for r in report["parity"].values() if r.get("boxes_note")})
        lines += [f"- {n}" for n in notes]
        if report.get("localization"):
            loc = report["localization"]
            lines += ["", f"First diverging block ({loc['backend']}): `{loc['first_divergent_block']}`"]
        lines += _block_check_lines(report.get("block_check")) + _island_lines(report.get("fp32_islands"))
        lines += _nms_lines(report.get("nms"))
    else:
        lines.append("Skipped (--no-parity).")
    if "parity.png" in report.get("pictures", []):
        lines += ["", "![parity](parity.png)"]
    if report.get("speed"):
        lines += ["", f"## Speed ({_bench_setting(report['bench'])})", "",
                  "| backend | min ms | median ms | max ms | images/s | vs PyTorch eager |", "|---|---|---|---|---|---|"]
        lines += [f"| {'PyTorch eager (reference)' if b == 'torch' else backend_label(b)} | {s['min_ms']:.2f} | {s['median_ms']:.2f} | {s['max_ms']:.2f} | "
                  f"{s['images_per_s']:.1f} | {s['speedup_vs_torch']:.2f}x |" for b, s in report["speed"].items()]
    lines += _blocks_lines(report.get("blocks"))
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _block_check_lines(check):
    """Each --code block's own ONNX output against PyTorch (the model's output can hide a wrong block)."""
    if not check:
        return []
    second = check.get("errors_second", {})
    at = f"; at {'x'.join(map(str, check['second_imgsz']))}: " if second else ""

    def line(block, error):
        if error is None:
            return f"- `{block}`: not checked on its own (its input or output is not one tensor)"
        return (f"- `{block}`: {error:.2g}" + (f"{at}{second[block]:.2g}" if second else "")
                + f" -> {'**FAIL**' if block in check['failed'] else 'pass'}")

    return ["", f"Block check (each --code block exported on its own, {check['precision']}, fed PyTorch's input to "
                f"it; limit {check['limit']:.0e} of the block's output scale):", ""] + [
        line(block, error) for block, error in check["errors"].items()]


def _nms_lines(nms):
    """--nms: each end-to-end file against ultralytics' NMS on its plain file's output."""
    if not nms:
        return []
    p = nms["params"]
    lines = ["", f"End-to-end files ({nms['layout']} layout; conf {p['conf']}, iou {p['iou']}, max_det {p['max_det']}"
                 f"{', class-agnostic' if p['agnostic'] else ''}), against the NMS of their plain file:", "",
             "| file | detections | borderline | max box diff (px) | max score diff | pass |", "|---|---|---|---|---|---|"]
    for r in nms["files"].values():
        lines.append(f"| {r['file'].rpartition('/')[2]} | {r['detections']} | {r['borderline']} | "
                     f"{r['max_box_diff']:.3g} | {r['max_score_diff']:.3g} | {'yes' if r['pass'] else '**NO**'} |")
    return lines


def _island_lines(islands):
    if not islands:
        return []
    return ["", "Kept fp32 inside the fp16 model:", ""] + [f"- `{i['block']}`: {i['reason']}" for i in islands]


CRITERIA = (("rel_max_abs", "max abs / output scale", "<="), ("cosine", "cosine", ">="),
            ("box_recall", "box recall", ">="), ("box_precision", "box precision", ">="))


def verdicts(report):
    """One line per backend: pass / FAIL and the figure that decided it (the failing one, else the closest)."""
    lines = []
    for backend, r in report.get("parity", {}).items():
        if "skipped" in r:
            lines.append(f"- {backend_label(backend)}: not run ({r['skipped']})")
            continue
        lines.append(f"- {backend_label(backend, r['precision'])}: {'pass' if r['pass'] else '**FAIL**'}, "
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
    return f"{what} {_short(key, r[key])} (limit {op} {_short(key, limits[key])})"


def _short(key, value):
    """A figure as a reader wants it: the cosine to 7 digits (its story is in the nines), the rest to 2-3."""
    text = f"{value:.7g}" if key == "cosine" else f"{value:.3g}" if key.startswith("box") else f"{value:.2g}"
    return text.replace("e-0", "e-").replace("e+0", "e+")


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
        lines.append(f"| `{name}` | `{shown(b['class'])}` | `{b['file']}` | {rewrites} |")
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


def _runtime_line(runtime):
    if not runtime:
        return []
    trt = runtime.get("tensorrt") or "none (no engine built)"
    return [f"- Ran with: ONNX Runtime {runtime['onnxruntime']} ({', '.join(runtime['providers'])}); TensorRT: {trt}"]


def _borderline(r):
    b = r.get("borderline")
    return f"{b['confidence']} / {b['class']} / {b['nms_or_cap']}" if b else "n/a"


def _skipped(info):
    return f"not built ({info['skipped']})" if isinstance(info, dict) and "skipped" in info else "not requested"
