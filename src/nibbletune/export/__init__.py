"""After training: verified merge, 4-bit checkpoints, GGUF export.

`merge` folds a LoRA/DoRA adapter into the base weights (as training saw them) and verifies
the result; `quantize_checkpoint` writes the bitsandbytes 4-bit serialization; `export_gguf`
writes a llama.cpp GGUF file and reads it back to check it.
"""

from .atomic import OutputExistsError
from .quantize_checkpoint import quantize_checkpoint

__all__ = ["OutputExistsError", "quantize_checkpoint"]

try:  # written in the same change; tolerated while absent
    from .merge import merge
except ModuleNotFoundError as exc:  # pragma: no cover
    if exc.name != f"{__name__}.merge":
        raise
else:
    __all__ += ["merge"]

try:
    from .gguf_export import export_gguf
except ModuleNotFoundError as exc:  # pragma: no cover
    if exc.name not in (f"{__name__}.gguf_export", "gguf"):
        raise
else:
    from .gguf_lora import export_gguf_lora

    __all__ += ["export_gguf", "export_gguf_lora"]
