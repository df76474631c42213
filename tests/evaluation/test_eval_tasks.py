"""Which rows become generation tasks, with which prompt tokens and reference, per format."""

from __future__ import annotations

import pytest
from eval_helpers import toy_rows
from train_helpers import write_jsonl

from nibbletune.data import build_dataset
from nibbletune.data.formats import ALPACA_PROMPT_NO_INPUT
from nibbletune.data.tokenize import TokenizerInfo
from nibbletune.evaluation import held_out_data
from nibbletune.loading import load_tokenizer

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return load_tokenizer(tiny_base)


def test_completion_prompt_is_bos_plus_the_prompt_alone(tokenizer, tmp_path):
    rows = toy_rows(5, seed=3)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = held_out_data(path, tokenizer, "auto", 48, limit=3)
    assert data.format == "completion" and data.rows == 5 and len(data.examples) == 5
    assert [task.reference for task in data.tasks] == [row["completion"] for row in rows[:3]]
    assert [task.source for task in data.tasks] == [f"{path}:{line}" for line in (1, 2, 3)]
    prefix = list(TokenizerInfo.probe(tokenizer).prefix_ids)  # what the tokenizer puts before a text (BOS)
    for task, row in zip(data.tasks, rows):
        assert list(task.prompt_ids) == prefix + tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    dataset = build_dataset(path, tokenizer, 48, format="completion")
    assert data.loss_tokens == dataset.stats.trained_tokens
    assert [e.input_ids for e in data.examples] == [e.input_ids for e in dataset.examples]


def test_limits_and_skipped_prompts(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", toy_rows(6, seed=3))
    assert held_out_data(path, tokenizer, "completion", 48, limit=0).tasks == []
    assert len(held_out_data(path, tokenizer, "completion", 48, limit=None).tasks) == 6
    short = held_out_data(path, tokenizer, "completion", 6, limit=None)  # every prompt is longer than 6 tokens
    assert short.tasks == [] and short.skipped_tasks == 6


def test_alpaca_prompt_is_the_training_template(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "name a colour", "output": "red"}])
    (task,) = held_out_data(path, tokenizer, "auto", 1024, limit=None).tasks  # the template is ~200 tokens here
    assert task.reference == "red"
    assert tokenizer.decode(task.prompt_ids) == ALPACA_PROMPT_NO_INPUT.format(instruction="name a colour")


def test_chat_reference_is_the_last_assistant_turn(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", CHAT_TEMPLATE)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"},
                    {"role": "user", "content": "again"}, {"role": "assistant", "content": "blue"}]
    rows = [{"messages": conversation}, {"messages": conversation[:3]}, {"messages": conversation[:2]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    data = held_out_data(path, tokenizer, "chat", 128, limit=None)
    assert [task.reference for task in data.tasks] == ["blue", "red"]  # the row ending in a user turn has none
    prompt = "<|user|>hi</s><|assistant|>red</s><|user|>again</s><|assistant|>"
    assert list(data.tasks[0].prompt_ids) == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_text_rows_have_no_generation_tasks(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "alpha beta gamma"}, {"text": "red green"}])
    data = held_out_data(path, tokenizer, "auto", 48, limit=None)
    assert data.format == "text" and len(data.examples) == 2 and data.tasks == []
