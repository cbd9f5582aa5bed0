"""Security regression tests: hostile checkpoints are refused in a fresh process, and nothing of theirs runs.

Every attack below was reproduced against the earlier loader (code execution, process-wide state changes,
hangs, memory exhaustion, a segfault). Each case crafts its file in its own folder next to a marker path the
payload would create, then tests/crafted.py loads it in a forked child of a freshly imported process (one
child per attack, 4 GiB address space, killed after 120 s). The child reports the refusal, and whether any
function or class it can see was changed, which modules got imported and how long / how much memory it took.
A few representative cases also run through `python -m export` in a fresh interpreter for the CLI contract.
Controls (the same crafting pipeline with benign values) must load, so a refusal is never just an artefact
of how the files were crafted.
"""

import copy
import json
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from ultralytics import YOLO

from tests.crafted import (Op, build, call, ops, deflate_bomb, eval_cfg, glob, inst, legacy_stream, newobj, newobj_ex, obj,
                           pickle_of, patch_zip_sizes, persid, read_zip, rewrite, stack_glob, swap, tar_with_fifo,
                           tensor)

REPO = Path(__file__).resolve().parents[1]
LIMIT_AS = 4 << 30
TIMEOUT_S = 120
DOS_SECONDS = 30  # CPU seconds of the load call: a DoS input is refused within seconds, not after the 120 s budget
DOS_WALL_FACTOR = 3  # the same call's wall time, with room for a machine shared with other work
DOS_EXTRA_MB = 512  # ... and with its peak RSS at most this far above the child's RSS when it started

# Sentinel strings planted in the real checkpoint; each case swaps them for benign values or its payload.
SENTINELS = {"model_key": "zz_model_key", "model_value": "zz_model_value",  # an attribute of the DetectionModel
             "layer_key": "zz_layer_key", "layer_value": "zz_layer_value",  # an attribute of model.model[4] (C2f)
             "buffer_value": "zz_buffer_value"}  # a buffer of model.model[4]
BENIGN = {"model_key": "note", "model_value": "benign", "layer_key": "note", "layer_value": "benign",
          "buffer_value": tensor("zz_ok", 4, (4,), (1,))}
BENIGN_RECORDS = {"zz_ok": bytes(16)}  # four float32 zeros

DM = glob("ultralytics.nn.tasks", "DetectionModel")
RECONSTRUCTOR = glob("copyreg", "_reconstructor")
OBJECT_DTYPE = build(call(glob("numpy", "dtype"), "O8", False, True), (3, "|", None, None, None, -1, -1, 63))
UINT8_DTYPE = build(call(glob("numpy", "dtype"), "u1", False, True), (3, "|", None, None, None, -1, -1, 0))
NP_RECONSTRUCT = glob("numpy._core.multiarray", "_reconstruct")


# ---- crafting --------------------------------------------------------------------------------------------------
@dataclass
class Bases:
    real: Path  # ultralytics-style torch.save zip with every sentinel planted
    real_top: str  # its zip's top folder
    legacy: Path  # the same checkpoint (model key/value sentinels only) in the legacy, non-zip format
    empty: Path  # torch.save of a string: a valid zip layout whose data.pkl a case replaces
    model: torch.nn.Module  # the half-precision yolov8n the real checkpoints hold


def _checkpoint(model):
    return {"epoch": -1, "model": model, "ema": None, "optimizer": None, "train_args": {"imgsz": 64},
            "version": "8.4.190"}


def _make_bases(folder):
    model = YOLO("yolov8n.yaml").model.half()  # builds offline, as ultralytics saves: fp16
    planted = copy.deepcopy(model)
    planted.__dict__[SENTINELS["model_key"]] = SENTINELS["model_value"]
    legacy = folder / "legacy_base.pt"
    torch.save(_checkpoint(planted), legacy, _use_new_zipfile_serialization=False)
    layer = planted.model[4]
    layer.__dict__[SENTINELS["layer_key"]] = SENTINELS["layer_value"]
    layer._buffers["zz_buffer"] = SENTINELS["buffer_value"]  # a str for now; every case swaps in a tensor
    real = folder / "real_base.pt"
    torch.save(_checkpoint(planted), real)
    empty = folder / "empty_base.pt"
    torch.save("placeholder", empty)
    return Bases(real=real, real_top=read_zip(real)[0], legacy=legacy, empty=empty, model=model)


class Workshop:
    """One case's folder: where its file goes and where its payload would leave a marker."""

    def __init__(self, bases, folder):
        self.bases, self.dir = bases, folder
        self.marker = folder / "pwned"
        self.weights = folder / "weights.pt"
        self.cfg = eval_cfg(self.marker)  # a model YAML whose `activation` would touch the marker

    def real(self, records=None, compression=zipfile.ZIP_STORED, **slots):
        """The real checkpoint with some sentinels swapped for payload fragments (the rest benign)."""
        swaps = {SENTINELS[k]: v for k, v in {**BENIGN, **slots}.items()}
        return rewrite(self.bases.real, self.weights, swaps, records={**BENIGN_RECORDS, **(records or {})},
                       compression=compression)

    def standalone(self, value, records=None):
        """A torch zip whose whole pickle is `value` (no real model around the payload)."""
        return rewrite(self.bases.empty, self.weights, data_pkl=pickle_of(value), records=records)

    def legacy(self, main_pickle):
        self.weights.write_bytes(legacy_stream(main_pickle))
        return self.weights

    def saved(self, mutate):
        """torch.save of a real checkpoint after `mutate(model)`, for payloads torch itself can pickle."""
        model = copy.deepcopy(self.bases.model)
        ckpt = _checkpoint(model)
        mutate(model, ckpt)
        torch.save(ckpt, self.weights)
        return self.weights


