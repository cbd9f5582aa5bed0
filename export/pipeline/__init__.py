"""The jobs: each runs the stages in order and assembles its report from the stages' typed results.

- export_job: `python -m export` (checkpoint -> graph -> engine -> verify -> report);
- parity_job: `python -m export parity` (an existing ONNX / engine against its checkpoint);
- bench_job: `python -m export bench` (several models timed side by side).
"""
