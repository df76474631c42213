"""Peak resident memory of `nibbletune quantize` and `nibbletune merge` relative to the model size.

Builds a random Llama of a few hundred MB (bf16, sharded safetensors) and a LoRA adapter for it,
then runs each command in a fresh subprocess and reads that child's peak RSS (ru_maxrss from
os.wait4). The bare interpreter + torch + transformers import is measured too, since it is part
of every figure.

    python benchmarks/export_memory.py [--workdir DIR] [--layers 8] [--hidden 1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BUILD = r"""
import sys, torch, transformers
from pathlib import Path
hidden, layers, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
torch.manual_seed(0)
config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
    num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
    vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=False)
model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(out / "base", safe_serialization=True, max_shard_size="100MB")
del model
from nibbletune.loading import load_model, save_adapter
from nibbletune.quant import QuantSettings
from nibbletune.modules import LoraSettings, apply_lora, lora_layers
model = load_model(out / "base", QuantSettings(compute_dtype="float32"))
settings = LoraSettings(r=16, alpha=32, dropout=0.0)
apply_lora(model, settings)
with torch.no_grad():
    for layer in lora_layers(model).values():
        layer.lora_B.weight.normal_(0, 0.01)
save_adapter(model, out / "lora", settings)
"""


BASELINE = r"""
import sys, torch, transformers, nibbletune.export
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    transformers.AutoModelForCausalLM.from_config(config)
"""


def peak_rss(cmd: list[str]) -> tuple[int, int, float, int]:
    """(peak RSS, sampled peak anonymous RSS (bytes), seconds, exit code) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks, anon_peak = [], [0]
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while True:  # sample anonymous (heap) memory; file-backed mmap pages are reclaimable
        try:
            with open(f"/proc/{proc.pid}/status") as status_file:
                for line in status_file:
                    if line.startswith("RssAnon:"):
                        anon_peak[0] = max(anon_peak[0], int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.02)
    reader.join()
    output = b"".join(chunks)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(output.decode(errors="replace")[-2000:], file=sys.stderr)
    return usage.ru_maxrss * 1024, anon_peak[0], seconds, code


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nibbletune-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "lora").is_dir():
        subprocess.run([sys.executable, "-c", BUILD, str(args.hidden), str(args.layers), str(work)], check=True)
    model_bytes = size_of(work / "base")
    print(f"model: {model_bytes / 2**20:.0f} MiB bf16 safetensors in {len(list((work / 'base').glob('*.safetensors')))} shards")
    cli = [sys.executable, "-m", "nibbletune.cli.main"]
    runs = {
        "baseline: imports + Llama skeleton on meta": [sys.executable, "-c", BASELINE, str(work / "base")],
        "quantize (1 GiB shards)": cli + ["quantize", str(work / "base"), str(work / "q1")],
        "quantize (--max-shard-size 32)": cli + ["quantize", str(work / "base"), str(work / "q2"), "--max-shard-size", "32"],
        "merge --no-verify (1 GiB shards)": cli + ["merge", str(work / "base"), str(work / "lora"), str(work / "m1"), "--no-verify"],
        "merge --no-verify (--max-shard-size 32)": cli + ["merge", str(work / "base"), str(work / "lora"), str(work / "m2"),
                                                          "--no-verify", "--max-shard-size", "32"],
        "merge with verification (--max-shard-size 32)": cli + ["merge", str(work / "base"), str(work / "lora"),
                                                                str(work / "m3"), "--max-shard-size", "32"],
    }
    for name in ("q1", "q2", "m1", "m2", "m3"):
        shutil.rmtree(work / name, ignore_errors=True)
    print(f"{'run':48s} {'peak RSS':>10s} {'x model':>8s} {'peak anon':>10s} {'x model':>8s} {'seconds':>8s}")
    for label, cmd in runs.items():
        rss, anon, seconds, code = peak_rss(cmd)
        status = "" if code == 0 else f"  (exit {code})"
        print(f"{label:48s} {rss / 2**20:6.0f} MiB {rss / model_bytes:8.2f} {anon / 2**20:6.0f} MiB "
              f"{anon / model_bytes:8.2f} {seconds:8.1f}{status}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