def _standalone_ckpt(**extra):
    return {"epoch": -1, "model": None, "ema": None, "optimizer": None, **extra}


# ---- the attacks ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attack:
    craft: object  # Workshop -> Path of the file to load
    says: tuple = ()  # the one-line refusal must contain one of these
    dos: bool = False  # must be refused within DOS_SECONDS and DOS_EXTRA_MB
    watch: tuple = ()  # modules the pickle names that must not be imported (and are not before)
    cli: bool = False  # also run `python -m export` on it in a fresh interpreter


ATTACKS = {}
CONTROLS = {}
GATE = ("refused",)  # refusals by the unpickling gate say so


def attack(case_id, **kw):
    def register(craft):
        ATTACKS[case_id] = Attack(craft, **kw)
        return craft
    return register


def control(case_id):
    def register(craft):
        CONTROLS[case_id] = Attack(craft)
        return craft
    return register


def reconstructor_defaults(ws):
    """BUILD on copyreg._reconstructor: afterwards _reconstructor() means DetectionModel(attacker cfg)."""
    return build(RECONSTRUCTOR, (None, {"__defaults__": (DM, DM, ws.cfg)}))


# 1. BUILD on an allowlisted function or class (not an instance): process-wide setattr.
@attack("build-on-function/reconstructor-defaults-with-float-shadow", says=GATE, cli=True)
def _(ws):  # the reproduced exploit: the loader's model.float() calls _reconstructor() -> eval(activation)
    return ws.real(model_key="float", model_value=reconstructor_defaults(ws))


@attack("build-on-function/reconstructor-defaults-standalone", says=GATE)
def _(ws):
    return ws.standalone(_standalone_ckpt(x=reconstructor_defaults(ws)))


@attack("build-on-function/rebuild-tensor-dict-state", says=GATE)
def _(ws):  # dict state on a function updates the function's own __dict__
    return ws.real(layer_value=build(glob("torch._utils", "_rebuild_tensor_v2"), {"hook": "pwned"}))


@attack("build-on-function/rebuild-tensor-defaults-slotstate", says=GATE)
def _(ws):
    return ws.real(layer_value=build(glob("torch._utils", "_rebuild_tensor_v2"),
                                     (None, {"__defaults__": ({"pwned": True},)})))


@attack("build-on-class/detectionmodel-float", says=GATE)
def _(ws):  # setattr on the class every later DetectionModel shares
    return ws.real(layer_value=build(DM, (None, {"float": glob("torch.nn", "Identity")})))


@attack("build-on-class/posixpath-stem-in-model", says=GATE)
def _(ws):
    return ws.real(layer_value=build(glob("pathlib", "PosixPath"), (None, {"stem": "pwned"})))


@attack("build-on-class/posixpath-stem-standalone", says=GATE)
def _(ws):
    return ws.standalone(_standalone_ckpt(x=build(glob("pathlib", "PosixPath"), (None, {"stem": "pwned"}))))


for _name in ("float", "eval", "fuse", "forward", "end2end"):  # methods the loader calls; a property
    attack(f"shadow/model-{_name}", says=GATE)(lambda ws, n=_name: ws.real(model_key=n))
attack("shadow/layer-forward", says=GATE)(lambda ws: ws.real(layer_key="forward"))
attack("dunder/__class__", says=GATE)(
    lambda ws: ws.real(model_key="__class__", model_value=glob("torch.nn", "Identity")))
attack("dunder/__dict__", says=GATE)(lambda ws: ws.real(model_key="__dict__", model_value={"training": False}))
attack("dunder/__init__", says=GATE)(lambda ws: ws.real(layer_key="__init__"))


# 2. BUILD running a class's own __setstate__: OptimizedModule calls dynamo_ctx(_orig_mod.__call__).
def optimized_module(orig):
    return build(newobj(glob("torch._dynamo.eval_frame", "OptimizedModule")),
                 {"_orig_mod": orig, "dynamo_ctx": DM, "training": False})


def namespace_with_call(ws):
    """_orig_mod.__call__ is the attacker's model YAML, so dynamo_ctx(...) is DetectionModel(cfg)."""
    return build(call(glob("types", "SimpleNamespace")), {"__call__": ws.cfg, "forward": "plain"})


# The reproduced exploit (the earlier loader touched the marker); here the namespace's '__call__' key may
# already be what trips the gate, so the plain-state variant checks OptimizedModule on its own.
attack("setstate/optimized-module-in-model", says=GATE, cli=True)(
    lambda ws: ws.real(layer_value=optimized_module(namespace_with_call(ws))))
