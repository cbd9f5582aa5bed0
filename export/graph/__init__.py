"""Stage 2, graph: the loaded model becomes checked ONNX files.

- rewrite: every family block swapped for its export twin (same weights), each checked on its real input;
- generic: exact rewrites of torch calls inside `--code` blocks, which have no twin (adaptive pooling, einsum);
- onnx_passes: exact passes over the exported ONNX graph (literal slice writes and reshapes, node scopes);
- to_onnx: tracing, onnxslim, metadata, atomic save;
- lint: what TensorRT's parser rejects or runs badly, found before a build.
A new twin goes in its family file (models/); a new generic rewrite in generic.py or onnx_passes.py; a new lint
rule in lint.py.
"""
