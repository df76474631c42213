"""Checking a merged model against the model training ran: logits on held-out inputs.

The reference is the unmerged QLoRA model exactly as training built it (`load_model` with the
training quantization settings, float32 compute, + `load_adapter`), in eval mode (no LoRA
dropout); the candidate is the merged
checkpoint loaded with plain transformers, its weights upcast to float32 so the figures show
what merging and storing in the output dtype cost, not the precision of a CPU matmul.

Figures: max and mean |logit difference|, the max relative to the spread (std) of the
reference logits, and top-1 agreement over all positions. The default tolerances (relative
max difference, minimum top-1 agreement) sit about 3x above what random tiny Llamas give
(hidden 64, 2 layers, LoRA r=8 on every linear, 96 positions; tests/export):

    float32 merge     max/std 3.6e-6, mean |diff| 2e-7,  top-1 100%
    float16 merge     max/std 7.6e-3, mean |diff| 3e-4,  top-1 100%
    bfloat16 merge    max/std 5.0e-2, mean |diff| 2.7e-3, top-1 97.9%
    --base-16bit      max/std 1.08,   mean |diff| 5.9e-2, top-1 71.9%  (quantization error)

Merging onto the 16-bit original moves logits by the whole quantization error the adapter
was trained around, so only a loose bound applies there. Memory: the merged model is loaded in
float32, so verification peaks at about twice the size of a 16-bit merged model.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NibbletuneError
from ..native import return_freed_memory
from ..quant import QuantSettings

# dtype -> (max |diff| / std(reference logits), minimum top-1 agreement)
TOLERANCES = {"float32": (1e-3, 0.99), "float16": (0.05, 0.9), "bfloat16": (0.15, 0.8)}
BASE_16BIT_TOLERANCE = (2.0, 0.5)
HELD_OUT_TEXTS = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "In 1887 the committee met twice, once in spring and once in the late autumn.",
    "Question: what is the capital of France? Answer: Paris is the capital.",
)


class VerificationError(NibbletuneError):
    """The merged model's outputs differ from the unmerged model's beyond the tolerance."""


@dataclass
class Verification:
    """Logit comparison figures between a reference and a candidate model."""

    max_abs_diff: float
    mean_abs_diff: float
    relative_max_diff: float
    top1_agreement: float
    positions: int
    tolerance: tuple[float, float]

    @property
    def passed(self) -> bool:
        return self.relative_max_diff <= self.tolerance[0] and self.top1_agreement >= self.tolerance[1]

    def summary(self) -> str:
        return (
            f"max |diff| {self.max_abs_diff:.3g}, mean |diff| {self.mean_abs_diff:.3g}, "
            f"max/std(logits) {self.relative_max_diff:.3g} (limit {self.tolerance[0]:g}), "
            f"top-1 agreement {100 * self.top1_agreement:.1f}% (min {100 * self.tolerance[1]:g}%) "
            f"over {self.positions} positions"
        )


def held_out_inputs(model_dir: Path, vocab_size: int, count: int = 4, length: int = 24) -> torch.Tensor:
    """Token ids [count, length]: the held-out texts tokenized when a tokenizer is present, else seeded random ids."""
    try:
        from ..loading import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in HELD_OUT_TEXTS[:count]]
        if all(len(r) >= 4 for r in rows) and max(max(r) for r in rows) < vocab_size:
            length = min(length, min(len(r) for r in rows))
            return torch.tensor([r[:length] for r in rows])
    except NibbletuneError:
        pass
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (count, length), generator=generator)


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, tolerance: tuple[float, float]) -> Verification:
    """The figures for two logits tensors of the same shape [..., vocab]."""
    reference, candidate = reference.float(), candidate.float()
    diff = (reference - candidate).abs()
    spread = reference.std().clamp_min(1e-12)
    agreement = (reference.argmax(-1) == candidate.argmax(-1)).float().mean()
    return Verification(
        max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item(),
        relative_max_diff=(diff.max() / spread).item(), top1_agreement=agreement.item(),
        positions=reference.argmax(-1).numel(), tolerance=tolerance,
    )


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM for `input_ids`, no gradients."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def check_merged(
    base: Path,
    adapter: Path,
    merged_dir: Path,
    settings: QuantSettings | None,
    dtype_name: str,
    base_16bit: bool = False,
    tolerance: float | None = None,
    trust_remote_code: bool = False,
) -> Verification:
    """Run the unmerged QLoRA model and the merged one on held-out inputs; raise VerificationError beyond tolerance.

    `settings`: the base quantization training used (None: training ran on a base without 4-bit linears).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..loading import load_adapter, load_model

    hf_logging.disable_progress_bar()

    if settings is not None:
        reference_model = load_model(base, settings.with_changes(compute_dtype="float32"),
                                     trust_remote_code=trust_remote_code)
    else:  # the adapter trained on a base with no 4-bit linears
        reference_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32,
                                                               trust_remote_code=trust_remote_code)
    reference_model.eval()
    load_adapter(reference_model, adapter, dtype=torch.float32)  # LoRA layers follow: eval, no dropout
    vocab_size = reference_model.get_input_embeddings().weight.shape[0]
    input_ids = held_out_inputs(merged_dir, vocab_size)
    reference = logits(reference_model, input_ids)
    del reference_model
    gc.collect()
    return_freed_memory()  # the 4-bit model's pages go back before the merged model is loaded
    merged_model = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
    ).eval()
    candidate = logits(merged_model, input_ids)
    del merged_model
    limits = BASE_16BIT_TOLERANCE if base_16bit else TOLERANCES[dtype_name]
    if tolerance is not None:
        limits = (tolerance, limits[1])
    result = compare_logits(reference, candidate, limits)
    if not result.passed:
        raise VerificationError(
            f"merged model in {merged_dir.name} does not reproduce the unmerged QLoRA model: {result.summary()}; "
            "the output was not kept"
        )
    return result
