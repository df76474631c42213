"""Conversion between QuantizedTensor and the bitsandbytes state-dict entries.

For a weight saved under `<prefix>` (e.g. "model.layers.0.mlp.up_proj.weight") bitsandbytes
writes `<prefix>`, `<prefix>.absmax`, `<prefix>.quant_map`, and with double quantization
`<prefix>.nested_absmax`, `<prefix>.nested_quant_map`; the non-tensor fields go into
`<prefix>.quant_state.bitsandbytes__<quant_type>`, a uint8 tensor holding UTF-8 JSON.
bitsandbytes is not needed to read or write any of it.
"""

from __future__ import annotations

import json

import torch

from ..errors import FormatError
from .blockwise import SUPPORTED_BLOCKSIZES, SUPPORTED_DTYPES
from .codebooks import BNB_QUANT_TYPES, NESTED_BLOCKSIZE, codebook, dynamic_map
from .settings import check_bnb_quant_type
from .tensor import QuantizedTensor

QUANT_STATE_KEY = "quant_state.bitsandbytes__"
_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack_json(obj: dict) -> torch.Tensor:
    """Encode a JSON object as a uint8 tensor (bitsandbytes' pack_dict_to_tensor)."""
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def unpack_json(tensor: torch.Tensor) -> dict:
    """Decode a uint8 tensor holding UTF-8 JSON."""
    try:
        return json.loads(bytes(tensor.cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"quant_state tensor does not hold valid JSON: {exc}") from None


def to_bnb_state_dict(qt: QuantizedTensor, prefix: str) -> dict[str, torch.Tensor]:
    """Return the bitsandbytes state-dict entries for `qt` stored under `prefix`.

    Raises BnbFormatUnsupportedError for an int4 tensor (bitsandbytes has no such type).
    """
    check_bnb_quant_type(qt.quant_type, f"bitsandbytes state-dict entries ('{prefix}')")
    meta = {
        "quant_type": qt.quant_type,
        "blocksize": qt.blocksize,
        "dtype": _dtype_name(qt.dtype),
        "shape": list(qt.shape),
    }
    entries = {
        prefix: qt.packed,
        f"{prefix}.absmax": qt.absmax,
        f"{prefix}.quant_map": codebook(qt.quant_type, qt.device),
    }
    if qt.double_quant:
        entries[f"{prefix}.nested_absmax"] = qt.nested_absmax
        entries[f"{prefix}.nested_quant_map"] = dynamic_map(qt.device)
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=qt.nested_offset)
    entries[f"{prefix}.{QUANT_STATE_KEY}{qt.quant_type}"] = pack_json(meta)
    return entries


def is_bnb_quantized(state_dict: dict, prefix: str) -> bool:
    """True when `state_dict` holds a bitsandbytes 4-bit quant state for `prefix`."""
    return any(f"{prefix}.{QUANT_STATE_KEY}{qt}" in state_dict for qt in BNB_QUANT_TYPES)


def bnb_state_keys(prefix: str, state_dict: dict) -> list[str]:
    """All keys of `state_dict` that belong to the quantized weight at `prefix`."""
    keys = [prefix] + [f"{prefix}.{s}" for s in _STATE_SUFFIXES]
    keys += [f"{prefix}.{QUANT_STATE_KEY}{qt}" for qt in BNB_QUANT_TYPES]
    return [k for k in keys if k in state_dict]


def from_bnb_state_dict(state_dict: dict, prefix: str) -> QuantizedTensor:
    """Build a QuantizedTensor from bitsandbytes state-dict entries stored under `prefix`.

    Checks that codebooks, sizes and metadata are consistent; raises FormatError naming
    the key otherwise.
    """
    state_keys = [f"{prefix}.{QUANT_STATE_KEY}{qt}" for qt in BNB_QUANT_TYPES if f"{prefix}.{QUANT_STATE_KEY}{qt}" in state_dict]
    if len(state_keys) != 1:
        raise FormatError(f"{prefix}: expected exactly one '{QUANT_STATE_KEY}<nf4|fp4>' entry, found {len(state_keys)}")
    meta = unpack_json(state_dict[state_keys[0]])

    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise FormatError(f"{prefix}: missing '{key}' in the 4-bit checkpoint")
        return state_dict[key]

    try:
        quant_type = meta["quant_type"]
        blocksize = int(meta["blocksize"])
        shape = torch.Size(int(s) for s in meta["shape"])
        dtype = getattr(torch, meta["dtype"])
        nested_offset = float(meta["nested_offset"]) if "nested_offset" in meta else None
        nested_blocksize = int(meta.get("nested_blocksize", NESTED_BLOCKSIZE))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FormatError(f"{prefix}: malformed quant_state metadata {meta!r} ({exc})") from None
    if quant_type not in BNB_QUANT_TYPES or dtype not in SUPPORTED_DTYPES:
        raise FormatError(f"{prefix}: unsupported quant_type {quant_type!r} or dtype {meta['dtype']!r}")
    if blocksize not in SUPPORTED_BLOCKSIZES or any(size < 0 for size in shape):
        raise FormatError(f"{prefix}: invalid blocksize {blocksize} or shape {list(shape)} in quant_state")
    packed = need(prefix)
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)  # quant_storage other than uint8
    packed = packed.reshape(-1, 1)
    numel = shape.numel()
    blocks = -(-numel // blocksize)
    if packed.shape[0] != (numel + 1) // 2:
        raise FormatError(f"{prefix}: packed codes hold {packed.shape[0] * 2} values, shape {tuple(shape)} needs {numel}")
    quant_map = need(f"{prefix}.quant_map")
    if not torch.equal(quant_map.float().cpu(), codebook(quant_type)):
        raise FormatError(f"{prefix}.quant_map is not the standard {quant_type} codebook")
    absmax = need(f"{prefix}.absmax").reshape(-1)
    if absmax.numel() != blocks:
        raise FormatError(f"{prefix}.absmax has {absmax.numel()} entries, expected {blocks}")
    if nested_offset is None:
        if absmax.dtype != torch.float32:
            raise FormatError(f"{prefix}.absmax must be float32 without double quantization, got {absmax.dtype}")
        return QuantizedTensor(packed, absmax, shape, dtype, blocksize, quant_type)
    nested_absmax = need(f"{prefix}.nested_absmax").reshape(-1).float()
    nested_map = need(f"{prefix}.nested_quant_map")
    if nested_blocksize != NESTED_BLOCKSIZE:
        raise FormatError(f"{prefix}: nested_blocksize {nested_blocksize} unsupported (expected 256)")
    if not torch.equal(nested_map.float().cpu(), dynamic_map()):
        raise FormatError(f"{prefix}.nested_quant_map is not bitsandbytes' dynamic map")
    if absmax.dtype != torch.uint8 or nested_absmax.numel() != -(-blocks // NESTED_BLOCKSIZE):
        raise FormatError(f"{prefix}: double-quantized absmax has the wrong dtype or nested size")
    return QuantizedTensor(
        packed, absmax, shape, dtype, blocksize, quant_type, nested_absmax, nested_offset
    )
