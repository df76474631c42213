"""The quickstart's base model: a small Llama pretrained offline on the Python standard library.

Built once and cached under the user cache dir (`~/.cache/nibbletune/quickstart/base-v3`, or
`$NIBBLETUNE_CACHE/quickstart`): the stdlib's own source files are always present, so nothing
is downloaded.

1. corpus: the stdlib's .py files (tests and vendored packages left out), split by file into
   a training part and a held-out part (`is_held_out`); only the training part is used here,
   as two streams: whole source files, and two short snippets per documented function (its
   `def` line then the first paragraph of its docstring, as in the source; and that paragraph
   as a `#` comment above the `def` line);
2. tokenizer: byte-level BPE, 4096 tokens, whose pre-tokenizer splits words from the space
   before them and from underscores (`get`, `_`, `scheme`), so a word has one id whether it is
   in a name or in prose (GPT-2's split gives ' scheme' and 'scheme', and `_` + 'None' pieces);
3. model: LlamaForCausalLM, hidden 192, 4 layers, 6 heads (3.3 M parameters), randomly
   initialised, then pretrained by `nibbletune.training` itself with `method: full` (every weight,
   float32 master weights) on a text dataset of 120-token windows of the source files and the
   snippets, one source token for every three snippet tokens, packed into 128-token sequences,
   for `PRETRAIN_STEPS` steps (about 2 minutes on 2 unloaded cores; `train.max_seconds` stops a
   slow machine at `PRETRAIN_SECONDS`). Seeded: the weights are the same run to run when the
   steps finish within the cap;
4. saved as a safetensors transformers directory (the run's config.yaml and metrics.jsonl
   beside it), built in a temporary directory beside the cache entry and renamed into place, so
   a killed build leaves nothing half-made.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import random
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

from ..training.checkpoint import replace_directory

BASE_VERSION = "base-v3"
EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
                 "__pycache__", "ensurepip", "tkinter", "pydoc_data"}
MAX_FILE_BYTES = 200_000
VOCAB_SIZE = 4096
MODEL_SHAPE = {"hidden_size": 192, "num_layers": 4, "heads": 6, "intermediate_size": 512}
PRETRAIN_STEPS = 320
PRETRAIN_SECONDS = 150.0
PRETRAIN_SEQ_LEN = 128
WINDOW_TOKENS = 120         # source files are cut into windows this long (room for EOS and re-tokenization)
SNIPPETS_PER_SOURCE_TOKEN = 3
# GPT-2's split, except that a word never carries the space before it and underscores are their own
# pieces: "scheme" in `get_scheme` and in "the URL scheme" is the same token, so names can be copied
WORD_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}\p{N}]+|_+| ?[^\s\p{L}\p{N}_]+|\s+(?!\S)|\s+"


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
    """The file's text, or None when it cannot be read as UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def first_paragraph(doc: str, limit: int = 240) -> str:
    """The docstring's first paragraph on one line, at most `limit` characters."""
    paragraph = doc.strip().split("\n\n")[0]
    return " ".join(paragraph.split())[:limit]


@functools.cache
def documented_functions(path: Path) -> tuple[tuple[str, str], ...]:
    """(def line without the colon, docstring's first paragraph) for each documented function of a file."""
    source = read_source(path)
    if not source:
        return ()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 12:
            continue
        signature = f"def {node.name}({ast.unparse(node.args)})"
        if node.returns is not None:
            signature += f" -> {ast.unparse(node.returns)}"
        if len(signature) <= 160:
            found.append((signature, first_paragraph(doc)))
    return tuple(found)


def training_texts(max_bytes: int = 4_000_000, seed: int = 0) -> list[str]:
    """Whole training-part source files in a seeded order, up to `max_bytes`."""
    files = [path for path in stdlib_files() if not is_held_out(path)]
    random.Random(seed).shuffle(files)
    texts, total = [], 0
    for path in files:
        text = read_source(path)
        if text:
            texts.append(text)
            total += len(text)
            if total >= max_bytes:
                break
    return texts


def training_snippets(seed: int = 0) -> list[str]:
    """Two short snippets per documented training-part function, shuffled.

    The source's own order (`def` line, then the docstring's first paragraph) and the same
    function documented by a comment above it (`# paragraph` then `def` line), a common way
    of writing Python: the second teaches which names go with which descriptions, reading
    the description first. The quickstart's task (the docstring in triple quotes on a line, then
    the `def` line) is in neither form, and its held-out functions come from files never used here.
    """
    snippets = [text for path in stdlib_files() if not is_held_out(path)
                for signature, doc in documented_functions(path)
                for text in (f'{signature}:\n    """{doc}"""\n', f"# {doc}\n{signature}:\n")]
    random.Random(seed).shuffle(snippets)
    return snippets


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE split by `WORD_SPLIT` (words without their leading space, `_` apart).

    Same special tokens as `tiny.train_tokenizer`. GPT-2's split would make `get_scheme` into
    ' get', '_', 'scheme' and the prose word into ' scheme': different ids for the same word.
    """
    from . import tiny

    return tiny.train_tokenizer(texts, vocab_size, split_regex=WORD_SPLIT)


def source_windows(tokenizer, text: str, window: int = WINDOW_TOKENS) -> list[str]:
    """`text` cut into pieces of `window` tokens, decoded back to text (the last piece may be shorter).

    A piece whose cut splits a multi-byte character decodes with a replacement character and may
    re-tokenize longer than `window`; such pieces are left out.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = []
    for start in range(0, len(ids), window):
        piece = tokenizer.decode(ids[start:start + window])
        if piece.strip() and "\ufffd" not in piece:
            pieces.append(piece)
    return pieces


