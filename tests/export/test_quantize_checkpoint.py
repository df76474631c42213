"""quantize_checkpoint against transformers + bitsandbytes quantizing the same checkpoint itself."""

import json
import warnings

import pytest
import torch
from export_helpers import save_model, tiny_llama

from nibbletune.errors import FormatError
from nibbletune.export import OutputExistsError, quantize_checkpoint


def _bnb_logits(path, input_ids, **bnb_options):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"quantization_config": BitsAndBytesConfig(**bnb_options)} if bnb_options else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
        with torch.no_grad():
            return model(input_ids=input_ids).logits, model


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("fp4", False), ("nf4", True)])
def test_bnb_loads_our_checkpoint_like_its_own(base_dir, tmp_path, quant_type, double_quant):
    out = tmp_path / "q"
    report = quantize_checkpoint(base_dir, out, quant_type=quant_type, double_quant=double_quant, compute_dtype="float32")
    assert report.quantized == 14
    input_ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ours, _ = _bnb_logits(out, input_ids)
    theirs, _ = _bnb_logits(
        base_dir, input_ids, load_in_4bit=True, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32,
    )
    if double_quant:  # bitsandbytes' CPU absmax lookup table differs on ~0.1% of nested codes
        torch.testing.assert_close(ours, theirs, atol=2e-3 * theirs.abs().max().item(), rtol=0)
    else:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".*partial"))


def test_config_matches_what_transformers_writes(base_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    ours = tmp_path / "ours"
    quantize_checkpoint(base_dir, ours, compute_dtype="float32")
    _, model = _bnb_logits(base_dir, torch.zeros(1, 1, dtype=torch.long), load_in_4bit=True,
                           bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model.save_pretrained(tmp_path / "theirs")
    expected = json.loads((tmp_path / "theirs" / "config.json").read_text())["quantization_config"]
    assert json.loads((ours / "config.json").read_text())["quantization_config"] == expected


def test_sharded_source_and_output(tmp_path):
    src = save_model(tiny_llama(seed=3), tmp_path / "src", max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    out = tmp_path / "q"
    report = quantize_checkpoint(src, out, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert report.quantized == 14 and len(set(index["weight_map"].values())) > 1
    from nibbletune.loading import load_model

    load_model(out)  # our own loader reads the sharded 4-bit checkpoint


def test_refuses_existing_output(base_dir, tmp_path):
    (tmp_path / "q").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        quantize_checkpoint(base_dir, tmp_path / "q")
    quantize_checkpoint(base_dir, tmp_path / "q", overwrite=True)
    assert (tmp_path / "q" / "config.json").is_file()


def test_truncated_source_leaves_nothing(base_dir, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(base_dir, src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(FormatError, match="truncated"):
        quantize_checkpoint(src, tmp_path / "q")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_refuses_already_quantized(base_dir, tmp_path):
    quantize_checkpoint(base_dir, tmp_path / "q")
    with pytest.raises(FormatError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq")
