"""evaluate_adapter on a trained toy adapter: its losses are training's, its rates are counted right."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
import yaml
from eval_helpers import ANSWER, BATCH, SEQ_LEN

import nibbletune
from nibbletune.data import build_dataset
from nibbletune.evaluation import EvalJob, EvaluationError, GenerationTask, evaluate_adapter, held_out_data, score_model
from nibbletune.evaluation import scoring as scoring_module
from nibbletune.training.batches import evaluate
from nibbletune.training.config import config_from_dict

MAX_NEW = 8


@pytest.fixture(scope="module")
def report(trained):
    return evaluate_adapter(EvalJob.from_config(trained.config, max_new_tokens=MAX_NEW))


def test_job_from_config(trained):
    job = EvalJob.from_config(trained.config, max_new_tokens=MAX_NEW)
    assert job == EvalJob(model=str(trained.base), data=str(trained.eval_path), adapter=str(trained.output_dir),
                          format="auto", seq_len=SEQ_LEN, batch_size=BATCH, limit=100, max_new_tokens=MAX_NEW)


def test_losses_are_training_evaluate_on_the_same_data(trained, report):
    tokenizer = nibbletune.load_tokenizer(trained.base)
    dataset = build_dataset(trained.eval_path, tokenizer, SEQ_LEN)
    model = nibbletune.load_model(trained.base, nibbletune.QuantSettings(compute_dtype="float32"))
    cpu = torch.device("cpu")
    assert report.base.loss == evaluate(model, dataset.examples, BATCH, dataset.pad_token_id, cpu, nullcontext)
    nibbletune.load_adapter(model, trained.output_dir)
    assert report.adapter.loss == evaluate(model, dataset.examples, BATCH, dataset.pad_token_id, cpu, nullcontext)
    assert report.adapter.loss == pytest.approx(trained.eval_loss, rel=1e-6)  # the training loop's last eval
    assert report.examples == 12 and report.loss_tokens == dataset.stats.trained_tokens


def test_the_adapter_row_differs_and_learnt_the_answer(report):
    assert report.adapter.loss < report.base.loss and report.adapter.perplexity < report.base.perplexity
    assert report.generation_examples == 12 and report.references == (ANSWER,) * 12
    assert report.base.exact_match == 0.0
    assert report.adapter.generations == (ANSWER,) * 12
    assert report.adapter.metrics() == {**report.adapter.metrics(), "exact_match": 1.0, "first_lines_match": 1.0,
                                        "contains_answer": 1.0}
    assert report.change()["exact_match"] == 1.0
    assert report.quantization == "nf4, blocksize 64, double quant, compute float32"


def test_json_and_table(report):
    data = json.loads(report.to_json())
    metrics = {"loss", "perplexity", "exact_match", "first_lines_match", "contains_answer"}
    assert set(data["base"]) == set(data["adapter"]) == set(data["change"]) == metrics
    assert data["examples"] == 12 and data["generation_examples"] == 12 and data["generation_skipped"] == 0
    assert data["generations"][0] == {"source": f"{report.data}:1", "reference": ANSWER,
                                      "base": report.base.generations[0], "adapter": ANSWER}
    lines = report.table().splitlines()
    assert lines[4].split() == ["metric", "base", "base+adapter", "change"]
    assert lines[5].startswith("held-out loss") and lines[-1].split()[-3:] == ["100.0%", "+100.0", "pts"]
    assert len({len(line) for line in lines[4:]}) <= 2  # aligned columns (the header may be shorter)


def test_rates_count_controlled_generations(trained, monkeypatch):
    """Generations replaced by hand-written texts: each rate is the count of passing pairs."""
    tokenizer = nibbletune.load_tokenizer(trained.base)
    data = held_out_data(trained.eval_path, tokenizer, "completion", SEQ_LEN, limit=4)
    references = ["alpha beta", "gamma", "delta\nepsilon", "zeta"]
    generations = [" alpha beta ", "gamma\nmore text", "so: delta  epsilon!", "nothing"]
    data.tasks = [GenerationTask(task.prompt_ids, reference, task.source)
                  for task, reference in zip(data.tasks, references)]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in generations]
    monkeypatch.setattr(scoring_module, "greedy_generate", lambda *args, **kwargs: encoded)
    model = nibbletune.load_model(trained.base, nibbletune.QuantSettings(compute_dtype="float32"))
    scores = score_model(model, tokenizer, data, BATCH, MAX_NEW, torch.float32)
    assert scores.generations == tuple(generations)
    assert (scores.exact_match, scores.first_lines_match, scores.contains_answer) == (0.25, 0.5, 0.75)


def test_base_alone_and_determinism(trained, report):
    job = EvalJob(model=trained.base, data=trained.eval_path, seq_len=SEQ_LEN, batch_size=BATCH,
                  max_new_tokens=MAX_NEW, compute_dtype="float32", limit=5)
    alone = evaluate_adapter(job)
    assert alone.adapter is None and alone.change() is None and alone.generation_examples == 5
    assert alone.base.loss == report.base.loss and alone.base.generations == report.base.generations[:5]
    assert "base+adapter" not in alone.table() and json.loads(alone.to_json())["adapter"] is None


def test_adapter_trained_on_a_16_bit_base_is_scored_on_it(trained, tmp_path):
    raw = yaml.safe_load(trained.config.read_text())
    raw.update(method="lora", quant={"compute_dtype": "float32"}, output_dir=str(tmp_path / "lora"))
    result = nibbletune.train(raw, progress=False)
    report = evaluate_adapter(EvalJob.from_config(config_from_dict(raw), limit=0))
    assert report.quantization == "16-bit, compute float32"
    assert report.adapter.loss == pytest.approx(result.eval_loss, rel=1e-6)
    assert any("without 4-bit linears" in warning for warning in report.warnings)


@pytest.mark.parametrize("changes, message", [
    ({"seq_len": 1}, "seq_len must be an integer of at least 2"),
    ({"limit": -1}, "limit must be 0 or more"),
    ({"format": "markdown"}, "format 'markdown': expected one of auto"),
    ({"compute_dtype": "fp8"}, "compute_dtype 'fp8'"),
])
def test_job_settings_are_checked(changes, message):
    with pytest.raises(EvaluationError, match=message):
        EvalJob(model="m", data="d.jsonl", **changes)
