"""INT8 QDQ ONNX in TensorRT's explicit-quantization scheme, through ONNX Runtime's `quantize_static`.

Why ONNX Runtime's quantizer and not NVIDIA ModelOpt: ModelOpt's ONNX PTQ calls this same
`quantize_static` (QDQ, symmetric, per-channel), but emits opset >= 19 (TensorRT 8.5 on JetPack 5
parses <= 17) and pins its own onnxruntime-gpu and cupy against our onnxruntime pin. Used directly,
it gives the same scheme at the export's opset:
- QuantFormat.QDQ, int8 weights per channel and int8 activations per tensor, all symmetric (zero
  points 0: TensorRT's parser takes nothing else);
- only the *inputs* of Conv/Gemm/MatMul/Add are quantized (OpTypesToExcludeOutputQuantization), as
  TensorRT wants: a conv's output meets Q/DQ only where the next quantized layer reads it, so
  TensorRT fuses conv + SiLU + quantize;
- biases stay float (QuantizeBias False): TensorRT rejects an int32 DequantizeLinear;
- calibration on ONNX Runtime's CPU provider; ranges computed once and cached in the run's temp dir,
  so the sensitivity search re-quantizes without re-calibrating.
"""

import contextlib
import logging
import time
from pathlib import Path

from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from calib.rules import QUANT_OPS
from calib.source import ImageReader

METHODS = {"max": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


class Quantizer:
    """Calibrate `fp32_path` once on `files`; `quantize(float_nodes)` then writes QDQ models under workdir."""

    def __init__(self, fp32_path, files, imgsz, batch, method, workdir):
        self.fp32_path, self.files, self.imgsz, self.batch = Path(fp32_path), list(files), imgsz, batch
        self.method, self.workdir = method, Path(workdir)
        self.ranges = self.workdir / "calibration_ranges.json"
        self.calibration_s = None
        self._count = 0

    def quantize(self, float_nodes=()):
        """Path of a new QDQ model (under workdir) with `float_nodes` left float."""
        self._count += 1
        out = self.workdir / f"int8_{self._count}.onnx"
        calibrating = not self.ranges.exists()
        start = time.perf_counter()
        with _quiet_ort():
            quantize_static(
                str(self.fp32_path), str(out),
                calibration_data_reader=ImageReader(self.files, self.imgsz, self.batch) if calibrating else None,
                calibration_cache_path=str(self.ranges), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANT_OPS), per_channel=True, reduce_range=False,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=sorted(float_nodes),
                calibrate_method=METHODS[self.method],
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                               "OpTypesToExcludeOutputQuantization": list(QUANT_OPS)})
        if calibrating:
            self.calibration_s = round(time.perf_counter() - start, 2)
        return out


def qdq_summary(proto):
    """Counts of what the QDQ model holds: quantized compute nodes and Q/DQ pairs."""
    produced_by_dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = [n for n in proto.graph.node if n.op_type in QUANT_OPS and any(i in produced_by_dq for i in n.input)]
    return {"quantized_nodes": len(quantized),
            "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in proto.graph.node),
            "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in proto.graph.node)}


@contextlib.contextmanager
def _quiet_ort():
    """quantize_static logs advice ("consider pre-processing") at WARNING on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
