"""Training on several processes with gloo on CPU: ddp and fsdp against one process, kill, resume, mismatch.

Every multi-process test launches real `torchrun --standalone -m nibbletune train` processes, so it
covers the launch path a user runs. The single-process reference trains with micro_batch_size 4;
two ranks train with 2 each, the same global batch, in float32 with dropout 0, so the curves and
adapters agree up to float reduction order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nibbletune.training import distributed
from nibbletune.training.config import ConfigError, load_config

HERE = Path(__file__).parent
TOLERANCE = 1e-5


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train(config: Path, nproc: int = 0, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    module = ["-m", "nibbletune", "train", str(config), "--no-progress", *extra]
    command = _torchrun(nproc, *module) if nproc else [sys.executable, *module]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)


def _config(make_config, name: str, **train) -> tuple[Path, Path]:
    path, output_dir = make_config(name, **{"max_steps": 4, "eval_every": 2, **train})
    raw = yaml.safe_load(path.read_text())
    raw["lora"]["dropout"] = 0.0
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, output_dir


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((item[5:].decode() for item in environ if item.startswith(b"RANK=")), None)


def _losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _adapter(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "adapter_model.safetensors"))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base, tiny_data):
    """One process, micro-batch 4, 4 steps: the curve the 2-rank runs must reproduce."""
    import train_helpers

    directory = tmp_path_factory.mktemp("reference")

    def make(name, **train):
        return train_helpers.write_config(directory / f"{name}.yaml", tiny_base, tiny_data, directory / name,
                                          **train), directory / name

    path, output_dir = _config(make, "one", micro_batch_size=4, scheduler="constant")
    done = _train(path)
    assert done.returncode == 0, done.stderr[-2000:]
    return make, output_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_reproduce_one_process_at_the_same_global_batch(reference, strategy):
    make, one = reference
    path, output_dir = _config(make, strategy, micro_batch_size=2, scheduler="constant", distributed=strategy)
    done = _train(path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained 4 steps") == 1  # rank 0 reports for the job
    assert _losses(output_dir) == pytest.approx(_losses(one), abs=TOLERANCE)
    assert _max_difference(_adapter(output_dir), _adapter(one)) < TOLERANCE
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records[0]["peak_mem_bytes_per_rank"]) == 2
    assert (output_dir / "adapter_config.json").is_file()


def test_killed_rank_fails_fast_naming_it_and_the_run_resumes_on_one_rank(reference):
    make, one = reference
    path, output_dir = _config(make, "killed", micro_batch_size=2, scheduler="constant", distributed="fsdp",
                               max_steps=10_000, save_every=2, keep_checkpoints=0, distributed_timeout_s=60)
    launcher = subprocess.Popen(_torchrun(2, "-m", "nibbletune", "train", str(path), "--no-progress"), env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (output_dir / "checkpoints" / "step-00000002").is_dir():
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint from the 2-rank run"
            time.sleep(0.2)
        ranks = subprocess.run(["pgrep", "-f", f"nibbletune train {path}"], capture_output=True, text=True)
        rank_one = [pid for pid in map(int, ranks.stdout.split()) if _rank_of(pid) == "1"]
        assert len(rank_one) == 1
        killed_at = time.monotonic()
        os.kill(rank_one[0], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode != 0
    assert elapsed < 30
    assert re.search(r"rank\s*:?\s+1\b", stderr), stderr[-3000:]  # ours ("rank 1 exited") or torchrun's table
    ours = [line for line in stderr.splitlines() if line.startswith("nibbletune train: error: rank 0:")]
    if ours:  # rank 0 may be stopped by torchrun before it prints
        assert "rank 1 exited" in ours[0] and "--resume" in ours[0]

    checkpoint = str(output_dir / "checkpoints" / "step-00000002")
    refused = _train(path, 0, "--resume", checkpoint, "--set", "train.distributed=none")
    assert refused.returncode == 2 and "keep the product" in refused.stderr  # 2 rows a micro-batch, not 4
    resumed = _train(path, 0, "--resume", checkpoint, "--set", "train.max_steps=4", "--set",
                     "train.distributed=none", "--set", "train.micro_batch_size=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(output_dir) == pytest.approx(_losses(one), abs=TOLERANCE)
    assert _max_difference(_adapter(output_dir), _adapter(one)) < TOLERANCE


def test_a_rank_with_another_config_is_refused(reference, tmp_path):
    make, _ = reference
    path, _ = _config(make, "mismatch", micro_batch_size=2, distributed="ddp")
    entry = tmp_path / "entry.py"
    entry.write_text("import os, sys\nfrom nibbletune.cli.main import main\n"
                     "extra = ['--set', 'train.lr=0.5'] if os.environ['RANK'] == '1' else []\n"
                     "sys.exit(main(sys.argv[1:] + extra))\n")
    done = subprocess.run(_torchrun(2, str(entry), "train", str(path), "--no-progress"), env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert "rank 1 has a different config than rank 0" in done.stderr


def test_fsdp_shards_4bit_storage_and_keeps_nan_like_bytes(tmp_path):
    done = subprocess.run(_torchrun(2, str(HERE / "fsdp_bytes_worker.py"), str(tmp_path)), env=_env(),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ok").is_file()


def test_rank_rows_split_a_global_micro_batch_and_fill_a_short_one():
    run = distributed.DistributedRun("ddp", rank=1, world_size=2)
    assert distributed.rank_rows([5, 6, 7, 8], run, 2) == ([7, 8], 0)
    assert distributed.rank_rows([5, 6, 7], run, 2) == ([7, 5], 1)
    assert distributed.rank_rows([5], run, 2) == ([5, 5], 2)
    single = distributed.DistributedRun()
    assert distributed.rank_rows([1, 2, 3], single, 4) == ([1, 2, 3], 0)


def test_launched_with_several_ranks_needs_a_strategy(make_config, monkeypatch):
    path, _ = make_config("strategy")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.distributed"):
        distributed.start(load_config(path), torch.device("cpu"))
    with pytest.raises(ConfigError, match="adamw"):
        distributed.start(load_config(path, ["train.distributed=fsdp", "train.optimizer=adamw8bit"]),
                          torch.device("cpu"))


def test_fingerprints_tell_models_and_data_apart(tiny_base):
    from nibbletune.loading import load_model
    from nibbletune.quant import QuantSettings

    model = load_model(str(tiny_base), QuantSettings(compute_dtype="float32"))
    before = distributed.model_fingerprint(model)
    assert distributed.model_fingerprint(model) == before
    layer = distributed.decoder_layers(model)[0]
    next(m for m in layer.modules() if hasattr(m, "absmax")).absmax.view(-1)[0] += 1
    assert distributed.model_fingerprint(model) != before
    assert len(distributed.decoder_layers(model)) == model.config.num_hidden_layers
    assert distributed.storage_as_parameters(layer) == 3 * 7  # codes, absmax, nested absmax of 7 linears


def test_collective_failures_are_recognised():
    assert distributed.is_collective_failure(RuntimeError("[pair.cc:537] Read error: Connection reset by peer"))
    assert not distributed.is_collective_failure(RuntimeError("Cannot use ReduceOp.PREMUL_SUM with Gloo"))
    assert not distributed.is_collective_failure(ValueError("timed out"))
