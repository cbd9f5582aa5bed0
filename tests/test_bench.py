"""The benchmark's structure (rounds, stats, interleaving) and the per-block attribution. No timing asserts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import models
from export.verify import profile, timing
from export.cli import main
from export.checkpoint.loader import from_yaml, load
from export.graph.rewrite import rewrite
from export.graph.to_onnx import export_yolo


class _Counter:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def __call__(self, images):
        self.log.append(self.name)


def test_interleaved_rounds_rotate_and_summarise():
    log = []
    runners = {n: _Counter(n, log) for n in "abc"}
    stats = timing.interleaved(runners, np.zeros((2, 3, 8, 8), np.float32), iterations=4, rounds=3, warmup=2)
    timed = log[3 * 2:]  # after every runner's warm-up calls
    assert len(timed) == 3 * 3 * 4 and all(log.count(n) == 2 + 3 * 4 for n in "abc")
    firsts = [timed[r * 12] for r in range(3)]
    assert firsts == ["a", "b", "c"]  # the order rotates: no runner always goes first
    for s in stats.values():
        assert len(s["round_medians_ms"]) == s["rounds"] == 3 and s["iterations_per_round"] == 4
        assert s["min_ms"] <= s["median_ms"] <= s["max_ms"]


def test_fresh_runners_are_rebuilt_and_warmed_every_round():
    log, made = [], []

    def make():
        made.append(1)
        return _Counter("fresh", log)

    stats = timing.interleaved({"kept": _Counter("kept", log), "fresh": timing.Fresh(make)},
                              np.zeros((1, 3, 8, 8), np.float32), iterations=3, rounds=4, warmup=2)
    assert len(made) == 4 and log.count("fresh") == 4 * (2 + 3) and log.count("kept") == 2 + 4 * 3
    assert stats["fresh"]["rounds"] == 4


def test_latency_stats():
    s = timing.latency_stats([3.0, 1.0, 2.0, 10.0, 4.0], iterations=7, batch=2)
    assert (s["min_ms"], s["median_ms"], s["max_ms"]) == (1.0, 3.0, 10.0)
    assert s["images_per_s"] == pytest.approx(2 * 1000 / 3.0) and s["rounds"] == 5


def test_time_over_first_pairs_rounds():
    """A machine that drifts between rounds moves both models alike: the paired ratio sees the 10% the model costs,
    the min-based ratio sees the drift (one lucky round of the base)."""
    base = [10.0, 20.0, 10.0, 20.0, 9.0]
    rows = [{"model": "plain", "precision": "fp32", "flops": 100, **timing.latency_stats(base, 1, 1)},
            {"model": "fla", "precision": "fp32", "flops": 103, **timing.latency_stats([11.0, 22.0, 11.0, 22.0, 12.0], 1, 1)},
            {"model": "plain", "precision": "fp16", "flops": None, **timing.latency_stats([5.0], 1, 1)}]
    timing.relative_to_first(rows)
    plain, fla, half = rows
    assert plain["time_over_first"] == 0 and plain["time_over_first_iqr"] == [0, 0] and plain["within_bound"]
    assert fla["time_over_first"] == pytest.approx(0.10)
    assert fla["time_over_first_rounds"] == pytest.approx([0.1, 0.1, 0.1, 0.1, 1 / 3], abs=1e-4)
    assert fla["time_over_first_iqr"] == pytest.approx([0.1, 0.1])
    assert fla["min_over_first"] == pytest.approx(11 / 9 - 1) and fla["median_over_first"] == pytest.approx(0.2)
    assert fla["time_bound"] == pytest.approx(0.05) and not fla["within_bound"]
    assert half["time_over_first"] == 0 and "flops_over_first" not in half


def test_module_costs_counts_conv_flops_and_params():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    costs = profile.module_costs(model, (16, 16))
    assert costs["0"]["flops"] == 2 * 3 * 8 * 9 * 16 * 16 and costs["0"]["params"] == 8 * 3 * 9 + 8
    assert costs["2"]["flops"] == 2 * 8 * 4 * 16 * 16 and costs["1"]["flops"] == 0
    assert costs[""]["flops"] == costs["0"]["flops"] + costs["2"]["flops"]


@pytest.fixture(scope="module")
def fla_blocks(tmp_path_factory):
    """A small model: the FLA demo at 96x96, profiled."""
    loaded = load(models.demo_checkpoint("fla"))
    imgsz = (96, 96)
    twin, _ = rewrite(loaded.model, imgsz)
    path = tmp_path_factory.mktemp("fla") / "fla.onnx"
    export_yolo(twin, loaded, path, imgsz)
    images = np.random.default_rng(0).random((1, 3, *imgsz), dtype=np.float32)
    measured = profile.profile_onnx(path, images, threads=torch.get_num_threads(), runs=5, warmup=2)
    return profile.block_costs(measured, profile.module_costs(loaded.model, imgsz), loaded.model)


def test_layer_shares_add_up_to_the_measured_total(fla_blocks):
    layers = [r for r in fla_blocks["rows"] if r["kind"] == "layer"]
    assert len(layers) == 23
    # Every kernel lands in a layer (layout reorders ORT inserts are charged to the op that forces them):
    assert fla_blocks["unattributed_ms"] == 0
    assert sum(r["ms"] for r in layers) == pytest.approx(fla_blocks["kernel_ms"], rel=1e-9)
    assert sum(r["time_share"] for r in layers) == pytest.approx(1.0, rel=1e-9)
    # ORT runs one node at a time, so the kernels fit in the run. How much of the run they fill is a timing figure
    # (it drops on a loaded machine): the report prints it on every --bench run, no test bounds it.
    assert 0 < fla_blocks["kernel_ms"] <= fla_blocks["run_ms"]
    # Convolutions and matmuls all live in layers: their FLOPs and the parameters partition the model.
    assert sum(r["flops"] for r in layers) == fla_blocks["total_flops"]
    assert sum(r["params"] for r in layers) == fla_blocks["total_params"]


def test_attention_blocks_are_charged_inside_their_layers(fla_blocks):
    rows = {r["module"]: r for r in fla_blocks["rows"]}
    attention = [r for r in fla_blocks["rows"] if r["kind"] == "attention"]
    assert [r["module"] for r in attention] == [f"model.{i}.m.0.FLA" for i in (12, 15, 18, 21)]
    for r in attention:
        layer = rows[".".join(r["module"].split(".")[:2])]
        assert 0 < r["ms"] < layer["ms"] and 0 < r["flops"] < layer["flops"]
        assert layer["contains_attention"] == [r["module"]] and layer["type"] == "C2f_FLA"


def test_bench_command_side_by_side(tmp_path, capsys):
    fla_onnx = tmp_path / "given.onnx"
    loaded = load(models.demo_checkpoint("fla"))
    export_yolo(models.to_export(loaded.model), loaded, fla_onnx, (64, 64))
    argv = ["bench", "yolov8n.yaml", str(models.demo_checkpoint("fla")), str(fla_onnx), "--imgsz", "64",
            "--rounds", "2", "--iterations", "2", "--warmup", "1", "--half", "--out", str(tmp_path / "b")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    rows = {(r["model"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {("yolov8n", "fp32"), ("yolov8n", "fp16"), ("yolov8n-fla", "fp32"),
                         ("yolov8n-fla", "fp16"), ("given", "fp32")}
    assert rows[("yolov8n", "fp32")]["time_over_first"] == 0 and rows[("yolov8n", "fp32")]["within_bound"]
    fla_row = rows[("yolov8n-fla", "fp32")]
    assert 0.02 < fla_row["flops_over_first"] < 0.05  # FLA adds about 3% FLOPs to yolov8n (nc 3 from the checkpoint)
    assert fla_row["time_bound"] == pytest.approx(max(1.5 * fla_row["flops_over_first"], fla_row["flops_over_first"] + 0.02))
    assert len(fla_row["round_medians_ms"]) == 2 and fla_row["blocks"]["rows"]
    assert rows[("given", "fp32")]["flops"] is None and "flops_over_first" not in rows[("given", "fp32")]
    assert result["threads"]["onnxruntime_intra_op_threads"] >= 1
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "| yolov8n-fla | fp16 |" in md and "Where the time goes" in md
    assert (tmp_path / "b" / "bench.png").stat().st_size > 0
    assert "time over first" in capsys.readouterr().out


def test_bench_command_bad_input(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.onnx"), "--out", str(tmp_path)]) == 2
    assert main(["bench", "no-such-model.yaml", "--out", str(tmp_path)]) == 2
    assert main(["bench", "yolov8n.yaml", "--imgsz", "100", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)


def test_from_yaml_builds_stock_and_our_architectures():
    assert from_yaml("yolov8n.yaml", 3).nc == 3
    fla_model = from_yaml("yolov8-fla.yaml", 3).model
    assert profile.attention_blocks(fla_model) == [f"model.{i}.m.0.FLA" for i in (12, 15, 18, 21)]


def test_fla_floor_tool_keeps_the_convolutions_and_drops_the_attention(tmp_path):
    import importlib.util

    import onnx

    spec = importlib.util.spec_from_file_location("fla_floor", Path(__file__).resolve().parents[1] / "tools" / "fla_floor.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--out", str(tmp_path), "--imgsz", "64"])
    for name in ("yolov8n-fla-floor.onnx", "yolov8n-fla-floor_fp16.onnx"):
        nodes = [n for n in onnx.load(tmp_path / name).graph.node if "/FLA/" in n.name]
        ops = {n.op_type for n in nodes}
        assert sum(n.op_type == "Conv" for n in nodes) == 4 * 5  # q, k, v, dwc, proj in each of the 4 blocks
        assert not ops & {"MatMul", "Pow", "ReduceL2", "Div"}, ops
