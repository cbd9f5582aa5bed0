"""Mutation plans for a torch.save checkpoint, and a driver that loads each mutant with export.load.

    python -m tests.fuzz_driver BASE.pt PLAN.json WORKDIR

The driver runs in its own process so that a segfault (negative return code) or a hang (faulthandler
dumps the stack and exits 1) is seen by the test instead of taking the test session down. Per case it
prints `start <i>` before loading (the last one names the culprit of a crash) and then one JSON line:
{"i", "case", "outcome": "ok" | "refused" | "other", "error"}. It ends with {"done": <count>}.
Mutants that give "other" are kept as WORKDIR/other-<i>.pt for reproduction.

Two arms, because every zip record carries a CRC-32 and most raw-byte mutations stop at that check:
  raw-*  mutate or truncate the file itself, biased to the zip structure (local headers, data
         descriptors, central directory, end records) where a hand-written zip reader can go wrong;
  pkl-*  mutate only data.pkl and put it back into a valid archive with a fresh CRC, so the mutant
         reaches the unpickler and the object-graph checks behind it.
"""

import faulthandler
import json
import pickletools
import random
import resource
import shutil
import struct
import sys
import zipfile
import zlib
from io import BytesIO
from pathlib import Path

PER_CASE_TIMEOUT_S = 20  # a real load takes well under a second; anything this slow is a hang
ADDRESS_SPACE_LIMIT = 10 << 30  # importing torch maps ~4 GiB; a mutated size must fail, not OOM the machine
VALID_OPCODES = sorted({op.code.encode("latin-1")[0] for op in pickletools.opcodes})


# ---- zip layout --------------------------------------------------------------------------------------
def central_directory_offsets(data, start_dir):
    """filename -> offset of its central directory entry."""
    offsets, pos = {}, start_dir
    while data[pos:pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", data, pos + 28)
        offsets[data[pos + 46:pos + 46 + n].decode("utf-8")] = pos
        pos += 46 + n + m + k
    return offsets


def records(data):
    """Per record: name, local header offset, data start, data end, central directory entry offset, flags."""
    with zipfile.ZipFile(BytesIO(data)) as z:
        infos, start_dir = z.infolist(), z.start_dir
    cd = central_directory_offsets(data, start_dir)
    out = []
    for info in infos:
        n, m = struct.unpack_from("<HH", data, info.header_offset + 26)
        begin = info.header_offset + 30 + n + m
        out.append({"name": info.filename, "header": info.header_offset, "begin": begin,
                    "end": begin + info.compress_size, "cd": cd[info.filename], "flags": info.flag_bits})
    return out, start_dir


def pickle_record(data):
    recs, _ = records(data)
    return next(r for r in recs if r["name"].endswith("/data.pkl"))


def patch_record_in_place(data, rec, payload):
    """Same-length replacement of one record's bytes, CRC-32 fixed wherever the archive stores it, so
    everything else (torch's 64-byte alignment included) stays byte-identical."""
    assert len(payload) == rec["end"] - rec["begin"]
    out = bytearray(data)
    out[rec["begin"]:rec["end"]] = payload
    crc = struct.pack("<I", zlib.crc32(payload))
    out[rec["cd"] + 16:rec["cd"] + 20] = crc
    if rec["flags"] & 0x8:  # sizes and CRC follow the data in a descriptor, optionally signed
        at = rec["end"] + (4 if out[rec["end"]:rec["end"] + 4] == b"PK\x07\x08" else 0)
        out[at:at + 4] = crc
    else:
        out[rec["header"] + 14:rec["header"] + 18] = crc
    return bytes(out)


def repack(data, name, payload):
    """Length-changing replacement: rewrite the archive with Python's zipfile (ZIP_STORED, fresh CRCs)."""
    buf = BytesIO()
    with zipfile.ZipFile(BytesIO(data)) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, payload if info.filename == name else src.read(info))
    return buf.getvalue()


# ---- mutations ---------------------------------------------------------------------------------------
def mutate(data, case):
    kind, offset, value = case["kind"], case.get("offset"), case.get("value")
    if kind == "baseline":
        return data
    if kind == "raw-set":
        return data[:offset] + bytes([value]) + data[offset + 1:]
    if kind == "raw-truncate":
        return data[:offset]
    rec = pickle_record(data)
    pkl = data[rec["begin"]:rec["end"]]
    if kind in ("pkl-set", "pkl-flip"):
        byte = value if kind == "pkl-set" else pkl[offset] ^ (1 << value)
        return patch_record_in_place(data, rec, pkl[:offset] + bytes([byte]) + pkl[offset + 1:])
    if kind == "pkl-delete":
        new = pkl[:offset] + pkl[offset + 1:]
    elif kind == "pkl-insert":
        new = pkl[:offset] + bytes([value]) + pkl[offset:]
    elif kind == "pkl-truncate":
        new = pkl[:offset]
    elif kind == "baseline-repack":
        new = pkl
    else:
        raise ValueError(f"unknown mutation kind {kind}")
    return repack(data, rec["name"], new)


