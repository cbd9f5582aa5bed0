"""Crafted hostile checkpoints for tests/test_load_attacks.py, and the fresh-process driver that loads them.

Crafting (stdlib only, so the driver's children never depend on it):
- `Op`: hand-written pickle opcodes that push exactly ONE object and never touch the memo, so a fragment
  can be dropped into any pickle (in place of a sentinel string) without clashing with its BINPUT/BINGET
  indices. `ops(value)` turns plain data (which may contain `Op`s) into such opcodes.
- torch zip helpers: read a torch.save zip, swap sentinel strings in its data.pkl for fragments, add
  records, and write it back (ZIP_STORED unless a test asks for DEFLATE; zipfile recomputes the CRCs).
- legacy (torch < 1.6) streams and tar archives.

Driver: `python -m tests.crafted JOBS.json RESULTS.json` imports torch, ultralytics and export once, then
forks one child per job: a fresh copy of a pristine process for every attack, so one attack's process-wide
side effects cannot leak into another's verdict. Each child runs under a 4 GiB address-space limit, loads
the job's file with export.load, and reports the outcome plus what it can see of process-wide damage
(mutated functions and classes, imported modules). The parent kills a child after 120 s and records its
wall time, CPU time and peak RSS (from wait4).
"""

import json
import os
import pickle
import struct
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The loading process's address space: what its imports mapped plus this much. A fixed total would shrink the
# load's room whenever the imports grow (torchvision's ops add ~0.3 GiB of mappings).
ADDRESS_SPACE_HEADROOM = 768 << 20
TIMEOUT_S = 120

# Importing these runs pip install / git clone / sys.exit: a child refuses the import (and records the
# attempt), so even a faulty loader cannot make the test suite do any of that.
BLOCKED_IMPORTS = ("ultralytics.trackers", "ultralytics.nn.text_model", "numpy.f2py", "torch.utils.model_dump")
# Modules a hostile pickle names that a correct loader never needs: reported when they appear.
OBSERVED_IMPORTS = BLOCKED_IMPORTS + ("torch._dynamo",)


# ---- pickle fragments -----------------------------------------------------------------------------------
class Op(bytes):
    """Pickle opcodes that push exactly one object onto the stack and never use the memo."""


def ops(value):
    """Opcodes for plain data (None, bool, int, float, str, bytes, tuple, list, dict) that may hold Ops."""
    if isinstance(value, Op):
        return value
    if value is None:
        return Op(pickle.NONE)
    if isinstance(value, bool):
        return Op(pickle.NEWTRUE if value else pickle.NEWFALSE)
    if isinstance(value, int):
        if -(1 << 31) <= value < (1 << 31):
            return Op(pickle.BININT + struct.pack("<i", value))
        raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        if len(raw) < 256:
            return Op(pickle.LONG1 + bytes([len(raw)]) + raw)
        return Op(pickle.LONG4 + struct.pack("<i", len(raw)) + raw)
    if isinstance(value, float):
        return Op(pickle.BINFLOAT + struct.pack(">d", value))
    if isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
        return Op(pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw)
    if isinstance(value, bytes):
        return Op(pickle.BINBYTES + struct.pack("<I", len(value)) + value)
    if isinstance(value, tuple):
        return Op(pickle.MARK + b"".join(ops(v) for v in value) + pickle.TUPLE)
    if isinstance(value, list):
        body = b"".join(ops(v) for v in value)
        return Op(pickle.EMPTY_LIST + (pickle.MARK + body + pickle.APPENDS if value else b""))
    if isinstance(value, dict):
        body = b"".join(ops(k) + ops(v) for k, v in value.items())
        return Op(pickle.EMPTY_DICT + (pickle.MARK + body + pickle.SETITEMS if value else b""))
    raise TypeError(f"no opcodes for {type(value).__name__}")


def glob(module, name):
    """GLOBAL opcode (protocol 0-3 style)."""
    return Op(pickle.GLOBAL + f"{module}\n{name}\n".encode())


def stack_glob(module, name):
    """STACK_GLOBAL opcode (protocol 4 style): module and name come from the stack."""
    return Op(ops(module) + ops(name) + pickle.STACK_GLOBAL)


def call(func, *args):
    """REDUCE: func(*args)."""
    return Op(ops(func) + ops(tuple(args)) + pickle.REDUCE)


def newobj(cls, *args):
    """NEWOBJ: cls.__new__(cls, *args)."""
    return Op(ops(cls) + ops(tuple(args)) + pickle.NEWOBJ)


