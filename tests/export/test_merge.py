"""merge: merged logits reproduce the unmerged QLoRA model; bad inputs fail before anything is written."""

import json
import shutil

import pytest
import torch
from export_helpers import make_adapter, save_model, tiny_llama

from nibbletune.errors import FormatError, NibbletuneError
from nibbletune.export import OutputExistsError, merge, quantize_checkpoint
from nibbletune.export.verify import VerificationError
from nibbletune.loading import read_adapter
from nibbletune.loading.adapter_files import AdapterMismatchError
from nibbletune.loading.base_record import recorded_base_quantization
from nibbletune.quant import QuantSettings


def _unmerged_and_merged_logits(base, adapter, merged, input_ids):
    from transformers import AutoModelForCausalLM

    from nibbletune.loading import load_adapter, load_model

    model = load_model(base, QuantSettings(compute_dtype="float32"))
    load_adapter(model, adapter)
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=input_ids).logits, plain(input_ids=input_ids).logits


@pytest.mark.parametrize("which", ["adapter_dir", "dora_dir"])
def test_float32_merge_matches_unmerged(request, base_dir, tmp_path, which):
    adapter = request.getfixturevalue(which)
    report = merge(base_dir, adapter, tmp_path / "m", dtype="float32")
    assert report.verification.relative_max_diff < 1e-4 and report.verification.top1_agreement == 1.0
    input_ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(5))
    unmerged, merged = _unmerged_and_merged_logits(base_dir, adapter, tmp_path / "m", input_ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_bfloat16_merge_reports_its_precision_loss(base_dir, adapter_dir, tmp_path):
    report = merge(base_dir, adapter_dir, tmp_path / "m", dtype="bfloat16")
    v = report.verification
    assert 1e-4 < v.relative_max_diff < 0.15 and v.top1_agreement >= 0.8


def test_merge_onto_4bit_checkpoint_equals_merge_onto_16bit_source(base_dir, adapter_dir, tmp_path):
    quantize_checkpoint(base_dir, tmp_path / "q4")
    merge(tmp_path / "q4", adapter_dir, tmp_path / "from4", dtype="float32")
    merge(base_dir, adapter_dir, tmp_path / "from16", dtype="float32")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "from4" / "model.safetensors"), load_file(tmp_path / "from16" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # double-quant absmax codes are identical (same quantizer), so weights are equal
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_base_16bit_merge_is_verified_with_a_loose_bound(base_dir, adapter_dir, tmp_path):
    report = merge(base_dir, adapter_dir, tmp_path / "m", dtype="float32", base_16bit=base_dir)
    assert report.base_16bit and report.verification.relative_max_diff > 1e-3  # quantization error shows


def test_failed_verification_keeps_no_output(base_dir, adapter_dir, tmp_path):
    with pytest.raises(VerificationError, match="does not reproduce"):
        merge(base_dir, adapter_dir, tmp_path / "m", dtype="bfloat16", tolerance=1e-9)
    assert list(tmp_path.iterdir()) == []


def test_adapter_for_another_base(adapter_dir, tmp_path):
    other = save_model(tiny_llama(seed=2, hidden=128, vocab_size=320), tmp_path / "other")
    with pytest.raises(AdapterMismatchError, match="another base"):
        merge(other, adapter_dir, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_adapter_with_missing_target_module(base_dir, tmp_path):
    adapter = tmp_path / "a"
    from safetensors.torch import load_file, save_file

    src = make_adapter(base_dir, tmp_path / "src", targets=["q_proj"])
    tensors = load_file(src / "adapter_model.safetensors")
    renamed = {k.replace("q_proj", "qkv_proj"): v for k, v in tensors.items()}
    adapter.mkdir()
    shutil.copy(src / "adapter_config.json", adapter)
    save_file(renamed, adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterMismatchError, match="qkv_proj"):
        merge(base_dir, adapter, tmp_path / "m")


def test_adapter_missing_key_and_truncated(adapter_dir, base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    dropped = next(k for k in tensors if k.endswith("lora_B.weight"))
    del tensors[dropped]
    save_file(tensors, broken / "adapter_model.safetensors")
    with pytest.raises(FormatError, match="missing key"):
        read_adapter(broken)
    truncated = tmp_path / "truncated"
    shutil.copytree(adapter_dir, truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated"):
        merge(base_dir, truncated, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_existing_output_refused(base_dir, adapter_dir, tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(OutputExistsError):
        merge(base_dir, adapter_dir, tmp_path / "m")


def test_training_quant_settings_are_read_from_the_run(base_dir, adapter_dir, tmp_path):
    adapter = tmp_path / "run"
    shutil.copytree(adapter_dir, adapter)
    (adapter / "nibbletune.json").unlink()  # a run without the record: the run's config.yaml is read
    (adapter / "config.yaml").write_text("quant:\n  type: fp4\n  double_quant: true\n  blocksize: 64\n")
    assert recorded_base_quantization(adapter).settings.quant_type == "fp4"
    report = merge(base_dir, adapter, tmp_path / "fp4", dtype="float32")
    assert report.base_record.settings.quant_type == "fp4" and report.base_record.source.endswith("config.yaml")
    report = merge(base_dir, adapter, tmp_path / "nf4", dtype="float32", quant=QuantSettings(quant_type="nf4"))
    assert report.base_record.source == "command line" and report.verification.passed
    from safetensors.torch import load_file

    key = "model.layers.0.mlp.up_proj.weight"
    a, b = (load_file(tmp_path / n / "model.safetensors")[key] for n in ("fp4", "nf4"))
    assert not torch.equal(a, b)  # the recorded codebook was used


def test_base_missing_a_target_weight(base_dir, adapter_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    tensors = load_file(base / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match="down_proj.weight"):
        merge(base, adapter_dir, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_multi_round_loftq_adapter_is_refused(base_dir, adapter_dir, tmp_path):
    from nibbletune.modules.loftq import LOFTQ_NOTE

    adapter = tmp_path / "loftq_adapter"
    shutil.copytree(adapter_dir, adapter)
    (adapter / LOFTQ_NOTE).write_text(json.dumps({"init": "loftq", "num_iters": 2, "base_is_plain_quantization": False}))
    with pytest.raises(NibbletuneError, match="2-round LoftQ adapter"):
        merge(base_dir, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (adapter / LOFTQ_NOTE).write_text(json.dumps({"init": "loftq", "num_iters": 1, "base_is_plain_quantization": True}))
    merge(base_dir, adapter, tmp_path / "out")  # one round: trained on plain Q(W), merges as usual


@pytest.mark.parametrize("change", [{"rank_pattern": {"q_proj": 4}}, {"alpha_pattern": {"q_proj": 2}},
                                    {"modules_to_save": ["lm_head"]}, {"bias": "lora_only"}, {"r": 4}],
                         ids=["rank_pattern", "alpha_pattern", "modules_to_save", "bias", "wrong-rank"])
def test_merge_refuses_exactly_what_load_adapter_refuses(base_dir, adapter_dir, tmp_path, change):
    """One reader (`loading.read_adapter`): merge --no-verify cannot apply an adapter generate would refuse."""
    from nibbletune.loading import load_adapter, load_model

    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(FormatError) as refused_by_load:
        load_adapter(load_model(base_dir, QuantSettings(compute_dtype="float32")), adapter)
    with pytest.raises(FormatError) as refused_by_merge:
        merge(base_dir, adapter, tmp_path / "m", verify=False)
    assert str(refused_by_merge.value) == str(refused_by_load.value)
    assert not (tmp_path / "m").exists()
