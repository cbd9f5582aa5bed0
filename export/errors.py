"""The two ways a run stops early, and the exit codes the CLI maps them to.

Every stage raises one of these with a one-line message that says what is wrong and what to do; the CLI
prints it and exits with the class's code. A failed verdict (parity, int8 accuracy) is not an error: the
run writes its report and exits with EXIT_VERDICT_FAILED.
"""

EXIT_OK, EXIT_BAD_INPUT, EXIT_STAGE_FAILED, EXIT_VERDICT_FAILED = 0, 2, 3, 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class BadInput(Exception):
    """Something the user fixes: a checkpoint we will not load, a flag, a folder, a dataset. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


class StageFailed(Exception):
    """A stage could not do its job on good input (ONNX export, INT8 quantization, TensorRT build). Exit code 3."""

    exit_code = EXIT_STAGE_FAILED
