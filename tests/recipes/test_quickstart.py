"""The quickstart recipe, shrunk: data extraction and split, tokenizer, pretraining data, decoding,
and the pipeline end to end on a 40-file corpus with a few steps (never the real pretraining)."""

from __future__ import annotations

import textwrap

import pytest

from nibbletune.recipes import quickstart, quickstart_base
from nibbletune.recipes.tiny import llama_config, random_llama


def test_function_examples_docstring_to_def(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(textwrap.dedent('''
        def add(a, b=1, *rest, key: int = 0) -> int:
            """Return the sum of a and b.

            More text that is not used.
            """
            return a + b

        def undocumented(x):
            return x
    '''))
    rows = quickstart.function_examples(source)
    assert rows == [{"prompt": '"""Return the sum of a and b."""\n',
                     "completion": "def add(a, b=1, *rest, key: int=0) -> int:"}]


def test_held_out_split_is_by_file_and_stable():
    files = quickstart_base.stdlib_files()
    assert len(files) > 100
    held = [f for f in files if quickstart_base.is_held_out(f)]
    assert 0.03 < len(held) / len(files) < 0.2
    assert held == [f for f in files if quickstart_base.is_held_out(f)]


def test_pretraining_snippets_are_source_order_and_never_held_out(monkeypatch):
    files = quickstart_base.stdlib_files()[:80]
    monkeypatch.setattr(quickstart_base, "stdlib_files", lambda: files)
    snippets = quickstart_base.training_snippets()

    def pairs(held_out: bool) -> set:
        return {pair for f in files if quickstart_base.is_held_out(f) == held_out
                for pair in quickstart_base.documented_functions(f)}

    assert pairs(True), "the 80-file sample should contain held-out functions"
    # def line then docstring (the source's order) and "# docstring" then def line, never the task's
    # '"""docstring"""' then def line; only from training files: held-out task pairs are never seen
    expected = {text for sig, doc in pairs(False)
                for text in (f'{sig}:\n    """{doc}"""\n', f"# {doc}\n{sig}:\n")}
    assert set(snippets) == expected and not any(s.startswith('"""') for s in snippets)


def test_tokenizer_gives_a_word_one_id_in_names_and_in_prose():
    texts = ["def get_scheme(self):\n    return self._scheme\n", "# Return the URL scheme\nx = None\n"] * 50
    tokenizer = quickstart_base.train_tokenizer(texts, vocab_size=400)
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str("def get_scheme(self, _None):")]
    assert pieces == ["def", "Ġ", "get", "_", "scheme", "(", "self", ",", "Ġ", "_", "None", "):"]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert ids("get_scheme")[-1] == ids("the URL scheme")[-1]     # copyable from docstring to name
    assert tokenizer.decode(ids("def get_scheme(self):\n")) == "def get_scheme(self):\n"
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0


def _tiny_model(vocab: int = 64):
    return random_llama(llama_config(vocab, hidden_size=32, num_layers=1, heads=2), seed=0)


def test_pretraining_rows_mix_one_source_token_per_three_snippet_tokens():
    texts = ["def f(x):\n    return x + 1\n" * 40, "class A:\n    pass\n" * 60]
    snippets = [f"# doc {i}\ndef g{i}():\n" for i in range(200)]
    tokenizer = quickstart_base.train_tokenizer(texts + snippets, vocab_size=300)
    windows = [piece for text in texts for piece in quickstart_base.source_windows(tokenizer, text, window=16)]
    lengths = [len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in windows]
    assert max(lengths) <= 16 + 2 and "".join(windows) == "".join(texts)  # cut by tokens, nothing lost
    rows = quickstart_base.pretraining_rows(tokenizer, texts, snippets)
    assert rows == quickstart_base.pretraining_rows(tokenizer, texts, snippets)  # seeded
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    source = sum(count(r["text"]) for r in rows if r["text"] not in snippets)
    snippet = sum(count(r["text"]) for r in rows if r["text"] in snippets)
    assert {r["text"] for r in rows} >= set(snippets)
    assert 0.2 < source / snippet < 0.5


def test_pretraining_is_a_nibbletune_train_job(tmp_path):
    config = quickstart_base.pretraining_config(tmp_path / "init", tmp_path / "d.jsonl", tmp_path / "out", 5, 60)
    assert config.method == "full" and config.data.format == "text" and config.train.packing
    assert config.train.max_steps == 5 and config.train.max_seconds == 60


def test_greedy_stops_at_end_of_line():
    tokenizer = quickstart_base.train_tokenizer(["def f(x):\n    return x\n"] * 20, vocab_size=300)
    model = _tiny_model(len(tokenizer))
    out = quickstart.greedy(model, tokenizer, '"""doc"""\n', max_new_tokens=12)
    assert "\n" not in out


def test_pick_samples_short_docstrings_in_order():
    rows = [{"prompt": "x" * n, "completion": f"def f{n}():"} for n in (10, 50, 300, 60, 70, 80)]
    assert [s.expected for s in quickstart.pick_samples(rows)] == ["def f50():", "def f60():", "def f70():"]


@pytest.mark.slow
def test_quickstart_small(tmp_path, monkeypatch, capsys):
    files = quickstart_base.stdlib_files()[:40]
    monkeypatch.setattr(quickstart_base, "stdlib_files", lambda: files)
    monkeypatch.setattr(quickstart, "stdlib_files", lambda: files)
    monkeypatch.setattr(quickstart_base, "MODEL_SHAPE",
                        {"hidden_size": 32, "num_layers": 1, "heads": 2, "intermediate_size": 64})
    monkeypatch.setenv("NIBBLETUNE_CACHE", str(tmp_path / "cache"))
    result = quickstart.run_quickstart(tmp_path / "out", steps=2, pretrain_steps=3, progress=False)
    out = capsys.readouterr().out
    assert "held-out loss  before" in out and out.count("  expected: def ") == len(result.samples) == 3
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    base = tmp_path / "cache" / "quickstart" / quickstart_base.BASE_VERSION
    assert (base / "config.json").is_file()
    assert '"pretrain_steps": 3' in (base / "quickstart_base.json").read_text()
    assert (base / "model.safetensors").is_file() and (base / "metrics.jsonl").is_file()  # trained by train()
    assert result.loss_after == result.loss_after  # finite, not NaN
    # warm: the cached base is reused, not rebuilt
    stamp = (base / "quickstart_base.json").stat().st_mtime_ns
    quickstart.run_quickstart(tmp_path / "out2", steps=1, pretrain_steps=3, progress=False)
    assert (base / "quickstart_base.json").stat().st_mtime_ns == stamp
