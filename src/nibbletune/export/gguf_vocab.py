"""The tokenizer of a model directory as llama.cpp's `tokenizer.ggml.*` keys.

Two kinds, as convert_hf_to_gguf writes them:

- a byte-level BPE tokenizer.json (GPT-2, Llama 3, Qwen) -> model "gpt2": tokens, token types,
  merges and `tokenizer.ggml.pre`, detected from the pre-tokenizer regex ("gpt-2", "llama-bpe",
  "qwen2"; others must be named) where convert_hf_to_gguf hashes a sample's tokenization;
- a SentencePiece BPE model (Gemma, Llama 2, Phi-3: tokenizer.json BPE with byte fallback,
  spaces as "\u2581") -> model "llama": pieces, scores and types read from tokenizer.model
  (`_create_vocab_sentencepiece`), then the added tokens. The protobuf is parsed here, so the
  `sentencepiece` package is not needed. `add_space_prefix` is what the HF tokenizer does: a
  Prepend("\u2581") normalizer or a Metaspace pre-tokenizer that prepends (Llama 2, Phi-3), none
  for Gemma.

Both add the special ids, add_bos/add_eos and the chat template through `gguf.SpecialVocab`.
Anything else (Unigram, WordPiece, a byte-fallback tokenizer.json without its tokenizer.model)
is refused with one line naming the file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .gguf_arch import GGUFExportError

_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# tokenizer.json pre-tokenizer regex -> llama.cpp's tokenizer.ggml.pre (llama-vocab.cpp).
PRE_TOKENIZER_REGEXES = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "llama-bpe",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "qwen2",
    _GPT2_REGEX: "gpt-2",
}
SPACE = "\u2581"  # SentencePiece's visible space
_SPM_BPE = 2  # TrainerSpec.ModelType (UNIGRAM = 1, BPE = 2, WORD = 3, CHAR = 4)


def detect_tokenizer_pre(tokenizer_json: dict, path: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, from its pre-tokenizer.

    A ByteLevel pre-tokenizer with its own (GPT-2) regex is llama.cpp's "gpt-2"; a Split with the
    Llama 3 / Qwen2 regex followed by ByteLevel is "llama-bpe" / "qwen2".
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in PRE_TOKENIZER_REGEXES:
            return PRE_TOKENIZER_REGEXES[regex]
    raise GGUFExportError(f"{path}: pre-tokenizer {kinds or 'none'} has no known llama.cpp equivalent "
                          f"(supported: byte-level BPE as GPT-2, Llama 3, Qwen2); name one with --tokenizer-pre")


def tokenizer_kind(root: Path) -> str | None:
    """"gpt2" (byte-level BPE), "llama" (SentencePiece BPE) or None (no tokenizer files); refuses the rest."""
    json_path, spm_path = root / "tokenizer.json", root / "tokenizer.model"
    if not json_path.is_file():
        return "llama" if spm_path.is_file() else None
    model = json.loads(json_path.read_text(encoding="utf-8")).get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{json_path}: {model.get('type')} tokenizers are not supported for GGUF export "
                              "(byte-level BPE or SentencePiece BPE)")
    if not model.get("byte_fallback"):
        return "gpt2"
    if not spm_path.is_file():
        raise GGUFExportError(f"{json_path}: is a SentencePiece tokenizer (BPE with byte fallback); GGUF export "
                              f"reads its pieces and scores from {spm_path.name}, which is missing")
    return "llama"


def write_tokenizer(writer, gguf, root: Path, vocab_size: int, pre: str | None = None) -> str | None:
    """Add the tokenizer keys for `root`; return the tokenizer model written ("gpt2", "llama") or None."""
    kind = tokenizer_kind(root)
    if kind == "gpt2":
        _write_bpe(writer, gguf, root, vocab_size, pre)
    elif kind == "llama":
        if pre is not None:
            raise GGUFExportError(f"{root}: --tokenizer-pre applies to byte-level BPE tokenizers, "
                                  "not SentencePiece ones")
        _write_sentencepiece(writer, gguf, root, vocab_size)
    return kind


def _write_bpe(writer, gguf, root: Path, vocab_size: int, pre: str | None) -> None:
    """GPT-2 style BPE vocabulary (convert_hf_to_gguf `_set_vocab_gpt2`).

    Read from tokenizer.json with the `tokenizers` library, not AutoTokenizer: transformers may
    rebuild a tokenizer from the model type (e.g. a Qwen2 class adding tokens), while llama.cpp
    must get exactly what the file holds. Ids up to vocab_size without a token are "[PAD<id>]".
    """
    from tokenizers import Tokenizer

    path = root / "tokenizer.json"
    pre = pre or detect_tokenizer_pre(json.loads(path.read_text(encoding="utf-8")), path)
    tokenizer = Tokenizer.from_file(str(path))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"{path}: tokenizer has ids up to {max(vocab.values())} but vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(root, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


@dataclass
class SentencePieceModel:
    """What llama.cpp needs of a tokenizer.model (sentencepiece_model.proto ModelProto)."""

    pieces: list[tuple[str, float, int]]  # (piece, score, SentencePiece.Type: 1 normal ... 6 byte)
    model_type: int  # TrainerSpec.model_type
    add_dummy_prefix: bool  # NormalizerSpec.add_dummy_prefix


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _protobuf_fields(data: bytes, path: Path):
    """Yield (field number, value) of one protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise GGUFExportError(f"{path}: not a SentencePiece model (protobuf wire type {wire})")
        yield key >> 3, value


