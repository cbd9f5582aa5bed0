"""Mutation run over the code that enforces the documented limits: the parity verdict, the int8 acceptance rule, the
loader's bounds and the exit codes (docs/testing.md).

    pip install -c constraints.txt ".[mutation]"       # cosmic-ray
    python tools/mutation.py                             # every target (about 80 min on 2 cores)
    python tools/mutation.py parity int8                 # some targets
    python tools/mutation.py --again                     # the survivors of the last run, against the tests as now

Each target names a module, the definitions in it to mutate (a function, a method as Class.method, a constant; with
`:regex`, only that definition's lines matching the regex) and the fast tests that must kill the mutants. The
repository's files (tracked and untracked, not ignored) are copied to a work folder and mutated there, never in
place: cosmic-ray rewrites the module under test for each mutant. Bytecode caching is off, so no stale .pyc can
stand in for a mutated module. Prints killed / survived / total per target and every survivor's diff; the sessions
stay in the work folder (`cr-report WORK/<target>.sqlite`).

Speed: importing torch and ultralytics takes most of a test run (about 5 of 7 s). So the test command cosmic-ray
runs for each mutant is a small client of a test server that has imported the third-party packages the project uses
(never the project's own modules) and forks a fresh child per run, which imports the mutated project and runs pytest.
"""

import argparse
import ast
import importlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_TESTS = "tests/test_limits.py"
LOADER_TESTS = ("tests/test_load_limits.py tests/test_schema.py::test_names_bounds "
                "tests/test_schema.py::test_training_image_size_rounds_up_to_the_stride "
                "tests/test_schema.py::test_training_image_size_past_the_bound_is_refused")


@dataclass(frozen=True)
class Target:
    name: str
    module: str
    definitions: tuple  # "name", "Class.method", "name:regex" (only the lines of `name` matching regex)
    tests: str


TARGETS = (
    Target("parity", "export/verify/parity.py",
           ("Thresholds", "THRESHOLDS", "FP16_OWN_FACTOR", "thresholds_for", "passes", "AnchorTolerance",
            "ANCHOR_TOLERANCE", "anchor_agrees", "_xywh_iou", "judge", "box_verdict", "compare:limits"), LIMIT_TESTS),
    Target("int8", "calib/int8.py", ("Int8Job", "make_int8", "_drop", "_fallback", "_stamp"), LIMIT_TESTS),
    Target("errors", "export/errors.py", ("EXIT_OK", "EXIT_INTERRUPTED", "BadInput", "StageFailed"), LIMIT_TESTS),
    Target("cli", "export/cli.py", ("main", "_main", "_guarded", "check", "check_nms", "check_bench"), LIMIT_TESTS),
    Target("finish", "export/pipeline/export_job.py", ("finish", "_int8_failure"), LIMIT_TESTS),
    Target("parity_job", "export/pipeline/parity_job.py", ("run",), LIMIT_TESTS),
    Target("safe_pickle", "export/checkpoint/safe_pickle.py",
           ("MAX_GLOBAL_NAME", "MAX_UNKNOWN_GLOBALS", "MAX_TENSOR_DIMS", "MAX_INT", "MAX_KEY_NODES", "MAX_KEY_INT",
            "MAX_STATE_KEYS", "MAX_INSTANCES", "WORK_PER_PICKLE_BYTE", "WORK_FLOOR", "_is_int", "_is_shape",
            "ExpansionBudget", "plain_key", "_check_state_keys:MAX_STATE_KEYS", "make_size", "UnpickleLog.placeholder",
            "GatedUnpickler.__init__", "GatedUnpickler._charge", "GatedUnpickler.find_class:MAX_GLOBAL_NAME",
            "GatedUnpickler._new:_instances"), LOADER_TESTS),
    Target("object_graph", "export/checkpoint/object_graph.py",
           ("MAX_DEPTH", "MAX_OBJECTS", "MAX_MODULE_PATHS", "MEMBER_NAME", "_Walk.run", "_check_module_paths"),
           LOADER_TESTS),
    Target("schema", "export/checkpoint/schema.py",
           ("MAX_CHANNELS", "MAX_REPEATS", "MAX_IMGSZ", "MAX_NAMES", "MAX_LAYERS", "MAX_TENSOR_BYTES", "MAX_PAD",
            "MAX_UNFOLD_KERNEL", "integer", "integers", "CHANNELS", "KERNEL", "PADS", "UNFOLD",
            "FIELDS:MAX_REPEATS", "check_names", "image_size", "_layer_graph:MAX_LAYERS", "_tensor_bytes"),
           LOADER_TESTS),
    Target("torch_zip", "export/checkpoint/torch_zip.py",
           ("MAX_ENTRIES", "MAX_CENTRAL_DIRECTORY", "MAX_PICKLE_BYTES", "_check_central_directory:MAX_",
            "_check_records:MAX_ENTRIES", "_top_folder:MAX_PICKLE_BYTES"), LOADER_TESTS),
)
TIMEOUT_S = 40  # one test run: about 3x the slowest unmutated (a mutant that loops for ever is killed by it)
PROJECT = ("export", "calib", "models", "plugins", "tests", "tools")  # never preloaded: mutants live here
SOCKET = "pytest.sock"


