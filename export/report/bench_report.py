"""`python -m export bench`'s files: bench.json, bench.md (the table and where the time goes), bench.png; and the
console table."""

import json

from export.files import atomic_write
from export.report.pictures import bench_plot, latency_plot
from export.verify.timing import quartiles


def write_bench(result, out):
    """`python -m export bench`: bench.json, bench.md (the table and where the time goes), bench.png."""
    atomic_write(out / "bench.json", (json.dumps(result, indent=2, default=str) + "\n").encode())
    atomic_write(out / "bench.md", bench_markdown(result).encode())
    if single_model(result):
        latency_plot(result["rows"], [round_iqr_ms(r) for r in result["rows"]], out / "bench.png")
    else:
        bench_plot(result, out / "bench.png")


def single_model(result):
    """One model on the bench: no other to compare with, so absolute latencies only and no ratio claims."""
    return len({r["model"] for r in result["rows"]}) == 1


def round_iqr_ms(row):
    """[first, third] quartile of a row's round medians, ms."""
    return quartiles(row["round_medians_ms"])


def bench_markdown(result):
    if single_model(result):
        return _single_markdown(result)
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


def _single_markdown(result):
    t = result["threads"]
    lines = [f"# Benchmark: ONNX Runtime CPU, {result['imgsz'][0]}x{result['imgsz'][1]}, batch {result['batch']}", "",
             f"- One model: latencies only (add a second MODEL to compare). {result['rounds']} interleaved rounds of "
             f"{result['iterations_per_round']} calls after {result['warmup']} warm-up calls; per file the median of "
             f"each round, then min / median / max and the interquartile range across rounds.",
             f"- Threads: onnxruntime {t['onnxruntime_intra_op_threads']}, torch {t['torch_threads']}, "
             f"{t['cpu_count']} CPUs. Input: {result['input']}.", "",
             "| model | precision | min ms | median ms | max ms | IQR of rounds (ms) | GFLOPs |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        q1, q3 = round_iqr_ms(r)
        flops = f"{r['flops'] / 1e9:.2f}" if r["flops"] else "n/a"
        lines.append(f"| {r['model']} | {r['precision']} | {r['min_ms']:.2f} | {r['median_ms']:.2f} | {r['max_ms']:.2f} "
                     f"| {q1:.2f} .. {q3:.2f} | {flops} |")
    return "\n".join(lines + ["", "![latency per file](bench.png)", ""])


def bench_table(result):
    if single_model(result):
        lines = [f"{'model':24s} {'prec':5s} {'min ms':>8s} {'median':>8s} {'max':>8s} {'IQR of rounds (ms)':>20s}"]
        for r in result["rows"]:
            q1, q3 = round_iqr_ms(r)
            lines.append(f"{r['model']:24s} {r['precision']:5s} {r['min_ms']:8.2f} {r['median_ms']:8.2f} "
                         f"{r['max_ms']:8.2f} {f'{q1:.2f} .. {q3:.2f}':>20s}")
        return "\n".join(lines)
    lines = [f"{'model':24s} {'prec':5s} {'min ms':>8s} {'median':>8s} {'max':>8s} {'time over first':>16s} "
             f"{'(IQR of rounds)':>17s} {'FLOPs over first':>17s} {'bound':>7s}"]
    for r in result["rows"]:
        flops = f"{r['flops_over_first']:+.1%}" if "flops_over_first" in r else "n/a"
        bound = ("ok" if r["within_bound"] else "OVER") if "within_bound" in r else ""
        q1, q3 = r["time_over_first_iqr"]
        lines.append(f"{r['model']:24s} {r['precision']:5s} {r['min_ms']:8.2f} {r['median_ms']:8.2f} "
                     f"{r['max_ms']:8.2f} {r['time_over_first']:+16.1%} {f'{q1:+.1%} .. {q3:+.1%}':>17s} "
                     f"{flops:>17s} {bound:>7s}")
    return "\n".join(lines)