attack("setstate/optimized-module-standalone", says=GATE)(
    lambda ws: ws.standalone(_standalone_ckpt(model=optimized_module(namespace_with_call(ws)))))
attack("setstate/optimized-module-plain-state", says=GATE)(lambda ws: ws.real(layer_value=optimized_module("plain")))


# 3. Legacy (non-zip) and tar formats: refused before any of their pickles is read.
RESAVE = ("re-save",)


@attack("legacy/torch-save-real-model-float-shadow", says=RESAVE)
def _(ws):
    data = swap(ws.bases.legacy.read_bytes(), {SENTINELS["model_key"]: "float",
                                               SENTINELS["model_value"]: reconstructor_defaults(ws)})
    ws.weights.write_bytes(data)
    return ws.weights


@attack("legacy/module-persistent-id-writes-patch", says=RESAVE, cli=True)
def _(ws):  # torch's 'module' id diffs a class's source and writes <its __name__>.patch: BUILD chose the name
    container = build(glob("pathlib", "PosixPath"), (None, {"dump_patches": True, "__name__": str(ws.marker)}))
    return ws.legacy(pickle_of({"model": persid(("module", container, "evil.py", "class Evil: pass\n"))}))


@attack("legacy/reduce-os-system", says=RESAVE)
def _(ws):
    return ws.legacy(pickle_of({"ema": call(glob("os", "system"), f"touch {ws.marker}")}))


@attack("legacy/tar-with-fifo-member", says=RESAVE + ("not a PyTorch checkpoint",), dos=True, cli=True)
def _(ws):
    return tar_with_fifo(ws.weights)


# 5. find_class never imports what the pickle names (importing these runs pip install / git clone / exit).
IMPORT_TARGETS = {  # module, name, modules that must stay unimported
    "trackers-matching": ("ultralytics.trackers.utils.matching", "linear_assignment",
                          ("ultralytics.trackers", "ultralytics.trackers.utils",
                           "ultralytics.trackers.utils.matching")),
    "text-model": ("ultralytics.nn.text_model", "build_text_model", ("ultralytics.nn.text_model",)),
    "f2py-main": ("numpy.f2py.__main__", "main", ("numpy.f2py", "numpy.f2py.__main__")),
    "model-dump-main": ("torch.utils.model_dump.__main__", "main",
                        ("torch.utils.model_dump", "torch.utils.model_dump.__main__")),
}
IMPORT_STYLES = {
    "global-value": lambda m, n: glob(m, n),
    "stack-global-value": lambda m, n: stack_glob(m, n),
    "reduce-target": lambda m, n: call(glob(m, n), "x"),
}
for _target, (_module, _attr, _watch) in IMPORT_TARGETS.items():
    for _style, _fragment in IMPORT_STYLES.items():
        attack(f"find_class/{_target}/{_style}", says=GATE, watch=_watch)(
            lambda ws, f=_fragment(_module, _attr): ws.real(layer_value=f))


# 6. Classes called with pickle-supplied arguments (REDUCE / NEWOBJ / NEWOBJ_EX / INST / OBJ).
attack("call-class/reduce-detectionmodel", says=GATE)(lambda ws: ws.real(layer_value=call(DM, ws.cfg)))
attack("call-class/reduce-detectionmodel-standalone", says=GATE)(
    lambda ws: ws.standalone(_standalone_ckpt(model=call(DM, ws.cfg))))
attack("call-class/newobj-with-args", says=GATE)(lambda ws: ws.real(layer_value=newobj(DM, ws.cfg)))
attack("call-class/newobj-ex-with-kwargs", says=GATE)(
    lambda ws: ws.real(layer_value=newobj_ex(DM, (), {"cfg": ws.cfg})))
attack("call-class/inst", says=GATE)(
    lambda ws: ws.real(layer_value=inst("ultralytics.nn.tasks", "DetectionModel", ws.cfg)))
attack("call-class/obj", says=GATE)(lambda ws: ws.real(layer_value=obj(DM, ws.cfg)))
attack("call-class/reconstructor-runs-base-init", says=GATE)(
    lambda ws: ws.real(layer_value=call(RECONSTRUCTOR, DM, DM, ws.cfg)))


# Classic payloads: REDUCE on a callable that runs code.
def _touch(ws):
    return f"touch {ws.marker}"


def _py_touch(ws):
    return f"open({str(ws.marker)!r}, 'w').close()"


CLASSIC = {
    "os.system": lambda ws: call(glob("os", "system"), _touch(ws)),
    "posix.system": lambda ws: call(glob("posix", "system"), _touch(ws)),
    "builtins.eval": lambda ws: call(glob("builtins", "eval"), _py_touch(ws)),
    "__builtin__.eval": lambda ws: call(glob("__builtin__", "eval"), _py_touch(ws)),  # Python 2 name, mapped
    "builtins.exec": lambda ws: call(glob("builtins", "exec"), _py_touch(ws)),
    "subprocess.getoutput": lambda ws: call(glob("subprocess", "getoutput"), _touch(ws)),
    "subprocess.Popen": lambda ws: call(glob("subprocess", "Popen"), ["touch", str(ws.marker)]),
    "subprocess.run": lambda ws: call(glob("subprocess", "run"), ["touch", str(ws.marker)]),
    "subprocess.check_output": lambda ws: call(glob("subprocess", "check_output"), ["touch", str(ws.marker)]),
    "functools.partial": lambda ws: call(call(glob("functools", "partial"), glob("os", "system"), _touch(ws))),
    # getattr on an allowlisted object is enough: PosixPath(marker).touch()
    "builtins.getattr": lambda ws: call(call(glob("builtins", "getattr"),
                                             call(glob("pathlib", "PosixPath"), str(ws.marker)), "touch")),
    "builtins.__import__": lambda ws: call(call(glob("builtins", "getattr"), call(glob("builtins", "__import__"), "os"),
                                                "system"), _touch(ws)),
}
for _name, _payload in CLASSIC.items():
    attack(f"classic/{_name}", says=GATE)(lambda ws, p=_payload: ws.real(layer_value=p(ws)))
