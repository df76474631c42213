"""Resident and peak memory of load_model on a ~2 GB (bf16) random Llama, against its bf16 and 4-bit sizes.

The checkpoint is written layer by layer (never the whole model in memory) as bf16 safetensors
shards with an index, into a temporary directory that is removed at the end. Each loader runs
in a fresh subprocess (Linux only). Its baseline is taken after it has imported everything it
needs, transformers' modeling code included: `import transformers` is lazy, and the first
model class pulls in transformers.modeling_utils (torch._dynamo, triton, scipy: about 225 MiB
resident, the same for every loader), which would otherwise be charged to the load. Reported:
the peak (VmHWM), the resident size right after loading (VmRSS, and again after gc +
malloc_trim; anonymous and file-backed parts: transformers keeps unconverted tensors as views
of the safetensors memory map, which count as file-backed) and the model's exact bytes.

    python benchmarks/load_memory.py                 # nibbletune only
    python benchmarks/load_memory.py --bnb           # also transformers + bitsandbytes
    python benchmarks/load_memory.py --layers 8      # smaller, faster
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 16, 16

CHILD = r"""
import ctypes, ctypes.util, gc, json, sys, time
import torch, transformers
import nibbletune.loading, nibbletune.quant
import transformers.models.llama.modeling_llama  # what any loader of this model imports (see the docstring)

def memory():
    # VmHWM belongs to this process image; ru_maxrss would carry over the parent's peak across fork/exec
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}

def model_bytes(model):
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():  # bitsandbytes keeps the 4-bit statistics on the weight's quant_state
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        for part in (state, getattr(state, "state2", None)):
            if part is not None:
                tensors += [part.absmax, part.code]
    unique = {(t.data_ptr(), t.numel(), t.dtype): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())

path, loader, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if loader == "bitsandbytes":
    import bitsandbytes
baseline = memory()
start = time.perf_counter()
if loader == "nibbletune":
    model = nibbletune.loading.load_model(path, nibbletune.quant.QuantSettings(compute_dtype=sys.argv[3]))
else:
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config,
                                                              device_map="cpu", dtype=dtype)
seconds = time.perf_counter() - start
loaded = memory()
gc.collect()
trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
if trim is not None:
    trim(0)
trimmed = memory()
size = model_bytes(model)
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
print(json.dumps({"baseline": baseline, "loaded": loaded, "trimmed": trimmed, "peak": loaded["VmHWM"],
                  "model_bytes": size, "seconds": seconds, "finite": bool(logits.isfinite().all())}))
"""


def layer_tensors(index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One decoder layer's bf16 weights (std 0.02 normal linears, unit norms)."""
    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.bfloat16).mul_(0.02)

    prefix = f"model.layers.{index}."
    head_dim = HIDDEN // HEADS
    return {
        prefix + "self_attn.q_proj.weight": normal(HIDDEN, HIDDEN),
        prefix + "self_attn.k_proj.weight": normal(KV_HEADS * head_dim, HIDDEN),
        prefix + "self_attn.v_proj.weight": normal(KV_HEADS * head_dim, HIDDEN),
        prefix + "self_attn.o_proj.weight": normal(HIDDEN, HIDDEN),
        prefix + "mlp.gate_proj.weight": normal(INTERMEDIATE, HIDDEN),
        prefix + "mlp.up_proj.weight": normal(INTERMEDIATE, HIDDEN),
        prefix + "mlp.down_proj.weight": normal(HIDDEN, INTERMEDIATE),
        prefix + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        prefix + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
    }


def write_checkpoint(root: Path, layers: int) -> tuple[int, int]:
    """Write config.json, one shard per layer plus one for embeddings/head, and the index.

    Returns (linear parameters, other parameters).
    """
    import transformers

    transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=VOCAB, tie_word_embeddings=False, dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(root)
    generator = torch.Generator().manual_seed(0)
    weight_map, linear, other = {}, 0, 0
    shards = [None] + list(range(layers))
    for number, layer in enumerate(shards):
        if layer is None:
            tensors = {
                "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.bfloat16).mul_(0.02),
                "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.bfloat16).mul_(0.02),
                "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            }
        else:
            tensors = layer_tensors(layer, generator)
        name = f"model-{number + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, root / name, metadata={"format": "pt"})
        for key, value in tensors.items():
            weight_map[key] = name
            if layer is not None and value.dim() == 2:
                linear += value.numel()
            else:
                other += value.numel()
        del tensors
    total_bytes = (linear + other) * 2
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map})
    )
    return linear, other


def run_child(path: Path, loader: str, dtype: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), loader, dtype], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"{loader} subprocess failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16 gives ~1.9 GB in bf16)")
    parser.add_argument("--compute-dtype", default="bfloat16", help="compute dtype of the loaded model")
    parser.add_argument("--bnb", action="store_true", help="also measure transformers + bitsandbytes")
    args = parser.parse_args()
    from nibbletune.quant import bits_per_parameter

    root = Path(tempfile.mkdtemp(prefix="nibbletune-load-memory-"))
    try:
        start = time.perf_counter()
        linear, other = write_checkpoint(root, args.layers)
        write_seconds = time.perf_counter() - start
        other_bytes = other * torch.empty(0, dtype=getattr(torch, args.compute_dtype)).element_size()
        bf16_bytes = (linear + other) * 2
        nf4_bytes = linear * bits_per_parameter(64, True) / 8 + other_bytes
        largest = VOCAB * HIDDEN * 2
        mb = 1 / 2**20
        print(f"checkpoint: {args.layers} layers, {(linear + other) / 1e9:.2f} B params, written in {write_seconds:.0f} s")
        print(f"  bf16 size            {bf16_bytes * mb:8.0f} MiB")
        print(f"  4-bit size           {nf4_bytes * mb:8.0f} MiB  (NF4+DQ linears, other tensors in {args.compute_dtype})")
        print(f"  largest tensor       {largest * mb:8.0f} MiB  (bf16 embedding)")
        loaders = ["nibbletune"] + (["bitsandbytes"] if args.bnb else [])
        for loader in loaders:
            figures = run_child(root, loader, args.compute_dtype)
            base, loaded, trimmed = figures["baseline"], figures["loaded"], figures["trimmed"]
            size = figures["model_bytes"]
            growth = figures["peak"] - base["VmHWM"]
            resident = loaded["VmRSS"] - base["VmRSS"]
            print(
                f"{loader:>12}: model {size * mb:6.0f} MiB; resident after load +{resident * mb:6.0f} MiB"
                f" = {resident / size:.2f}x the model (goal <= 1.15x; anonymous +{(loaded['RssAnon'] - base['RssAnon']) * mb:.0f},"
                f" file-backed +{(loaded['RssFile'] - base['RssFile']) * mb:.0f}; after malloc_trim"
                f" +{(trimmed['VmRSS'] - base['VmRSS']) * mb:.0f});\n{'':14}peak RSS {figures['peak'] * mb:6.0f} MiB"
                f" (after imports {base['VmHWM'] * mb:5.0f} MiB, growth {growth * mb:6.0f} MiB"
                f" = {growth / nf4_bytes:.2f}x the 4-bit size, {growth / bf16_bytes:.2f}x the bf16 size) while loading;"
                f" load {figures['seconds']:.0f} s; logits finite: {figures['finite']}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
