"""llama.cpp itself loads our GGUF files and computes the transformers logits (tests/export/llamacpp_check.py).

Runs when `llama_cpp` imports in this interpreter, or when NIBBLETUNE_LLAMA_CPP_PYTHON names a python
that has it (e.g. a scratch venv: python3 -m venv /tmp/llamaenv && /tmp/llamaenv/bin/pip install
llama-cpp-python numpy); skipped otherwise. On CPUs with AMX a native build crashes on q8_0 files (the
converter's own too); CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" builds one that runs.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

pytest.importorskip("gguf")

from export_helpers import TEXT, save_family
from test_gguf_families import save_family_model, sentencepiece_tokenizer

from nibbletune.export import merge
from nibbletune.export.gguf_export import export_gguf
from nibbletune.export.gguf_lora import export_gguf_lora

CHECK = Path(__file__).with_name("llamacpp_check.py")
# max |llama.cpp - HF float32| / std(HF logits) accepted. llama.cpp's CPU kernels also round the
# activations (to f16 for f16 weights, to q8_0 blocks for q8_0 ones), so these sit above the
# weight-only rounding of test_gguf_forward. Measured (llama / qwen2-tied): f32 2.2e-6 / 1.6e-6,
# f16 3.1e-3 / 2.1e-3, q8_0 8.1e-2 / 8.7e-2; limits are ~3-10x that.
LIMITS = {"f32": 2e-5, "f16": 1.5e-2, "q8_0": 0.3}


def _llama_cpp_python() -> str | None:
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    return os.environ.get("NIBBLETUNE_LLAMA_CPP_PYTHON") or None


PYTHON = _llama_cpp_python()
pytestmark = pytest.mark.skipif(PYTHON is None, reason="llama_cpp not importable and NIBBLETUNE_LLAMA_CPP_PYTHON unset")


def run_check(tmp_path: Path, gguf_path: Path, expected: torch.Tensor, tokens: list[int], *extra: str) -> dict:
    """Run llamacpp_check.py under PYTHON; return its JSON report (the test asserts on it)."""
    np.save(tmp_path / "expected.npy", expected.float().numpy())
    command = [PYTHON, str(CHECK), str(gguf_path), str(tmp_path / "expected.npy"),
               "--tokens", ",".join(map(str, tokens)), "--max-rel", "1e9", "--min-top1", "0", *extra]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip(), f"llamacpp_check.py printed nothing; stderr:\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in report.items() if k != "llama_cpp_ids"}))
    return report


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, token_ids):
    """{family: (model dir, HF float32 logits)} for a Llama (untied, GQA) and a Qwen2 (tied, biases)."""
    root = tmp_path_factory.mktemp("llamacpp")
    out = {}
    for family in ("llama", "qwen2-tied"):
        path, _, logits = save_family(family, root, tokenizer, token_ids)
        out[family] = (path, logits)
    return out


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("family", ["llama", "qwen2-tied"])
def test_llama_cpp_logits_match_transformers(models, token_ids, tmp_path, family, out_type):
    path, expected = models[family]
    export_gguf(path, tmp_path / "m.gguf", out_type)
    report = run_check(tmp_path, tmp_path / "m.gguf", expected, token_ids,
                       "--text", TEXT, "--text-ids", ",".join(map(str, token_ids)))
    assert report["tokenize_match"], f"llama.cpp tokenized {TEXT!r} as {report['llama_cpp_ids']}, HF as {token_ids}"
    assert report["max_rel"] <= LIMITS[out_type]
    assert report["top1"] >= (1.0 if out_type != "q8_0" else 0.9)


def test_llama_cpp_lora_adapter_matches_merged(base_dir, adapter_dir, token_ids, tmp_path):
    """base GGUF + `--lora` GGUF adapter in llama.cpp == transformers on the merged (16/32-bit base) model."""
    merge(base_dir, adapter_dir, tmp_path / "merged", dtype="float32", base_16bit=base_dir, verify=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = merged(torch.tensor([token_ids])).logits[0]
    export_gguf(base_dir, tmp_path / "base.gguf", "f32")
    for lora_type in ("f32", "f16", "q8_0"):
        export_gguf_lora(adapter_dir, tmp_path / f"lora-{lora_type}.gguf", base_dir, lora_type)
        report = run_check(tmp_path, tmp_path / "base.gguf", expected, token_ids,
                           "--lora", str(tmp_path / f"lora-{lora_type}.gguf"))
        assert report["max_rel"] <= LIMITS[lora_type] and report["top1"] == 1.0
    # without the adapter llama.cpp is far from the merged model: the adapter was applied
    assert run_check(tmp_path, tmp_path / "base.gguf", expected, token_ids)["max_rel"] > 100 * LIMITS["f32"]


# llama.cpp vs HF float32 for the families test_gguf_families.py builds. gemma3 sits higher: llama.cpp's CPU
# GELU reads an fp16 table (ggml-cpu vec.h GGML_GELU_FP16). Measured (llama-cpp-python 0.3.36, AVX2 build),
# qwen3 / gemma3 / phi3 / gemma3-spm / phi3-spm: f32 2.0e-6 / 1.3e-3 / 2.0e-6 / 1.5e-3 / 2.0e-6,
# f16 3.3e-3 / 4.3e-3 / 4.0e-3 / 5.2e-3 / 3.5e-3, q8_0 8.9e-2 / 0.11 / 0.10 / 0.16 / 7.8e-2 (top-1 down to 0.89).
FAMILY_LIMITS = {"qwen3": LIMITS, "phi3": LIMITS, "gemma3": {"f32": 1.5e-2, "f16": 3e-2, "q8_0": 0.4}}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tokenizer):
    """{name: (model dir, token ids of TEXT, HF float32 logits)}: the BPE-tokenizer families, and Gemma 3 /
    Phi-3 with SentencePiece tokenizers (Gemma's without, Llama 2's with a prefix space)."""
    root = tmp_path_factory.mktemp("llamacpp-families")
    out = {}
    for family in ("qwen3", "gemma3", "phi3"):
        path, _, ids, logits = save_family_model(family, root / "bpe", tokenizer)
        out[family] = (path, ids, logits)
    for family, style in (("gemma3", "gemma"), ("phi3", "llama")):
        spm = sentencepiece_tokenizer(root / f"spm-{style}", prefix_space=style == "llama")
        path, _, ids, logits = save_family_model(family, root / style, spm)
        for name in ("tokenizer.model", "tokenizer_config.json"):
            (path / name).write_bytes((root / f"spm-{style}" / name).read_bytes())
        out[f"{family}-spm"] = (path, ids, logits)
    return out


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3", "gemma3-spm", "phi3-spm"])
def test_llama_cpp_runs_the_new_families(family_models, tmp_path, name, out_type):
    path, token_ids, expected = family_models[name]
    # general.name containing "phi3" makes llama.cpp look up Phi-3's own special tokens, absent from the BPE vocab
    export_gguf(path, tmp_path / "m.gguf", out_type, name="tiny")
    report = run_check(tmp_path, tmp_path / "m.gguf", expected, token_ids,
                       "--text", TEXT, "--text-ids", ",".join(map(str, token_ids)))
    assert report["tokenize_match"], f"llama.cpp tokenized {TEXT!r} as {report['llama_cpp_ids']}, HF as {token_ids}"
    assert report["max_rel"] <= FAMILY_LIMITS[name.split("-")[0]][out_type]
    assert report["top1"] >= (1.0 if out_type != "q8_0" else 0.8)