attack("classic/os.system-standalone", says=GATE)(
    lambda ws: ws.standalone(_standalone_ckpt(x=CLASSIC["os.system"](ws))))


# Denial of service: each must be refused within seconds and bounded memory.
def _lstm_state(num_layers):
    return {"training": False, "_parameters": {}, "_buffers": {}, "_modules": {}, "mode": "LSTM", "input_size": 2,
            "hidden_size": 2, "num_layers": num_layers, "bias": True, "batch_first": False, "dropout": 0.0,
            "bidirectional": False, "proj_size": 0, "_all_weights": [[0]], "_flat_weights_names": [],
            "_flat_weights": []}


@attack("dos/lstm-setstate-huge-num-layers", dos=True)
def _(ws):  # RNNBase.__setstate__ loops num_layers times
    return ws.real(layer_value=build(newobj(glob("torch.nn.modules.rnn", "LSTM")), _lstm_state(10 ** 12)))


def shared_graph(depth=60):
    """~40 KB pickled; `_apply` (model.float()) walks 2**depth paths: each level's two wrappers share a child.
    (A Sequential holding the same child twice is no DoS: children() de-duplicates within one module.)"""
    inner = torch.nn.Conv2d(1, 1, 1)  # a parameter, so the loader gets as far as converting it
    for _ in range(depth):
        inner = torch.nn.Sequential(torch.nn.Sequential(inner), torch.nn.Sequential(inner))
    inner.i, inner.f, inner.type, inner.np = 9, -1, "torch.nn.Sequential", 0  # pass as an ultralytics layer
    return inner


def _put_layer(model, ckpt):
    model.model[9] = shared_graph()


def _put_model(model, ckpt):
    ckpt["model"] = shared_graph()


attack("dos/shared-graph-as-layer", dos=True, cli=True)(lambda ws: ws.saved(_put_layer))
attack("dos/shared-graph-as-model", dos=True)(lambda ws: ws.saved(_put_model))
attack("dos/bytearray-1e12", dos=True)(lambda ws: ws.real(layer_value=call(glob("builtins", "bytearray"), 10 ** 12)))
attack("dos/ndarray-object-1e12", dos=True)(
    lambda ws: ws.real(layer_value=call(glob("numpy", "ndarray"), (10 ** 12,), OBJECT_DTYPE)))
attack("dos/ndarray-reconstruct-object-huge-shape", dos=True)(
    lambda ws: ws.real(layer_value=build(call(NP_RECONSTRUCT, glob("numpy", "ndarray"), (0,), b"b"),
                                         (1, (10 ** 12,), OBJECT_DTYPE, False, [None]))))
attack("dos/ndarray-reconstruct-uint8-huge-shape", dos=True)(
    lambda ws: ws.real(layer_value=build(call(NP_RECONSTRUCT, glob("numpy", "ndarray"), (0,), b"b"),
                                         (1, (10 ** 6, 10 ** 6), UINT8_DTYPE, False, bytes(16)))))

COMPRESSED = ("compressed",)
BOMB_MIB = 1536  # inflates to 1.5 GiB from ~1.6 MB


@attack("zip/deflate-real-checkpoint", says=COMPRESSED, dos=True)
def _(ws):
    return ws.real(compression=zipfile.ZIP_DEFLATED)


@attack("zip/deflate-bomb-in-real-checkpoint", says=COMPRESSED, dos=True, cli=True)
def _(ws):
    stored = ws.real(buffer_value=tensor("zz_bomb", BOMB_MIB << 18, (BOMB_MIB << 18,), (1,)))
    top, records = read_zip(stored)
    return deflate_bomb(ws.weights, top, records, "zz_bomb", BOMB_MIB)


@attack("zip/deflate-bomb-standalone", says=COMPRESSED, dos=True)
def _(ws):
    top, records = read_zip(ws.bases.empty)
    records["data.pkl"] = pickle_of(_standalone_ckpt(x=tensor("0", BOMB_MIB << 18, (BOMB_MIB << 18,), (1,))))
    return deflate_bomb(ws.weights, top, records, "0", BOMB_MIB)


@attack("zip/stored-record-size-beyond-file", dos=True)
def _(ws):
    return patch_zip_sizes(ws.real(), f"{ws.bases.real_top}/data/zz_ok", 0xFFFFFF00)


