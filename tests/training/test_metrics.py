"""Progress bar contents, the loss-curve PNG (always written), and `train.report_to` reporters."""

from __future__ import annotations

import json
import sys
import types

import pytest

from nibbletune.training import ConfigError, TrainHooks, load_config, train
from nibbletune.training import metrics as metrics_module
from nibbletune.training.metrics import format_postfix, plot_loss_curve, progress_bar, read_metrics, scalars

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(directory):
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "eval_loss": 2.7}]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def run(config_path):
    return train(load_config(config_path), progress=False)


def assert_png(path):
    """A readable PNG image of real size (matplotlib reads it back)."""
    import matplotlib.image

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000
    height, width, _ = matplotlib.image.imread(path).shape
    assert height > 200 and width > 300


def test_progress_bar_shows_loss_tokens_per_second_eta_and_memory(capsys):
    bar = progress_bar(total=10, initial=2, enabled=True)
    bar.set_postfix_str(format_postfix(2.34567, 1234.4, 300 * 2**20), refresh=False)
    bar.update(1)
    bar.close()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "3/10" in line and "<" in line  # tqdm: [elapsed<remaining ETA, rate]
    assert "loss=2.3457" in line and "tok/s=1,234" in line and "mem=300MiB" in line
    assert progress_bar(10, 0, enabled=False) is None


def test_loss_curve_png_leaves_no_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    write_metrics(tmp_path)
    open_before = plt.get_fignums()
    path = plot_loss_curve(tmp_path, title="run: qlora of tiny")
    assert path == tmp_path / "loss_curve.png"
    assert_png(path)
    assert plt.get_fignums() == open_before
    assert {p.name for p in tmp_path.iterdir()} == {"metrics.jsonl", "loss_curve.png"}  # no partial file left
    assert plot_loss_curve(tmp_path / "empty") is None  # nothing logged yet: nothing to draw


def test_scalars_tag_train_and_eval_numbers():
    record = {"step": 3, "loss": 2.0, "lr": 1e-3, "grad_norm": None, "eval_loss": 2.5, "eval_perplexity": 12.2,
              "peak_mem_bytes_per_rank": [1, 2], "tokens_per_s": float("inf")}
    assert scalars(record) == {"train/loss": 2.0, "train/lr": 1e-3, "eval/loss": 2.5, "eval/perplexity": 12.2}


def test_training_writes_the_curve_at_each_checkpoint_and_at_the_end(make_config):
    config_path, output_dir = make_config("curve", max_steps=4, save_every=2, eval_every=2)
    seen = {}

    def after_step(trainer, record):
        if record["step"] == 3:  # the step-2 checkpoint has been saved, the adapter not yet
            seen["png"] = (output_dir / "loss_curve.png").read_bytes()
            seen["adapter"] = (output_dir / "adapter_model.safetensors").exists()

    train(load_config(config_path), progress=False, hooks=TrainHooks(on_step=after_step))
    assert seen["png"].startswith(PNG_SIGNATURE) and not seen["adapter"]
    final = output_dir / "loss_curve.png"
    assert (output_dir / "adapter_model.safetensors").is_file() and final.is_file()
    assert_png(final)
    assert final.read_bytes() != seen["png"]  # redrawn at the end with steps 3 and 4


def test_a_failing_plot_warns_once_and_the_run_completes(make_config, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(metrics_module, "plot_loss_curve", broken)
    config_path, output_dir = make_config("broken_plot", max_steps=4, save_every=2, eval_every=0)
    result = run(config_path)
    assert result.steps == 4 and (output_dir / "adapter_model.safetensors").is_file()
    assert not (output_dir / "loss_curve.png").exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "loss_curve.png not written" in line]
    assert len(warnings) == 1 and "RuntimeError: no fonts" in warnings[0]  # checkpoint and end: warned once


def test_report_to_is_validated_as_a_config_key(make_config):
    config_path, _ = make_config("bad_report")
    with pytest.raises(ConfigError, match=r"'train.report_to' input should be 'none', 'tensorboard' or 'wandb'"):
        load_config(config_path, ["train.report_to=mlflow"])
    assert load_config(config_path).train.report_to == "none"


@pytest.mark.parametrize(("report_to", "module"), [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_report_to_without_its_package_fails_at_start_with_the_install_line(make_config, monkeypatch,
                                                                          report_to, module):
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError
    config_path, output_dir = make_config(f"no_{report_to}", report_to=report_to)
    with pytest.raises(ConfigError) as info:
        run(config_path)
    assert str(info.value) == (f"'train.report_to' is {report_to} but the {report_to} package is not installed: "
                               f"pip install 'nibbletune[{report_to}]'")
    assert not output_dir.exists()  # refused before any work


def test_report_to_tensorboard_writes_events(make_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config_path, output_dir = make_config("tensorboard", max_steps=3, eval_every=3, report_to="tensorboard")
    run(config_path)
    assert list((output_dir / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/loss"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3]
    assert (output_dir / "loss_curve.png").is_file()


def test_report_to_wandb_logs_through_the_wandb_module(make_config, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs))
    fake.log = lambda data, step=None: calls.append(("log", data, step))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    config_path, output_dir = make_config("wandb_run", max_steps=3, eval_every=3, report_to="wandb")
    run(config_path)
    (_, init), *logs, finish = calls
    assert init["name"] == "wandb_run" and init["dir"] == str(output_dir) and init["project"] == "nibbletune"
    assert init["config"]["train"]["report_to"] == "wandb"
    assert finish == ("finish",)
    assert [step for _, _, step in logs] == [r["step"] for r in read_metrics(output_dir)] == [1, 2, 3]
    assert logs[0][1]["train/loss"] == read_metrics(output_dir)[0]["loss"] and "eval/loss" in logs[-1][1]
