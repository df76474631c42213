"""The fused head + loss on whole models: the same loss and LoRA gradients as the plain logits path,
in both compute regimes, on the families whose head it can fuse, and a refusal on those it cannot."""

from __future__ import annotations

import pytest
import torch
import transformers

from nibbletune.loading import load_model
from nibbletune.modules import LoraSettings, apply_lora, lora_layers
from nibbletune.quant import QuantSettings
from nibbletune.training.batches import token_loss_sum
from nibbletune.training.loss import FusedHead, agrees_with_logits, loss_sum

VOCAB = 384
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
    "llama-tied": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True),
    "gemma3-softcap": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=16, final_logit_softcapping=5.0,
                                                            sliding_window=16),
}
# Tolerance on the relative error of the summed loss and of the LoRA gradient norm-wise: float32 agrees to
# rounding; in bf16 both paths round the head matmul to bf16 but in different chunk orders.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def _widen(model) -> None:
    """Scale the random init so the logits spread over several units: the softcap and the softmax both bite."""
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0)
        model.get_output_embeddings().weight.mul_(5.0)


def _saved_base(family: str, directory) -> str:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    with torch.no_grad():
        _widen(model)
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def _lora_model(base: str, compute_dtype: str):
    model = load_model(base, QuantSettings(compute_dtype=compute_dtype))
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=generator))
    return model


def _batch(rows: int = 3, length: int = 24):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -5:] = 0  # a padded row
    labels = input_ids.clone()
    labels[:, :6] = -100  # an untrained prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask}, labels


def _loss_and_grads(model, inputs, labels, fused, compute_dtype):
    model.zero_grad(set_to_none=True)
    dtype = getattr(torch, compute_dtype)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_sum(model, inputs, labels, fused)
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), grads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_loss_and_lora_grads_equal_plain(family, compute_dtype, tmp_path, single_thread):
    model = _lora_model(_saved_base(family, tmp_path / family), compute_dtype)
    fused = FusedHead.of(model)
    assert fused is not None
    if family == "gemma3-softcap":
        assert fused.softcap == 5.0
    inputs, labels = _batch()
    plain_loss, plain_grads = _loss_and_grads(model, inputs, labels, None, compute_dtype)
    fused_loss, fused_grads = _loss_and_grads(model, inputs, labels, fused, compute_dtype)
    tolerance = TOLERANCE[compute_dtype]
    assert abs(fused_loss - plain_loss) <= tolerance * abs(plain_loss)
    assert plain_grads.norm() > 0
    assert (fused_grads - plain_grads).norm() <= tolerance * plain_grads.norm()


def test_softcap_is_not_optional(tmp_path, single_thread):
    """Dropping Gemma's softcap changes the loss: the equality above is not vacuous."""
    model = _lora_model(_saved_base("gemma3-softcap", tmp_path / "g"), "float32")
    fused = FusedHead.of(model)
    inputs, labels = _batch()
    uncapped = FusedHead(fused.decoder, fused.head, None)
    assert agrees_with_logits(model, fused, inputs, labels, tolerance=1e-5)
    assert not agrees_with_logits(model, uncapped, inputs, labels, tolerance=1e-2)


def test_a_scaled_head_is_detected_and_refused(tmp_path, single_thread):
    """Cohere multiplies its logits by logit_scale after lm_head: the fused loss would be wrong, and the
    trainer's pre-flight check sees it."""
    config = transformers.CohereConfig(**COMMON, logit_scale=0.25)
    torch.manual_seed(0)
    model = transformers.CohereForCausalLM(config)
    _widen(model)
    fused = FusedHead.of(model)
    inputs, labels = _batch()
    assert fused is not None
    assert not agrees_with_logits(model, fused, inputs, labels)


def test_a_biased_head_is_not_fused():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    model.lm_head = torch.nn.Linear(32, 64, bias=True)
    assert FusedHead.of(model) is None


def test_agrees_with_logits_keeps_the_training_mode(tmp_path, single_thread):
    model = _lora_model(_saved_base("llama", tmp_path / "l"), "float32")
    model.train()
    inputs, labels = _batch()
    assert agrees_with_logits(model, FusedHead.of(model), inputs, labels)
    assert model.training
    plain = token_loss_sum(model(**inputs).logits, labels)
    assert torch.isfinite(plain)
