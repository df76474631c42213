"""After training: verified merge, 4-bit checkpoints, GGUF export.

`merge` folds a LoRA/DoRA adapter into the base weights (as training saw them) and verifies
the result; `quantize_checkpoint` writes the bitsandbytes 4-bit serialization; `export_gguf`
and `export_gguf_lora` write llama.cpp GGUF files and read them back to check them (they need
the `gguf` package, the `export` extra, imported when they run).
"""

from .atomic import OutputExistsError
from .gguf_export import export_gguf
from .gguf_lora import export_gguf_lora
from .merge import merge
from .quantize_checkpoint import quantize_checkpoint

__all__ = ["OutputExistsError", "merge", "quantize_checkpoint", "export_gguf", "export_gguf_lora"]
