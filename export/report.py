"""Write the job's report into --out: report.json (schema in the README), report.md (the same as tables), parity.png."""

import json
import math

from export.files import atomic_write
from export.kinds import KINDS

BACKEND_LABEL = {"torch": "PyTorch (export twin)", "onnxruntime": "ONNX Runtime", "tensorrt": "TensorRT"}


def write_report(report, out):
    samples = {b: r.pop("abs_diff_sample", None) for b, r in report.get("parity", {}).items()}
    atomic_write(out / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    atomic_write(out / "report.md", markdown(report).encode())
    _plot(samples, report.get("speed", {}), out / "parity.png")


def markdown(report):
    kind = KINDS[report["checkpoint"].get("kind", "ultralytics")]
    lines = [f"# Export report: {report['weights']}", "",
             f"- Checkpoint: {kind.label}, output `{kind.output_layout}`",
             f"- ONNX: {_files(report)} (imgsz {report['imgsz']}, batch {report['batch']}"
             f"{', dynamic' if report['dynamic'] else ''})",
             f"- Engine: {('`' + report['engine'] + '`') if report.get('engine') else _skipped(report.get('engine_build'))}",
             f"- Exit code: {report['exit_code']}", ""]
    if report["checkpoint"]["remapped"]:
        lines += ["## Classes remapped", "", "| in the checkpoint | reconstructed as |", "|---|---|"]
        lines += [f"| `{k}` | `{v}` |" for k, v in report["checkpoint"]["remapped"].items()] + [""]
    lines += ["## Rewritten blocks (export twin vs reference on this block's real input)", "",
              "| block | reference → twin | input | max abs | rel | note |", "|---|---|---|---|---|---|"]
    lines += [f"| `{m['name']}` | {m['reference']} → {m['twin']} | {'x'.join(map(str, m['input_shape']))} | "
              f"{m['max_abs']:.3g} | {m['rel']:.2g} | {m['note']} |" for m in report["modules"]] or ["| (none) |||||"]
    lines += ["", "## Lint (TensorRT's ONNX parser)", ""]
    lines += [f"- **{f['severity']}** ({f.get('onnx', report['precision'])}) `{f['op'] or f['rule']}` {f['node']}: "
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
    if report.get("speed"):
        lines += ["", "## Speed (same inputs, same threads)", "",
                  "| backend | p50 ms | p90 ms | images/s | vs PyTorch eager |", "|---|---|---|---|---|"]
        lines += [f"| {b} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | {s['images_per_s']:.1f} | {s['speedup_vs_torch']:.2f}x |"
                  for b, s in report["speed"].items()]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _label(backend):
    base, _, precision = backend.partition("_")
    return BACKEND_LABEL.get(base, base) + (f" ({precision} file)" if precision else "")


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
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
    for backend, values in samples.items():
        if values:
            logs = [math.log10(v) if v > 0 else -12 for v in values]
            ax_err.hist(logs, bins=60, histtype="step", label=BACKEND_LABEL.get(backend, backend))
    ax_err.set(title="|backend - PyTorch| per output value", xlabel="log10 |difference| (exact matches at -12)",
               ylabel="count")
    if any(samples.values()):
        ax_err.legend()
    if speed:
        names = list(speed)
        p50 = [speed[n]["p50_ms"] for n in names]
        p90 = [speed[n]["p90_ms"] - speed[n]["p50_ms"] for n in names]
        ax_speed.bar(names, p50, yerr=[[0] * len(names), p90], capsize=4)
        ax_speed.set(title="latency per call (p50, bar to p90)", ylabel="ms")
    else:
        ax_speed.text(0.5, 0.5, "no benchmark (--bench N)", ha="center", va="center")
        ax_speed.set_axis_off()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
