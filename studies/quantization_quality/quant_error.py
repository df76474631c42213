"""Pure quantization error of the 4-bit formats on real weights (no training).

For every format (nf4, fp4, int4) x double quant (on, off) x blocksize (64, 128, 256), every
`nn.Linear` weight W of a model is quantized with `nibbletune.quantize` and decoded back (W'):

* weight error: relative MSE, sum (W' - W)^2 / sum W^2 over all linears (parameter-weighted);
* layer error: relative output error ||x W'^T - x W^T|| / ||x W^T|| on the real activations x that
  reach each linear during a forward of held-out text, averaged over the linears;
* end metric, with every linear replaced by W' at once: for all-MiniLM-L6-v2 the cosine between the
  mean-pooled sentence embeddings and the fp32 ones; for the causal LMs the perplexity of held-out text.

The reference W is the model's own full-precision weight. For the GGUF models (SmolLM2 Q4_1, Gemma 3
Q4_K_M) that is the *dequantized GGUF*, itself already a 4-bit grid: the figures measure the extra
error of re-quantizing it, not the error against the original bf16 release.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import nn

from nibbletune import quantize
from nibbletune.evaluation.metrics import perplexity

FORMATS = ("nf4", "fp4", "int4")
BLOCKSIZES = (64, 128, 256)
ROWS_PER_LAYER = 256  # activation rows kept per linear for the layer error


def configs(quick: bool) -> list[tuple[str, bool, int]]:
    """(quant_type, double_quant, blocksize) combinations: all 18, or the 6 at blocksize 64 with --quick."""
    blocksizes = (64,) if quick else BLOCKSIZES
    return list(itertools.product(FORMATS, (True, False), blocksizes))


def linears(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> dict[str, nn.Linear]:
    """The model's nn.Linear layers by name, minus those `skip` names (output heads)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not skip(name)}


def capture_inputs(model: nn.Module, layers: dict[str, nn.Linear], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """The float32 inputs each layer sees during `run()`, ROWS_PER_LAYER rows each (evenly spaced)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def store(module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            step = max(1, rows.shape[0] // ROWS_PER_LAYER)
            seen.setdefault(name, rows[::step][:ROWS_PER_LAYER].clone())
        return store

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def measure(layers: dict[str, nn.Linear], inputs: dict[str, torch.Tensor], end_metric: Callable[[], float],
            quick: bool) -> list[dict]:
    """One row per config: weight relative MSE, mean layer output error, and `end_metric()` on the decoded model.

    The weights are swapped in place for each config and restored afterwards.
    """
    originals = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    rows = []
    try:
        for quant_type, double_quant, blocksize in configs(quick):
            squared_error = squared_norm = 0.0
            layer_errors = []
            for name, layer in layers.items():
                weight = originals[name]
                decoded = quantize(weight, quant_type, blocksize, double_quant).dequantize(torch.float32)
                w32 = weight.float()
                squared_error += float(((decoded - w32) ** 2).sum())
                squared_norm += float((w32 ** 2).sum())
                x = inputs.get(name)
                if x is not None:
                    reference = x @ w32.T
                    layer_errors.append(float((x @ decoded.T - reference).norm() / reference.norm().clamp(min=1e-30)))
                layer.weight.data.copy_(decoded.to(weight.dtype))
            rows.append({"quant_type": quant_type, "double_quant": double_quant, "blocksize": blocksize,
                         "weight_rel_mse": squared_error / squared_norm,
                         "layer_rel_error": sum(layer_errors) / max(1, len(layer_errors)),
                         "end_metric": end_metric()})
            for name, layer in layers.items():
                layer.weight.data.copy_(originals[name])
    finally:
        for name, layer in layers.items():
            layer.weight.data.copy_(originals[name])
    return rows


# -- all-MiniLM-L6-v2: sentence-embedding cosine -------------------------------------------------------------------


def minilm_study(model_dir, sentences: list[str], quick: bool) -> dict:
    """all-MiniLM-L6-v2 in float32: every encoder linear quantized; end metric = mean embedding cosine vs fp32."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def embed() -> torch.Tensor:
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    layers = linears(model)
    inputs = capture_inputs(model, layers, embed)
    reference = embed()

    def cosine() -> float:
        return float((embed() * reference).sum(-1).mean())

    rows = measure(layers, inputs, cosine, quick)
    return {"model": "all-MiniLM-L6-v2 (fp32)", "end_metric": "mean cosine vs fp32", "linears": len(layers),
            "reference": 1.0, "rows": rows}


# -- causal LMs from GGUF: perplexity -----------------------------------------------------------------------------


def lm_perplexity(model: nn.Module, token_ids: torch.Tensor) -> float:
    """Perplexity of `token_ids` ([sequences, length]) under the model's own shifted loss."""
    with torch.no_grad():
        loss = model(input_ids=token_ids, labels=token_ids).loss
    return perplexity(float(loss))


def gguf_study(name: str, gguf_path, texts: list[str], seq_len: int, quick: bool) -> dict:
    """A GGUF base dequantized to float32; every linear but the output head quantized; end metric = perplexity."""
    from nibbletune import load_tokenizer
    from nibbletune.loading.load import load_unquantized

    model = load_unquantized(gguf_path, torch.float32)
    tokenizer = load_tokenizer(gguf_path)
    ids = tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    sequences = max(1, min(4 if quick else 8, ids.numel() // seq_len))
    token_ids = ids[: sequences * seq_len].reshape(sequences, seq_len)
    layers = linears(model, skip=lambda layer_name: layer_name.endswith("lm_head"))
    inputs = capture_inputs(model, layers, lambda: model(input_ids=token_ids[:1]))
    reference = lm_perplexity(model, token_ids)
    rows = measure(layers, inputs, lambda: lm_perplexity(model, token_ids), quick)
    for row in rows:
        row["ppl_increase_pct"] = 100 * (row["end_metric"] / reference - 1)
    return {"model": name, "end_metric": f"perplexity ({sequences}x{seq_len} held-out tokens)", "linears": len(layers),
            "reference": reference, "rows": rows,
            "note": "reference = the dequantized GGUF base (already 4-bit); errors are those of re-quantizing it"}


def is_finite_table(study: dict) -> bool:
    """True when every number of a study's rows is finite (a sanity check before writing)."""
    return all(math.isfinite(v) for row in study["rows"] for v in row.values() if isinstance(v, float))