DEEP = 1_000_000  # one opcode a level: 1 MB of pickle


def deep_tuple():
    """((((...)))) a million levels deep: hashing it recurses in C with no limit and overflows the stack."""
    return Op(pickle.EMPTY_TUPLE + pickle.TUPLE1 * DEEP)


def deep_list():
    return Op(pickle.EMPTY_LIST * DEEP + pickle.APPEND * (DEEP - 1))


attack("nesting/deep-tuple-as-dict-key", says=GATE, dos=True, cli=True)(
    lambda ws: ws.real(model_key=deep_tuple()))
attack("nesting/deep-tuple-in-frozenset", says=GATE, dos=True)(
    lambda ws: ws.real(model_value=Op(pickle.MARK + deep_tuple() + pickle.FROZENSET)))
attack("nesting/deep-tuple-in-set-call", says=GATE, dos=True)(
    lambda ws: ws.real(model_value=call(glob("builtins", "set"), [deep_tuple()])))
attack("nesting/deep-tuple-as-rebuild-func", says=GATE, dos=True)(
    lambda ws: ws.real(model_value=call(glob("torch._tensor", "_rebuild_from_type_v2"), deep_tuple(), None, (), None)))
attack("nesting/deep-list-value", says=GATE, dos=True)(lambda ws: ws.real(layer_value=deep_list()))


# One large object referenced over and over for a few bytes each: without a work budget each reference
# re-encodes, re-copies or re-hashes it, and a small file asks for unbounded time or memory.
MEMO = 999_999  # far above the memo indices of the real pickle the fragment lands in


def remembered(value):
    """Push `value` and keep it in the memo; `recall()` pushes it again for 5 bytes."""
    return Op(ops(value) + pickle.LONG_BINPUT + MEMO.to_bytes(4, "little"))


def recall():
    return Op(pickle.LONG_BINGET + MEMO.to_bytes(4, "little"))


def list_of(first, repeated, times):
    """[first, repeated, repeated, ...]: `first` puts the shared object in the memo, `repeated` reuses it."""
    return Op(pickle.EMPTY_LIST + pickle.MARK + first + repeated * times + pickle.APPENDS)


BIG_TEXT = "A" * (4 << 20)  # 4 MiB: 1000 latin-1 encodings of it would be 4 GiB
WIDE_STATE = {f"a{i}": 0 for i in range(4000)}  # under the per-object cap; 5000 modules from it: 20M entries


attack("amplification/encode-one-big-string-repeatedly", says=GATE, dos=True)(lambda ws: ws.real(
    model_value=list_of(call(glob("_codecs", "encode"), remembered(BIG_TEXT), "latin1"),
                        call(glob("_codecs", "encode"), recall(), "latin1"), 1000)))
attack("amplification/build-modules-from-one-wide-state", says=GATE, dos=True)(lambda ws: ws.real(
    model_value=list_of(build(newobj(glob("torch.nn.modules.linear", "Identity")), remembered(WIDE_STATE)),
                        build(newobj(glob("torch.nn.modules.linear", "Identity")), recall()), 5000)))
attack("amplification/set-from-one-long-list-repeatedly", says=GATE, dos=True)(lambda ws: ws.real(
    model_value=list_of(call(glob("builtins", "set"), remembered(list(range(1_000_000)))),
                        call(glob("builtins", "set"), recall()), 2000)))
attack("amplification/million-module-instances", says=GATE, dos=True)(lambda ws: ws.real(
    model_value=list_of(remembered(glob("torch.nn.modules.linear", "Identity")),
                        Op(recall() + pickle.EMPTY_TUPLE + pickle.NEWOBJ), 1_000_000)))


def _sparse_out_of_range():
    indices = torch.tensor([[0, 1_000_000_000]])
    return torch.sparse_coo_tensor(indices, torch.ones(2), (4,), check_invariants=False)


attack("tensor/sparse-out-of-range-buffer", dos=True, cli=True)(
    lambda ws: ws.saved(lambda m, c: m.model[4].register_buffer("evil", _sparse_out_of_range())))
attack("tensor/sparse-out-of-range-attribute", dos=True)(
    lambda ws: ws.saved(lambda m, c: setattr(m, "evil", _sparse_out_of_range())))
def _quantized():
    with warnings.catch_warnings():  # torch deprecates quantized tensors; the attack still uses one
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.quint8)


attack("tensor/quantized-buffer")(lambda ws: ws.saved(lambda m, c: m.model[4].register_buffer("evil", _quantized())))

attack("storage/numel-far-beyond-record", dos=True)(
    lambda ws: ws.real(buffer_value=tensor("zz_big", 10 ** 9, (10 ** 9,), (1,)), records={"zz_big": bytes(16)}))
attack("storage/numel-one-beyond-record", dos=True)(
    lambda ws: ws.real(buffer_value=tensor("zz_big", 5, (5,), (1,)), records={"zz_big": bytes(16)}))
attack("tensor/size-beyond-storage", dos=True)(lambda ws: ws.real(buffer_value=tensor("zz_ok", 4, (1000,), (1,))))
attack("tensor/stride-beyond-storage", dos=True)(lambda ws: ws.real(buffer_value=tensor("zz_ok", 4, (4,), (1000,))))
attack("tensor/offset-beyond-storage", dos=True)(
    lambda ws: ws.real(buffer_value=tensor("zz_ok", 4, (4,), (1,), offset=10 ** 6)))
