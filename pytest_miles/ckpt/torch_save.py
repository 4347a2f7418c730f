"""`torch.save` files and blobs (the zip format of torch >= 1.6) read without torch and without
running anything: the archive is checked (stored entries, inside the file), its `data.pkl` goes
through the restricted unpickler, and its tensors become `LazyTensor`s over the file's bytes.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from typing import Any

from pytest_miles._files import SafeFile
from pytest_miles.ckpt.lazy import check_tensors
from pytest_miles.ckpt.unpickle import RestrictedUnpickler, check_memo, refusal, unshare
from pytest_miles.errors import CheckpointError, UnsafePickle

__all__ = ["load_torch"]


class _Window(io.RawIOBase):
    """A seekable read-only view of bytes [base, base + size) of a SafeFile, for zipfile."""

    def __init__(self, f: SafeFile, base: int = 0, size: int | None = None) -> None:
        self.f, self.pos, self.base = f, 0, base
        self.size = f.size - base if size is None else size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos)
        return self.pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        data = self.f.pread(self.base + self.pos, n) if n else b""
        b[:n] = data
        self.pos += n
        return n


def load_torch(source: str | os.PathLike | bytes, where: str | None = None, span: tuple[int, int] | None = None) -> Any:
    """A `torch.save` file (path) or blob (bytes): the object with `LazyTensor` leaves.

    `span`: (offset, length) of a blob inside the file `source` (a DCP item), read in place: only its
    zip directory and pickle, not its tensor bytes. Only the zip format (torch >= 1.6) is read;
    entries must be stored, not compressed (as torch writes them), and lie inside the file."""
    where = where or str(source)
    fh: SafeFile | None = None
    base = span[0] if span is not None else 0
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            raw: Any = io.BytesIO(source)
            size, head = len(source), bytes(source[:4])
        else:
            fh = SafeFile(source)
            if span is not None and (span[0] < 0 or span[1] < 0 or span[0] + span[1] > fh.size):
                raise CheckpointError(f"{where}: bytes [{span[0]}, {span[0] + span[1]}) are outside the file")
            raw = _Window(fh, base, span[1] if span is not None else None)
            size = raw.size
            head = fh.pread(base, min(4, size))
        if size == 0:
            raise CheckpointError(f"{where}: empty file")
        if head != b"PK\x03\x04":
            raise CheckpointError(f"{where}: not a torch zip archive (legacy torch.save format or not a torch "
                                  "file; only the zip format of torch >= 1.6 is read)")
        try:
            z = zipfile.ZipFile(raw)
            infos = z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            # NotImplementedError: zipfile's answer to a damaged "version needed" field ("zip file version 6.4")
            raise CheckpointError(f"{where}: corrupt or truncated torch file ({exc})") from None
        pkls = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
        if len(pkls) != 1:
            raise CheckpointError(f"{where}: corrupt torch file ({len(pkls)} data.pkl entries)")
        prefix = pkls[0].filename[: -len("data.pkl")]
        entries: dict[str, tuple[int, int]] = {}
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{where}: entry {info.filename} is compressed "
                                      "(torch stores entries uncompressed)")
            local = raw_pread(raw, info.header_offset, 30, where)
            if local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{where}: corrupt torch file (bad local header for {info.filename})")
            n, m = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + n + m
            if start + info.file_size > size:
                raise CheckpointError(f"{where}: truncated: entry {info.filename} ends at byte "
                                      f"{start + info.file_size}, file has {size}")
            if info.filename.startswith(prefix + "data/"):
                entries[info.filename[len(prefix) + 5:]] = (base + start, info.file_size)
        pstart, plen = raw_pread_span(pkls[0], raw, where)
        data = raw_pread(raw, pstart, plen, where)
        src = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
        check_memo(data, where)
        try:
            obj = RestrictedUnpickler(io.BytesIO(data), src, entries, where).load()
        except UnsafePickle as exc:
            raise refusal(where, exc) from None
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{where}: corrupt torch file ({type(exc).__name__}: {exc})") from None
        obj = unshare(obj, where)
        check_tensors(obj, where)
        return obj
    finally:
        if fh is not None:
            fh.close()


def raw_pread(raw: Any, offset: int, length: int, where: str) -> bytes:
    if offset < 0 or length < 0:  # a damaged zip directory (header offset before the archive's start)
        raise CheckpointError(f"{where}: corrupt torch file (an entry at byte {offset}, {length} bytes long: "
                              "outside the archive)")
    raw.seek(offset)
    data = raw.read(length)
    if len(data) != length:
        raise CheckpointError(f"{where}: truncated at byte {offset + len(data)}")
    return data


def raw_pread_span(info: zipfile.ZipInfo, raw: Any, where: str) -> tuple[int, int]:
    local = raw_pread(raw, info.header_offset, 30, where)
    n, m = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + n + m, info.file_size
