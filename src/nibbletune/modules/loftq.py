"""LoftQ initialisation: choose the 4-bit base and the LoRA factors together.

Plain QLoRA starts from Q(W) with B = 0, so the model begins with the full quantization error
W - Q(W). LoftQ (Li et al. 2023) alternates, starting from B A = 0:

    Q_k       = dequant(quantize(W - scaling * B_{k-1} A_{k-1}))
    B_k, A_k  = rank-r factors with scaling * B_k A_k ~= W - Q_k   (truncated SVD)

so after each round Q_k + scaling * B_k A_k is closer to W than Q(W) alone (the first round
already is: the SVD captures the best rank-r part of the quantization error). The returned base
is the quantized tensor from the last round, whose B A was fitted to it.

Unlike PEFT's `loftq_init` (CUDA-only, and fitting B A to the residual with no regard to
lora_alpha / r), this runs wherever `quantize` runs and honours the scale: the SVD factors
U sqrt(S) and sqrt(S) V^T are divided by sqrt(scaling) so that scaling * B A is the fitted
residual, whatever alpha and r are.

`loftq_base.LoftQBase` applies it while a model is loaded (`load_model(..., quantize_weight=...)`),
the only moment the full-precision weights exist. With one round (PEFT's default) that base is
plain Q(W); with more it is Q(W - scaling B A), and the adapter belongs to that base only:
`LOFTQ_NOTE` (loftq.json) says which, in its directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import NibbletuneError
from ..quant import QuantizedTensor, QuantSettings, quantize


def low_rank_factors(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with scaling * B @ A the best rank-r approximation of `residual`."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:r].sqrt() / scaling ** 0.5
    B = U[:, :r] * root  # [out, r]
    A = root[:, None] * Vh[:r]  # [r, in]
    return A, B


def loftq_init(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    quant: QuantSettings | None = None,
    num_iters: int = 1,
) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
    """Return (quantized base, lora_A [r, in], lora_B [out, r]) for a [out, in] weight.

    The base is quantized with `quant` (default QuantSettings()). The factors are float32; the
    quantized tensor keeps the weight's dtype as its nominal dtype.
    """
    quant = quant or QuantSettings()
    if weight.dim() != 2:
        raise NibbletuneError(f"LoftQ needs a 2-D weight, got shape {tuple(weight.shape)}")
    if num_iters < 1:
        raise NibbletuneError(f"LoftQ num_iters must be at least 1, got {num_iters}")
    if r > min(weight.shape):
        raise NibbletuneError(f"LoftQ rank {r} exceeds the weight's smallest dimension {min(weight.shape)}")
    full = weight.detach().float()
    target = full
    for _ in range(num_iters):
        qt = quantize(target.to(weight.dtype), quant.quant_type, quant.blocksize, quant.double_quant)
        dequantized = qt.dequantize(torch.float32)
        lora_A, lora_B = low_rank_factors(full - dequantized, r, scaling)
        target = full - scaling * (lora_B @ lora_A)
    return qt, lora_A.contiguous(), lora_B.contiguous()


LOFTQ_NOTE = "loftq.json"
_ONE_ROUND_NOTE = (
    "LoftQ adapter, 1 round: the base it was trained on is the plain 4-bit Q(W) with these quant settings "
    "(B0 A0 fitted W - Q(W)), so it works on any base quantized that way, PEFT + bitsandbytes included.")
_ROUNDS_NOTE = (
    "LoftQ adapter, several rounds: it was trained on the base Q(W - scaling * B0 A0), not on Q(W). Rebuild that "
    "base with nibbletune.load_model(path, quant, quantize_weight=nibbletune.modules.loftq_base.LoftQBase(lora, "
    "quant)) from the same full-precision checkpoint, with these quant settings and a LoraSettings of "
    "loftq_iters rounds; on a plain 4-bit base (PEFT + bitsandbytes, or a merge from Q(W)) it gives other outputs.")


def loftq_note(quant: QuantSettings, num_iters: int) -> dict:
    """The `loftq.json` written beside an adapter trained from a LoftQ base."""
    return {
        "format": 2, "init": "loftq", "num_iters": num_iters, "quant": quant.to_record(),
        "base_is_plain_quantization": num_iters == 1,
        "note": _ONE_ROUND_NOTE if num_iters == 1 else _ROUNDS_NOTE,
    }


def read_loftq_note(adapter_dir) -> dict | None:
    """The `loftq.json` of an adapter directory, or None for an adapter not initialised with LoftQ."""
    path = Path(adapter_dir) / LOFTQ_NOTE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NibbletuneError(f"{path}: cannot read ({exc})") from None
