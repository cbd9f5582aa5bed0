"""Build a TensorRT engine from an exported ONNX file.

    info = build_engine(onnx_path, engine_path, precision="fp16", imgsz=(640, 640))

Backend: the `tensorrt` Python API when it imports and a CUDA GPU is present; otherwise TensorRT for
RTX (`tensorrt_rtx`), which parses and builds ahead of time on a CPU-only host. Precision:
- strongly typed networks (TensorRT >= 10.12, TensorRT 11, TensorRT-RTX): precision comes from the ONNX
  types, so the fp16 ONNX with its explicit fp32 islands is built as is;
- TensorRT < 10.12 (Jetson): the same fp16 ONNX with the FP16 builder flag, and every layer the ONNX
  types as fp32 pinned to fp32 (OBEY_PRECISION_CONSTRAINTS), so the islands survive.
INT8 builds the QDQ ONNX (calib/): strongly typed TensorRT takes the Q/DQ as is (int8 where the file
quantizes, the file's float types elsewhere); TensorRT < 10.12 needs the INT8 and FP16 flags for an
explicitly quantized network, and the fp16 export's fp32 islands (`fp32_layers`, by node name) are
pinned to fp32. TensorRT for RTX parses and builds QDQ files, but its support matrix has int8 only as
weight-only GEMM quantization, not int8 activations: the report says so (RTX_INT8_NOTE).
The timing cache (full TensorRT) is a file reused across builds; the engine's metadata is a JSON file beside it
(not prepended to the engine, so trtexec loads the engine as is).
"""

import json
import sys
import time
from pathlib import Path

import onnx

import plugins
from export.files import atomic_write

STRONGLY_TYPED_SINCE = (10, 12)
PRECISIONS = ("fp32", "fp16", "int8")
RTX_INT8_NOTE = ("TensorRT for RTX built this engine from the QDQ ONNX (its parser accepts the file), but NVIDIA's "
                 "TensorRT-RTX support matrix lists int8 only as weight-only GEMM quantization, not int8 activations: "
                 "this is not an int8-activation engine; for int8 on Jetson / datacenter GPUs build with TensorRT "
                 "(`tensorrt`) from the same file")
DEFAULT_CACHE = Path.home() / ".cache" / "yolo-attn-export" / "timing.cache"


class BuildUnavailable(Exception):
    """Neither TensorRT nor TensorRT for RTX can build here."""


class BuildFailed(Exception):
    pass


def backend():
    """(trt module, flavour): 'tensorrt' with a GPU, else 'tensorrt_rtx'; BuildUnavailable when neither imports."""
    import torch

    if torch.cuda.is_available():
        try:
            import tensorrt

            return tensorrt, "tensorrt"
        except ImportError:
            pass
    try:
        import tensorrt_rtx

        return tensorrt_rtx, "tensorrt_rtx"
    except ImportError:
        raise BuildUnavailable("building an engine needs TensorRT: install `tensorrt` on a machine with an NVIDIA GPU "
                               "(or on Jetson, JetPack's), or `pip install tensorrt-rtx` to build ahead of time on "
                               "any host") from None


def _version(trt):
    return tuple(int(p) for p in trt.__version__.split(".")[:2])


