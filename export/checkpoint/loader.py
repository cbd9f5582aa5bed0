"""Load any YOLO best.pt (stock, fork-trained or hostile) safely, without the fork it was trained in.

    loaded = load("best.pt")   # -> LoadedCheckpoint(model=..., names=..., remapped=..., ...)

The file is read by our own zip reader (torch_zip) and gated unpickler (safe_pickle),
never by torch.load; what they build is validated as a whole (object_graph) before any method
is called on it. Every refusal is a CheckpointError: one line saying what is wrong and what to do;
the CLI maps it to exit code 2. The input file is only ever read.
"""

import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from export.checkpoint import object_graph, schema, user_code
import models
from export.checkpoint.safe_pickle import FAMILY_CLASSES, LIBRARY_ROOTS, Refused, UnpickleLog, unpickle
from export.checkpoint.torch_zip import NotTorchZip, open_torch_zip
from export.errors import BadInput
from export.text import shown

NOT_WEIGHTS = {".onnx": "an ONNX model", ".engine": "a TensorRT engine", ".plan": "a TensorRT engine",
               ".trt": "a TensorRT engine", ".torchscript": "a TorchScript archive"}
FAMILY_HINT = ("the exporter knows FLA, MLLA, STA and S2; to add a family, write its reference and export twin in "
               "models/<family>.py and list its class names in CHECKPOINT_NAMES")
RESAVE = ("re-save it with torch >= 1.6 in an environment you trust: "
          "`torch.save(torch.load(f, weights_only=False), f2)`")
# What a damaged or hostile pickle makes the unpickler raise; all mean "not a readable checkpoint".
UNREADABLE = (pickle.UnpicklingError, EOFError, struct.error, UnicodeDecodeError, ValueError, KeyError, IndexError,
              TypeError, AttributeError, OverflowError, RecursionError, MemoryError, zipfile.BadZipFile, OSError,
              RuntimeError, AssertionError, NotImplementedError, ZeroDivisionError, ImportError)


class CheckpointError(BadInput):
    """A checkpoint we will not load; str(e) is the one-line message for the user."""


CODE_HINT = ("to export them as written, pass --code <your fork's root folder>: it imports those classes from your "
             "fork's files (this runs your code; see the trust model in docs/checkpoints.md)")
LIBRARY_HINT = ("the loader does not reconstruct (its table of stock layers is in docs/checkpoints.md); library "
                "classes cannot come from --code")


def _listed(blocks):
    return "; ".join(f"{shown(cls)} at layer {', '.join(map(str, idx))}" for cls, idx in blocks.items())


class UnknownBlocksError(CheckpointError):
    def __init__(self, blocks):
        self.blocks = blocks  # "module.Class" -> [layer indices]
        super().__init__(f"unknown custom block(s): {_listed(blocks)} — {CODE_HINT}; or {FAMILY_HINT}")


class LibraryClassesError(CheckpointError):
    """Classes of a library (torch, torchvision, numpy, the standard library) outside the loader's table, inside the
    model. Never reported as custom blocks: --code refuses library modules, so that advice could not work."""

    def __init__(self, classes, blocks):
        self.classes, self.blocks = classes, blocks  # "module.Class" -> [layer indices]: library; custom blocks
        what = "is a library class" if len(classes) == 1 else "are library classes"
        also = f"; the model also holds unknown custom block(s): {_listed(blocks)}, which --code could supply" \
            if blocks else ""
        super().__init__(f"{_listed(classes)} {what} {LIBRARY_HINT}{also}")


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
    user_code: dict = field(default_factory=dict)  # --code: pickled class path -> the fork file it was imported from
    code_rewrites: dict = field(default_factory=dict)  # --code: fork file -> [(line, statement)] rewritten at import
    not_family: dict = field(default_factory=dict)  # --code: class path named like a family, built differently -> why
    kind: str = "ultralytics"  # or "yolov5": a YOLOv5-repository checkpoint (kinds.py)


