"""The held-out data of an evaluation, tokenized once and scored for every model.

Two views of the same rows:

* loss examples: `build_dataset` exactly as training builds its eval set, but never packed,
  so each example is scored alone (the trained spans, EOS and truncation to seq_len are the
  data stage's);
* generation tasks: rows with a reference answer, in file order, at most `limit` of them:

    ==========  ==============================================  ==========================
    format      prompt (what the model sees)                    reference
    ==========  ==============================================  ==========================
    completion  `prompt`                                         `completion`
    alpaca      the Alpaca template up to "### Response:\\n"      `output`
    chat        the conversation before the last turn, with     the last turn's `content`,
                the template's generation prompt                if that turn is assistant
                (ShareGPT rows too: the data stage makes them chat messages)
    text        (no task: nothing marks an answer)
    ==========  ==============================================  ==========================

  The prompt text is the untrained text before the row's last trained span, as the data
  stage renders it (`data.formats.render`), so it is the training prompt. It is tokenized on
  its own as a user's prompt would be: with the tokenizer's leading special tokens (BOS) for
  text formats, with none added for chat (the template wrote them). A row whose reference is
  blank, or whose prompt is empty or longer than seq_len tokens, is skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data import build_dataset, load_records
from ..data.formats import render
from ..data.tokenize import Example, TokenizerInfo


@dataclass(frozen=True)
class GenerationTask:
    """One row to answer: its prompt as token ids, its reference answer, and where it came from."""

    prompt_ids: tuple[int, ...]
    reference: str
    source: str


@dataclass
class HeldOutData:
    """The rows of one evaluation: loss examples and generation tasks (module docstring)."""

    path: str
    format: str
    """The resolved format (never "auto")."""
    rows: int
    examples: list[Example]
    loss_tokens: int
    """Supervised tokens of `examples`: the positions the loss averages over."""
    pad_token_id: int
    stop_ids: frozenset[int]
    """Tokens a generation stops at: EOS and the tokenizer's other stop tokens (`TokenizerInfo.stop_ids`)."""
    tasks: list[GenerationTask] = field(default_factory=list)
    skipped_tasks: int = 0
    """Rows with a reference left out of generation: blank reference, empty or over-long prompt."""
    warnings: list[str] = field(default_factory=list)


def held_out_data(path: str | Path, tokenizer, format: str, seq_len: int, limit: int | None) -> HeldOutData:
    """Tokenize the rows at `path` for loss and for generation (`limit` tasks at most; None: all, 0: none)."""
    dataset = build_dataset(path, tokenizer, seq_len, format=format, packing=False)
    resolved = dataset.stats.format
    info = TokenizerInfo.probe(tokenizer)
    data = HeldOutData(str(path), resolved, dataset.stats.rows, list(dataset.examples), dataset.stats.trained_tokens,
                       dataset.pad_token_id, info.stop_ids, warnings=list(dataset.warnings))
    if limit == 0 or resolved == "text":
        return data
    for record in load_records(path, resolved):
        if limit is not None and len(data.tasks) >= limit:
            break
        task = generation_task(record.fields, resolved, tokenizer, info, record.source)
        if task is None:
            continue
        if not task.reference.strip() or not task.prompt_ids or len(task.prompt_ids) > seq_len:
            data.skipped_tasks += 1
            continue
        data.tasks.append(task)
    return data


def generation_task(fields: dict, format: str, tokenizer, info: TokenizerInfo, source: str) -> GenerationTask | None:
    """The task of one checked row (table in the module docstring); None when the row has no reference."""
    reference = _reference(fields, format)
    if reference is None:
        return None
    rendered = render(fields, format, tokenizer, source)
    trained = [index for index, (_, is_trained) in enumerate(rendered.segments) if is_trained]
    if not trained:
        return GenerationTask((), reference, source)
    prompt = "".join(text for text, _ in rendered.segments[:trained[-1]])
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    prefix = () if rendered.from_template else info.prefix_ids
    return GenerationTask((*prefix, *ids) if ids else (), reference, source)


def _reference(fields: dict, format: str) -> str | None:
    if format == "completion":
        return fields["completion"]
    if format == "alpaca":
        return fields["output"]
    if "messages" in fields:  # chat, and ShareGPT rows, which the data stage checks into messages
        last = fields["messages"][-1]
        return (last.get("content") or "") if last.get("role") == "assistant" else None
    return None

