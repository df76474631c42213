"""A GGUF file read as a checkpoint: one tensor at a time, dequantized and named as transformers names it.

The config and tokenizer come from the file's metadata through transformers' own GGUF support
(`AutoConfig` / `AutoTokenizer` with `gguf_file=`). The tensors are read with the `gguf`
package: `GGUFReader` memory-maps the file, `gguf.quants.dequantize` decodes one tensor (Q4_0,
Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, F16, BF16, F32, ...) to float32, and transformers' per-architecture
tensor processor undoes what llama.cpp's converter did (the Llama q/k row permutation, Gemma's
norm offset); its name map (`get_gguf_hf_weights_map`, built from a weightless skeleton) gives
each GGUF tensor its transformers name. `GGUFCheckpoint` has the interface of
`safetensors_io.Checkpoint`, so `load_model`, `merge` and `quantize` stream a GGUF base exactly
like a safetensors one: peak memory is the 4-bit model plus one float32 tensor, and each tensor is
read through its own short-lived memory map.

A base that is already 4-bit in GGUF (Q4_1, Q4_K_M) is quantized a second time when it is loaded
in NF4: the NF4 codes approximate the dequantized GGUF weights, not the original ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import FormatError
from .gguf_metadata import file_version, gguf_config, import_gguf
from .safetensors_io import TensorInfo

# transformers' processors that turn one GGUF tensor into one transformers tensor (others, for
# mixture-of-experts and GPT-2, emit tensors of their own and need the whole file at once).
_ONE_TO_ONE_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor",
                          "NemotronTensorProcessor", "Lfm2TensorProcessor", "MambaTensorProcessor",
                          "T5TensorProcessor")


@dataclass(frozen=True)
class _StoredTensor:
    """Where one tensor's bytes are in the file and how to decode them (what `GGUFReader` found)."""

    gguf_name: str
    offset: int
    dtype: np.dtype
    """The element type of the stored array: uint8 for quantized blocks, float16/float32 otherwise."""
    data_shape: tuple[int, ...]
    """The stored array's shape (quantized types: rows of block bytes)."""
    tensor_type: object
    """The gguf.GGMLQuantizationType."""


@dataclass(frozen=True)
class _Index:
    """What opening a GGUF file costs once: transformers' processor and name map, and where each tensor is.

    The parsed `GGUFReader` itself is not kept: its metadata (a whole vocabulary as Python objects)
    would stay resident through training for nothing.
    """

    processor: object
    names: dict
    stored: dict
    infos: dict


@lru_cache(maxsize=2)
def _index(version: tuple[str, int, int]) -> _Index:
    gguf = import_gguf()
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from .model_config import model_class_for
    from .skeleton import build_skeleton

    path = Path(version[0])
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise FormatError(f"{path}: not a readable GGUF file ({exc})") from None
    config = gguf_config(path)
    architecture = reader.fields["general.architecture"].contents()
    processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    if processor_class.__name__ not in _ONE_TO_ONE_PROCESSORS:
        raise FormatError(f"{path}: GGUF architecture {architecture!r} is not supported as a base "
                          "(its tensors do not map one to one to transformers tensors)")
    processor = processor_class(config=config.to_dict())
    skeleton = build_skeleton(config, model_class_for(config), torch.float32)
    names = get_gguf_hf_weights_map(skeleton, processor)  # GGUF name -> transformers name
    stored, infos = {}, {}
    for tensor in reader.tensors:
        name = names.get(tensor.name)
        if name is None:
            continue  # e.g. llama.cpp's precomputed rope_freqs
        shape = torch.Size(int(size) for size in reversed(tensor.shape.tolist()))  # GGUF lists ne0 first
        stored[name] = _StoredTensor(tensor.name, int(tensor.data_offset), tensor.data.dtype,
                                     tuple(int(size) for size in tensor.data.shape), tensor.tensor_type)
        infos[name] = TensorInfo(name, path, torch.float32, shape, int(tensor.data_offset), shape.numel() * 4)
    return _Index(processor, names, stored, infos)


DEQUANTIZE_CHUNK_ELEMENTS = 1 << 22


def _dequantize_rows(gguf, data: np.ndarray, tensor_type, shape: tuple[int, ...]) -> np.ndarray:
    """`gguf.quants.dequantize` of a stored tensor, a block of rows at a time into one float32 array.

    The package's decoders make several float32 temporaries the size of their input (1.6 GB at the
    peak for Gemma 3's 262k x 640 embedding in one go); in blocks of rows they stay small.
    """
    if len(shape) != 2 or len(data.shape) != 2 or shape[0] * shape[1] <= DEQUANTIZE_CHUNK_ELEMENTS:
        return gguf.quants.dequantize(data, tensor_type)
    out = np.empty(shape, dtype=np.float32)
    rows = max(1, DEQUANTIZE_CHUNK_ELEMENTS // shape[1])
    for start in range(0, shape[0], rows):
        out[start:start + rows] = gguf.quants.dequantize(data[start:start + rows], tensor_type)
    return out


class GGUFCheckpoint:
    """The tensors of one GGUF file under their transformers names, read one at a time (float32).

    Opening a file parses its metadata once per process (the index is cached by path, size and
    mtime); each tensor is then read through its own short-lived memory map, so no page of the
    file stays resident. `config` is accepted for the interface's sake and not needed.
    """

    def __init__(self, path: Path, config=None):
        self.path = Path(path)
        self.files = [self.path]
        index = _index(file_version(self.path))
        self._processor, self._names, self._stored = index.processor, index.names, index.stored
        self.infos = dict(index.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def keys(self) -> list[str]:
        """All tensor names (transformers names), in file order."""
        return list(self.infos)

    def get(self, name: str) -> torch.Tensor:
        """Read, dequantize and process one tensor into a fresh float32 CPU tensor."""
        gguf = import_gguf()
        stored = self._stored.get(name)
        if stored is None:
            raise FormatError(f"tensor '{name}' is not in {self.path}")
        data = np.memmap(self.path, dtype=stored.dtype, mode="r", offset=stored.offset, shape=stored.data_shape)
        try:
            weights = _dequantize_rows(gguf, data, stored.tensor_type, tuple(self.infos[name].shape))
        except (NotImplementedError, ValueError) as exc:
            raise FormatError(f"{self.path}: cannot dequantize '{stored.gguf_name}' "
                              f"({stored.tensor_type.name}: {exc})") from None
        result = self._processor.process(weights=weights, name=stored.gguf_name, tensor_key_mapping=self._names,
                                         parsed_parameters={"tensors": {}})
        weights = result.weights
        if weights.dtype != np.float32 or not weights.flags.owndata or not weights.flags.writeable:
            weights = np.array(weights, dtype=np.float32)  # F32 tensors decode to views of the memory map
        del data
        value = torch.from_numpy(weights)
        shape = self.infos[name].shape
        if value.shape != shape:
            value = value.reshape(shape)
        return value

    def close(self) -> None:
        """Nothing to release: each tensor's memory map closes once it is decoded."""

    def __enter__(self) -> GGUFCheckpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
