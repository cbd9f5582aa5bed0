"""Stage 4, verify: does the deployed model compute what PyTorch computes, how accurate is it, how fast?

- runners: PyTorch, ONNX Runtime and TensorRT behind one call (images in, raw output0 out);
- parity: raw-output and box metrics against the reference, and the verdict per precision;
- localize: the first attention block whose ONNX output diverges, when a verdict fails;
- accuracy: labelled mAP on a dataset's val split (ultralytics' validator);
- timing: interleaved rounds and paired ratios; profile: where the time goes per block, against FLOPs.
A new backend is a runner; a new parity metric goes in parity.py.
"""
