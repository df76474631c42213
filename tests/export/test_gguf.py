"""GGUF export: read back with gguf.GGUFReader and compare with the merged source."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from nibbletune.export import merge, quantize_checkpoint
from nibbletune.export.gguf_export import GGUFExportError, export_gguf, llama_permute


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, base_dir, adapter_dir):
    out = tmp_path_factory.mktemp("gguf") / "merged"
    merge(base_dir, adapter_dir, out, dtype="float32")
    return out


@pytest.mark.parametrize("out_type,tolerance", [("f32", 0.0), ("f16", 1e-3), ("q8_0", 1e-2), ("q4_0", 0.16)])
def test_roundtrip(merged_dir, tmp_path, out_type, tolerance):
    from safetensors.torch import load_file

    out = tmp_path / "m.gguf"
    report = export_gguf(merged_dir, out, out_type)
    assert report.tensors == 21 and report.max_rel_error <= tolerance
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    source = load_file(merged_dir / "model.safetensors")
    q = source["model.layers.1.self_attn.q_proj.weight"]
    k = source["model.layers.1.self_attn.k_proj.weight"]
    for name, expected in [("blk.1.attn_q.weight", llama_permute(q, 4, 4)), ("blk.1.attn_k.weight", llama_permute(k, 4, 2)),
                           ("token_embd.weight", source["model.embed_tokens.weight"]),
                           ("output_norm.weight", source["model.norm.weight"])]:
        t = tensors[name]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(expected.shape)
        scale = expected.abs().max().item()
        assert np.abs(got - expected.numpy()).max() <= tolerance * scale + (0 if out_type == "f32" else 1e-7)
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == 320 and len(fields["tokenizer.ggml.merges"].data) > 0
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 1


def test_permute_matches_llama_cpp_rope_layout():
    # llama.cpp rotates pairs (2i, 2i+1); HF rotates (i, i + d/2). The permute interleaves the halves.
    w = torch.arange(8.0).reshape(8, 1)  # one head, head_dim 8
    assert llama_permute(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_refuses_4bit_checkpoint_and_existing_output(base_dir, tmp_path):
    quantize_checkpoint(base_dir, tmp_path / "q")
    with pytest.raises(GGUFExportError, match="4-bit"):
        export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(Exception, match="already exists"):
        export_gguf(base_dir, tmp_path / "x.gguf")


def test_qwen2_and_mistral_names(tmp_path):
    import transformers
    from export_helpers import save_model

    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
    for name, config in [("qwen2", transformers.Qwen2Config(**small, tie_word_embeddings=True)),
                         ("mistral", transformers.MistralConfig(**small, sliding_window=32))]:
        torch.manual_seed(0)
        path = save_model(transformers.AutoModelForCausalLM.from_config(config), tmp_path / name)
        report = export_gguf(path, tmp_path / f"{name}.gguf", "f32")
        names = {t.name for t in gguf.GGUFReader(str(tmp_path / f"{name}.gguf")).tensors}
        assert report.arch == ("qwen2" if name == "qwen2" else "llama")
        assert "blk.0.attn_q.weight" in names and "token_embd.weight" in names
        if name == "qwen2":
            assert "blk.0.attn_q.bias" in names and "output.weight" not in names  # tied


def test_gguf_lora_adapter(base_dir, adapter_dir, tmp_path):
    from nibbletune.export.gguf_lora import export_gguf_lora
    from nibbletune.loading import read_adapter

    report = export_gguf_lora(adapter_dir, tmp_path / "a.gguf", base_dir)
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(16.0)
    tensors = {t.name: t for t in reader.tensors}
    assert report.tensors == 28 and "blk.0.attn_k.weight.lora_a" in tensors
    pair = read_adapter(adapter_dir).modules["model.layers.0.self_attn.k_proj"]
    a = np.asarray(tensors["blk.0.attn_k.weight.lora_a"].data).reshape(pair.lora_A.shape)
    b = np.asarray(tensors["blk.0.attn_k.weight.lora_b"].data).reshape(pair.lora_B.shape)
    # llama.cpp applies B @ A to the permuted base weight: the product must be the permuted delta
    expected = llama_permute(pair.lora_B @ pair.lora_A, 4, 2).numpy()
    np.testing.assert_allclose(b @ a, expected, rtol=1e-5, atol=1e-6)


def test_tokenizer_pre_detection():
    from nibbletune.export.gguf_export import PRE_TOKENIZER_REGEXES, detect_tokenizer_pre

    def split_then_bytelevel(regex):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}

    assert detect_tokenizer_pre({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False}}, "t") == "gpt-2"
    for regex, name in PRE_TOKENIZER_REGEXES.items():
        assert detect_tokenizer_pre(split_then_bytelevel(regex), "t") == name
    assert {"llama-bpe", "qwen2", "gpt-2"} == set(PRE_TOKENIZER_REGEXES.values())
    with pytest.raises(GGUFExportError, match="Metaspace"):  # SentencePiece-style: llama.cpp "llama" vocab
        detect_tokenizer_pre({"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}}, "t")
    with pytest.raises(GGUFExportError, match="no known llama.cpp equivalent"):
        detect_tokenizer_pre(split_then_bytelevel(r"\p{L}+"), "t")


def test_tokenizer_pre_override_from_cli(base_dir, tmp_path, capsys):
    from nibbletune.cli.main import main

    assert main(["export", "gguf", str(base_dir), str(tmp_path / "m.gguf"), "--type", "f32",
                 "--tokenizer-pre", "llama-bpe"]) == 0
    assert "read back and checked" in capsys.readouterr().out
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.pre"].contents() == "llama-bpe"


def test_refuses_unsupported_rope(tmp_path):
    import transformers
    from export_helpers import save_model

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                      vocab_size=64, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                      "rope_theta": 10000.0})
    path = save_model(transformers.LlamaForCausalLM(config), tmp_path / "dyn")
    with pytest.raises(GGUFExportError, match="rope type 'dynamic'"):
        export_gguf(path, tmp_path / "dyn.gguf")
    assert not (tmp_path / "dyn.gguf").exists()
