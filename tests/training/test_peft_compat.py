"""The adapter `nibbletune train` writes loads in peft.PeftModel on a transformers+bitsandbytes 4-bit base."""

from __future__ import annotations

import warnings

import pytest
import torch

from bnb_reference import exact_bnb
from nibbletune.loading import load_adapter, load_model
from nibbletune.quant import QuantSettings
from nibbletune.training import TrainHooks, load_config, train
from numerics import assert_close_rounding

# Rounding steps whose placement differs between our fused LoRA op and PEFT's modules, per linear
# layer: the LoRA branch's scaling (before B here, after it in PEFT) and its cast-and-add into the
# base output. A token passes 2 layers x 7 linears, plus the head.
ROUNDINGS = 2 * (2 * 7) + 1


def test_output_adapter_in_peft_matches_our_logits(make_config, tiny_base, compute_dtype):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, compute_dtype)
    path, output_dir = make_config("peft", max_steps=3, eval_every=0, lr=2e-2)
    trained = []
    train(load_config(path, ["quant.double_quant=false", f"quant.compute_dtype={compute_dtype}"]), progress=False,
          hooks=TrainHooks(on_model=trained.append))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])

    quant = QuantSettings(double_quant=False, compute_dtype=compute_dtype)
    ours = load_model(tiny_base, quant)
    load_adapter(ours, output_dir)
    with torch.no_grad():
        trained_logits = trained[0].eval()(input_ids=ids).logits  # the model as training left it
        our_logits = ours(input_ids=ids).logits
        base_logits = load_model(tiny_base, quant)(input_ids=ids).logits
    assert not torch.allclose(trained_logits.float(), base_logits.float(), atol=1e-2)  # the adapter changes something
    torch.testing.assert_close(our_logits, trained_logits, atol=0, rtol=0)  # the saved adapter is the trained one

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=quantization,
                                                    device_map="cpu", dtype=dtype)
        model = exact_bnb(peft.PeftModel.from_pretrained(base, output_dir)).eval()
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits
    assert_close_rounding(peft_logits, trained_logits, compute_dtype, ROUNDINGS)
