"""A GGUF file as the base model: the same tensors, config and tokenizer as transformers reads from it,
streamed into 4 bits; training, merging and quantizing from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

gguf = pytest.importorskip("gguf")

from export_helpers import save_model, tiny_llama, train_tokenizer  # noqa: E402
from train_helpers import make_rows, write_jsonl  # noqa: E402

import nibbletune  # noqa: E402
from nibbletune.errors import FormatError  # noqa: E402
from nibbletune.loading.model_files import open_weights  # noqa: E402

F32 = nibbletune.QuantSettings(compute_dtype="float32")
IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 2]])


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    """(a tiny Llama written as Q8_0 GGUF by our exporter, transformers' own float32 reading of it)."""
    from nibbletune.export import export_gguf

    root = tmp_path_factory.mktemp("gguf-base")
    tokenizer = train_tokenizer()
    source = save_model(tiny_llama(vocab_size=len(tokenizer)), root / "hf", tokenizer)
    path = root / "tiny.gguf"
    export_gguf(source, path, "q8_0")
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    return path, reference


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tensors_config_and_tokenizer_are_what_transformers_reads(gguf_base):
    path, reference = gguf_base
    weights = open_weights(path)
    state = reference.state_dict()
    assert sorted(weights.keys()) == sorted(k for k in state if k != "lm_head.weight" or not
                                            reference.config.tie_word_embeddings)
    for name in weights.keys():
        assert torch.equal(weights.get(name), state[name]), name
    assert nibbletune.loading.load_config(path).to_dict() == transformers.AutoConfig.from_pretrained(
        path.parent, gguf_file=path.name).to_dict()
    ours, theirs = nibbletune.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name)
    text = "question: what is the capital of france? answer: paris"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]


def test_loaded_in_4bit_like_the_same_weights_from_safetensors(gguf_base, tmp_path):
    """Streaming from the GGUF file gives bit for bit the model loading its dequantized weights from safetensors."""
    path, reference = gguf_base
    unquantized = nibbletune.load_model(path, nibbletune.QuantSettings(compute_dtype="float32", skip_modules=(".*",)))
    torch.testing.assert_close(_logits(unquantized), _logits(reference), atol=0, rtol=0)
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    plain = transformers.AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(reference.state_dict())
    plain.save_pretrained(tmp_path / "dequantized", safe_serialization=True)
    from_gguf, from_safetensors = nibbletune.load_model(path, F32), nibbletune.load_model(tmp_path / "dequantized", F32)
    assert sum(isinstance(m, nibbletune.modules.LinearNF4) for m in from_gguf.modules()) == 14
    torch.testing.assert_close(_logits(from_gguf), _logits(from_safetensors), atol=0, rtol=0)


def test_unquantized_gguf_base_is_plain_linears_for_lora(gguf_base):
    """method lora / full from a GGUF: every linear a dense nn.Linear (LoRA wraps it), same logits."""
    path, reference = gguf_base
    model = nibbletune.loading.load_unquantized(path, torch.float32)
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert len(linears) == 15  # 7 per layer x 2 layers + the head
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(_logits(model), _logits(reference), atol=0, rtol=0)
    assert len(nibbletune.apply_lora(model, nibbletune.LoraSettings(r=4, target_modules="all-linear"))) == 14


def test_directory_holding_one_gguf(gguf_base, tmp_path):
    path, _ = gguf_base
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "model.gguf").symlink_to(path)
    nibbletune.load_model(tmp_path / "one", F32)
    (tmp_path / "one" / "other.gguf").symlink_to(path)
    with pytest.raises(FormatError, match="holds 2 GGUF files"):
        nibbletune.load_model(tmp_path / "one", F32)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(FormatError, match="broken.gguf"):
        nibbletune.load_model(tmp_path / "broken.gguf", F32)


def test_train_merge_and_quantize_from_a_gguf_base(gguf_base, tmp_path):
    path, _ = gguf_base
    write_jsonl(tmp_path / "train.jsonl", make_rows(24, seed=1))
    raw = {"model": str(path), "data": {"path": str(tmp_path / "train.jsonl"), "format": "completion"},
           "output_dir": str(tmp_path / "run"), "quant": {"compute_dtype": "float32"},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "train": {"max_steps": 3, "micro_batch_size": 4, "seq_len": 48, "lr": 1e-2}}
    result = nibbletune.train(raw, progress=False)
    assert result.losses[-1] < result.losses[0]
    report = nibbletune.merge(path, tmp_path / "run", tmp_path / "merged", dtype="float32")
    assert report.verification.relative_max_diff < 1e-3  # the merge reproduces the QLoRA model on the GGUF base
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # an ordinary HF directory
    transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.config.model_type == "llama" and merged.config.architectures == ["LlamaForCausalLM"]
    quantized = nibbletune.quantize_checkpoint(path, tmp_path / "nf4")
    assert quantized.quantized == 14 and (tmp_path / "nf4" / "tokenizer.json").is_file()
