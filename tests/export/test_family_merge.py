"""Every common family goes train -> merge (float32, verified) -> PEFT on transformers+bitsandbytes agrees.

Tiny random configs (no real weights are installable for these in CI); the real SmolLM2 / Gemma 3
GGUF bases run the same path in tests/real/.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from export_helpers import save_model, train_tokenizer

from bnb_reference import exact_bnb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from train_helpers import make_rows, write_jsonl  # noqa: E402

import nibbletune  # noqa: E402

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 0, "eos_token_id": 1}
FAMILIES = {
    "llama-tied": lambda v: transformers.LlamaConfig(**SMALL, vocab_size=v, tie_word_embeddings=True),
    # hidden 640: sqrt(640) is not exact in bf16, so a wrongly built embed_scale shows
    "gemma3": lambda v: transformers.Gemma3TextConfig(**{**SMALL, "hidden_size": 640, "num_attention_heads": 2,
                                                        "num_key_value_heads": 1}, head_dim=32, vocab_size=v,
                                                     sliding_window=16),
    "qwen3": lambda v: transformers.Qwen3Config(**SMALL, vocab_size=v, head_dim=16),
    "phi3": lambda v: transformers.Phi3Config(**SMALL, vocab_size=v, pad_token_id=0),
}
IDS = torch.tensor([[0, 5, 17, 42, 99, 7, 3, 250, 11, 64, 2, 30]])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_merge_and_peft_agree(family, tmp_path):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    tokenizer = train_tokenizer()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](len(tokenizer)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.mul_(3.0) if "norm" not in name else param.add_(0.1 * torch.randn_like(param))
    base = save_model(model, tmp_path / "base", tokenizer)
    write_jsonl(tmp_path / "train.jsonl", make_rows(16, seed=1))
    raw = {"model": str(base), "data": {"path": str(tmp_path / "train.jsonl"), "format": "completion"},
           "output_dir": str(tmp_path / "run"),
           "quant": {"double_quant": False, "compute_dtype": "float32"},  # bitsandbytes picks the same codes
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"max_steps": 3, "micro_batch_size": 4, "seq_len": 48, "lr": 2e-2}}
    nibbletune.train(raw, progress=False)
    report = nibbletune.merge(base, tmp_path / "run", tmp_path / "merged", dtype="float32")
    assert report.verification.relative_max_diff <= 1e-3 and report.verification.top1_agreement == 1.0

    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_base = transformers.AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb_config,
                                                                     device_map="cpu", dtype=torch.float32)
        with_peft = exact_bnb(peft.PeftModel.from_pretrained(bnb_base, tmp_path / "run")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        peft_logits, merged_logits = with_peft(input_ids=IDS).logits, merged(input_ids=IDS).logits
    spread = merged_logits.std()
    assert (peft_logits - merged_logits).abs().max() / spread <= 1e-3
    assert torch.equal(peft_logits.argmax(-1), merged_logits.argmax(-1))
