"""The training loop on a tiny seeded model: golden losses, resume equality, NaN stop, optimizers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nibbletune.loading.peft_adapter import adapter_tensors
from nibbletune.training import (
    ConfigError,
    TrainHooks,
    TrainingDiverged,
    TrainingInterrupted,
    load_config,
    train,
)
from nibbletune.training.checkpoint import list_checkpoints
from nibbletune.training.metrics import read_metrics

# Recorded on the tiny base of train_helpers (Llama h64/2 layers, BPE 300, seed 7), CPU float32,
# with the hashed LoRA dropout of modules/dropout.py (a different dropout mask changes them).
GOLDEN_LOSSES = [5.706679821014404, 5.666025638580322, 5.6425940990448, 5.602466821670532,
                 5.519078969955444, 5.492621660232544]


def run(config_path, **kwargs):
    return train(load_config(config_path), progress=False, **kwargs)


def losses(output_dir):
    return [record["loss"] for record in read_metrics(output_dir)]


def test_smoke_golden_losses(make_config):
    config_path, output_dir = make_config("golden")
    result = run(config_path)
    records = read_metrics(output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"} <= set(records[0])
    assert "eval_loss" in records[2] and "eval_loss" in records[5] and "eval_loss" not in records[0]
    assert records[0]["lr"] == pytest.approx(5e-3 / 2)  # warmup: step 0 of 1 -> half the peak
    assert result.losses[-1] < result.losses[0]
    assert math.isfinite(result.eval_loss)
    assert (output_dir / "adapter_model.safetensors").is_file() and (output_dir / "adapter_config.json").is_file()
    if GOLDEN_LOSSES is not None:
        assert result.losses == pytest.approx(GOLDEN_LOSSES, rel=2e-4)
    again = run(make_config("golden_again")[0])
    assert again.losses == result.losses  # seeded and deterministic on CPU


def test_resume_repeats_the_uninterrupted_run(make_config):
    reference_path, reference_dir = make_config("whole", max_steps=8, save_every=0, eval_every=0)
    run(reference_path)
    path, output_dir = make_config("pieces", max_steps=8, save_every=2, eval_every=0, keep_checkpoints=2)

    def stop_at_5(trainer, record):
        if record["step"] == 5:
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted) as info:
        run(path, hooks=TrainHooks(on_step=stop_at_5))
    assert info.value.checkpoint.name == "step-00000005"
    assert [p.name for p in list_checkpoints(output_dir)] == ["step-00000004", "step-00000005"]
    run(path, resume="auto")
    assert losses(output_dir) == losses(reference_dir)
    assert [r["step"] for r in read_metrics(output_dir)] == list(range(1, 9))


def test_other_optimizers_train(make_config):
    reference = run(make_config("adamw", max_steps=4, eval_every=0)[0])
    paged = run(make_config("paged", max_steps=4, eval_every=0, optimizer="paged_adamw")[0])
    assert paged.losses == reference.losses
    eight_bit = run(make_config("eight_bit", max_steps=4, eval_every=0, optimizer="adamw8bit")[0])
    assert eight_bit.losses == pytest.approx(reference.losses, rel=2e-2)
    assert eight_bit.losses[-1] < eight_bit.losses[0]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(make_config):
    path, output_dir = make_config("nan", max_steps=10, save_every=2, eval_every=0)
    calls = {"forward": 0}
    models = []

    def poison(model):
        def hook(module, inputs, output):  # on the decoder: the fused and the plain loss both run it
            calls["forward"] += 1
            if calls["forward"] > 2 * 5:  # grad_accum 2: forward 11 is step 6
                output.last_hidden_state = output.last_hidden_state * float("nan")
            return output

        models.append(model)
        model.model.register_forward_hook(hook)

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 6.*step-00000004"):
        run(path, hooks=TrainHooks(on_model=poison))
    assert [p.name for p in list_checkpoints(output_dir)] == ["step-00000002", "step-00000004"]
    assert [r["step"] for r in read_metrics(output_dir)] == [1, 2, 3, 4, 5]
    assert not (output_dir / "adapter_model.safetensors").exists()
    state = json.loads((output_dir / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    # The weights after step 5 were not touched by the NaN step: they equal a clean 5-step run's.
    clean_path, clean_dir = make_config("clean5", max_steps=10, save_every=5, eval_every=0)

    def stop_at_5(trainer, record):
        if record["step"] == 5:
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted):
        run(clean_path, hooks=TrainHooks(on_step=stop_at_5))
    from safetensors.torch import load_file

    clean = load_file(str(list_checkpoints(clean_dir)[-1] / "adapter_model.safetensors"))
    for name, value in adapter_tensors(models[0]).items():
        assert torch.isfinite(value).all() and torch.equal(value, clean[name]), name


def test_gradient_checkpointing_same_losses(make_config):
    plain = run(make_config("plain", max_steps=2, eval_every=0)[0])
    checkpointed = run(make_config("ckpt", max_steps=2, eval_every=0, gradient_checkpointing=True)[0])
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)


def test_fused_loss_same_losses_as_plain(make_config):
    """The default fused head + loss trains the same run as the logits path (float32: to rounding)."""
    fused = run(make_config("fused", max_steps=3, eval_every=3)[0])
    plain = run(make_config("unfused", max_steps=3, eval_every=3, fused_loss=False)[0])
    assert fused.losses == pytest.approx(plain.losses, rel=1e-5)
    assert fused.eval_loss == pytest.approx(plain.eval_loss, rel=1e-5)


def test_checkpoint_has_no_pickle(make_config):
    path, output_dir = make_config("nopickle", max_steps=2, save_every=1, eval_every=0)
    run(path)
    files = sorted(p.name for p in list_checkpoints(output_dir)[-1].iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "nibbletune.json", "trainer_state.json",
                     "trainer_state.safetensors"]
    from safetensors.torch import load_file

    tensors = load_file(str(list_checkpoints(output_dir)[-1] / "trainer_state.safetensors"))
    assert "rng.torch" in tensors and any(k.endswith(".exp_avg_sq") for k in tensors)
    assert torch.is_tensor(tensors["rng.torch"])


def test_checkpoint_write_is_atomic(make_config, monkeypatch):
    """A run that dies while writing a checkpoint leaves the previous ones complete and resumable."""
    from nibbletune.training import checkpoint

    path, output_dir = make_config("atomic", max_steps=4, save_every=1, eval_every=0, keep_checkpoints=0)
    real_fsync_tree, calls = checkpoint._fsync_tree, {"n": 0}

    def dies_on_third(directory):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk vanished")
        real_fsync_tree(directory)

    monkeypatch.setattr(checkpoint, "_fsync_tree", dies_on_third)
    with pytest.raises(OSError, match="disk vanished"):
        run(path)
    assert [p.name for p in list_checkpoints(output_dir)] == ["step-00000001", "step-00000002"]
    assert any(p.name.startswith(".tmp-step-00000003") for p in (output_dir / "checkpoints").iterdir())
    monkeypatch.setattr(checkpoint, "_fsync_tree", real_fsync_tree)
    run(path, resume="auto")
    assert not any(p.name.startswith(".") for p in (output_dir / "checkpoints").iterdir())
    assert [r["step"] for r in read_metrics(output_dir)] == [1, 2, 3, 4]
    # A fresh run would prune those checkpoints by step number; a resume must keep the data stream.
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run.*--resume"):
        run(path)
    with pytest.raises(ConfigError, match=r"'train.seed' differs from the checkpoint's run \(7\)"):
        train(load_config(path, ["train.seed=8"]), resume="auto", progress=False)


def test_metrics_cut_short_by_kill_9_still_read(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]
