"""TensorRT's own ONNX parser takes every export twin graph, fp32 and fp16, and builds an engine.

TensorRT for RTX parses and builds ahead of time on a CPU-only host (strongly typed: precision comes
from the ONNX types, so fp16 graphs keep their fp32 islands). Running the engine needs a GPU.
"""

import pytest
import torch

import models
from export.graph.to_onnx import export_module
from tests.cases import CASES

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX not installed (pip install '.[rtx]')")


def _build(path, channels):
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    assert parsed, errors
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, channels, 4, 4), (1, channels, 16, 16), (2, channels, 40, 40))
    config.add_optimization_profile(profile)
    return builder.build_serialized_network(network, config)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["fla", "c2f_fla", "mlla", "sta", "sta_grid1x1", "sta_trained_banks", "s2_c30"])
def test_twin_parses_and_builds(name, half, tmp_path):
    case = CASES[name]
    twin = models.to_export(case.build())
    x = torch.randn(1, case.channels, 16, 16)
    if half:
        twin, x = twin.half(), x.half()
    path = tmp_path / "twin.onnx"
    export_module(twin, x, path, dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
    engine = _build(path, case.channels)
    assert engine is not None and engine.nbytes > 0
