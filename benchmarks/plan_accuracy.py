"""`nibbletune plan` against measurement: predicted peak vs the peak RSS of real short trainings on CPU.

Each case is a fresh `nibbletune train` subprocess of 2 steps; its peak is the last `peak_mem_bytes`
of metrics.jsonl (VmHWM). Models: a toy Llama (h512, 4 layers) built here, and SmolLM2-135M and
Gemma 3 270M when their packages are installed. `--llama-table` prints predictions for Llama-class
1B-70B on CUDA instead (no training).

    python benchmarks/plan_accuracy.py
    python benchmarks/plan_accuracy.py --llama-table
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
CASES = {
    "toy": [{"micro_batch_size": 4, "seq_len": 256}, {"micro_batch_size": 8, "seq_len": 512},
            {"micro_batch_size": 8, "seq_len": 512, "gradient_checkpointing": True},
            {"micro_batch_size": 8, "seq_len": 512, "fused_loss": False}, {"micro_batch_size": 2, "seq_len": 128},
            {"micro_batch_size": 8, "seq_len": 512, "lora.dropout": 0.0},
            {"micro_batch_size": 8, "seq_len": 512, "optimizer": "adamw8bit", "lora.r": 64}],
    "smollm2": [{"micro_batch_size": 4, "seq_len": 256},
                {"micro_batch_size": 2, "seq_len": 512, "gradient_checkpointing": True},
                {"micro_batch_size": 4, "seq_len": 256, "fused_loss": False},
                {"micro_batch_size": 8, "seq_len": 256, "optimizer": "adamw8bit", "lora.r": 8}],
    "gemma3": [{"micro_batch_size": 4, "seq_len": 256},
               {"micro_batch_size": 2, "seq_len": 512, "gradient_checkpointing": True, "optimizer": "paged_adamw"},
               {"micro_batch_size": 4, "seq_len": 256, "fused_loss": False}],
}
LLAMAS = {  # hidden, intermediate, layers, heads, kv heads, vocab (Llama 3.2 1B/3B, 3.1 8B, 2 13B, Code Llama 34B, 3.1 70B)
    "1B": (2048, 8192, 16, 32, 8, 128256), "3B": (3072, 8192, 28, 24, 8, 128256),
    "8B": (4096, 14336, 32, 32, 8, 128256), "13B": (5120, 13824, 40, 40, 40, 32000),
    "34B": (8192, 22016, 48, 64, 8, 32000), "70B": (8192, 28672, 80, 64, 8, 128256),
}



def models(work: Path) -> dict[str, str]:
    """Model paths by case name: the toy (built here) and the installed packaged models."""
    from nibbletune.recipes.packaged_models import gemma3_gguf, smollm2_gguf
    from nibbletune.recipes.tiny import llama_config, random_llama, save_model_dir, train_tokenizer

    corpus = [" ".join(random.Random(i).choices(WORDS, k=40)) for i in range(200)]
    tokenizer = train_tokenizer(corpus, vocab_size=500)
    config = llama_config(len(tokenizer), hidden_size=512, num_layers=4, heads=8, max_positions=1024)
    found = {"toy": str(save_model_dir(random_llama(config, seed=0), tokenizer, work / "toy"))}
    for name, path in (("smollm2", smollm2_gguf()), ("gemma3", gemma3_gguf())):
        if path is not None:
            found[name] = str(path)
    return found


def write_data(path: Path) -> Path:
    """Rows long enough to fill every sequence length used here (no padding)."""
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(64):
            words = rng.choices(WORDS, k=1200)
            handle.write(json.dumps({"prompt": " ".join(words[:20]), "completion": " " + " ".join(words[20:])}) + "\n")
    return path


def case_config(model: str, data: Path, output_dir: Path, case: dict) -> dict:
    """The training config of one case (r=16 all-linear, dropout 0.05 unless the case says otherwise)."""
    lora = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
    lora.update({k.removeprefix("lora."): v for k, v in case.items() if k.startswith("lora.")})
    train = {"max_steps": 2, "log_every": 1, **{k: v for k, v in case.items() if not k.startswith("lora.")}}
    return {"model": model, "data": {"path": str(data)}, "output_dir": str(output_dir), "lora": lora, "train": train}


def measure(config: dict, path: Path) -> int:
    """Peak RSS of a fresh `nibbletune train` of `config` (written to `path`)."""
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "nibbletune", "train", str(path), "--no-progress"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{path.name} failed:\n{done.stderr[-3000:]}")
    lines = (Path(config["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    return int(json.loads(lines[-1])["peak_mem_bytes"])


def accuracy() -> None:
    """Train every case and print predicted vs measured."""
    from nibbletune import plan
    from nibbletune.devices import simd_summary

    print(f"{os.cpu_count()} cores, SIMD flags: {simd_summary()}")
    print("| case | predicted GiB | measured peak RSS GiB | error |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_data(work / "train.jsonl")
        for name, model in models(work).items():
            for number, case in enumerate(CASES[name]):
                config = case_config(model, data, work / f"{name}-{number}", case)
                predicted = plan(config).peak_bytes
                measured = measure(config, work / f"{name}-{number}.yaml")
                label = f"{name} " + ", ".join(f"{k}={v}" for k, v in case.items())
                print(f"| {label} | {predicted / 2**30:.2f} | {measured / 2**30:.2f} | "
                      f"{(predicted - measured) / measured * 100:+.1f}% |", flush=True)


def llama_table() -> None:
    """Predicted peak for Llama-class models: QLoRA r=16 all-linear, seq 2048, micro-batch 1, checkpointing,
    paged_adamw, bf16, CUDA; one GPU and per rank under FSDP on 2 and 8 ranks."""
    from transformers import LlamaConfig

    from nibbletune.training.config import config_from_dict
    from nibbletune.training.memory_plan import estimate_memory

    print("| model | 1 GPU | FSDP 2 ranks (per rank) | FSDP 8 ranks (per rank) |\n|---|---|---|---|")
    for name, (hidden, intermediate, layers, heads, kv, vocab) in LLAMAS.items():
        model_config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab)
        cells = []
        for strategy, ranks in (("none", 1), ("fsdp", 2), ("fsdp", 8)):
            config = config_from_dict(case_config("llama", Path("x"), Path("out"), {
                "micro_batch_size": 1, "seq_len": 2048, "gradient_checkpointing": True, "optimizer": "paged_adamw",
                "distributed": strategy}) | {"quant": {"compute_dtype": "bfloat16"}})
            plan = estimate_memory(model_config, config, device="cuda", world_size=ranks, memory_bytes=1 << 50)
            cells.append(f"{plan.peak_bytes / 2**30:.1f} GiB")
        print(f"| Llama {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-table", action="store_true", help="print the Llama-class CUDA table and exit")
    args = parser.parse_args()
    llama_table() if args.llama_table else accuracy()