def build_engine(onnx_path, engine_path, precision, imgsz, batch=1, dynamic=False, workspace_gib=4.0, cache_path=None,
                 metadata=None, plugins=False, fp32_layers=(), verbose=False):
    """Build and write `engine_path` (+ .json) from the ONNX of `precision` ('fp32', 'fp16' or 'int8')."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    trt, flavour = backend()
    plugin_note = _register_plugins(flavour) if plugins else None
    strongly_typed = flavour == "tensorrt_rtx" or _version(trt) >= STRONGLY_TYPED_SINCE
    logger = _logger(trt, verbose)
    if flavour == "tensorrt":  # TensorRT's own plugins (EfficientNMS_TRT of --nms trt files) in the registry
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, flavour, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    registered = plugins and flavour == "tensorrt" and plugin_note is None
    if not _parse(parser, onnx_path, inline=not registered):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildFailed(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2 ** 30))
    if precision == "fp16" and not strongly_typed:
        _weakly_typed_fp16(trt, network, config)
    if precision == "int8" and not strongly_typed:
        _weakly_typed_int8(trt, network, config, set(fp32_layers))
    profile = _profile(trt, builder, network, imgsz, batch, dynamic)
    if profile is not None:
        config.add_optimization_profile(profile)
    # TensorRT-RTX has no timing cache (its cache calls are no-ops, and reading a file makes it log CUDA errors).
    cache_path = Path(cache_path or DEFAULT_CACHE) if flavour == "tensorrt" else None
    cache = _load_timing_cache(config, cache_path) if cache_path else None
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildFailed(f"TensorRT could not build an engine from {onnx_path.name}: "
                          + (logger.errors[-1] if logger.errors else "no error logged (rerun with -v)"))
    seconds = time.perf_counter() - start
    if cache_path:
        _save_timing_cache(config, cache, cache_path)
    info = {"backend": flavour, "tensorrt_version": trt.__version__, "strongly_typed": strongly_typed,
            "precision": precision, "build_s": round(seconds, 2), "bytes": serialized.nbytes,
            "timing_cache": str(cache_path) if cache_path else "none (TensorRT-RTX has no timing cache)",
            "dynamic": dynamic,
            "profile": _profile_shapes(imgsz, batch) if dynamic else None,
            "plugins": plugin_note or ("registered: TensorRT runs yolo_attn plugins" if plugins else None)}
    if precision == "int8":
        info["int8"] = RTX_INT8_NOTE if flavour == "tensorrt_rtx" else (
            "explicit quantization: Q/DQ from the ONNX" + ("" if strongly_typed else
                                                           ", INT8 + FP16 flags, fp32 islands pinned"))
    atomic_write(Path(engine_path), bytes(serialized))
    atomic_write(Path(f"{engine_path}.json"), json.dumps({**(metadata or {}), "engine": info}, indent=2).encode())
    return info


def _logger(trt, verbose):
    """TensorRT's log, kept to what a user needs: warnings one line each on stderr, errors collected for the one-line
    failure (the parser's errors come from the parser itself); everything as TensorRT prints it with -v."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            text = " ".join(str(msg).split())
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(text)
            if verbose or severity == trt.ILogger.Severity.WARNING:
                print(f"TensorRT {severity.name.lower()}: {text}", file=sys.stderr)

    return Logger()


def _parse(parser, onnx_path, inline):
    """Parse the file as is when our plugins are registered (they replace the yolo_attn nodes); otherwise with
    the yolo_attn functions inlined per call site, so every layer has a unique, traceable name."""
    if not inline:
        return parser.parse_from_file(str(onnx_path))
    proto = onnx.load(str(onnx_path))
    if not proto.functions:
        return parser.parse_from_file(str(onnx_path))
    return parser.parse(plugins.inline_for_parser(proto).SerializeToString(), str(onnx_path))


def _register_plugins(flavour):
    """Register our plugins before parsing (full TensorRT only); else say that the local functions are inlined."""
    if flavour != "tensorrt":
        return "TensorRT for RTX: its parser inlines the yolo_attn ops' local functions (no plugins registered)"
    return plugins.register_tensorrt()


def _network_flags(trt, flavour, strongly_typed):
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and _version(trt) < (10, 0):  # TRT 8.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return flags


def _weakly_typed_fp16(trt, network, config):
    """TensorRT < 10.12: FP16 flag, with the layers the ONNX types as fp32 (the islands) pinned to fp32."""
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if outputs and all(o.dtype == trt.float32 for o in outputs) and layer.type != trt.LayerType.CONSTANT:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def _weakly_typed_int8(trt, network, config, fp32_layers):
    """TensorRT < 10.12: an explicitly quantized network needs the INT8 flag, and FP16 so that what the Q/DQ leave
    float runs in fp16; the fp16 export's fp32 islands (node names = layer names) stay fp32."""
    config.set_flag(trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in fp32_layers and layer.type != trt.LayerType.CONSTANT:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def _profile_shapes(imgsz, batch):
    """--dynamic profile: min 1x3x64x64, opt batch x 3 x H x W, max max(batch, 8) x 3 x H x W."""
    h, w = imgsz
    return {"min": [1, 3, 64, 64], "opt": [batch, 3, h, w], "max": [max(batch, 8), 3, h, w]}


def _profile(trt, builder, network, imgsz, batch, dynamic):
    if not dynamic:
        return None
    shapes = _profile_shapes(imgsz, batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, shapes["min"], shapes["opt"], shapes["max"])
    return profile


def _load_timing_cache(config, path):
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=True)
    return cache


def _save_timing_cache(config, cache, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, bytes(config.get_timing_cache().serialize()))
