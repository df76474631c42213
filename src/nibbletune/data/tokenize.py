"""Rendered rows -> token ids and labels: masking, EOS, truncation.

Labels follow the transformers convention: ``labels[t]`` is the token at ``t`` itself (the model shifts),
and ``-100`` (:data:`IGNORE_INDEX`) marks a token that is not trained.

Tokenization choice: the whole text of a row is tokenized in one piece, and a token is trained when
its characters overlap a trained segment (found through the fast tokenizer's offset mapping). So the
ids are exactly those of tokenizing the full text: a completion tokenized on its own would get a
different first token with SentencePiece-style tokenizers (a spurious ``▁``) and would split
differently where BPE merges across the prompt/completion boundary. A token that straddles the
boundary is trained. Tokenizers without offsets (slow, Python ones) tokenize each segment on its own
and concatenate instead.

Special tokens:

- text / completion / alpaca: the tokens the tokenizer puts before a text (BOS, when it adds one) are
  prepended, never trained; with ``add_eos`` the EOS token is appended and trained. Tokens the
  tokenizer would put after a text are not added (EOS is ``add_eos``'s job).
- chat: the chat template writes BOS and turn markers itself, so the text is tokenized without adding
  special tokens (as ``apply_chat_template`` does). With ``add_eos``, EOS is appended only when the
  conversation ends in a trained assistant turn that holds no EOS or other special token, i.e. when
  the template has no end-of-turn token the model could learn to stop on.
- The first token of every example is never trained: nothing precedes it to predict it from, and in a
  packed sequence the previous sample's last token would otherwise be trained to predict it.

Text that spells a special token (say ``</s>`` inside a row) becomes that special token, as with
``tokenizer(text)``.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from nibbletune.data.formats import Rendered
from nibbletune.data.records import DataError

IGNORE_INDEX = -100
_BATCH_ROWS = 512


@dataclass
class Example:
    """One training sample: ids, labels (``-100`` = not trained), per-sample positions when packed."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    source: str = ""

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class TokenizerInfo:
    """What the data stage needs to know about a tokenizer, found once by probing it."""

    prefix_ids: tuple[int, ...]
    """Special tokens the tokenizer puts before a text (usually BOS, or nothing)."""
    eos_token_id: int | None
    pad_token_id: int
    """Used to pad packed sequences: the pad token, else EOS, else 0 (padding is never trained)."""
    stop_ids: frozenset[int]
    """Tokens that let a model stop: EOS plus special tokens such as ``<|im_end|>`` or ``<|eot_id|>``."""

    @classmethod
    def probe(cls, tokenizer) -> TokenizerInfo:
        probe_text = "nibbletune probe"
        bare = tokenizer(probe_text, add_special_tokens=False)["input_ids"]
        decorated = tokenizer(probe_text, add_special_tokens=True)["input_ids"]
        prefix: list[int] = []
        for start in range(len(decorated) - len(bare) + 1):
            if decorated[start : start + len(bare)] == bare:
                prefix = decorated[:start]
                break
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        not_stops = {tokenizer.bos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id} - {eos}
        special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
        stops = (special | set(tokenizer.all_special_ids) | {eos}) - not_stops - {None}
        return cls(tuple(prefix), eos, 0 if pad is None else pad, frozenset(stops))


def tokenize_rendered(
    rendered: list[Rendered], sources: list[str], tokenizer, info: TokenizerInfo, add_eos: bool
) -> list[Example]:
    """Token ids and labels for each rendered row, untruncated."""
    examples = []
    for start in range(0, len(rendered), _BATCH_ROWS):
        batch = rendered[start : start + _BATCH_ROWS]
        for row, (ids, trained) in zip(batch, _encode(batch, tokenizer)):
            examples.append(_finish(row, ids, trained, sources[len(examples)], info, add_eos))
    return examples


def _encode(batch: list[Rendered], tokenizer) -> list[tuple[list[int], list[bool]]]:
    """For each row: its token ids and, per token, whether it is trained."""
    if not getattr(tokenizer, "is_fast", False):
        return [_encode_by_segment(row, tokenizer) for row in batch]
    encoded = tokenizer([row.text for row in batch], add_special_tokens=False, return_offsets_mapping=True)
    results = []
    for row, ids, offsets in zip(batch, encoded["input_ids"], encoded["offset_mapping"]):
        starts, ends, position = [], [], 0
        for text, trained in row.segments:
            if trained and text:
                starts.append(position)
                ends.append(position + len(text))
            position += len(text)
        results.append((list(ids), [_overlaps(starts, ends, s, e) for s, e in offsets]))
    return results


def _overlaps(starts: list[int], ends: list[int], token_start: int, token_end: int) -> bool:
    """Whether characters ``[token_start, token_end)`` touch a trained span (spans sorted, disjoint)."""
    index = bisect_right(ends, token_start)
    if index == len(starts):
        return False
    if token_end > token_start:
        return starts[index] < token_end
    return starts[index] <= token_start


def _encode_by_segment(row: Rendered, tokenizer) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_trained in row.segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids.extend(piece)
        trained.extend([is_trained] * len(piece))
    return ids, trained


def _finish(row: Rendered, ids, trained, source: str, info: TokenizerInfo, add_eos: bool) -> Example:
    labels = [token if is_trained else IGNORE_INDEX for token, is_trained in zip(ids, trained)]
    if not row.from_template:
        ids = list(info.prefix_ids) + ids
        labels = [IGNORE_INDEX] * len(info.prefix_ids) + labels
        append_eos = add_eos and (not ids or ids[-1] != info.eos_token_id)
    else:
        append_eos = add_eos and labels and labels[-1] != IGNORE_INDEX and not has_stop_token(labels, info)
    if append_eos:
        if info.eos_token_id is None:
            raise DataError(
                "add_eos is set but the tokenizer has no eos_token; set one or pass add_eos=False"
            )
        ids.append(info.eos_token_id)
        labels.append(info.eos_token_id)
    if labels:
        labels[0] = IGNORE_INDEX
    return Example(input_ids=ids, labels=labels, source=source)


def has_stop_token(labels: list[int], info: TokenizerInfo) -> bool:
    """Whether any trained token is EOS or another token a model can stop on."""
    return any(label in info.stop_ids for label in labels if label != IGNORE_INDEX)


def truncate(example: Example, seq_len: int) -> Example:
    """The first ``seq_len`` tokens of ``example`` (the example itself when it fits)."""
    if len(example.input_ids) <= seq_len:
        return example
    return Example(example.input_ids[:seq_len], example.labels[:seq_len], None, example.source)
