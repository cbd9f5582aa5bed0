"""Artifacts are written atomically: a temp file in the same folder, then a rename. Never half-written.

An exception or Ctrl-C during the write removes the temp file. A process killed outright (SIGKILL, power loss)
cannot clean up: its temp file carries its pid, and the next write of the same artifact removes the temp files
of writers that no longer run."""

import os
import re
import tempfile
from pathlib import Path


def atomic_write(path, data):
    """Write bytes `data` to `path` (creating its folder) so that readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphaned_parts(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _remove_orphaned_parts(path):
    """Temp files of `path` left by writers that were killed (their pid no longer runs)."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)\.[^.]+\.part")
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _running(int(match.group(1))):
            entry.unlink(missing_ok=True)


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
