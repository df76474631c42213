"""Progress bar contents and the optional loss-curve PNG."""

from __future__ import annotations

import json
import sys

import pytest

from nibbletune.training.metrics import format_postfix, plot_loss_curve, progress_bar


def write_metrics(directory):
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "eval_loss": 2.7}]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_progress_bar_shows_loss_tokens_per_second_eta_and_memory(capsys):
    bar = progress_bar(total=10, initial=2, enabled=True)
    bar.set_postfix_str(format_postfix(2.34567, 1234.4, 300 * 2**20), refresh=False)
    bar.update(1)
    bar.close()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "3/10" in line and "<" in line  # tqdm: [elapsed<remaining ETA, rate]
    assert "loss=2.3457" in line and "tok/s=1,234" in line and "mem=300MiB" in line
    assert progress_bar(10, 0, enabled=False) is None


def test_loss_curve_skipped_silently_without_matplotlib(tmp_path, monkeypatch):
    write_metrics(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot_loss_curve(tmp_path) is None
    assert not (tmp_path / "loss_curve.png").exists()


def test_loss_curve_png_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    write_metrics(tmp_path)
    path = plot_loss_curve(tmp_path)
    assert path == tmp_path / "loss_curve.png" and path.read_bytes().startswith(b"\x89PNG")