attack("tensor/expanded-view-claims-a-terabyte", says=GATE, dos=True)(  # casting it would allocate 4 TB
    lambda ws: ws.real(buffer_value=tensor("zz_ok", 4, (1 << 20, 1 << 20), (0, 0))))
attack("tensor/size-overflows-int64", dos=True)(
    lambda ws: ws.real(buffer_value=tensor("zz_ok", 4, (1 << 62, 4), (4, 1))))


@attack("input/weights-path-is-a-fifo", dos=True, cli=True)
def _(ws):
    os.mkfifo(ws.weights)
    return ws.weights


# 7. Second round: legal types, values later stages trust. Each is refused at load, naming the field and bound.
def _set(layer, field, value):
    def mutate(model, ckpt):
        model.model[layer].__dict__[field] = value
    return mutate


SCHEMA = ("must be", "takes input from layer")
VALUE_ATTACKS = {  # yolov8n: model.4 C2f, model.9 SPPF, model.22 Detect (inputs 15, 18, 21)
    "sppf-n-25000": _set(9, "n", 25_000),  # ultralytics' SPPF keeps n pooled outputs
    "sppf-n-as-a-tensor": _set(9, "n", torch.tensor(10 ** 9)),  # range() takes a 0-d int tensor
    "n-iter-1e9-on-any-class": _set(4, "n_iter", 10 ** 9),  # STA's twin iterates n_iter times
    "repconv-style-c1-12000": _set(4, "c1", 12_000),  # RepConv.fuse allocates c1 x c1/g x 3 x 3
    "detect-nl-1e9": _set(22, "nl", 10 ** 9),
    "detect-input-past-the-model": _set(22, "f", [15, 18, 99]),
    "detect-input-never-saved": _set(22, "f", [15, 18, 3]),  # y[3] is None at run time
    "layer-input-is-itself": _set(4, "f", 4),
    "layer-type-1mib": _set(4, "type", "x" * (1 << 20)),
    "float-where-an-index-goes": _set(4, "f", 0.5),
}


def _held(make, field, value):
    """A stock torch layer of the table, held by model.4 (C2f), with one field set past its bound."""
    def mutate(model, ckpt):
        layer = model.model[4].extra = make()
        layer.__dict__[field] = value
    return mutate


VALUE_ATTACKS |= {  # the torch layers the table accepts are bounded field by field too
    "unfold-kernel-1e9": _held(lambda: torch.nn.Unfold(3), "kernel_size", 10 ** 9),  # k*k copies of its input
    "multihead-attention-embed-dim-1e9": _held(lambda: torch.nn.MultiheadAttention(16, 4), "embed_dim", 10 ** 9),
    "reflection-pad-1e6": _held(lambda: torch.nn.ReflectionPad2d(1), "padding", (10 ** 6,) * 4),
    "conv-reflect-pad-1e6": _held(lambda: torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                                  "_reversed_padding_repeated_twice", [10 ** 6] * 4),  # what F.pad gets
}
for _name, _mutate in VALUE_ATTACKS.items():
    attack(f"value/{_name}", says=SCHEMA, dos=True)(lambda ws, m=_mutate: ws.saved(m))


def _names(value):
    def mutate(model, ckpt):
        model.names = value
    return mutate


_BIG = "a" * (1 << 20)
attack("value/names-6000-references-to-one-1mib-string", says=("class name",), dos=True)(
    lambda ws: ws.saved(_names([_BIG] * 6000)))  # pickled once, expanded by str(names) into ONNX metadata
attack("value/names-forge-a-console-line", says=("class name",), cli=True)(
    lambda ws: ws.saved(_names({0: "person\nwrote best.onnx: parity passed", 1: "car"})))
attack("value/names-ansi-escape", says=("class name",))(lambda ws: ws.saved(_names({0: "\x1b[2K\x1b[1Gok"})))
attack("value/names-20000-classes", says=("class names",))(
    lambda ws: ws.saved(_names({i: f"c{i}" for i in range(20_000)})))


def _train_imgsz(value):
    def mutate(model, ckpt):
        ckpt["train_args"] = {"imgsz": value}
    return mutate


for _name, _value in {"6400": 6400, "16384x64": [16384, 64], "three-sides": [640, 640, 640]}.items():
    attack(f"value/train-imgsz-{_name}", says=("train_args imgsz",), cli=_name == "6400")(
        lambda ws, v=_value: ws.saved(_train_imgsz(v)))


def _views(count, layer=4):
    def mutate(model, ckpt):  # one 2 MiB fp16 storage in the file; each view becomes a 4 MiB fp32 copy
        base = torch.zeros(1 << 20, dtype=torch.float16)
        for k in range(count):
            model.model[layer].register_buffer(f"view{k}", base[k % 7:])
    return mutate


attack("budget/1500-views-of-one-fp16-storage", says=("once cast to fp32",), dos=True, cli=True)(
    lambda ws: ws.saved(_views(1500)))
