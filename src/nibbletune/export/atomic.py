"""Writing outputs so that a half-written one is never presented as complete.

Every export writes into a hidden staging directory (or file) next to its destination and
renames it into place only after the last byte is written and checked. A failure (or Ctrl-C)
removes the staging copy; an existing destination is refused unless `overwrite` is set, and
then replaced only at the very end.

`ShardWriter` writes a safetensors checkpoint shard by shard: tensors are buffered until the
shard reaches `max_shard_bytes`, written, and dropped, so peak memory is about one shard plus
one tensor. Shards get their final `model-0000i-of-0000N.safetensors` names (and the index its
weight map) when the writer is closed, since N is only known then.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import NibbletuneError
from ..native import return_freed_memory

DEFAULT_SHARD_BYTES = 1 << 30
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


class OutputExistsError(NibbletuneError, FileExistsError):
    """The output path exists and --overwrite was not given."""


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output (unless `overwrite`) or a parent path that is not a directory; return the path.

    A missing parent is fine: `staged_output` creates it (`merge BASE ADAPTER out/merged`).
    """
    target = Path(out)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target}: already exists (pass --overwrite to replace it)")
    parent = target.parent.resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NibbletuneError(f"{target}: {parent} is not a directory")
    return target


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, overwrite: bool = False, is_dir: bool = True) -> Iterator[Path]:
    """Yield a staging path next to `out`; on success rename it to `out`, on any error delete it.

    The staging name starts with a dot and ends in `.partial`, so a listing shows it is not a
    finished output even if the process is killed before the cleanup runs.
    """
    target = check_output(out, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"
    if is_dir:
        staging.mkdir()
    try:
        yield staging
    except BaseException:
        _remove(staging)
        raise
    if target.exists():  # only reachable with overwrite
        old = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
        target.rename(old)
        staging.rename(target)
        _remove(old)
    else:
        staging.rename(target)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files found in `src` to `dst`; return their names."""
    copied = []
    for name in TOKENIZER_FILES:
        source = Path(src) / name
        if source.is_file():
            shutil.copy2(source, Path(dst) / name)
            copied.append(name)
    return copied


def copy_if_present(src: str | os.PathLike, dst: str | os.PathLike, names: tuple[str, ...]) -> list[str]:
    """Copy the named files of `src` that exist into `dst`."""
    copied = []
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def copy_model_extras(src: str | os.PathLike, dst: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None):
    """The tokenizer (from `tokenizer_from` when it has tokenizer files, else from `src`) and generation config
    of a model into `dst`; a GGUF source's tokenizer is written out as transformers tokenizer files."""
    from ..loading.model_files import save_tokenizer

    if tokenizer_from is not None and any((Path(tokenizer_from) / name).is_file() for name in TOKENIZER_FILES):
        copy_tokenizer_files(tokenizer_from, dst)
    elif not save_tokenizer(src, Path(dst)):
        copy_tokenizer_files(src, dst)
    if Path(src).is_dir():
        copy_if_present(src, dst, ("generation_config.json",))


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented, key-sorted JSON (the layout transformers uses)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


class ShardWriter:
    """Write tensors into size-bounded safetensors shards plus `model.safetensors.index.json`.

    A single shard is written as `model.safetensors` with no index, like transformers does.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_storages: set[int] = set()
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; flush the current shard first if it would overflow."""
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        if name in self._pending or any(name in keys for _, keys in self._shards):
            raise NibbletuneError(f"tensor '{name}' written twice")
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in self._pending_storages or storage.nbytes() > nbytes:
            # codebooks are shared between weights (safetensors refuses aliases), and a view would
            # keep its whole parent buffer alive until the shard is written
            tensor = tensor.clone()
        self._pending_storages.add(tensor.untyped_storage().data_ptr())
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        """Write the queued tensors as one shard and release them."""
        if not self._pending:
            return
        path = self.directory / f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_storages = set()
        self._pending_bytes = 0
        return_freed_memory()

    def close(self) -> list[str]:
        """Flush, give the shards their final names, write the index; return the file names."""
        self.flush()
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.directory / "model.safetensors")
            return ["model.safetensors"]
        count = len(self._shards)
        weight_map, names = {}, []
        for i, (path, keys) in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(self.directory / name)
            names.append(name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.directory / "model.safetensors.index.json", index)
        return names


def directory_bytes(path: Path) -> int:
    """Total size of the regular files in `path` (recursively)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
