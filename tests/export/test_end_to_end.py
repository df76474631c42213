"""The README flow through the real CLI on a tiny model: train -> merge -> generate -> quantize -> bitsandbytes."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from train_helpers import build_tiny_base, make_rows, write_config, write_jsonl

from nibbletune.cli.main import main
from nibbletune.quant import QuantSettings

PROMPT = "reverse: alpha beta gamma\n=>"


def _generate(capsys, *args, sampling=("--temperature", "0")) -> str:
    capsys.readouterr()
    assert main(["generate", *map(str, args), "--prompt", PROMPT, "--max-new-tokens", "8", *sampling]) == 0
    return capsys.readouterr().out


def test_train_merge_generate_quantize(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from nibbletune.loading import load_adapter, load_model

    base = build_tiny_base(tmp_path / "base")
    write_jsonl(tmp_path / "train.jsonl", make_rows(32, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", make_rows(8, seed=2))
    run, merged, quantized = tmp_path / "run", tmp_path / "merged", tmp_path / "merged-nf4"
    config = write_config(tmp_path / "run.yaml", base, tmp_path, run, max_steps=3, micro_batch_size=2, grad_accum=1,
                          seq_len=32, lr=2e-2, eval_every=0)  # lora dropout 0.1
    assert main(["train", str(config)]) == 0
    assert (run / "nibbletune.json").is_file()

    capsys.readouterr()
    assert main(["merge", str(base), str(run), str(merged), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert f"from {run / 'nibbletune.json'}" in out and "top-1 agreement 100.0%" in out
    assert f"nibbletune quantize {merged}" in out

    # round trip: the merged checkpoint in plain transformers = the unmerged QLoRA model
    unmerged = load_model(base, QuantSettings(compute_dtype="float32"))
    load_adapter(unmerged, run)
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    input_ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=input_ids).logits, unmerged(input_ids=input_ids).logits,
                                   atol=1e-4, rtol=1e-4)

    # merged model = 4-bit base + adapter (LoRA dropout off), greedy and seeded sampling alike; repeatable
    from_merged = _generate(capsys, merged, "--merged")
    assert len(from_merged) > 1 and from_merged == _generate(capsys, base, "--adapter", run)
    sampled = _generate(capsys, merged, "--merged", sampling=("--temperature", "1.0", "--seed", "3"))
    assert sampled == _generate(capsys, base, "--adapter", run, sampling=("--temperature", "1.0", "--seed", "3"))
    assert sampled != from_merged and len(set(sampled.split())) > 1

    capsys.readouterr()
    assert main(["quantize", str(merged), str(quantized), "--no-double-quant", "--compute-dtype", "float32"]) == 0
    assert "quantized 14 linear weights" in capsys.readouterr().out
    assert len(_generate(capsys, quantized)) > 1  # our loader reads the 4-bit checkpoint

    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32)
        theirs = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
            bnb_4bit_compute_dtype=torch.float32))
        assert type(ours.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=input_ids).logits, theirs(input_ids=input_ids).logits,
                                       atol=0, rtol=0)