attack("budget/300-views-on-another-layer", says=("once cast to fp32",), dos=True)(
    lambda ws: ws.saved(_views(300, layer=22)))


def _dict_with_keys(keys):
    """A dict fragment built key by key from opcodes (crafting the dict itself would pay the collisions here)."""
    return Op(pickle.EMPTY_DICT + pickle.MARK + b"".join(ops(k) + ops(0) for k in keys) + pickle.SETITEMS)


P61 = (1 << 61) - 1  # ints equal modulo 2**61 - 1 share one hash
attack("keys/200k-ints-with-one-hash", says=GATE, dos=True)(
    lambda ws: ws.real(model_value=_dict_with_keys(1 + k * P61 for k in range(200_000))))
attack("keys/64-bit-ints-with-one-hash", says=GATE, dos=True)(  # within int64, still colliding
    lambda ws: ws.real(model_value=_dict_with_keys(1 + k * P61 for k in range(1, 4))))
attack("keys/one-1mib-int-as-key-300k-times", says=GATE, dos=True)(lambda ws: ws.real(model_value=Op(
    pickle.EMPTY_DICT + pickle.MARK + remembered(1 << (8 << 20)) + ops(0) + (recall() + ops(0)) * 300_000
    + pickle.SETITEMS)))
attack("keys/huge-int-in-a-set", says=GATE, dos=True)(
    lambda ws: ws.real(model_value=call(glob("builtins", "set"), [1 << 100_000])))


def chain_in_flat_list(n=5000):
    """[L0, L1, ..., Ln] where each Lk also holds Lk+1: every link sits one level below the flat list, and the
    chain from L0 is n deep (copy.deepcopy recurses along it)."""
    base = MEMO + 1
    body = b"".join(pickle.EMPTY_LIST + pickle.LONG_BINPUT + (base + k).to_bytes(4, "little") + pickle.APPEND
                    for k in range(n))
    links = b"".join(pickle.LONG_BINGET + (base + k).to_bytes(4, "little") + pickle.LONG_BINGET
                     + (base + k + 1).to_bytes(4, "little") + pickle.APPEND + pickle.POP for k in range(n - 1))
    return Op(pickle.EMPTY_LIST + body + links)


attack("nesting/deep-chain-also-reachable-from-a-flat-list", says=GATE, dos=True, cli=True)(
    lambda ws: ws.real(model_value=chain_in_flat_list()))
attack("nesting/deep-chain-inside-the-model", says=GATE, dos=True)(
    lambda ws: ws.real(layer_value=chain_in_flat_list(3000)))
attack("nesting/list-that-contains-itself", says=GATE)(lambda ws: ws.real(model_value=Op(
    pickle.EMPTY_LIST + pickle.LONG_BINPUT + MEMO.to_bytes(4, "little") + recall() + pickle.APPEND)))


@attack("zip/central-directory-padded-with-extra-fields", says=("zip directory",), dos=True, cli=True)
def _(ws):  # zipfile reads the whole directory when it opens the file: ours is refused from the end record
    top, records = read_zip(ws.real())
    padding = struct.pack("<HH", 0xCAFE, 65_000) + bytes(65_000)
    with zipfile.ZipFile(ws.weights, "w") as z:
        for name, data in records.items():
            z.writestr(zipfile.ZipInfo(f"{top}/{name}"), data)
        for k in range(300):
            info = zipfile.ZipInfo(f"{top}/pad{k}")
            info.extra = padding
            z.writestr(info, b"")
    return ws.weights


@attack("global/class-name-with-a-newline", says=GATE, cli=True)
def _(ws):  # the name would reach the console: a forged line
    return ws.real(layer_value=newobj(stack_glob("evil\nwrote best.onnx: parity passed", "Block")))


@attack("model/member-name-with-an-escape", says=GATE)
def _(ws):
    def mutate(model, ckpt):
        model.model[4]._modules["\x1b[2Kcv1"] = model.model[4]._modules.pop("cv1")
    return ws.saved(mutate)


# Controls: the same pipeline with benign values loads, so refusals above are about the payloads.
control("control/real-with-benign-sentinels")(lambda ws: ws.real())
control("control/plain-torch-save")(lambda ws: ws.saved(lambda m, c: None))


# ---- running them --------------------------------------------------------------------------------------------
def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))


def _selected(request, test_name):
    ids = []
    for item in request.session.items:
        if item.module is sys.modules[__name__] and item.originalname == test_name:
            ids.append(item.callspec.params["case"])
    return ids


def _run_cli(cases, workshops, parallel):
    """`python -m export` on each file in a fresh interpreter; {case: (returncode or 'timeout', stderr)}."""
    results, pending, running = {}, list(cases), {}
    while pending or running:
        while pending and len(running) < parallel:
            case = pending.pop(0)
            ws = workshops[case]
            cmd = [sys.executable, "-m", "export", "--weights", str(ws.weights), "--out", str(ws.dir / "out"),
                   "--no-parity", "--imgsz", "64"]
            running[case] = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                             text=True, preexec_fn=_limit_memory)
        case = next(iter(running))
        proc = running.pop(case)
        try:
            _, err = proc.communicate(timeout=TIMEOUT_S)
            results[case] = (proc.returncode, err)
        except subprocess.TimeoutExpired:
            proc.kill()
            results[case] = ("timeout", proc.communicate()[1])
    return results


