"""Shared by tests/loading: tiny random models of each supported family, saved as safetensors, and their dequantized references."""

from __future__ import annotations

import copy

import torch
import transformers

from nibbletune.modules import LinearNF4, four_bit_layer_names
from nibbletune.modules.linear_layers import to_linear_layout
from nibbletune.quant import quantize

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
DECODER = dict(SMALL, num_key_value_heads=2, max_position_embeddings=128)

# family -> (config factory, linears quantized by default in a 2-layer model)
FAMILIES = {
    "llama": (lambda: transformers.LlamaConfig(**DECODER, tie_word_embeddings=False), 14),
    "mistral": (lambda: transformers.MistralConfig(**DECODER, sliding_window=32), 14),
    "qwen2": (lambda: transformers.Qwen2Config(**DECODER, tie_word_embeddings=True), 14),
    "qwen3": (lambda: transformers.Qwen3Config(**DECODER, head_dim=16), 14),
    "gemma": (lambda: transformers.GemmaConfig(**DECODER, head_dim=16), 14),
    "gemma2": (lambda: transformers.Gemma2Config(**DECODER, head_dim=16, sliding_window=32), 14),
    "phi3": (lambda: transformers.Phi3Config(**DECODER, pad_token_id=0), 8),
    "gpt2": (lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=256), 8),
    "bert": (lambda: transformers.BertConfig(**SMALL, max_position_embeddings=128), 13),
}
DECODERS = [name for name in FAMILIES if name != "bert"]


def build_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised fp32 model of `family` in eval mode."""
    torch.manual_seed(seed)
    config = FAMILIES[family][0]()
    cls = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    model = cls.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # norms start at 1/0: perturb them so a loader that skips them is caught
        for name, param in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def dequantized_reference(model, skip_modules=(), blocksize=64, double_quant=True, quant_type="nf4"):
    """A copy of `model` whose selected linear weights are dequantize(quantize(W)) in fp32."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in four_bit_layer_names(reference, skip_modules):
            module = reference.get_submodule(name)
            weight = to_linear_layout(module, module.weight)
            decoded = quantize(weight, quant_type, blocksize, double_quant).dequantize(torch.float32)
            module.weight.copy_(decoded if isinstance(module, torch.nn.Linear) else decoded.t())
    return reference


def model_output(model, input_ids):
    """Logits for a causal LM, last hidden state for an encoder."""
    with torch.no_grad():
        out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def count_nf4(model) -> int:
    """Number of LinearNF4 modules in `model`."""
    return sum(1 for m in model.modules() if isinstance(m, LinearNF4))


def count_plain_linears(model) -> int:
    """Number of nn.Linear / Conv1D modules left unquantized in `model`."""
    from nibbletune.modules.linear_layers import is_conv1d

    return sum(1 for m in model.modules() if type(m) is torch.nn.Linear or is_conv1d(m))
