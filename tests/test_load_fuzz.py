"""Fuzzing the loader: mutated and truncated checkpoints only ever load or raise a clean CheckpointError.

Never another exception, a traceback, a hang or a crash. The mutants are generated from a fixed seed
(tests/fuzz_driver.py explains the two arms: raw-file and data.pkl-only) and loaded in a separate
process so that a segfault or a hang fails this test instead of killing the session.
"""

import io
import json
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from tests import fuzz_driver

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "models" / "demo" / "yolov8n-sta.pt"  # a real (6.7 MB, fp16) training checkpoint
SEED = 20240611
DRIVER_TIMEOUT_S = 240  # 387 cases take ~25 s on 2 busy cores; generous for slow machines, still catches a hang
CLI_KINDS = ("raw-set", "raw-truncate", "pkl-set", "pkl-insert", "pkl-truncate")  # one mutant of each via the CLI


@pytest.fixture(scope="module")
def base_bytes():
    return BASE.read_bytes()


@pytest.fixture(scope="module")
def plan(base_bytes):
    return fuzz_driver.make_plan(base_bytes, SEED)


def run_driver(plan, workdir):
    """The driver's per-case results; fails the test on a crash, a hang or an unfinished run."""
    plan_file = workdir / "plan.json"
    plan_file.write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "tests.fuzz_driver", str(BASE), str(plan_file), str(workdir)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        started = [line for line in out.splitlines() if line.startswith("start ")]
        pytest.fail(f"driver did not finish in {DRIVER_TIMEOUT_S} s; last case started: {started[-1:]}")
    started = [line for line in proc.stdout.splitlines() if line.startswith("start ")]
    # negative: killed by a signal (segfault, abort); 1 with a faulthandler dump: one case hung
    assert proc.returncode == 0, (f"driver exit {proc.returncode}; last case started: {started[-1:]}\n"
                                  f"{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[-1] == {"done": len(plan)}, proc.stdout[-2000:]
    return lines[:-1]


def test_pickle_mutants_are_valid_archives(base_bytes, plan):
    """The premise of the pkl-* arm: mutants pass every zip/CRC check, so they reach the unpickler."""
    for case in [c for c in plan if c["kind"].startswith("pkl-")][:20]:
        mutant = fuzz_driver.mutate(base_bytes, case)
        with zipfile.ZipFile(io.BytesIO(mutant)) as z:
            assert z.testzip() is None, fuzz_driver.case_id(case)  # every CRC matches


def test_mutated_checkpoints_load_or_refuse_cleanly(plan, tmp_path):
    results = run_driver(plan, tmp_path)
    assert len(results) == len(plan)
    others = [f"{r['case']}: {r['error']}" for r in results if r["outcome"] == "other"]
    assert not others, f"{len(others)} of {len(results)} mutants broke the contract:\n" + "\n".join(others[:40])
    by_case = {r["case"]: r["outcome"] for r in results}
    # an unmutated file and an unmutated zipfile-repacked one must load, or the pkl-* arm proves nothing
    assert by_case["baseline@None=None"] == "ok" and by_case["baseline-repack@None=None"] == "ok"
    outcomes = Counter((r["case"].split("@")[0], r["outcome"]) for r in results)
    # data.pkl mutants must get past the archive checks: some load, some are refused by the unpickler
    assert sum(n for (kind, o), n in outcomes.items() if kind.startswith("pkl-") and o == "ok") >= 5, outcomes
    assert sum(n for (kind, o), n in outcomes.items() if kind.startswith("pkl-") and o == "refused") >= 5, outcomes


def test_mutated_checkpoints_via_cli(base_bytes, plan, tmp_path):
    for kind in CLI_KINDS:
        case = next(c for c in plan if c["kind"] == kind)
        weights = tmp_path / f"{kind}.pt"
        weights.write_bytes(fuzz_driver.mutate(base_bytes, case))
        out = tmp_path / f"out-{kind}"
        proc = subprocess.run([sys.executable, "-m", "export", "--weights", str(weights), "--out", str(out),
                               "--no-parity", "--imgsz", "64"], cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        label = fuzz_driver.case_id(case)
        assert proc.returncode in (0, 2), f"{label}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{label}:\n{proc.stderr[-3000:]}"
        if proc.returncode == 2:
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{label}: {proc.stderr!r}"
        else:
            assert (out / "report.json").is_file(), label
