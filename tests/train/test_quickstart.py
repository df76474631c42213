"""The quickstart pipeline end to end, shrunk: a 30-file corpus, 2 s of pretraining, 2 fine-tuning steps."""

from __future__ import annotations

import textwrap

import pytest

from nibbletune.train import quickstart, quickstart_base


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


@pytest.mark.slow
def test_quickstart_small(tmp_path, monkeypatch, capsys):
    files = quickstart_base.stdlib_files()[:40]
    monkeypatch.setattr(quickstart_base, "stdlib_files", lambda: files)
    monkeypatch.setattr(quickstart, "stdlib_files", lambda: files)
    monkeypatch.setenv("NIBBLETUNE_CACHE", str(tmp_path / "cache"))
    result = quickstart.run_quickstart(tmp_path / "out", steps=2, pretrain_seconds=2, progress=False)
    out = capsys.readouterr().out
    assert "held-out loss  before" in out and "after" in out
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "cache" / "quickstart" / quickstart_base.BASE_VERSION / "config.json").is_file()
    assert result.loss_after == result.loss_after  # finite, not NaN
