"""Speed you can trust: interleaved rounds and paired ratios.

- `interleaved`: warm-up, then rounds; in each round every runner makes `iterations` calls back to back, in
  an order that rotates between rounds, ONNX Runtime sessions opened afresh each round (`Fresh`). Per
  runner: the median of each round, and the min / median / max of those medians. On a shared CPU single
  runs move by tens of percent; interleaved in one run, ratios hold much better.
- `paired_ratios` / `relative_to_first`: per round, one runner's median over another's of the same round.
"""

import os
import statistics
import time
from collections import defaultdict

import torch
from tqdm import tqdm

DEFAULT_ROUNDS, DEFAULT_WARMUP = 5, 5


def thread_settings(ort_threads):
    """What the timings depend on besides the model: recorded with every benchmark."""
    return {"torch_threads": torch.get_num_threads(), "onnxruntime_intra_op_threads": ort_threads,
            "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


class Fresh:
    """A runner rebuilt at every round (an ONNX Runtime session): measured here, two sessions of the same file
    in one run kept offsets of up to 5% from each other for their whole life, so one session per model
    would bias the comparison; a fresh session per round turns that offset into round-to-round spread."""

    def __init__(self, make):
        self.make = make


def interleaved(runners, images, iterations, rounds=DEFAULT_ROUNDS, warmup=DEFAULT_WARMUP):
    """{name: latency stats (ms)} of each runner's call on `images` (one batch), timed in interleaved rounds.
    A `Fresh` runner is rebuilt and warmed up at every round; any other runner is warmed up once."""
    names = list(runners)
    kept = {n: r for n, r in runners.items() if not isinstance(r, Fresh)}
    for runner in kept.values():
        _warm(runner, images, warmup)
    medians = defaultdict(list)
    steps = tqdm(total=rounds * len(names) * iterations, desc="bench", leave=False, disable=None)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no runner always goes first
            runner = kept.get(name) or _warm(runners[name].make(), images, warmup)
            times = []
            for _ in range(iterations):
                start = time.perf_counter()
                runner(images)
                times.append((time.perf_counter() - start) * 1000)
                steps.update()
            medians[name].append(statistics.median(times))
    steps.close()
    return {name: latency_stats(medians[name], iterations, len(images)) for name in names}


def _warm(runner, images, calls):
    for _ in range(calls):
        runner(images)
    return runner


def latency_stats(round_medians, iterations, batch):
    median = statistics.median(round_medians)
    return {"round_medians_ms": [round(m, 3) for m in round_medians], "min_ms": min(round_medians),
            "median_ms": median, "max_ms": max(round_medians), "images_per_s": batch * 1000 / median,
            "rounds": len(round_medians), "iterations_per_round": iterations}


def paired_ratios(stats, base):
    """Per round, `stats`' median over `base`'s median of the same round (both from one `interleaved` call)."""
    return [mine / theirs for mine, theirs in zip(stats["round_medians_ms"], base["round_medians_ms"])]


def relative_to_first(rows):
    """Time and FLOPs over the first model of the same precision, and the bound the attention's cost should meet:
    max(1.5 x its FLOP share, its FLOP share + 2 points).

    The headline ratio is paired: each round's median over the first model's median of the same round, then the
    median of those ratios (and their spread). Both runs of a round are seconds apart, so the machine's drift
    cancels. Measured here: for the same two files, the ratio of the min of round medians read +4.5%, +6.1% and
    +9.3% in three runs, the paired median +9.9%, +10.5% and +10.7%. The min- and median-based ratios stay in
    the JSON."""
    for row in rows:
        base = next(r for r in rows if r["precision"] == row["precision"])
        paired = [ratio - 1 for ratio in paired_ratios(row, base)]
        row["time_over_first"] = statistics.median(paired)
        row["time_over_first_rounds"] = [round(p, 4) for p in paired]
        row["time_over_first_iqr"] = quartiles(paired)
        row["min_over_first"] = row["min_ms"] / base["min_ms"] - 1
        row["median_over_first"] = row["median_ms"] / base["median_ms"] - 1
        if row["flops"] and base["flops"]:
            share = row["flops"] / base["flops"] - 1
            row["flops_over_first"], row["time_bound"] = share, max(1.5 * share, share + 0.02)
            row["within_bound"] = row is base or row["time_over_first"] <= row["time_bound"]


def quartiles(values):
    """[first, third] quartile (the interquartile range of the per-round ratios)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]