def load(path, code=()):
    """`code`: the --code folders, the user's opt-in to import unknown blocks' classes from their fork source."""
    path = Path(path)
    kind = _check_file(path)
    if kind != "zip":
        raise CheckpointError(f"{path} is in torch's {kind} format, which we do not read; {RESAVE}")
    try:
        ckpt, log = read(path)
        model, source = _pick_model(ckpt, path)
        imported, mismatched = user_code.ImportedCode(), family_mismatches(log, model)
        not_family = {qual: e["differences"] for qual, e in mismatched.items()}
        if (log.unknown or mismatched) and code:
            imported = _import_user_code(log, model, code, mismatched)
            ckpt, log = read(path, imported.classes)
            model, source = _pick_model(ckpt, path)
            mismatched = family_mismatches(log, model)
        _refuse_unknowns(log, model)
        if mismatched:
            raise FamilyMismatchError(mismatched)
        schema.check_model(model)  # every value later code trusts, before any method of the model runs
        names, stride = _names(model), _stride(model)
        schema.check_names(names)
        imgsz = schema.image_size(_train_imgsz(ckpt), max(stride))
        saved_half = next(model.parameters()).dtype == torch.float16
        model = _prepare(model)
    except CheckpointError:
        raise
    except Refused as e:
        raise _refused(path, e) from None
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # the file's contents decide what fails here
        raise CheckpointError(f"{path} could not be read as a checkpoint ({_one_line(e)}); the file may be "
                              f"truncated or damaged, or not a YOLO checkpoint") from None
    return LoadedCheckpoint(model=model, path=path, names=names, nc=len(names), stride=stride,
                            task=_task(model), imgsz=imgsz, source=source, saved_half=saved_half,
                            remapped=log.remapped, kind=log.kind, user_code=imported.sources(),
                            code_rewrites=imported.rewritten, not_family=not_family)


def _one_line(e):
    text = shown(str(e).splitlines()[0]) if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _refused(path, e):
    return CheckpointError(f"refused to load {path}: {shown(e, 600)}; nothing from the file was run — only torch, "
                           f"ultralytics and the attention families' own objects are reconstructed")