def case_id(case):
    return f"{case['kind']}@{case.get('offset')}={case.get('value')}"


def structural_offsets(data):
    """Every byte of zip bookkeeping: local headers, data descriptors, the central directory and end records."""
    recs, start_dir = records(data)
    spans = [(r["header"], r["begin"]) for r in recs]
    spans += [(r["end"], r["end"] + 24) for r in recs if r["flags"] & 0x8]
    spans.append((start_dir, len(data)))
    return sorted({i for a, b in spans for i in range(a, min(b, len(data)))})


def make_plan(data, seed, raw_structural=100, raw_uniform=20, raw_truncate=30, pkl_opcode=100, pkl_uniform=60,
              pkl_flip=40, pkl_shift=20, pkl_truncate=15):
    """A deterministic list of mutation cases (dicts) for the checkpoint bytes `data`."""
    rng = random.Random(seed)
    rec = pickle_record(data)
    pkl = data[rec["begin"]:rec["end"]]
    opcode_at = [pos for _, _, pos in pickletools.genops(pkl)]
    structure = structural_offsets(data)
    _, start_dir = records(data)

    def byte_value():  # half the time a valid opcode, so mutants parse further than a random byte would
        return rng.choice(VALID_OPCODES) if rng.random() < 0.5 else rng.randrange(256)

    plan = [{"kind": "baseline"}, {"kind": "baseline-repack"}]
    plan += [{"kind": "raw-set", "offset": rng.choice(structure), "value": rng.randrange(256)}
             for _ in range(raw_structural)]
    plan += [{"kind": "raw-set", "offset": rng.randrange(len(data)), "value": rng.randrange(256)}
             for _ in range(raw_uniform)]
    cut_ranges = [(1, len(data)), (start_dir, len(data)), (1, rec["end"] + 4096)]  # anywhere, in the CD, early
    plan += [{"kind": "raw-truncate", "offset": rng.randrange(*cut_ranges[i % 3])} for i in range(raw_truncate)]
    plan += [{"kind": "pkl-set", "offset": rng.choice(opcode_at), "value": byte_value()} for _ in range(pkl_opcode)]
    plan += [{"kind": "pkl-set", "offset": rng.randrange(len(pkl)), "value": rng.randrange(256)}
             for _ in range(pkl_uniform)]
    plan += [{"kind": "pkl-flip", "offset": rng.randrange(len(pkl)), "value": rng.randrange(8)}
             for _ in range(pkl_flip)]
    plan += [{"kind": "pkl-delete", "offset": rng.choice(opcode_at)} for _ in range(pkl_shift // 2)]
    plan += [{"kind": "pkl-insert", "offset": rng.choice(opcode_at), "value": byte_value()}
             for _ in range(pkl_shift - pkl_shift // 2)]
    plan += [{"kind": "pkl-truncate", "offset": rng.randrange(len(pkl))} for _ in range(pkl_truncate)]
    return plan


# ---- the driver --------------------------------------------------------------------------------------
def classify(load, error_type, path):
    """("ok" | "refused" | "other", detail) for one load of `path`."""
    try:
        loaded = load(path)
    except error_type as e:
        message = str(e)
        if not message or "\n" in message or getattr(e, "exit_code", None) != 2:
            return "other", f"{type(e).__name__} without a one-line message / exit code 2: {message!r}"
        return "refused", message
    except BaseException as e:  # noqa: BLE001 - anything but CheckpointError breaks the contract
        tb = e.__traceback__
        while tb.tb_next:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        return "other", f"{type(e).__name__}: {str(e)[:300]} (raised at {where})"
    if type(loaded).__name__ != "LoadedCheckpoint":
        return "other", f"load returned {type(loaded).__name__}"
    return "ok", ""


def main(base, plan_file, workdir):
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    faulthandler.enable()  # a segfault prints the Python stack of the crashing case to stderr
    import torch

    import export  # after the limits: the import itself is part of what is being checked
    from export.checkpoint.loader import CheckpointError

    torch.set_num_threads(1)  # tiny tensors: extra threads only oversubscribe a small (CI) machine, ~4x slower

    data = Path(base).read_bytes()
    plan = json.loads(Path(plan_file).read_text())
    workdir = Path(workdir)
    path = workdir / "case.pt"
    for i, case in enumerate(plan):
        path.write_bytes(mutate(data, case))
        print(f"start {i} {case_id(case)}", flush=True)
        faulthandler.dump_traceback_later(PER_CASE_TIMEOUT_S, exit=True)
        outcome, detail = classify(export.load, CheckpointError, path)
        faulthandler.cancel_dump_traceback_later()
        if outcome == "other":
            shutil.copy(path, workdir / f"other-{i}.pt")
        print(json.dumps({"i": i, "case": case_id(case), "outcome": outcome, "error": detail}), flush=True)
    print(json.dumps({"done": len(plan)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
