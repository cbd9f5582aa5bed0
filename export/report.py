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
             f"- ONNX: `{report['onnx']}` ({report['precision']}, imgsz {report['imgsz']}, batch {report['batch']}"
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
    lines += [f"- **{f['severity']}** `{f['op'] or f['rule']}` {f['node']}: {f['message']}" for f in report["lint"]] \
        or ["Clean: nothing TensorRT rejects or runs badly."]
    lines += ["", "## Parity against PyTorch (the loaded reference model)", ""]
    if report.get("parity"):
        lines += ["| backend | max abs | mean abs | cosine | top-anchor rel | box recall | box precision | mean IoU | "
                  "mAP50-95 | pass |", "|---|---|---|---|---|---|---|---|---|---|"]
        for backend, r in report["parity"].items():
            if "skipped" in r:
                lines.append(f"| {BACKEND_LABEL.get(backend, backend)} | skipped: {r['skipped']} |||||||||")
                continue
            lines.append(f"| {BACKEND_LABEL.get(backend, backend)} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | "
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
