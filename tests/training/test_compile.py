"""train.compile: what auto chooses, compiled decoder layers training like eager ones, the eager fallback."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nibbletune.training import ConfigError, load_config, train
from nibbletune.training import compile as compile_module
from nibbletune.training.compile import AUTO_MIN_STEPS, choose, decoder_layers, is_compile_failure

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(("setting", "device", "steps", "distributed", "enabled"), [
    (False, CUDA, 10_000, "none", False),
    (True, CPU, 1, "none", True),
    ("auto", CPU, 10_000, "none", False),
    ("auto", CUDA, AUTO_MIN_STEPS - 1, "none", False),
    ("auto", CUDA, AUTO_MIN_STEPS, "none", True),
    ("auto", CUDA, AUTO_MIN_STEPS, "ddp", True),
    ("auto", CUDA, 10_000, "fsdp", False),
])
def test_choose(setting, device, steps, distributed, enabled):
    choice = choose(setting, device, steps, distributed)
    assert choice.enabled is enabled and choice.reason


def test_decoder_layers_are_the_repeated_blocks():
    from nibbletune.recipes.tiny import llama_config, random_llama

    model = random_llama(llama_config(64, hidden_size=32, num_layers=3, heads=2, max_positions=32), seed=0)
    layers = decoder_layers(model)
    assert layers == list(model.model.layers) and len(layers) == 3


def test_is_compile_failure():
    assert is_compile_failure(torch._dynamo.exc.Unsupported("an op Dynamo cannot trace"))
    assert not is_compile_failure(RuntimeError("a shape mismatch in the model"))


def test_bad_values_get_one_line(make_config):
    path, _ = make_config("bad")
    with pytest.raises(ConfigError, match="train.compile.*must be auto, true or false"):
        load_config(path, ["train.compile=maybe"])
    with pytest.raises(ConfigError, match="fsdp"):
        load_config(path, ["train.compile=true", "train.distributed=fsdp"])


def _no_dropout(path):
    raw = yaml.safe_load(path.read_text())
    raw["lora"]["dropout"] = 0.0  # compiled dropout draws its seeds from Inductor's generator: masks differ
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(make_config, name, compile_setting):
    path, output_dir = make_config(name, max_steps=3, eval_every=2, compile=compile_setting)
    result = train(load_config(_no_dropout(path)), progress=False)
    return result, load_file(str(output_dir / "adapter_model.safetensors"))


def test_compiled_layers_train_like_eager(make_config, capfd):
    """Three steps with both decoder layers compiled: the losses and the adapter match the eager run."""
    eager, eager_adapter = _run(make_config, "eager", False)
    compiled, compiled_adapter = _run(make_config, "compiled", True)
    err = capfd.readouterr().err
    assert "compiling the decoder layers (all but the first) on the first step (train.compile is true)" in err
    assert "torch.compile failed" not in err
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    assert compiled.eval_loss == pytest.approx(eager.eval_loss, rel=1e-5)
    assert compiled_adapter.keys() == eager_adapter.keys()
    for key, value in eager_adapter.items():
        torch.testing.assert_close(compiled_adapter[key], value, rtol=1e-4, atol=1e-6)


def test_compile_failure_falls_back_to_eager(make_config, capfd, monkeypatch):
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setattr(compile_module, "BACKEND", failing_backend)
    fallback, fallback_adapter = _run(make_config, "fallback", True)
    err = capfd.readouterr().err
    assert err.count("torch.compile failed") == 1 and "no C++ compiler on this machine" in err
    assert "training eagerly" in err
    eager, eager_adapter = _run(make_config, "eager", False)
    assert fallback.losses == eager.losses  # the failed first attempt left no gradient behind
    for key, value in eager_adapter.items():
        torch.testing.assert_close(fallback_adapter[key], value, rtol=0, atol=0)