@dataclass
class Runs:
    workshops: dict
    listing: dict  # case -> file names in its folder right after crafting
    driver: dict
    cli: dict

    def listing_now(self, case):
        return sorted(p.name for p in self.workshops[case].dir.iterdir())


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    in_driver = _selected(request, "test_attack_is_refused_in_a_fresh_process") + _selected(
        request, "test_control_loads_in_a_fresh_process")
    in_cli = _selected(request, "test_cli_refuses_in_a_fresh_interpreter")
    root = tmp_path_factory.mktemp("attacks")
    bases = _make_bases(root)
    workshops, jobs = {}, []
    for case in dict.fromkeys(in_driver + in_cli):
        folder = root / case.replace("/", "__")
        folder.mkdir()
        ws = workshops[case] = Workshop(bases, folder)
        (ATTACKS.get(case) or CONTROLS[case]).craft(ws)
        if case in in_driver:
            jobs.append({"id": case, "weights": str(ws.weights), "cwd": str(folder),
                         "watch": list((ATTACKS.get(case) or CONTROLS[case]).watch)})
    listing = {case: sorted(p.name for p in ws.dir.iterdir()) for case, ws in workshops.items()}
    (root / "jobs.json").write_text(json.dumps(jobs))
    driver = {}
    if jobs:
        subprocess.run([sys.executable, "-m", "tests.crafted", str(root / "jobs.json"), str(root / "results.json")],
                       cwd=REPO, check=True, timeout=3600)
        driver = json.loads((root / "results.json").read_text())
    cli = _run_cli(in_cli, workshops, parallel=max(2, os.cpu_count() or 2))
    yield Runs(workshops, listing, driver, cli)
    shutil.rmtree(root, ignore_errors=True)  # ~60 copies of a 6 MB checkpoint


def _describe(run):
    r = run.get("result") or {}
    return json.dumps({k: run.get(k) for k in ("status", "code", "signal", "wall_s", "cpu_s", "maxrss_mb",
                                               "baseline_mb", "driver_error", "output_tail")}
                      | {k: r.get(k) for k in ("outcome", "message", "error", "traceback", "call_wall_s",
                                               "call_cpu_s")}, indent=1)


def _assert_nothing_happened(case, runs, run):
    """No payload ran: no marker, no new file, no changed function/class, no module imported."""
    ws, r = runs.workshops[case], run["result"]
    assert not ws.marker.exists() and not ws.marker.with_suffix(".patch").exists(), "the payload ran"
    assert runs.listing_now(case) == runs.listing[case], "something was written next to the checkpoint"
    assert r["mutated"] == [], f"process-wide state changed: {r['mutated']}"
    assert all(r["probes"].values()), r["probes"]
    assert r["imports_blocked"] == [], f"the loader tried to import {r['imports_blocked']}"
    assert r["new_modules"] == [] and r["watch_after"] == [], f"imported: {r['new_modules'] + r['watch_after']}"


@pytest.mark.parametrize("case", list(ATTACKS))
def test_attack_is_refused_in_a_fresh_process(case, runs):
    attack_, run = ATTACKS[case], runs.driver[case]
    assert run["status"] == "exited" and run["result"] is not None, _describe(run)  # no segfault, no hang
    assert run["result"]["watch_before"] == [], "the driver itself imported a watched module"
    _assert_nothing_happened(case, runs, run)
    r = run["result"]
    assert r["outcome"] == "refused", _describe(run)
    assert "CheckpointError" in r["error_types"] and r["exit_code"] == 2
    assert r["message"] and "\n" not in r["message"]
    assert not any(w in r["message"] for w in ("MemoryError", "RecursionError")), \
        f"refused by exhaustion, not by a rule: {r['message']}"
    if attack_.says:
        assert any(w in r["message"] for w in attack_.says), f"expected {attack_.says!r} in: {r['message']}"
    if attack_.dos:
        assert r["call_cpu_s"] <= DOS_SECONDS and r["call_wall_s"] <= DOS_WALL_FACTOR * DOS_SECONDS, _describe(run)
        assert run["maxrss_mb"] - r["rss_start_mb"] <= DOS_EXTRA_MB, _describe(run)


@pytest.mark.parametrize("case", list(CONTROLS))
def test_control_loads_in_a_fresh_process(case, runs):
    run = runs.driver[case]
    assert run["status"] == "exited" and run["result"] is not None, _describe(run)
    assert run["result"]["outcome"] == "loaded", _describe(run)
    _assert_nothing_happened(case, runs, run)


@pytest.mark.parametrize("case", [c for c, a in ATTACKS.items() if a.cli])
def test_cli_refuses_in_a_fresh_interpreter(case, runs):
    code, err = runs.cli[case]
    ws = runs.workshops[case]
    assert code == 2, f"exit {code}: {err[-3000:]}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    if ATTACKS[case].says:
        assert any(w in lines[0] for w in ATTACKS[case].says), lines[0]
    assert not (ws.dir / "out").exists()
    assert not ws.marker.exists() and not ws.marker.with_suffix(".patch").exists()
