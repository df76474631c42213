"""Checkpoint reading and the errors a user can cause: one NibbletuneError naming the file or tensor."""

import json
import shutil
import struct

import pytest
import torch
from loading_helpers import dequantized_reference, model_output
from safetensors.torch import save_file

from nibbletune.errors import FormatError, NibbletuneError, QuantizationError
from nibbletune.loading import UnsupportedModelError, load_model, load_tokenizer, open_checkpoint
from nibbletune.loading.safetensors_io import read_header
from nibbletune.quant import QuantSettings


@pytest.fixture
def llama_dir(saved_family, tmp_path):
    """A private copy of the saved tiny Llama that a test may damage."""
    _, path = saved_family("llama")
    target = tmp_path / "llama"
    shutil.copytree(path, target)
    return target


def _one_line(exc: Exception) -> str:
    message = str(exc)
    assert "\n" not in message
    return message


def test_sharded_checkpoint(saved_family, tmp_path):
    model, _ = saved_family("llama")
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    with open_checkpoint(tmp_path) as checkpoint:
        assert len(checkpoint.files) > 3
        assert checkpoint.infos["model.norm.weight"].shape == (64,)
    loaded = load_model(tmp_path, QuantSettings(compute_dtype="float32"))
    input_ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    torch.testing.assert_close(model_output(loaded, input_ids), model_output(dequantized_reference(model), input_ids),
                               atol=1e-5, rtol=1e-4)


def test_missing_shard(saved_family, tmp_path):
    model, _ = saved_family("llama")
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FormatError, match=shard.name):
        load_model(tmp_path)


@pytest.mark.parametrize("keep_fraction", [0.0, 0.5, 0.999])
def test_truncated_file(llama_dir, keep_fraction):
    weights = llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(4, int(len(data) * keep_fraction))])
    with pytest.raises(FormatError, match="model.safetensors") as info:
        load_model(llama_dir)
    assert "truncated" in _one_line(info.value) or "not a safetensors" in str(info.value)


def test_corrupt_header(llama_dir):
    weights = llama_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[20:30] = b"\xff" * 10  # inside the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="corrupt"):
        load_model(llama_dir)


def _write_safetensors(path, header: dict, data_bytes: int = 16):
    """A safetensors file with `header` as written and `data_bytes` zero bytes of data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_bytes))
    return path


def test_inconsistent_offsets(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    path = _write_safetensors(tmp_path / "bad.safetensors", header)
    with pytest.raises(FormatError, match="'a' has byte range"):
        read_header(path)


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    path = _write_safetensors(tmp_path / "bad.safetensors", header)
    with pytest.raises(FormatError, match="overlap"):
        read_header(path)


def test_pickle_checkpoint_refused(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, llama_dir / "pytorch_model.bin")
    with pytest.raises(FormatError, match="pytorch_model.bin.*safetensors only"):
        load_model(llama_dir)
    with pytest.raises(FormatError, match="pickle"):
        open_checkpoint(llama_dir / "pytorch_model.bin")


def test_directory_without_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(FormatError, match="no model weights"):
        load_model(llama_dir)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FormatError, match="not a directory"):
        load_model(tmp_path / "absent")
    with pytest.raises(FormatError, match="no config.json"):
        load_model(tmp_path)


def test_shape_mismatch_names_tensor_and_shapes(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["intermediate_size"] = 192
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError) as info:
        load_model(llama_dir)
    message = _one_line(info.value)
    assert "model.layers.0.mlp.gate_proj.weight" in message and "[128, 64]" in message and "[192, 64]" in message


def test_missing_weight_for_a_module(llama_dir):
    from safetensors.torch import load_file

    state = load_file(llama_dir / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, llama_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FormatError, match="model.layers.1.self_attn.k_proj.weight"):
        load_model(llama_dir)


def test_nan_weight_named(llama_dir):
    from safetensors.torch import load_file

    state = load_file(llama_dir / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, llama_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match="model.layers.0.mlp.up_proj.weight"):
        load_model(llama_dir)


def test_unknown_model_type(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["model_type"] = "llamazing"
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="unknown model_type 'llamazing'"):
        load_model(llama_dir)


def test_remote_code_refused(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config.update(model_type="my_custom_llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="trust_remote_code=True") as info:
        load_model(llama_dir)
    assert isinstance(info.value, NibbletuneError)
    _one_line(info.value)


def test_architecture_without_causal_lm(saved_family):
    _, path = saved_family("bert")
    import transformers

    with pytest.raises(UnsupportedModelError, match="bert"):
        load_model(path, model_class=transformers.AutoModelForImageClassification)


def test_unsupported_quantization_config(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="gptq"):
        load_model(llama_dir)


def test_tokenizer_errors_and_loading(llama_dir, tmp_path):
    with pytest.raises(FormatError, match="tokenizer"):
        load_tokenizer(llama_dir)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(llama_dir)
    assert load_tokenizer(llama_dir)("hello world")["input_ids"] == [1, 2]


def test_single_file_checkpoint_listing(llama_dir):
    with open_checkpoint(llama_dir / "model.safetensors") as checkpoint:
        assert "lm_head.weight" in checkpoint
        assert checkpoint.get("model.norm.weight").shape == (64,)
        with pytest.raises(FormatError, match="not in the checkpoint"):
            checkpoint.get("nope")


def test_reader_matches_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = {
        "bf16": torch.randn(3, 5).bfloat16(), "f16": torch.randn(7).half(), "f32": torch.randn(2, 2, 2),
        "i64": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(9, dtype=torch.uint8), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "a.safetensors")
    with open_checkpoint(tmp_path / "a.safetensors") as checkpoint, safe_open(tmp_path / "a.safetensors", "pt") as oracle:
        assert set(checkpoint.keys()) == set(tensors)
        for name in tensors:
            ours, theirs = checkpoint.get(name), oracle.get_tensor(name)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs)
