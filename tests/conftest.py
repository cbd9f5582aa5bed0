"""Shared test setup. The README's test command runs the suite on every core with pytest-xdist (`-n auto`, one
test file per worker): each worker then gets its share of the cores for torch's threads, since N workers each
using every core oversubscribe a small machine."""

import os

import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
