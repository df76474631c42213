"""The adapter directory records the base quantization (nibbletune.json); inference runs in eval mode."""

import json
import shutil

import pytest
import torch
from export_helpers import make_adapter

from nibbletune.errors import FormatError
from nibbletune.export import merge
from nibbletune.loading import load_adapter, load_model
from nibbletune.loading.adapter_files import SIDECAR_NAME
from nibbletune.loading.base_record import recorded_base_quantization
from nibbletune.quant import QuantSettings


@pytest.fixture(scope="module")
def fp4_adapter(tmp_path_factory, base_dir):
    """An adapter trained against an fp4 / blocksize 128 / no double quant base, down_proj kept in float."""
    return make_adapter(base_dir, tmp_path_factory.mktemp("fp4") / "lora", quant_type="fp4", blocksize=128,
                        double_quant=False, skip_modules=["down_proj"], targets=["q_proj", "up_proj", "down_proj"])


def test_sidecar_records_the_training_quantization(fp4_adapter):
    record = json.loads((fp4_adapter / SIDECAR_NAME).read_text())
    assert record == {"format": 2, "base_quantization": {
        "quant_type": "fp4", "blocksize": 128, "double_quant": False, "compute_dtype": "float32",
        "skip_modules": ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]}}
    found = recorded_base_quantization(fp4_adapter)
    assert found.source.endswith(SIDECAR_NAME)
    assert found.settings == QuantSettings("fp4", 128, False, "float32",
                                           ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"))


def test_first_format_of_the_record_is_still_read(fp4_adapter, tmp_path):
    adapter = tmp_path / "old"
    shutil.copytree(fp4_adapter, adapter)
    (adapter / SIDECAR_NAME).write_text(json.dumps({"format": 1, "base_quantization": {
        "quant_type": "fp4", "blocksize": 128, "double_quant": False, "compute_dtype": "float32",
        "skip_modules": ["model.layers.0.mlp.down_proj"]}}))
    assert recorded_base_quantization(adapter).settings.skip_modules == ("model.layers.0.mlp.down_proj",)
    (adapter / SIDECAR_NAME).write_text(json.dumps({"format": 3, "base_quantization": None}))
    with pytest.raises(FormatError, match="newer"):
        recorded_base_quantization(adapter)


def test_peft_still_loads_the_directory(fp4_adapter, base_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), fp4_adapter)
    assert sum("lora_A" in name for name, _ in model.named_parameters()) == 6


def test_merge_uses_the_sidecar_and_it_matters(fp4_adapter, base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    report = merge(base_dir, fp4_adapter, tmp_path / "m", dtype="float32")
    assert report.base_record.source.endswith(SIDECAR_NAME)
    assert report.verification.relative_max_diff < 1e-4 and report.verification.top1_agreement == 1.0
    bare = tmp_path / "bare"  # the same adapter without its record: nf4 defaults, not the base it trained on
    shutil.copytree(fp4_adapter, bare)
    (bare / SIDECAR_NAME).unlink()
    assert recorded_base_quantization(bare).from_defaults
    merge(base_dir, bare, tmp_path / "wrong", dtype="float32")
    trained = load_model(base_dir, QuantSettings(quant_type="fp4", blocksize=128, double_quant=False, skip_modules=("down_proj",), compute_dtype="float32"))
    load_adapter(trained, fp4_adapter)
    input_ids = torch.arange(3, 19).view(1, 16)
    with torch.no_grad():
        expected = trained(input_ids=input_ids).logits
        right, wrong = (AutoModelForCausalLM.from_pretrained(tmp_path / name)(input_ids=input_ids).logits
                        for name in ("m", "wrong"))
    torch.testing.assert_close(right, expected, atol=1e-4, rtol=1e-4)
    assert (wrong - expected).abs().max() > 100 * (right - expected).abs().max()


def test_lookup_order_sidecar_then_config_yaml_then_defaults(fp4_adapter, tmp_path):
    adapter = tmp_path / "a"
    shutil.copytree(fp4_adapter, adapter)
    (adapter / "config.yaml").write_text("quant:\n  type: nf4\n  blocksize: 256\n  compute_dtype: auto\n")
    assert recorded_base_quantization(adapter).settings.quant_type == "fp4"  # the sidecar wins
    (adapter / SIDECAR_NAME).unlink()
    found = recorded_base_quantization(adapter)
    assert found.settings == QuantSettings("nf4", 256, True, "auto") and found.source.endswith("config.yaml")
    (adapter / SIDECAR_NAME).write_text("{not json")
    with pytest.raises(FormatError, match=SIDECAR_NAME):
        recorded_base_quantization(adapter)


def test_merge_cli_prints_a_note_for_defaults(base_dir, adapter_dir, tmp_path, capsys):
    from nibbletune.cli.main import main

    bare = tmp_path / "bare"
    shutil.copytree(adapter_dir, bare)
    (bare / SIDECAR_NAME).unlink()
    assert main(["merge", str(base_dir), str(bare), str(tmp_path / "m"), "--dtype", "float32"]) == 0
    assert "note: the adapter records no quantization settings" in capsys.readouterr().out


def test_load_adapter_follows_the_model_mode(base_dir, tmp_path):
    adapter = make_adapter(base_dir, tmp_path / "drop", dropout=0.5)
    model = load_model(base_dir, QuantSettings(compute_dtype="float32"))  # eval mode
    load_adapter(model, adapter)
    assert not any(module.training for module in model.modules())
    input_ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
    training = load_model(base_dir, QuantSettings(compute_dtype="float32")).train()
    load_adapter(training, adapter)
    assert all(module.training for module in training.modules())