def pretraining_rows(tokenizer, texts: list[str], snippets: list[str], seed: int = 0) -> list[dict]:
    """The pretraining dataset as text rows: every snippet that fits a sequence, and source windows worth a third
    of their tokens.

    Source files are taken in a seeded order and tokenized one at a time until the budget is met,
    so memory stays at one file's encoding.
    """
    rng = random.Random(seed)
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in snippets]
    snippets = [text for text, length in zip(snippets, lengths) if length < PRETRAIN_SEQ_LEN]  # room for EOS
    snippet_tokens = sum(length for length in lengths if length < PRETRAIN_SEQ_LEN)
    budget, chosen = snippet_tokens / SNIPPETS_PER_SOURCE_TOKEN, []
    for index in rng.sample(range(len(texts)), len(texts)):
        for piece in source_windows(tokenizer, texts[index]):
            if budget <= 0:
                break
            chosen.append(piece)
            budget -= WINDOW_TOKENS
        if budget <= 0:
            break
    rows = [{"text": text} for text in chosen + snippets]
    rng.shuffle(rows)
    return rows


def pretraining_config(init_dir: Path, data_path: Path, output_dir: Path, steps: int, seconds: float):
    """The pretraining job as a `nibbletune train` config: method full on packed text."""
    from ..training.config import config_from_dict

    return config_from_dict({
        "method": "full",
        "model": str(init_dir),
        "data": {"path": str(data_path), "format": "text"},
        "output_dir": str(output_dir),
        "quant": {"compute_dtype": "float32"},
        "train": {"max_steps": steps, "max_seconds": seconds, "micro_batch_size": 16, "grad_accum": 1,
                  "seq_len": PRETRAIN_SEQ_LEN, "packing": True, "lr": 3e-3, "scheduler": "cosine",
                  "warmup_steps": 20, "weight_decay": 0.01, "max_grad_norm": 1.0, "seed": 0,
                  "log_every": 10, "save_every": 0, "keep_checkpoints": 1},
    }, source="quickstart pretraining")


def build_base(directory: Path, steps: int = PRETRAIN_STEPS, seconds: float = PRETRAIN_SECONDS,
               progress: bool = True) -> dict:
    """Tokenizer + tiny Llama pretrained by `nibbletune.training` into `directory`; returns facts about the build."""
    from ..training import train
    from .tiny import llama_config, random_llama, save_model_dir

    started = time.perf_counter()
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    say(f"quickstart: building the base model once (cached in {directory.parent})")
    texts, snippets = training_texts(), training_snippets()
    say(f"  corpus: {len(texts)} stdlib files ({sum(map(len, texts)) / 1e6:.1f} MB) and "
        f"{len(snippets)} def+docstring snippets")
    tokenizer = train_tokenizer(texts + snippets)
    rows = pretraining_rows(tokenizer, texts, snippets)
    say(f"  tokenizer: byte-level BPE, words split from spaces and underscores, {len(tokenizer)} tokens; "
        f"{len(rows)} pretraining rows")
    config = llama_config(len(tokenizer), max_positions=512, **MODEL_SHAPE)
    model = random_llama(config, seed=0)
    parameters = sum(p.numel() for p in model.parameters())
    say(f"  model: Llama, hidden {MODEL_SHAPE['hidden_size']}, {MODEL_SHAPE['num_layers']} layers, "
        f"{parameters / 1e6:.1f} M parameters; pretraining {steps} steps (at most {seconds:.0f} s) "
        "with `nibbletune train`, method full")
    init_dir = directory.parent / f"{directory.name}-init"
    shutil.rmtree(init_dir, ignore_errors=True)
    try:
        save_model_dir(model, tokenizer, init_dir)
        data_path = init_dir / "pretrain.jsonl"
        data_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        result = train(pretraining_config(init_dir, data_path, directory, steps, seconds), progress=progress)
    finally:
        shutil.rmtree(init_dir, ignore_errors=True)
    facts = {"version": BASE_VERSION, "pretrain_steps": result.steps, "pretrain_steps_planned": steps,
             "pretrain_final_loss": sum(result.losses[-20:]) / max(1, len(result.losses[-20:])),
             "rows": len(rows), "parameters": parameters, "build_seconds": time.perf_counter() - started}
    (directory / "quickstart_base.json").write_text(json.dumps(facts, indent=2))
    if result.time_capped:
        say(f"  note: the time cap stopped pretraining after {result.steps} of {steps} steps (a slow or busy "
            "machine); the base is weaker than planned")
    return facts


def ensure_base(steps: int = PRETRAIN_STEPS, seconds: float = PRETRAIN_SECONDS, rebuild: bool = False,
                progress: bool = True) -> Path:
    """The cached base model directory, built (atomically) when missing or when `rebuild`."""
    final = cache_dir() / BASE_VERSION
    if final.is_dir() and (final / "quickstart_base.json").is_file() and not rebuild:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{BASE_VERSION}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_base(tmp, steps, seconds, progress)
        replace_directory(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
