"""Exit code 3 from real failures, not monkeypatched ones: a --code block torch's exporter cannot export, and a
block whose ONNX ONNX Runtime runs but TensorRT's parser refuses. Each ends in one line naming the stage, no
traceback, and nothing half-written under an artifact's name."""

import json

import pytest

from export.cli import main
from tests import user_blocks

COMPLEX_ROTATION = '''
    import torch
    from torch import nn


    class ComplexRotation(nn.Module):
        """Rotates channel pairs by 90 degrees as complex numbers (a RoPE written with torch's complex type)."""

        def __init__(self, c):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1, c, 1, 1))

        def forward(self, x):
            z = torch.view_as_complex(x.permute(0, 2, 3, 1).reshape(*x.shape[:1], -1, 2).contiguous())
            return torch.view_as_real(z * 1j).reshape(x.shape[0], x.shape[2], x.shape[3], -1).permute(0, 3, 1, 2) * self.scale
'''

DETERMINANT_GATE = '''
    import torch
    from torch import nn


    class DeterminantGate(nn.Module):
        """A gate that also takes a determinant of part of its input (numerically nothing: times zero)."""

        def __init__(self, c):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1, c, 1, 1))

        def forward(self, x):
            return x * self.scale + 0 * torch.det(x[0, 0, :4, :4])
'''


def _fork(tmp_path, stem, source):
    root = user_blocks.write_fork(tmp_path / "fork", extra={stem: source})
    return root, user_blocks.save_checkpoint(root, tmp_path / "best.pt", placement={15: (stem, 64)})


def _artifacts(out):
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_a_block_torch_cannot_export_exits_3_in_one_line(tmp_path, capsys):
    root, ckpt = _fork(tmp_path, "ComplexRotation", COMPLEX_ROTATION)
    out = tmp_path / "out"
    assert main(["--weights", str(ckpt), "--code", str(root), "--no-parity", "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ONNX export") and "Traceback" not in err, err
    assert "complex" in err.lower()
    assert not any(name.endswith((".onnx", ".part")) for name in _artifacts(out))


@pytest.mark.slow
def test_a_graph_the_tensorrt_parser_refuses_exits_3_in_one_line(tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX not installed (pip install '.[rtx]')")
    root, ckpt = _fork(tmp_path, "DeterminantGate", DETERMINANT_GATE)
    out = tmp_path / "out"
    assert main(["--weights", str(ckpt), "--code", str(root), "--no-parity", "--engine", "fp32",
                 "--out", str(out)]) == 3
    console = capsys.readouterr()
    err = console.err
    assert err.count("\n") == 1 and "TensorRT" in err and "Det" in err and "Traceback" not in err, err
    assert "lint best.onnx: 1 error(s), 0 warning(s)" in console.out  # the lint saw it coming
    files = _artifacts(out)
    assert "best.onnx" in files and not any(name.endswith((".engine", ".part")) for name in files)
    assert not (out / "report.json").exists() or json.loads((out / "report.json").read_text())["exit_code"] == 3
