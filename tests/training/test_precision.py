"""bf16 autocast and float16 training with dynamic loss scaling, on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from nibbletune.loading.peft_adapter import adapter_tensors
from nibbletune.training import TrainHooks, TrainingDiverged, TrainingInterrupted, load_config, train
from nibbletune.training import loop as loop_module
from nibbletune.training.metrics import read_metrics


def run(config_path, dtype, *overrides, **kwargs):
    return train(load_config(config_path, [f"quant.compute_dtype={dtype}", *overrides]), progress=False, **kwargs)


def poison_gradients(when):
    """on_model hook: the first LoRA parameter's gradient becomes inf while `when()` is true."""

    def on_model(model):
        param = next(p for name, p in model.named_parameters() if "lora_A" in name)
        param.register_hook(lambda grad: grad * math.inf if when() else grad)

    return on_model


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_trains_like_float32(make_config, dtype):
    reference = run(make_config("fp32", max_steps=3, eval_every=0)[0], "float32")
    path, output_dir = make_config(dtype, max_steps=3, eval_every=0)
    result = run(path, dtype)
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.losses == pytest.approx(reference.losses, rel=2e-3)
    records = read_metrics(output_dir)
    if dtype == "float16":
        assert [r["skipped"] for r in records] == [False] * 3
        assert all(r["loss_scale"] == 2.0**16 for r in records)
    else:
        assert "loss_scale" not in records[0]


def test_fp16_step_with_inf_gradients_is_skipped_not_applied(make_config):
    path, output_dir = make_config("skip", max_steps=4, eval_every=0)
    snapshots, optimizer_steps = [], []
    step = {"now": 1}

    def on_step(trainer, record):
        snapshots.append({k: v.clone() for k, v in adapter_tensors(trainer.model).items()})
        optimizer_steps.append(max(int(s["step"]) for s in trainer.optimizer.state.values()))
        step["now"] = record["step"] + 1

    result = run(path, "float16", hooks=TrainHooks(on_model=poison_gradients(lambda: step["now"] == 3),
                                                   on_step=on_step))
    records = read_metrics(output_dir)
    assert [r["skipped"] for r in records] == [False, False, True, False]
    assert records[2]["grad_norm"] is None and math.isfinite(records[2]["loss"])
    assert [r["loss_scale"] for r in records] == [2.0**16, 2.0**16, 2.0**15, 2.0**15]
    assert all(torch.equal(snapshots[2][k], snapshots[1][k]) for k in snapshots[1])  # step 3 changed nothing
    assert not all(torch.equal(snapshots[3][k], snapshots[2][k]) for k in snapshots[2])
    assert optimizer_steps == [1, 2, 2, 3]
    assert all(math.isfinite(loss) for loss in result.losses)


def test_fp16_overflowing_every_step_stops_the_run(make_config, monkeypatch):
    monkeypatch.setattr(loop_module, "MAX_SKIPPED_STEPS", 3)
    path, output_dir = make_config("overflow", max_steps=10, eval_every=0)
    with pytest.raises(TrainingDiverged, match=r"float16 gradients overflowed on 3 steps in a row.*bfloat16"):
        run(path, "float16", hooks=TrainHooks(on_model=poison_gradients(lambda: True)))
    assert [r["skipped"] for r in read_metrics(output_dir)] == [True, True]


def test_fp16_resume_restores_the_loss_scale(make_config):
    """A skipped step halves the scale; the checkpoint keeps it, so the resumed run repeats the whole one."""
    poisoned = {"on": True}

    def first_step_only(trainer, record):
        poisoned["on"] = False

    hooks = TrainHooks(on_model=poison_gradients(lambda: poisoned["on"]), on_step=first_step_only)
    whole_path, whole_dir = make_config("fp16_whole", max_steps=4, eval_every=0)
    run(whole_path, "float16", hooks=hooks)
    poisoned["on"] = True
    path, output_dir = make_config("fp16_pieces", max_steps=4, eval_every=0)

    def stop_at_2(trainer, record):
        poisoned["on"] = False
        if record["step"] == 2:
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted):
        run(path, "float16", hooks=TrainHooks(on_model=poison_gradients(lambda: poisoned["on"]), on_step=stop_at_2))
    run(path, "float16", resume="auto")

    def curve(directory):
        return [(r["step"], r["loss"], r["loss_scale"], r["skipped"]) for r in read_metrics(directory)]

    assert curve(whole_dir)[0][2:] == (2.0**15, True)
    assert curve(output_dir) == curve(whole_dir)