def read_sentencepiece(path: Path) -> SentencePieceModel:
    """Parse tokenizer.model: ModelProto {1: pieces {1: piece, 2: score, 3: type}, 2: trainer_spec
    {3: model_type}, 3: normalizer_spec {3: add_dummy_prefix}}, with the proto's defaults."""
    try:
        pieces, model_type, add_dummy_prefix = [], 1, True
        for number, value in _protobuf_fields(path.read_bytes(), path):
            if number == 1:
                fields = dict(_protobuf_fields(value, path))
                pieces.append((fields.get(1, b"").decode("utf-8"), struct.unpack("<f", fields.get(2, bytes(4)))[0],
                               fields.get(3, 1)))
            elif number == 2:
                model_type = dict(_protobuf_fields(value, path)).get(3, 1)
            elif number == 3:
                add_dummy_prefix = bool(dict(_protobuf_fields(value, path)).get(3, 1))
    except (IndexError, UnicodeDecodeError, struct.error):
        raise GGUFExportError(f"{path}: not a readable SentencePiece model") from None
    if not pieces:
        raise GGUFExportError(f"{path}: SentencePiece model has no pieces")
    return SentencePieceModel(pieces, model_type, add_dummy_prefix)


def _adds_space_prefix(tokenizer_json: dict | None, model: SentencePieceModel) -> bool:
    """Whether the HF tokenizer prepends "\u2581" to the text (the model's own flag without tokenizer.json)."""
    if tokenizer_json is None:
        return model.add_dummy_prefix

    def steps(node: dict | None, key: str) -> list[dict]:
        node = node or {}
        return node.get(key, []) if node.get("type") == "Sequence" else [node]

    normalizers = steps(tokenizer_json.get("normalizer"), "normalizers")
    pre_tokenizers = steps(tokenizer_json.get("pre_tokenizer"), "pretokenizers")
    return (any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in normalizers)
            or any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
                   for p in pre_tokenizers))


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's `does_token_look_special`: added tokens that act as control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _write_sentencepiece(writer, gguf, root: Path, vocab_size: int) -> None:
    """SentencePiece BPE vocabulary (convert_hf_to_gguf `_set_vocab_sentencepiece`).

    Pieces keep their scores and types (user-defined pieces become normal, as there); the
    tokenizer's added tokens then take score -1000 and are CONTROL when special.
    """
    path = root / "tokenizer.model"
    model = read_sentencepiece(path)
    if model.model_type != _SPM_BPE:
        raise GGUFExportError(f"{path}: SentencePiece model type {model.model_type} is not BPE (2); "
                              "llama.cpp reads only SentencePiece BPE as a 'llama' vocabulary")
    if len(model.pieces) > vocab_size:
        raise GGUFExportError(f"{path}: has {len(model.pieces)} pieces but vocab_size is {vocab_size}")
    T = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    for i, (piece, score, piece_type) in enumerate(model.pieces):
        tokens[i], scores[i] = piece, score
        types[i] = piece_type if piece_type in (T.UNKNOWN, T.CONTROL, T.UNUSED, T.BYTE) else int(T.NORMAL)
    json_path = root / "tokenizer.json"
    tokenizer_json = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else None
    for added in _added_tokens(root, tokenizer_json):
        token_id, content = added["id"], added["content"]
        if token_id >= vocab_size:
            raise GGUFExportError(f"{root}: added token {content!r} has id {token_id} but vocab_size is {vocab_size}")
        if added.get("special") or _looks_special(content):
            types[token_id] = int(T.CONTROL)
        else:
            content = content.replace(SPACE, " ")  # llama.cpp expects user-defined tokens pre-normalized
            types[token_id] = int(T.USER_DEFINED)
        tokens[token_id], scores[token_id] = content, -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(tokenizer_json, model))
    gguf.SpecialVocab(root, n_vocab=len(tokens)).add_to_gguf(writer)


def _added_tokens(root: Path, tokenizer_json: dict | None) -> list[dict]:
    """[{"id", "content", "special"}] from added_tokens.json, tokenizer.json and tokenizer_config.json
    (later files win, as convert_hf_to_gguf reads them)."""
    found: dict[int, dict] = {}
    added_json = root / "added_tokens.json"
    if added_json.is_file():
        for content, token_id in json.loads(added_json.read_text(encoding="utf-8")).items():
            found[token_id] = {"id": token_id, "content": content, "special": False}
    for added in (tokenizer_json or {}).get("added_tokens", []):
        found[added["id"]] = added
    config_path = root / "tokenizer_config.json"
    if config_path.is_file():
        decoder = json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for token_id, added in decoder.items():
            found[int(token_id)] = {**added, "id": int(token_id)}
    return [found[i] for i in sorted(found)]
