"""Load any YOLO best.pt (stock, fork-trained or hostile) safely, without the fork it was trained in.

    loaded = export.load("best.pt")   # -> LoadedCheckpoint(model=..., names=..., remapped=..., ...)

Every refusal is a CheckpointError: one line saying what is wrong and what to do; the CLI maps it to
exit code 2. The input file is only ever read.
"""

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from export.safe_pickle import Unknown, UnpickleLog, pickle_module

EXIT_BAD_INPUT = 2
NOT_WEIGHTS = {".onnx": "an ONNX model", ".engine": "a TensorRT engine", ".plan": "a TensorRT engine",
               ".trt": "a TensorRT engine", ".torchscript": "a TorchScript archive"}
FAMILY_HINT = ("the exporter knows FLA, MLLA, STA and S2; to add a family, write its reference and export twin in "
               "models/<family>.py and list its class names in CHECKPOINT_NAMES")


class CheckpointError(Exception):
    """A checkpoint we will not load; str(e) is the one-line message for the user."""

    exit_code = EXIT_BAD_INPUT


class UnknownBlocksError(CheckpointError):
    def __init__(self, blocks):
        self.blocks = blocks  # "module.Class" -> [layer indices]
        listed = "; ".join(f"{cls} at layer {', '.join(map(str, idx))}" for cls, idx in blocks.items())
        super().__init__(f"unknown custom block(s): {listed} — {FAMILY_HINT}")


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module  # fp32, CPU, eval, BatchNorm fused
    path: Path
    names: dict
    nc: int
    stride: list
    task: str
    imgsz: object  # training imgsz from train_args (int or [h, w]), None if absent
    source: str  # "ema" or "model": which entry the weights came from
    saved_half: bool
    remapped: dict = field(default_factory=dict)  # fork class path -> our class path


def load(path):
    path = Path(path)
    _check_file(path)
    log = UnpickleLog()
    ckpt = _torch_load(path, log)
    model, source = _pick_model(ckpt, path)
    _refuse_unknowns(log, model)
    saved_half = next(model.parameters()).dtype == torch.float16
    model = _prepare(model)
    train_args = (ckpt.get("train_args") or {}) if isinstance(ckpt, dict) else {}
    return LoadedCheckpoint(
        model=model, path=path, names=dict(model.names), nc=len(model.names),
        stride=[int(s) for s in model.stride.tolist()], task=getattr(model, "task", "detect"),
        imgsz=dict(train_args).get("imgsz"), source=source, saved_half=saved_half, remapped=log.remapped)


def _check_file(path):
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; pass the path of a .pt checkpoint (e.g. runs/train/weights/best.pt)")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the .pt checkpoint file inside it (e.g. {path}/best.pt)")
    kind = NOT_WEIGHTS.get(path.suffix.lower())
    if kind:
        raise CheckpointError(f"{path} is {kind}, not PyTorch weights; pass the training checkpoint (best.pt)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); re-copy the checkpoint")
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):
        _check_zip(path)
    elif not head.startswith(b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip nor a pickle); "
                              f"pass the best.pt that training wrote")


def _check_zip(path):
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(f"{path} is a truncated or corrupted zip archive; re-copy the checkpoint") from None
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError(f"{path} is a TorchScript archive (torch.jit.save), not a training checkpoint; "
                              f"pass the best.pt that training wrote")
    if not any(n.endswith("data.pkl") for n in names):
        raise CheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl)")


def _torch_load(path, log):
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module(log))
    except CheckpointError:
        raise
    except Exception as e:  # the file's contents, not our code, decide what fails here
        if log.called:
            raise _refused(log) from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} could not be read as a checkpoint ({type(e).__name__}: {reason}); "
                              f"the file may be truncated or not a PyTorch checkpoint") from None


def _refused(log):
    names = ", ".join(sorted(log.called))
    return CheckpointError(f"refused to load: the checkpoint asks to call {names}, which is not an allowed "
                           f"reconstruction step (nothing from the file was run); only torch, ultralytics and "
                           f"the attention families' objects are reconstructed")


def _pick_model(ckpt, path):
    if isinstance(ckpt, torch.nn.Module):
        return ckpt, "model"
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not an ultralytics checkpoint "
                              f"(a dict with 'model' or 'ema'); pass the best.pt that training wrote")
    for key in ("ema", "model"):  # ultralytics' own preference: EMA weights when present
        if isinstance(ckpt.get(key), torch.nn.Module):
            return ckpt[key], key
    raise CheckpointError(f"{path} is a checkpoint without a model ('model' and 'ema' are both missing or empty); "
                          f"pass the best.pt or last.pt that training wrote")


def _refuse_unknowns(log, model):
    if log.called:
        raise _refused(log)
    if not log.unknown:
        return
    layers = list(model.model) if isinstance(getattr(model, "model", None), torch.nn.Sequential) else [model]
    blocks = {}
    for i, layer in enumerate(layers):
        for m in layer.modules():
            if isinstance(m, Unknown):
                blocks.setdefault(m.origin, []).append(getattr(layer, "i", i))
    blocks = {k: sorted(set(v)) for k, v in blocks.items()}
    stray = sorted(set(log.unknown) - set(blocks))
    if stray:
        raise CheckpointError(f"refused to load: the checkpoint references {', '.join(stray)}, which is not an "
                              f"allowed global (nothing from the file was run)")
    raise UnknownBlocksError(blocks)


def _prepare(model):
    """What ultralytics does to a loaded model before export: fp32, eval, BN fused, old-version attributes."""
    model = model.float().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None  # pickled by torch < 1.11
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    if not hasattr(model, "names"):
        raise CheckpointError("the checkpoint's model has no class names; it is not an ultralytics detection model")
    if hasattr(model, "fuse"):
        model = model.fuse(verbose=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
