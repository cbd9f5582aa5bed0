"""The pictures the reports embed, written atomically as PNG (matplotlib, Agg; boxes by ultralytics' Annotator)."""

import io
import math

import numpy as np

from export.files import atomic_write
from export.report.labels import BACKEND_LABEL, backend_label
from export.verify.parity import disagreements


def parity_plot(samples, speed, path):
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


def detections_plot(images, pictured, labels, names, path):
    """One row per parity image, one column per backend: boxes with class and confidence (ultralytics'
    Annotator), the disagreements with PyTorch marked as the verdict judged them (real ones in red / magenta,
    borderline ones in grey), and a one-line count per panel."""
    from ultralytics.utils.plotting import Annotator, colors

    plt = _pyplot()
    backends = [b for b, d in pictured.items() if d and b != "torch"]  # the twin in PyTorch: parity's table
    reference = next(d for d in pictured.values() if d)["reference"]
    rows = min(len(images), len(reference))
    fig, axes = plt.subplots(rows, 1 + len(backends), figsize=(3.3 * (1 + len(backends)), 3.5 * rows), squeeze=False)
    for i in range(rows):
        picture = np.ascontiguousarray((images[i].transpose(1, 2, 0) * 255).astype(np.uint8))  # RGB
        panels = [("PyTorch (reference)", reference[i], None)]
        panels += [(labels[b], pictured[b]["backend"][i], _judged(pictured[b], reference[i], i)) for b in backends]
        for ax, (title, dets, diff) in zip(axes[i], panels):
            ann = Annotator(picture.copy(), line_width=1, example=str(names))
            _draw(ann, dets, reference[i], diff, names, colors)
            count = f"{len(dets)} boxes" + (f"; {len(diff['missed'])} missed, {len(diff['extra'])} extra, "
                                            f"{len(diff['flips'])} flips" if diff else "")
            count += f"; {len(diff['borderline'])} borderline" if diff and diff.get("borderline") else ""
            ax.imshow(ann.result())
            ax.set_title(f"{title}\n{count}", fontsize=8)
            ax.set_axis_off()
    _save(fig, path)


# RGB: magenta for a missed box, red for an extra or flipped one, grey for a borderline one (a decision flipped on
# values equal within the precision's tolerance: not counted against the backend)
MISSED, WRONG, BORDERLINE = (255, 0, 255), (255, 0, 0), (150, 150, 150)


def _judged(sample, reference, i):
    """The verdict's judgement of image i; a sample without one (an older report) gets the plain matching."""
    judged = sample.get("judged")
    return judged[i] if judged else {**disagreements(reference, sample["backend"][i]), "borderline": []}


def _draw(ann, dets, reference, diff, names, colors):
    diff = diff or {"missed": [], "extra": [], "flips": [], "borderline": []}
    flagged = set(diff["extra"]) | {d for _, d in diff["flips"]}
    grey_extra = {item if side == "extra" else item[1] for side, item, _ in diff["borderline"] if side != "missed"}
    for k in np.argsort([box[4] for box in dets], kind="stable"):  # least confident first: the top label is on top
        box, cls = dets[k], int(dets[k][5])
        label = f"{_name(names, cls)} {box[4]:.2f}"
        if k in flagged:
            label = ("EXTRA " if k in diff["extra"] else "FLIP ") + label
        elif k in grey_extra:
            label = "BORDERLINE " + label
        color = WRONG if k in flagged else BORDERLINE if k in grey_extra else colors(cls, False)
        ann.box_label(box[:4], label, color=color)
    for g in diff["missed"]:
        ann.box_label(reference[g][:4], f"MISSED {_name(names, int(reference[g][5]))}", color=MISSED)
    for side, item, kind in diff["borderline"]:
        if side == "missed":
            ann.box_label(reference[item][:4], f"BORDERLINE ({kind}) {_name(names, int(reference[item][5]))}",
                          color=BORDERLINE)


def _name(names, cls):
    return names.get(cls, names.get(str(cls), cls))


def block_errors_plot(report, path):
    """Each rewritten block's twin-vs-reference error and, when localisation ran, its error in the backend."""
    plt = _pyplot()
    names = [m["name"] for m in report["modules"]]
    located = report.get("localization", {}).get("block_errors", {})
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.6))
    y = np.arange(len(names))
    rows = [(y - (0.2 if located else 0), [m["rel"] for m in report["modules"]],
             "export twin vs reference (PyTorch, fp32)")]
    if located:
        rows.append((y + 0.2, [located.get(n, 0) for n in names],
                     f"{backend_label(report['localization']['backend'])} vs reference"))
    exact = []
    for at, values, label in rows:  # an exact match has no bar on a log axis: it is labelled "exact" instead
        ax.barh(at, [v if v > 0 else np.nan for v in values], height=0.4, label=label)
        exact += [a for a, v in zip(at, values) if v == 0]
    ax.set_xscale("log")
    if not any(v > 0 for _, values, _ in rows for v in values):
        ax.set_xlim(1e-12, 1)
    for a in exact:
        ax.text(ax.get_xlim()[0], a, " exact", va="center", fontsize=7)
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
    plt = _pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def blocks_plot(blocks, path):
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


def bench_plot(result, path):
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


def latency_plot(rows, iqrs, path):
    """One model on the bench: its median latency per file, with the interquartile range of the rounds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4))
    medians = [r["median_ms"] for r in rows]
    # the round medians are kept to 3 decimals, the median is not: clamp the rounding's sliver below zero
    spread = [[max(0.0, m - q1) for m, (q1, _) in zip(medians, iqrs)],
              [max(0.0, q3 - m) for m, (_, q3) in zip(medians, iqrs)]]
    ax.bar(range(len(rows)), medians, yerr=spread, capsize=4)
    ax.set_xticks(range(len(rows)), [f"{r['model']}\n{r['precision']}" for r in rows], fontsize=8)
    ax.set(ylabel="ms per call", title="ONNX Runtime CPU latency (median of round medians, bar: IQR of rounds)")
    _save(fig, path)
