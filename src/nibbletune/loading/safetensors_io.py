"""Checked, streaming reading of safetensors checkpoints (one file or index-sharded).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`) and a
data region whose offsets are relative to byte 8 + N. `open_checkpoint` checks every header
against the file size before anything is built, so a truncated or corrupt file fails with
one FormatError naming the file and no partial model is returned. Tensors are then read one
at a time, each with one positioned read of its byte range into a fresh tensor, so peak memory
stays near the largest tensor rather than the checkpoint size.

Why not `safetensors.safe_open`: its memory map keeps every page that was read resident in
this process until the file is closed (measured: reading 206 MB of one shard raised RSS by
208 MiB), so a single-file checkpoint would cost its whole size in RSS. The tests check
`read_tensor` against safe_open.

Pickle checkpoints (`pytorch_model.bin`, `*.pt`, `*.pth`, `*.ckpt`) are refused: loading them
runs arbitrary code.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it holds, read from a safetensors header."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: torch.Size
    offset: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check the header of one safetensors file; raise FormatError naming the file.

    Checks: header length within the file, valid JSON, known dtypes, integer shapes, each
    tensor's byte range equal to numel * itemsize and inside the data region, no overlaps.
    """
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise FormatError(f"{file}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise FormatError(
                    f"{file}: truncated or corrupt safetensors file (header claims {header_len} bytes, file has {size})"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise FormatError(f"{file}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError(f"{file}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - header_len
    infos, ranges = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, itemsize = DTYPES[entry["dtype"]]
            shape = torch.Size(int(s) for s in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{file}: corrupt header entry for tensor '{name}': {entry!r}") from None
        if any(s < 0 for s in shape) or end - begin != math.prod(shape) * itemsize or begin < 0:
            raise FormatError(f"{file}: tensor '{name}' has byte range {begin}:{end} inconsistent with shape {list(shape)}")
        if end > data_len:
            raise FormatError(
                f"{file}: truncated safetensors file: tensor '{name}' ends at byte {end} of a {data_len}-byte data region"
            )
        ranges.append((begin, end, name))
        infos[name] = TensorInfo(name, file, dtype, shape, 8 + header_len + begin, end - begin)
    ranges.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(ranges, ranges[1:]):
        if begin < prev_end:
            raise FormatError(f"{file}: corrupt safetensors file: tensors '{prev}' and '{name}' overlap")
    return infos


def find_weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory: the index's shards, model.safetensors, or all *.safetensors.

    Raises FormatError for a missing directory, an index naming absent shards, a directory that
    holds only pickle checkpoints (refused), or one without weights.
    """
    root = Path(path)
    if not root.is_dir():
        raise FormatError(f"{root}: not a directory")
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise FormatError(f"{index}: not a valid safetensors index (expected a 'weight_map' object)") from None
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise FormatError(f"{index}: shard file {missing[0]} is missing ({len(missing)} of {len(shards)} missing)")
        return [root / s for s in shards]
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    files = sorted(root.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise FormatError(
            f"{root}: only pickle checkpoints found ({', '.join(pickles[:3])}); nibbletune reads safetensors only "
            "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
        )
    raise FormatError(f"{root}: no model weights found (expected {SINGLE_NAME} or {INDEX_NAME})")


class Checkpoint:
    """A validated set of safetensors files, read one tensor at a time.

    `infos` maps each tensor name to its TensorInfo (file, dtype, shape, byte range) without
    reading data; `get(name)` reads one tensor. Use as a context manager (or call `close()`) to
    release the file handle.
    """

    def __init__(self, files: list[Path]):
        self.files = files
        self.infos: dict[str, TensorInfo] = {}
        for file in files:
            for name, info in read_header(file).items():
                if name in self.infos:
                    raise FormatError(f"{file}: tensor '{name}' also appears in {self.infos[name].file}")
                self.infos[name] = info
        self._handles: dict[Path, object] = {}  # at most one open file

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into a fresh CPU tensor."""
        info = self.infos.get(name)
        if info is None:
            raise FormatError(f"tensor '{name}' is not in the checkpoint ({self.files[0].parent})")
        handle = self._handles.get(info.file)
        if handle is None:
            self.close()  # one file open at a time; reads are grouped by file anyway
            try:
                handle = open(info.file, "rb", buffering=0)
            except OSError as exc:
                raise FormatError(f"{info.file}: cannot open ({exc.strerror})") from None
            self._handles[info.file] = handle
        return read_tensor(handle, info)

    def close(self) -> None:
        """Close the open file handle."""
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_tensor(handle, info: TensorInfo) -> torch.Tensor:
    """Read `info`'s bytes from an open binary file into a new tensor of its dtype and shape."""
    data = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(data.numpy()) if info.nbytes else memoryview(b"")
    handle.seek(info.offset)
    done = 0
    while done < info.nbytes:
        count = handle.readinto(view[done:])
        if not count:
            raise FormatError(f"{info.file}: file ended inside tensor '{info.name}' (changed while reading?)")
        done += count
    return data.view(info.dtype).reshape(info.shape)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Find and validate the safetensors files of `path` (a directory or one .safetensors file)."""
    target = Path(path)
    if target.is_file():
        if target.suffix in PICKLE_SUFFIXES:
            raise FormatError(f"{target}: pickle checkpoints are refused; nibbletune reads safetensors only")
        return Checkpoint([target])
    return Checkpoint(find_weight_files(target))
