"""Native code: the project's small C kernels, built on first use with a per-machine cache, and libc's
malloc_trim for handing freed heap memory back to the OS.

The kernels (`quant/csrc/*.c`, `modules/csrc/*.c`) include no torch headers, so the system C
compiler builds each in about a second and nothing is compiled at install time. A library is
cached at `$XDG_CACHE_HOME/nibbletune/kernels/<key>/<name>.so` (default `~/.cache`), where the
key hashes the source, the flags, the CPU flags and the compiler's version, so another machine
or compiler never loads a stale binary. It is compiled to a temporary name and moved into
place with os.replace, so concurrent processes never load a half-written file; when the cache
is not writable it is built in a private temporary directory instead.

Callers load the result with ctypes and fall back to a pure-torch path when this raises.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)


def kernels_enabled() -> bool:
    """False when NIBBLETUNE_NO_KERNELS=1 forces the pure-PyTorch paths."""
    return os.environ.get("NIBBLETUNE_NO_KERNELS", "") not in ("1", "true", "yes")


def find_compiler() -> str | None:
    """Path of the C compiler to use: $CC, then cc, then gcc; None when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def kernel_cache_root() -> Path:
    """Directory holding the compiled kernels of this user."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nibbletune" / "kernels"


def _build_key(compiler: str, source: bytes, cflags: tuple[str, ...]) -> str:
    from .devices import cpu_flags

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256()
    for part in (source, " ".join(cflags).encode(), " ".join(sorted(cpu_flags())).encode(),
                 compiler.encode(), version.encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def _compile(compiler: str, source_path: Path, cflags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run(
            [compiler, *cflags, "-o", temporary, str(source_path)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load_c_library(source_path: Path, cflags: tuple[str, ...], compiler: str | None) -> ctypes.CDLL:
    """Compile `source_path` with `cflags` (or reuse the cached build) and load it with ctypes.

    Raises RuntimeError when there is no compiler or the build fails.
    """
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    source = source_path.read_bytes()
    name = source_path.stem + ".so"
    target = kernel_cache_root() / _build_key(compiler, source, cflags) / name
    if not target.exists():
        try:
            _compile(compiler, source_path, cflags, target)
        except OSError:
            target = Path(tempfile.mkdtemp(prefix="nibbletune-kernels-")) / name
            _compile(compiler, source_path, cflags, target)
    return ctypes.CDLL(str(target))


class LazyLibrary:
    """A C kernel library built and loaded on first `get()`; None (one warning) when that fails.

    `configure` declares the ctypes signatures of the loaded library. `cflags` and `compiler`
    (a callable returning the compiler's path) are attributes so tests can build variants;
    `reset()` forgets the loaded library and any earlier failure.
    """

    def __init__(self, source: Path, cflags: tuple[str, ...], configure: Callable[[ctypes.CDLL], None],
                 description: str):
        self.source, self.cflags, self.configure, self.description = source, cflags, configure, description
        self.compiler: Callable[[], str | None] = find_compiler
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget the loaded library and any failure, so the next `get()` builds again."""
        self._library: ctypes.CDLL | None = None
        self._failed = False

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, or None when it cannot be built (logged once)."""
        if self._library is not None or self._failed:
            return self._library
        with self._lock:
            if self._library is None and not self._failed:
                try:
                    library = load_c_library(self.source, self.cflags, self.compiler())
                    self.configure(library)
                    self._library = library
                except Exception as error:  # noqa: BLE001 - any failure means "use the torch path"
                    self._failed = True
                    logger.warning("nibbletune %s unavailable, using the pure-torch path: %s", self.description, error)
        return self._library


@cache
def _malloc_trim():
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:  # pragma: no cover
        return None


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; elsewhere a no-op).

    Quantizing or merging one weight after another allocates a copy of each weight and float32
    temporaries (1 MiB per quantization chunk on a CPU); glibc serves those from the heap and
    keeps the freed pages, so without this the resident size after loading a 0.5 B-parameter
    Llama was 1.21x its 4-bit size instead of 1.04x (1.6x with 1 MiB chunks; measured with
    benchmarks/load_memory.py). Elsewhere (musl, macOS) nothing is trimmed.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
