"""atomic_write under interruption: an exception, Ctrl-C or SIGKILL in the middle of a write never leaves a half file
under the artifact's name; an exception or Ctrl-C leaves no temp file either, and a killed writer's temp file is
removed by the next write of that artifact."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from export import files
from export.files import atomic_write

REPO = Path(__file__).resolve().parents[1]
OLD, NEW = b"old artifact\n", b"n" * (1 << 20)


def _parts(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


@pytest.fixture
def artifact(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(OLD)
    return path


class _HalfWriter:
    """A file whose write stores half of the data, then raises: a write interrupted part-way."""

    def __init__(self, f, error):
        self.f, self.error = f, error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise self.error


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device")],
                         ids=["ctrl-c", "disk-full"])
def test_interrupted_mid_write_keeps_the_old_file_and_no_temp_file(artifact, monkeypatch, error):
    real_fdopen = os.fdopen
    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: _HalfWriter(real_fdopen(fd, mode), error))
    with pytest.raises(type(error)):
        atomic_write(artifact, NEW)
    assert artifact.read_bytes() == OLD and _parts(artifact.parent) == []


def test_interrupted_before_the_rename_keeps_the_old_file_and_no_temp_file(artifact, monkeypatch):
    def interrupted(src, dst):
        assert Path(src).read_bytes() == NEW  # everything was written, only the rename is missing
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(artifact, NEW)
    assert artifact.read_bytes() == OLD and _parts(artifact.parent) == []


def test_a_new_artifact_interrupted_is_not_created(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "replace", lambda src, dst: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "sub" / "report.json", b"{}")
    assert list((tmp_path / "sub").iterdir()) == []


# A writer in its own process that stops half-way through its write and says so, to be signalled there.
WRITER = textwrap.dedent("""
    import importlib.util, os, signal, sys, time

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a background job inherits it ignored
    spec = importlib.util.spec_from_file_location("files", "export/files.py")  # alone: export/ imports torch
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)

    real_fdopen = os.fdopen

    class Stalled:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def write(self, data):
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            print("half", flush=True)
            time.sleep(60)

    files.os.fdopen = lambda fd, mode: Stalled(real_fdopen(fd, mode))
    files.atomic_write(sys.argv[1], b"n" * (1 << 20))
""")


def _stalled_writer(path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "half\n", proc.stderr.read()
    return proc


def test_ctrl_c_in_another_process_mid_write_leaves_the_old_file_and_no_temp_file(artifact):
    proc = _stalled_writer(artifact)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0 and "KeyboardInterrupt" in proc.stderr.read()
    assert artifact.read_bytes() == OLD and _parts(artifact.parent) == []


def test_a_killed_writer_leaves_the_old_file_and_the_next_write_removes_its_temp_file(artifact):
    proc = _stalled_writer(artifact)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert artifact.read_bytes() == OLD
    orphans = _parts(artifact.parent)
    assert len(orphans) == 1 and orphans[0].startswith(f".model.onnx.{proc.pid}.")  # what no process can clean
    atomic_write(artifact, NEW)
    assert artifact.read_bytes() == NEW and _parts(artifact.parent) == []


def test_a_running_writers_temp_file_is_left_alone(artifact):
    proc = _stalled_writer(artifact)
    try:
        atomic_write(artifact, NEW)  # a second writer while the first is still writing
        assert artifact.read_bytes() == NEW and len(_parts(artifact.parent)) == 1
    finally:
        proc.kill()
        proc.wait(timeout=60)
