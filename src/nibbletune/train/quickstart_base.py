"""The quickstart's base model: a small Llama pretrained offline on the Python standard library.

Built once and cached under the user cache dir (`~/.cache/nibbletune/quickstart/base-v1`, or
`$NIBBLETUNE_CACHE/quickstart`): the stdlib's own source files are always present, so nothing
is downloaded.

1. corpus: the stdlib's .py files (tests and vendored packages left out), split by file into
   a training part and a held-out part (`is_held_out`); only the training part is used here;
2. tokenizer: byte-level BPE, 4096 tokens, trained on that corpus (`tiny.train_tokenizer`);
3. model: LlamaForCausalLM, hidden 256, 4 layers, 4 heads, pretrained for a fixed time budget
   (about 2 minutes) on random 128-token windows with AdamW;
4. saved as a safetensors transformers directory, built in a temporary directory beside the
   cache entry and renamed into place, so a killed build leaves nothing half-made.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch

BASE_VERSION = "base-v1"
EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
                 "__pycache__", "ensurepip", "tkinter", "pydoc_data"}
MAX_FILE_BYTES = 200_000


def cache_dir() -> Path:
    """Where quickstart artefacts live: $NIBBLETUNE_CACHE/quickstart or ~/.cache/nibbletune/quickstart."""
    root = os.environ.get("NIBBLETUNE_CACHE")
    if root:
        return Path(root) / "quickstart"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "nibbletune" / "quickstart"


def stdlib_files() -> list[Path]:
    """The standard library's .py sources, sorted, without tests and vendored packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS and not d.startswith("test")]
        for name in names:
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(directory) / name
                try:
                    if path.stat().st_size <= MAX_FILE_BYTES:
                        files.append(path)
                except OSError:
                    continue
    return sorted(files)


def is_held_out(path: Path) -> bool:
    """One file in ten (by a stable hash of its stdlib-relative path) is held out."""
    relative = path.relative_to(Path(sysconfig.get_paths()["stdlib"])).as_posix()
    return zlib.crc32(relative.encode()) % 10 == 0


def read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def training_texts(max_bytes: int = 4_000_000) -> list[str]:
    texts, total = [], 0
    for path in stdlib_files():
        if is_held_out(path):
            continue
        text = read_source(path)
        if text:
            texts.append(text)
            total += len(text)
            if total >= max_bytes:
                break
    return texts


def pretrain(model, token_ids: torch.Tensor, seconds: float, seq_len: int = 128, batch_size: int = 8,
             lr: float = 2e-3, seed: int = 0, progress: bool = True) -> list[float]:
    """Train `model` on random windows of `token_ids` for `seconds` of wall time; returns losses."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = 20
    model.train()
    losses: list[float] = []
    bar = tqdm(total=int(seconds), desc="pretrain base", unit="s", file=sys.stderr, disable=not progress,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]")
    started = time.perf_counter()
    step = 0
    while (elapsed := time.perf_counter() - started) < seconds:
        # cosine over the time budget, so the run ends at a low lr whatever the machine's speed
        factor = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / seconds)))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        starts = torch.randint(0, token_ids.numel() - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([token_ids[s:s + seq_len] for s in starts.tolist()])   # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        bar.n = min(int(time.perf_counter() - started), int(seconds))
        bar.set_postfix_str(f"step {step} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
        bar.refresh()
    bar.close()
    model.eval()
    return losses


def build_base(directory: Path, pretrain_seconds: float = 120.0, progress: bool = True) -> dict:
    """Tokenizer + pretrained tiny Llama into `directory`; returns facts about the build."""
    from .tiny import llama_config, random_llama, save_model_dir, train_tokenizer

    started = time.perf_counter()
    texts = training_texts()
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    say(f"quickstart: building the base model once (cached in {directory.parent})")
    say(f"  corpus: {len(texts)} stdlib files, {sum(map(len, texts)) / 1e6:.1f} MB of Python")
    tokenizer = train_tokenizer(texts, vocab_size=4096)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = torch.tensor([i for row in ids for i in (*row, tokenizer.eos_token_id)], dtype=torch.long)
    say(f"  tokenizer: byte-level BPE, {len(tokenizer)} tokens; corpus = {flat.numel() / 1e6:.2f} M tokens")
    config = llama_config(len(tokenizer), hidden_size=256, num_layers=4, heads=4, intermediate_size=704,
                          max_positions=512)
    model = random_llama(config, seed=0)
    parameters = sum(p.numel() for p in model.parameters())
    say(f"  model: Llama, hidden 256, 4 layers, {parameters / 1e6:.1f} M parameters; pretraining "
        f"for {pretrain_seconds:.0f} s")
    losses = pretrain(model, flat, pretrain_seconds, progress=progress)
    save_model_dir(model, tokenizer, directory)
    facts = {"pretrain_steps": len(losses), "pretrain_final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
             "tokens": flat.numel(), "parameters": parameters, "build_seconds": time.perf_counter() - started}
    (directory / "quickstart_base.json").write_text(json.dumps(facts, indent=2))
    return facts


def ensure_base(pretrain_seconds: float = 120.0, rebuild: bool = False, progress: bool = True) -> Path:
    """The cached base model directory, built (atomically) when missing or when `rebuild`."""
    final = cache_dir() / BASE_VERSION
    if final.is_dir() and (final / "quickstart_base.json").is_file() and not rebuild:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{BASE_VERSION}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_base(tmp, pretrain_seconds, progress)
        if final.exists():
            old = final.parent / f".old-{BASE_VERSION}-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
