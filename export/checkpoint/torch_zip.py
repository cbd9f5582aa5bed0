"""Read a torch.save zip archive ourselves, with every size checked against the bytes actually there.

torch.save writes one folder holding data.pkl, one uncompressed record per storage (data/<key>),
byteorder and version. We accept exactly that shape: stored (uncompressed) records only, their total
bounded by the file size, one data.pkl of bounded size, storages whose declared element counts match
their records byte for byte. Nothing is extracted to disk; records are read (CRC-checked) into tensors.
"""

import re
import struct
import sys
import zipfile
from dataclasses import dataclass, field

import torch

from export.checkpoint.safe_pickle import ExpansionBudget, LoadedStorage, Refused

MAX_ENTRIES = 100_000
MAX_CENTRAL_DIRECTORY = 16 << 20  # a yolov8x checkpoint's is ~70 KB (about 100 bytes a record)
MAX_PICKLE_BYTES = 16 << 20  # a YOLO data.pkl is 0.1-0.2 MB (yolov8n): the weights live in the storage records
RECORD_KEY = re.compile(r"^[A-Za-z0-9_.]{1,64}$")


class NotTorchZip(Exception):
    """A zip archive that is not a torch.save checkpoint; str(e) says what it is instead."""


@dataclass
class TorchZip:
    archive: zipfile.ZipFile
    prefix: str  # the archive's top folder, e.g. "archive/"
    big_endian: bool
    storages: dict = field(default_factory=dict)  # key -> LoadedStorage
    expansion: ExpansionBudget = field(default_factory=ExpansionBudget)

    def pickle_bytes(self):
        return self.archive.read(self.prefix + "data.pkl")

    def storage(self, key, dtype, numel):
        """persistent_load's answer for ('storage', dtype, key, location, numel)."""
        if key in self.storages:
            loaded = self.storages[key]
            if loaded.dtype != dtype or loaded.numel != numel:
                raise Refused(f"storage record {key} referenced with two different types or sizes")
            return loaded
        if not RECORD_KEY.match(key):
            raise Refused(f"a storage key {key[:40]!r} that torch.save does not write")
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise Refused(f"a tensor whose storage record {name} is missing") from None
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes:
            raise Refused(f"storage record {name} holds {info.file_size} bytes, not the {nbytes} its tensor declares")
        self.storages[key] = LoadedStorage(self._read(info, nbytes, dtype), dtype, self.expansion)
        return self.storages[key]

    def _read(self, info, nbytes, dtype):
        data = torch.empty(nbytes, dtype=torch.uint8)
        with self.archive.open(info) as f:  # zipfile checks the CRC once the record is read to its end
            if nbytes and f.readinto(data.numpy()) != nbytes or f.read(1):
                raise Refused(f"storage record {info.filename} is shorter or longer than its header says")
        storage = data.untyped_storage()
        if self.big_endian != (sys.byteorder == "big") and dtype.itemsize > 1:
            storage.byteswap(dtype)
        return storage


def open_torch_zip(path, file_size):
    """Open and vet a torch.save archive; raises NotTorchZip (not ours) or Refused (unsafe)."""
    _check_central_directory(path, file_size)  # zipfile reads and parses the whole directory when it opens
    archive = zipfile.ZipFile(path)
    try:
        infos = archive.infolist()
        prefix = _top_folder(infos)  # what kind of archive first, for the message; then is it safe
        _check_records(infos, file_size)
        order = archive.read(prefix + "byteorder") if prefix + "byteorder" in archive.NameToInfo else b"little"
        if order not in (b"little", b"big"):
            raise Refused(f"an unknown byte order {order[:16]!r}")
        return TorchZip(archive, prefix, order == b"big")
    except BaseException:
        archive.close()
        raise


EOCD, EOCD64, LOCATOR64 = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"


def _check_central_directory(path, file_size):
    """The end-of-central-directory record (and its zip64 form) read first: the directory's entry count and
    size must be within our limits and inside the file before zipfile reads it (about 0.3 us a byte: a
    directory padded to hundreds of MB would take minutes). Raises BadZipFile or Refused."""
    with open(path, "rb") as f:
        tail_size = min(file_size, (1 << 16) + 22)
        f.seek(file_size - tail_size)
        tail = f.read(tail_size)
        at = tail.rfind(EOCD)
        if at < 0 or len(tail) - at < 22:
            raise zipfile.BadZipFile("no end-of-central-directory record")
        entries, size, offset = struct.unpack("<10xHII", tail[at:at + 20])
        if 0xFFFF in (entries,) or 0xFFFFFFFF in (size, offset):  # zip64: the real numbers are in its record
            locator = tail[at - 20:at]
            if at < 20 or not locator.startswith(LOCATOR64):
                raise zipfile.BadZipFile("a zip64 archive without its locator")
            (record,) = struct.unpack("<8xQ", locator[:16])
            if record + 56 > file_size:
                raise zipfile.BadZipFile("a zip64 record past the end of the file")
            f.seek(record)
            head = f.read(56)
            if not head.startswith(EOCD64):
                raise zipfile.BadZipFile("no zip64 end-of-central-directory record")
            entries, size, offset = struct.unpack("<32xQQQ", head)
    if entries > MAX_ENTRIES or size > MAX_CENTRAL_DIRECTORY:
        raise Refused(f"a zip directory of {entries} records and {size >> 10} KiB (at most {MAX_ENTRIES} records and "
                      f"{MAX_CENTRAL_DIRECTORY >> 20} MiB; torch.save writes a few KiB)")
    if offset + size > file_size:
        raise zipfile.BadZipFile("a central directory past the end of the file")


def _check_records(infos, file_size):
    if len(infos) > MAX_ENTRIES:
        raise Refused(f"more than {MAX_ENTRIES} zip records")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise Refused("two zip records with the same name")
    compressed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED or i.compress_size != i.file_size]
    if compressed:
        raise Refused(f"a compressed zip record ({compressed[0].filename}, method {compressed[0].compress_type}); "
                      f"torch.save stores records uncompressed, and a compressed one can inflate without bound")
    if sum(i.file_size for i in infos) > file_size:
        raise Refused("zip records whose sizes add up to more than the file")


def _top_folder(infos):
    names = [i.filename for i in infos]
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise NotTorchZip("a TorchScript archive (torch.jit.save), not a training checkpoint")
    pickles = [i for i in infos if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise NotTorchZip("a zip archive but not a PyTorch checkpoint (no single <folder>/data.pkl)")
    if pickles[0].file_size > MAX_PICKLE_BYTES:
        raise Refused(f"a data.pkl of {pickles[0].file_size >> 20} MiB (a checkpoint's is a few MiB)")
    return pickles[0].filename[: -len("data.pkl")]
