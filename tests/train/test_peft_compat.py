"""The adapter `nibbletune train` writes loads in peft.PeftModel on a transformers+bitsandbytes 4-bit base."""

from __future__ import annotations

import warnings

import pytest
import torch

from nibbletune.train import TrainHooks, load_config, train


def test_output_adapter_in_peft_matches_our_logits(make_config, tiny_base):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nibbletune.loading import load_model
    from nibbletune.loading.peft_adapter import load_adapter

    path, output_dir = make_config("peft", max_steps=3, eval_every=0, lr=2e-2)
    trained = []
    train(load_config(path, ["quant.double_quant=false"]), progress=False,
          hooks=TrainHooks(on_model=trained.append))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])

    ours = load_model(tiny_base, quant_type="nf4", double_quant=False, blocksize=64, compute_dtype="float32")
    load_adapter(ours, output_dir)
    ours.eval()  # the LoRA layers load_adapter adds are new modules, in training mode (dropout on)
    with torch.no_grad():
        trained_logits = trained[0].eval()(input_ids=ids).logits  # the model as training left it
        our_logits = ours(input_ids=ids).logits
        base_logits = load_model(tiny_base, "nf4", False, 64, "float32")(input_ids=ids).logits
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3)  # the adapter changes something
    torch.testing.assert_close(our_logits, trained_logits, atol=1e-5, rtol=1e-5)

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=quantization,
                                                    device_map="cpu", dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, output_dir).eval()
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, trained_logits, atol=2e-4, rtol=1e-4)