def line_ranges(source, definitions):
    """'start-end' line specs (cosmic-ray's line filter) of the named definitions in `source`."""
    tree, lines, specs = ast.parse(source), source.splitlines(), []
    for definition in definitions:
        name, _, pattern = definition.partition(":")
        node = _find(tree, name)
        if pattern:
            specs += [str(n) for n in range(node.lineno, node.end_lineno + 1) if re.search(pattern, lines[n - 1])]
        else:
            specs.append(f"{node.lineno}-{node.end_lineno}")
    return specs


def _find(tree, dotted):
    """The module-level definition (or Class.method) named `dotted`: a def, a class or an assignment."""
    scope = tree.body
    for part in dotted.split("."):
        node = next((n for n in scope if part in _names(n)), None)
        if node is None:
            raise SystemExit(f"no definition {dotted!r}")
        scope = getattr(node, "body", [])
    return node


def _names(node):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


def copy_repository(work):
    """The repository's files as they are now (tracked and untracked, not ignored), without any bytecode."""
    if work.exists():
        shutil.rmtree(work)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and "__pycache__" not in source.parts:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, work / name)


def write_config(work, target):
    """The target's cosmic-ray configuration (TOML; its strings and lists written as JSON, which TOML reads)."""
    specs = line_ranges((work / target.module).read_text(), target.definitions)
    test_command = f"{sys.executable} tools/mutation.py --client {work / SOCKET} -x -q -p no:cacheprovider " \
                   f"{target.tests}"
    config = work / f"{target.name}.toml"
    config.write_text(f"""[cosmic-ray]
module-path = {json.dumps(target.module)}
timeout = {TIMEOUT_S}
excluded-modules = []
test-command = {json.dumps(test_command)}

[cosmic-ray.distributor]
name = "local"

[cosmic-ray.filters.line-filter.lines]
{json.dumps(target.module)} = {json.dumps(specs)}
""")
    return config


# ---- the test server: third-party imports once, a forked child per test run -----------------------------------
def third_party_modules(work, env):
    """Modules importing the project's test files loads, less the project's own (probed in a separate process)."""
    probe = ("import sys, importlib; sys.path.insert(0, '.'); "
             "[importlib.import_module(f'tests.{m}') for m in ('test_limits', 'test_load_limits', 'test_schema')];"
             "print('\\n'.join(sys.modules))")
    names = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, check=True, capture_output=True,
                           text=True).stdout.split()
    return [n for n in names if n.split(".")[0] not in PROJECT and n != "__main__"]


def serve(work, modules):
    """Answer each client's pytest arguments with the exit code of a forked child that ran them in `work`."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # a module that only imports as part of another: its parent brings it
            pass
    os.chdir(work)
    sys.path.insert(0, str(work))
    server = socket.socket(socket.AF_UNIX)
    server.bind(SOCKET)
    server.listen()
    while True:
        connection, _ = server.accept()
        with connection:
            args = json.loads(connection.makefile().readline())
            connection.sendall(f"{_forked_pytest(args)}\n".encode())


def _forked_pytest(args):
    pid = os.fork()
    if pid == 0:  # the child: a copy of the server, with none of the project imported yet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        import pytest
        os._exit(int(pytest.main(args)))
    deadline = time.monotonic() + TIMEOUT_S - 5
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return 124


def client(socket_path, args):
    """The test command cosmic-ray runs: pytest's exit code, from the server."""
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(socket_path)
        connection.sendall((json.dumps(args) + "\n").encode())
        return int(connection.makefile().readline())