def _check_file(path):
    """'zip', 'legacy pickle' or 'tar' — or a CheckpointError for anything that is not a checkpoint file."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; pass the path of a .pt checkpoint (e.g. runs/train/weights/best.pt)")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the .pt checkpoint file inside it (e.g. {path}/best.pt)")
    if not path.is_file():  # a FIFO or device would block or never end
        raise CheckpointError(f"{path} is not a regular file (a pipe or device?); pass the checkpoint file itself")
    kind = NOT_WEIGHTS.get(path.suffix.lower())
    if kind:
        raise CheckpointError(f"{path} is {kind}, not PyTorch weights; pass the training checkpoint (best.pt)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes); re-copy the checkpoint")
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(b"PK"):
        return "zip"
    if head[257:262] == b"ustar":
        return "tar (torch < 0.4)"
    if head.startswith(b"\x80"):
        return "legacy pickle (torch < 1.6)"
    raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip nor a pickle); "
                          f"pass the best.pt that training wrote")


def _import_user_code(log, model, code, mismatched):
    """The unknown blocks' classes, imported from --code for a second read. Only placeholders inside the model
    (blocks) are resolved, after the first read validated the whole file; any other unknown global, and any
    library class, is refused first (nothing of the user's runs for a file that would be refused anyway). Blocks
    named like a family but built differently (`mismatched`) come from the fork too, with every other class the
    checkpoint names from their fork modules (a block and its helpers from one file stay together)."""
    blocks = set(_custom_blocks(log, model))
    modules = {qual.rpartition(".")[0] for qual in mismatched}
    blocks |= set(mismatched) | {q for q in log.remapped if q.rpartition(".")[0] in modules}
    try:
        return user_code.resolve(blocks, code)
    except user_code.CodeError as e:
        raise CheckpointError(f"--code: {e}") from None


def read(path, user_classes=None):
    """(checkpoint, UnpickleLog): the file as the gated unpickler rebuilds it, validated as a whole, before
    anything is cast, fused or run. Raises CheckpointError (bad archive) or Refused. `user_classes`: classes
    --code imported for this run ({pickled "module.Name": class}), reconstructed like table classes."""
    log = UnpickleLog(user_classes=dict(user_classes or {}))
    try:
        archive = open_torch_zip(path, path.stat().st_size)
    except NotTorchZip as e:
        raise CheckpointError(f"{path} is {e}; pass the best.pt that training wrote") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error):
        raise CheckpointError(f"{path} is a truncated or corrupted zip archive; re-copy the checkpoint") from None
    with archive.archive:
        ckpt = unpickle(archive.pickle_bytes(), log, archive.storage)
    object_graph.validate(ckpt, log.user_classes.values())
    return ckpt, log


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
    """Placeholders inside the model are unknown blocks (listed by layer), or library classes outside the table
    (refused as such); any other unknown global is refused. Runs before any method of the model is called:
    placeholders' contents are not validated."""
    if log.unknown:
        raise UnknownBlocksError(_custom_blocks(log, model))


def family_mismatches(log, model):
    """{pickled class path: {"family_class", "layers", "differences"}} for the modules rebuilt as a family class by
    name whose structure is not the one that class's export twin is written for (models.structure_differences)."""
    found = {}
    for layer, m in object_graph.modules_by_layer(model):
        differences = models.structure_differences(m) if type(m) in FAMILY_TYPES else []
        if differences:
            ours = f"{type(m).__module__}.{type(m).__qualname__}"
            for qual in [q for q, o in log.remapped.items() if o == ours] or [ours]:
                entry = found.setdefault(qual, {"family_class": ours, "layers": set(), "differences": differences})
                entry["layers"].add(layer)
    return {q: {**e, "layers": sorted(e["layers"])} for q, e in found.items()}


FAMILY_TYPES = frozenset(FAMILY_CLASSES.values())


class FamilyMismatchError(CheckpointError):
    def __init__(self, mismatched):
        self.mismatched = mismatched
        listed = "; ".join(f"{shown(qual)} at layer {', '.join(map(str, e['layers']))} is named like our "
                           f"{e['family_class'].rpartition('.')[2]} but built differently "
                           f"({', '.join(e['differences'][:6])}{', ...' if len(e['differences']) > 6 else ''})"
                           for qual, e in mismatched.items())
        super().__init__(f"{listed}: our export twin is written for the tutorial's structure, so it cannot take "
                         f"this block — {CODE_HINT}")


def _custom_blocks(log, model):
    """{class path: [layers]} of the unknown blocks inside the model, once no other unknown global and no library
    class is among the placeholders (each refused with its own message)."""
    blocks = object_graph.unknown_blocks(model)
    stray = sorted(set(log.unknown) - set(blocks))
    if stray:
        raise Refused(f"it references {', '.join(stray[:5])}, which is not an allowed global")
    library = {cls: layers for cls, layers in blocks.items() if cls.split(".")[0] in LIBRARY_ROOTS}
    custom = {cls: layers for cls, layers in blocks.items() if cls not in library}
    if library:
        raise LibraryClassesError(library, custom)
    return custom


def _names(model):
    names = model.__dict__.get("names")
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names or not all(type(k) is int and type(v) is str for k, v in names.items()):
        raise CheckpointError("the checkpoint's model has no class names (a dict or list of strings); "
                              "it is not an ultralytics detection model")
    return dict(names)


def _stride(model):
    stride = model.__dict__.get("stride", torch.tensor([32.0]))
    values = stride.tolist() if isinstance(stride, torch.Tensor) and stride.dim() == 1 else None
    if not values or not all(float(v).is_integer() and 0 < v <= 1024 for v in values):
        raise CheckpointError("the checkpoint's model has no valid strides (a 1-d tensor of positive integers)")
    return [int(v) for v in values]


def _task(model):
    task = model.__dict__.get("task", "detect")
    return task if type(task) is str else "detect"


def _train_imgsz(ckpt):
    """The training image size, if the checkpoint records one: ultralytics' train_args.imgsz (an int or
    [h, w]), or YOLOv5's opt.imgsz / opt.img_size ([size] or [train, test] sizes: the first is training's)."""
    if not isinstance(ckpt, dict):
        return None
    args, opt = _as_dict(ckpt.get("train_args")), _as_dict(ckpt.get("opt"))
    if args is not None:
        return _image_size(args.get("imgsz"))
    if opt is not None:
        size = opt.get("imgsz", opt.get("img_size"))
        return _image_size(size[0] if isinstance(size, (list, tuple)) and size else size)
    return None


def _as_dict(args):
    """A dict or namespace of training arguments as a dict (None otherwise)."""
    args = vars(args) if hasattr(args, "__dict__") and not isinstance(args, torch.nn.Module) else args
    return args if isinstance(args, dict) else None


def _image_size(imgsz):
    """An int or a list of ints as recorded (bounded by schema.image_size); None for anything else."""
    sizes = imgsz if isinstance(imgsz, (list, tuple)) else [imgsz]
    return imgsz if sizes and all(type(v) is int for v in sizes) else None


def _prepare(model):
    """What ultralytics does to a loaded model before export: fp32, eval, BN fused (only after validation)."""
    model = model.float().eval()
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    if hasattr(model, "fuse"):
        model = model.fuse(verbose=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def from_yaml(path, nc):
    """An untrained model built from a model YAML (stock ultralytics names such as `yolov8n.yaml`, or ours in
    models/cfg), as a LoadedCheckpoint: for benchmarks, where only the architecture matters. Plain YAML: nothing
    is unpickled or imported."""
    import models  # registers our blocks with ultralytics' YAML parser
    from ultralytics.nn.tasks import DetectionModel

    path = Path(path)
    ours = models.CFG_DIR / path.name
    spec = ours if not path.is_file() and ours.is_file() else path  # else ultralytics resolves stock names
    try:
        model = DetectionModel(str(spec), nc=nc, verbose=False)
    except (Exception, SystemExit) as e:
        raise CheckpointError(f"{path}: not a buildable model YAML ({_one_line(e)}); pass a file or a stock "
                              f"ultralytics name such as yolov8n.yaml") from None
    names = {i: f"class{i}" for i in range(nc)}
    model.names = names
    return LoadedCheckpoint(model=_prepare(model), path=path, names=names, nc=nc, stride=_stride(model),
                            task="detect", imgsz=None, source="yaml", saved_half=False)