def newobj_ex(cls, args, kwargs):
    """NEWOBJ_EX: cls.__new__(cls, *args, **kwargs)."""
    return Op(ops(cls) + ops(tuple(args)) + ops(kwargs) + pickle.NEWOBJ_EX)


def inst(module, name, *args):
    """INST (protocol 0): module.name(*args)."""
    return Op(pickle.MARK + b"".join(ops(a) for a in args) + pickle.INST + f"{module}\n{name}\n".encode())


def obj(cls, *args):
    """OBJ (protocol 1): cls(*args)."""
    return Op(pickle.MARK + ops(cls) + b"".join(ops(a) for a in args) + pickle.OBJ)


def build(target, state):
    """BUILD: apply `state` to `target` (a dict, or a (dict, slotstate) pair for setattr)."""
    return Op(ops(target) + ops(state) + pickle.BUILD)


def persid(pid):
    """BINPERSID: the persistent id tuple torch resolves (storage records, legacy 'module' ids)."""
    return Op(ops(pid) + pickle.BINPERSID)


def pickle_of(value):
    """A whole protocol-2 pickle whose top object is `value`."""
    return pickle.PROTO + b"\x02" + ops(value) + pickle.STOP


def ordered_dict():
    return call(glob("collections", "OrderedDict"))


def tensor(key, numel, size, stride, offset=0, storage="FloatStorage"):
    """A tensor the way torch.save pickles one: _rebuild_tensor_v2 over a persistent storage record."""
    storage_op = persid(("storage", glob("torch", storage), key, "cpu", numel))
    return call(glob("torch._utils", "_rebuild_tensor_v2"), storage_op, offset, tuple(size), tuple(stride), False,
                ordered_dict())


def eval_cfg(marker):
    """A model YAML dict whose `activation` ultralytics' parse_model eval()s: touches `marker`."""
    return {"nc": 1, "activation": f"__import__('pathlib').Path({str(marker)!r}).touch() or nn.SiLU()",
            "backbone": [[-1, 1, "Conv", [8, 3, 2]]], "head": [[-1, 1, "nn.Identity", []]]}


# ---- torch zip archives --------------------------------------------------------------------------------
def read_zip(path):
    """(top folder, {name below it: bytes}) of a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        top = names[0].split("/")[0]
        return top, {n[len(top) + 1:]: z.read(n) for n in names}


def write_zip(path, top, records, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, data in records.items():
            z.writestr(f"{top}/{name}", data)
    return path


def swap(data, replacements):
    """Replace each sentinel string's BINUNICODE opcode in a pickle with a fragment (exactly once each)."""
    for sentinel, fragment in replacements.items():
        needle = ops(sentinel)
        assert data.count(needle) == 1, f"sentinel {sentinel!r} found {data.count(needle)} times"
        data = data.replace(needle, ops(fragment))
    return data


def rewrite(src, dst, replacements=None, data_pkl=None, records=None, compression=zipfile.ZIP_STORED):
    """Copy a torch.save zip with its data.pkl edited (or replaced) and extra records added."""
    top, recs = read_zip(src)
    recs["data.pkl"] = data_pkl if data_pkl is not None else swap(recs["data.pkl"], replacements or {})
    recs.update({f"data/{k}": v for k, v in (records or {}).items()})
    return write_zip(dst, top, recs, compression)


def patch_zip_sizes(path, name, size):
    """Make record `name`'s local and central headers claim `size` bytes, compressed and uncompressed."""
    data = bytearray(Path(path).read_bytes())
    with zipfile.ZipFile(path) as z:
        local = z.getinfo(name).header_offset
    struct.pack_into("<II", data, local + 18, size, size)
    raw = name.encode()
    central = data.find(b"PK\x01\x02")
    while data[central + 46:central + 46 + len(raw)] != raw or data[central + 28:central + 30] != struct.pack(
            "<H", len(raw)):
        central = data.find(b"PK\x01\x02", central + 4)
    struct.pack_into("<II", data, central + 20, size, size)
    Path(path).write_bytes(bytes(data))
    return path


def deflate_bomb(path, top, records, key, inflated_mib):
    """A torch zip of `records` (stored) plus record data/`key`, DEFLATE-compressed: ~1 KB per MiB of zeros
    it inflates to. zipfile cannot write pre-compressed data, so this writes the archive itself; after a full
    flush the compressor's output for the same input repeats, so one compressed MiB is repeated."""
    mib = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    stream = block * inflated_mib + c.flush()
    crc = 0
    for _ in range(inflated_mib):
        crc = zlib.crc32(mib, crc)
    entries = [(f"{top}/{name}", zipfile.ZIP_STORED, data, zlib.crc32(data), len(data))
               for name, data in records.items() if name != f"data/{key}"]
    entries.append((f"{top}/data/{key}", zipfile.ZIP_DEFLATED, stream, crc, inflated_mib << 20))
    return _write_raw_zip(path, entries)