def start_server(work, env):
    """The test server in its own process, ready when its socket exists."""
    modules = third_party_modules(work, env)
    (work / SOCKET).unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(work)], stdin=subprocess.PIPE, env=env,
                              cwd=work)
    server.stdin.write("\n".join(modules).encode())
    server.stdin.close()
    while not (work / SOCKET).exists():
        if server.poll() is not None:
            raise SystemExit("the test server stopped")
        time.sleep(0.2)
    return server


# ---- the run ---------------------------------------------------------------------------------------------------
def run_target(work, target, env, server, again=False):
    """A target's session: every mutant, or (again, when it has one) its survivors and unfinished mutants."""
    config, session = work / f"{target.name}.toml", work / f"{target.name}.sqlite"
    if again and session.exists():
        with sqlite3.connect(session) as db:  # results deleted: `exec` runs those mutants again
            db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")
        setup = []
    else:
        write_config(work, target)
        setup = [["cosmic-ray", "init", config, session, "--force"], ["cr-filter-lines", "--config", config, session]]
    tool = Path(sys.executable).parent
    for command in (*setup, ["cosmic-ray", "baseline", config], ["cosmic-ray", "exec", config, session]):
        subprocess.run([str(tool / command[0]), *map(str, command[1:])], cwd=work, env=env, check=True)
        if server.poll() is not None:  # every later test run would have failed: mutants counted killed falsely
            raise SystemExit("the test server stopped: this target's results are void")
    return summarize(session)


def summarize(session):
    """(killed, survived, incompetent, [survivor diffs]) of a finished session; mutants outside the definitions
    (filtered) and positions the operator could not mutate are not counted."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    killed, survived, incompetent, diffs = 0, 0, 0, []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome in (WorkerOutcome.SKIPPED, WorkerOutcome.NO_TEST):
                continue
            if result.test_outcome == TestOutcome.KILLED:
                killed += 1
            elif result.test_outcome == TestOutcome.SURVIVED:
                survived += 1
                diffs.append(f"{item.mutations[0].operator_name}\n{result.diff}")
            else:
                incompetent += 1
    return killed, survived, incompetent, diffs


def report(rows):
    """Every survivor's diff, then killed / survived / incompetent per target (a markdown table)."""
    for target, (_, _, _, diffs) in rows:
        for diff in diffs:
            print(f"--- survived in {target.module}: {diff}")
    print("\n| target | module | killed | survived | incompetent | total | score |\n|---|---|---|---|---|---|---|")
    for target, (killed, survived, incompetent, _) in rows:
        print(f"| {target.name} | {target.module} | {killed} | {survived} | {incompetent} | "
              f"{killed + survived + incompetent} | {killed / max(1, killed + survived):.1%} |")


def run(work, chosen, again=False):
    """Copy the repository to `work` (again: only the test files and the targets' modules, as an interrupted run may
    have left one mutated; the sessions are kept), start the test server, run each target's session there."""
    if again:
        tests = {t.partition("::")[0] for target in chosen for t in target.tests.split()}
        for name in tests | {target.module for target in chosen}:
            shutil.copy2(REPO / name, work / name)
    else:
        copy_repository(work)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    server = start_server(work, env)
    try:
        return [(target, run_target(work, target, env, server, again)) for target in chosen]
    finally:
        server.kill()


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--client"]:
        sys.exit(client(sys.argv[2], sys.argv[3:]))
    if argv is None and sys.argv[1:2] == ["--serve"]:
        sys.exit(serve(Path(sys.argv[2]), sys.stdin.read().split()))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help=f"targets to run (default: all): {', '.join(t.name for t in TARGETS)}")
    p.add_argument("--work", type=Path, default=Path("/tmp/yolo-attn-mutation"), help="work folder (replaced)")
    p.add_argument("--summary-only", action="store_true", help="summarize the sessions already in --work")
    p.add_argument("--again", action="store_true",
                   help="run the survivors of the sessions in --work again, against the test files as they are now")
    args = p.parse_args(argv)
    unknown = set(args.targets) - {t.name for t in TARGETS}
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    chosen = [t for t in TARGETS if not args.targets or t.name in args.targets]
    missing = [t.name for t in chosen if not (args.work / f"{t.name}.sqlite").exists()]
    if (args.summary_only or args.again) and missing:
        p.error(f"no session in {args.work} for {', '.join(missing)}: run them first, or name the work folder (--work)")
    if args.summary_only:
        report([(t, summarize(args.work / f"{t.name}.sqlite")) for t in chosen])
    else:
        report(run(args.work, chosen, args.again))


if __name__ == "__main__":
    main()
