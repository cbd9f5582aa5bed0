"""`python -m export`: the exporter's command line.

The export pipeline (ONNX, lint, TensorRT engine, parity report) is not in this version yet; what is
here is the model side it stands on: `models` (reference and export twins, YAMLs, demo checkpoints).
"""

import sys


def main():
    print("python -m export: ONNX/TensorRT export is not available in this version yet; the attention "
          "families, YAML configs and demo checkpoints are (see README).", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