def _write_raw_zip(path, entries):
    """entries: (name, method, data as stored, crc32 of the inflated data, inflated size)."""
    out, central = bytearray(), bytearray()
    for name, method, data, crc, size in entries:
        raw = name.encode()
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(data), size, len(raw), 0)
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, len(out)) + raw
        out += b"PK\x03\x04" + fields + raw + data
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    Path(path).write_bytes(bytes(out + central + end))
    return path


# ---- legacy formats ---------------------------------------------------------------------------------------
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def legacy_stream(main_pickle):
    """A torch < 1.6 (non-zip) file: magic, protocol, sys info, the main pickle, no storages."""
    sys_info = {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return (pickle.dumps(LEGACY_MAGIC, 2) + pickle.dumps(LEGACY_PROTOCOL, 2) + pickle.dumps(sys_info, 2)
            + main_pickle + pickle.dumps([], 2))


def tar_with_fifo(path):
    """A tar whose first member's name starts with 0x80 (so it sniffs as a pickle) and whose 'storages'
    member is a FIFO: torch's tar loader extracts it and blocks forever opening it."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        tar.addfile(tarfile.TarInfo("\x80pickle"))
        fifo = tarfile.TarInfo("storages")
        fifo.type = tarfile.FIFOTYPE
        tar.addfile(fifo)
    return path


# ---- the driver ----------------------------------------------------------------------------------------------
def _blocked(fullname):
    return any(fullname == p or fullname.startswith(p + ".") for p in BLOCKED_IMPORTS)


class ImportTripwire:
    """A meta-path finder that records and refuses imports of BLOCKED_IMPORTS (the import never runs)."""

    def __init__(self):
        self.attempts = []

    def find_spec(self, fullname, path=None, target=None):
        if _blocked(fullname):
            self.attempts.append(fullname)
            raise ImportError(f"import of {fullname} blocked by the test driver")
        return None


def _watched():
    """Functions and classes an attack could mutate process-wide (BUILD on a global, setattr on a class)."""
    import collections
    import copyreg
    import pathlib
    import types

    import torch
    from ultralytics.nn.modules import Conv
    from ultralytics.nn.tasks import BaseModel, DetectionModel

    return {"copyreg._reconstructor": copyreg._reconstructor, "copyreg.__newobj__": copyreg.__newobj__,
            "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
            "collections.OrderedDict": collections.OrderedDict, "types.SimpleNamespace": types.SimpleNamespace,
            "pathlib.PosixPath": pathlib.PosixPath, "pathlib.PurePosixPath": pathlib.PurePosixPath,
            "pathlib.Path": pathlib.Path, "torch.nn.Module": torch.nn.Module,
            "torch.nn.Identity": torch.nn.Identity, "torch.nn.Sequential": torch.nn.Sequential,
            "torch.nn.LSTM": torch.nn.LSTM, "ultralytics.nn.tasks.DetectionModel": DetectionModel,
            "ultralytics.nn.tasks.BaseModel": BaseModel, "ultralytics.nn.modules.Conv": Conv}


def _fingerprint(o):
    """Attribute name -> value object; compared by identity afterwards."""
    names = ("__defaults__", "__kwdefaults__", "__code__", "__name__", "__qualname__", "__module__", "__bases__")
    fp = {n: getattr(o, n) for n in names if hasattr(o, n)}
    fp.update({f"vars.{k}": v for k, v in vars(o).items()})
    return fp


def _same(a, b):
    """Identity, except for values C types rebuild on every access (their __name__ strings)."""
    return a is b or (type(a) is type(b) and type(a) in (str, int, bool, tuple) and a == b)


def _mutations(before):
    changed = []
    for label, o in _watched().items():
        now = _fingerprint(o)
        for key in sorted(set(before[label]) | set(now)):
            if key not in now or key not in before[label] or not _same(now[key], before[label][key]):
                changed.append(f"{label}.{key}")
    return changed


def _probes():
    """Behaviour a loaded checkpoint must not have changed in the loading process."""
    import copyreg
    import pathlib

    return {"PosixPath.stem": pathlib.PosixPath("/a/b.txt").stem == "b",
            "_reconstructor.__defaults__": copyreg._reconstructor.__defaults__ is None}


def _rss_mb():
    """This process's resident size now (a forked child starts well below its parent's)."""
    rss = _status_kb("VmRSS")
    return None if rss is None else rss // 1024


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _child(job, result_path):
    import resource
    import traceback

    import export
    from export.checkpoint.loader import CheckpointError

    limit = _status_kb("VmSize") * 1024 + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    log = os.open(Path(result_path).with_suffix(".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)  # the loader's (or a payload's) output, kept for the report
    os.dup2(log, 2)
    os.chdir(job["cwd"])  # anything written at a relative path lands where the test looks for it
    tripwire = ImportTripwire()
    sys.meta_path.insert(0, tripwire)
    before = {label: _fingerprint(o) for label, o in _watched().items()}
    modules_before = set(sys.modules)
    result = {"watch_before": [m for m in job.get("watch", []) if m in sys.modules], "rss_start_mb": _rss_mb()}
    started, cpu_started = time.monotonic(), time.process_time()
    try:
        export.load(job["weights"])
        result["outcome"] = "loaded"
    except CheckpointError as e:
        result.update(outcome="refused", error_types=[c.__name__ for c in type(e).__mro__],
                      exit_code=getattr(e, "exit_code", None), message=str(e))
    except BaseException as e:  # noqa: BLE001 - anything else is a loader bug the test reports
        result.update(outcome="crashed", error=f"{type(e).__name__}: {e}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
    # The attacked call alone, not the fork and the checks around it: CPU time is what a DoS burns and holds on a
    # loaded machine; wall time also counts waits (reads, a machine shared with other work).
    result["call_wall_s"] = round(time.monotonic() - started, 3)
    result["call_cpu_s"] = round(time.process_time() - cpu_started, 3)
    result["imports_blocked"] = tripwire.attempts
    result["new_modules"] = sorted(m for m in set(sys.modules) - modules_before if m.startswith(OBSERVED_IMPORTS))
    result["watch_after"] = [m for m in job.get("watch", []) if m in sys.modules]
    result["mutated"] = _mutations(before)
    result["probes"] = _probes()
    Path(result_path).write_text(json.dumps(result))


def _start(job, workdir):
    result_path = workdir / (job["id"].replace("/", "__") + ".json")
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _child(job, result_path)
        except BaseException:  # noqa: BLE001 - never fall back into the parent's loop; say why instead
            import traceback

            result_path.with_suffix(".crash").write_text(traceback.format_exc())
            code = 70
        os._exit(code)
    return pid, result_path, time.monotonic()


def _finish(job, status, rusage, started, result_path, baseline_kb):
    run = {"id": job["id"], "wall_s": round(time.monotonic() - started, 2),
           "cpu_s": round(rusage.ru_utime + rusage.ru_stime, 2) if rusage else None,
           "maxrss_mb": round(rusage.ru_maxrss / 1024) if rusage else None, "baseline_mb": round(baseline_kb / 1024)}
    if status is None:
        run.update(status="timeout")
    elif os.WIFSIGNALED(status):
        run.update(status="signalled", signal=os.WTERMSIG(status))
    else:
        run.update(status="exited", code=os.WEXITSTATUS(status))
    run["result"] = json.loads(result_path.read_text()) if result_path.exists() else None
    log = result_path.with_suffix(".log")
    run["output_tail"] = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    crash = result_path.with_suffix(".crash")
    run["driver_error"] = crash.read_text()[-3000:] if crash.exists() else None
    return run


def drive(jobs, workdir, parallel):
    """Run every job in its own forked child, at most `parallel` at a time; returns {id: run}."""
    import resource

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pending, running, runs = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            pid, result_path, started = _start(job, workdir)
            running[pid] = (job, result_path, started)
        for pid, (job, result_path, started) in list(running.items()):
            done, status, rusage = os.wait4(pid, os.WNOHANG)
            if done:
                runs[job["id"]] = _finish(job, status, rusage, started, result_path, baseline_kb)
            elif time.monotonic() - started > TIMEOUT_S:
                os.kill(pid, 9)
                _, _, rusage = os.wait4(pid, 0)
                runs[job["id"]] = _finish(job, None, rusage, started, result_path, baseline_kb)
            else:
                continue
            del running[pid]
        time.sleep(0.02)
    return runs



def main(jobs_path, results_path):
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401 - imported once here so every forked child starts warm
    import ultralytics.nn.tasks  # noqa: F401

    import export  # noqa: F401

    jobs = json.loads(Path(jobs_path).read_text())
    workdir = Path(results_path).parent / "driver"
    workdir.mkdir(exist_ok=True)
    parallel = max(2, os.cpu_count() or 2)
    Path(results_path).write_text(json.dumps(drive(jobs, workdir, parallel)))


if __name__ == "__main__":
    main(*sys.argv[1:])
