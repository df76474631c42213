"""Run an exported GGUF in llama.cpp (llama-cpp-python) and compare its logits with expected ones.

Standalone: it needs only numpy and llama_cpp, so it can run in a separate environment from the
project's (tests/export/test_gguf_llamacpp.py calls it through NIBBLETUNE_LLAMA_CPP_PYTHON):

    python tests/export/llamacpp_check.py MODEL.gguf EXPECTED.npy --tokens 5,17,42 \
        [--lora ADAPTER.gguf] [--text "..." --text-ids 5,17,42] [--max-rel 0.01] [--min-top1 1.0]

EXPECTED.npy holds float logits of shape (len(tokens), n_vocab) for the token sequence evaluated
from position 0 (no BOS added). Prints one JSON object: max |diff|, max |diff| / std(expected),
top-1 agreement and, with --text, whether llama.cpp tokenizes the text to --text-ids.
Exit status 0 when within --max-rel and --min-top1 (and the tokenization matches), else 1.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def ids(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]."""
    return [int(x) for x in text.split(",") if x.strip()]


def llama_cpp_logits(model_path: str, tokens: list[int], lora_path: str | None = None) -> tuple[np.ndarray, object]:
    """Logits (len(tokens), n_vocab) from llama.cpp, float32 KV cache, one thread; and the Llama object."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=model_path, lora_path=lora_path, logits_all=True, n_ctx=max(64, len(tokens)),
        n_threads=1, n_threads_batch=1, verbose=False, seed=0,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32), llm


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run llama.cpp, print the comparison as JSON, return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf")
    parser.add_argument("expected", help=".npy of expected logits, (len(tokens), n_vocab)")
    parser.add_argument("--tokens", type=ids, required=True, help="comma-separated token ids")
    parser.add_argument("--lora", default=None, help="a GGUF LoRA adapter applied at scale 1")
    parser.add_argument("--text", default=None, help="text llama.cpp must tokenize to --text-ids")
    parser.add_argument("--text-ids", type=ids, default=None)
    parser.add_argument("--max-rel", type=float, default=1e-2, help="max |diff| / std(expected) accepted")
    parser.add_argument("--min-top1", type=float, default=1.0)
    args = parser.parse_args(argv)

    expected = np.load(args.expected).astype(np.float32)
    got, llm = llama_cpp_logits(args.gguf, args.tokens, args.lora)
    if got.shape != expected.shape:
        print(json.dumps({"error": f"llama.cpp logits shape {got.shape} != expected {expected.shape}"}))
        return 1
    diff = np.abs(got - expected)
    report = {
        "gguf": args.gguf, "lora": args.lora, "n_tokens": len(args.tokens), "n_vocab": int(expected.shape[1]),
        "max_abs_diff": float(diff.max()), "logit_std": float(expected.std()),
        "max_rel": float(diff.max() / expected.std()),
        "top1": float((got.argmax(-1) == expected.argmax(-1)).mean()),
    }
    ok = report["max_rel"] <= args.max_rel and report["top1"] >= args.min_top1
    if args.text is not None:
        tokenized = llm.tokenize(args.text.encode("utf-8"), add_bos=False, special=False)
        report["tokenize_match"] = list(tokenized) == args.text_ids
        report["llama_cpp_ids"] = list(tokenized)
        ok = ok and report["tokenize_match"]
    report["ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
