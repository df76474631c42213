"""A real `nibbletune train` process: SIGINT saves a checkpoint; kill -9 loses only the steps since the last one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from nibbletune.train import load_config, train
from nibbletune.train.checkpoint import list_checkpoints, read_checkpoint_meta
from nibbletune.train.metrics import read_metrics

ENDLESS = {"max_steps": 100_000, "scheduler": "constant", "warmup_steps": 0, "eval_every": 0, "log_every": 1}


def start(config_path, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nibbletune.cli.main", "train", str(config_path), "--no-progress",
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            pytest.fail(f"trainer exited early ({process.returncode}): {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail("timed out waiting for the trainer")


def test_sigint_saves_a_checkpoint_and_exits_130(make_config):
    path, output_dir = make_config("sigint", **ENDLESS, save_every=0)
    process = start(path)
    wait_for(lambda: len(read_metrics(output_dir)) >= 3, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "checkpoint saved to" in stderr
    checkpoints = list_checkpoints(output_dir)
    assert len(checkpoints) == 1
    step = read_checkpoint_meta(checkpoints[0])["step"]
    assert step == read_metrics(output_dir)[-1]["step"] >= 3


def test_kill_9_loses_only_steps_since_last_checkpoint(make_config):
    path, output_dir = make_config("killed", **ENDLESS, save_every=2)
    process = start(path)
    wait_for(lambda: len(list_checkpoints(output_dir)) >= 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    logged = read_metrics(output_dir)[-1]["step"]
    last = list_checkpoints(output_dir)[-1]
    saved_step = read_checkpoint_meta(last)["step"]
    assert saved_step % 2 == 0 and logged - saved_step <= 2
    # Resume to two steps past the checkpoint; equals an uninterrupted run of that length.
    target = saved_step + 2
    resumed = start(path, "--resume", "--set", f"train.max_steps={target}")
    _, stderr = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, stderr
    reference_path, reference_dir = make_config("reference", **{**ENDLESS, "max_steps": target})
    train(load_config(reference_path), progress=False)
    got = [(r["step"], r["loss"]) for r in read_metrics(output_dir)]
    expected = [(r["step"], r["loss"]) for r in read_metrics(reference_dir)]
    assert got == expected
