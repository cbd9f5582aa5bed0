"""Stage 3, engine: TensorRT (or TensorRT for RTX) engines built from the ONNX files, with our plugins when asked."""
