"""Train-step time of a QLoRA step: floor vs transformers+bitsandbytes+PEFT vs nibbletune, in one process.

Model: random Llama, hidden 512, 4 layers, 8 heads, intermediate 1408, vocab 4096; batch 4 x 256
tokens; compute dtype `auto` (float32 on CPUs without native bf16). Columns:

* floor: the same model unquantized and frozen, forward + backward to the input embeddings
  (the work any adapter method must do: no quantization, no adapter, no optimizer);
* transformers + bitsandbytes + PEFT: 4-bit NF4 (double quant) base, LoRA r=16 on every
  linear, AdamW, a full step (forward, backward, optimizer);
* nibbletune: `load_model` (NF4, double quant) + `apply_lora` r=16 on every linear, the
  training loop's loss (`token_loss_sum`), AdamW, a full step;
* nibbletune LoRA on the unquantized base: the same, with the frozen weights kept in the
  compute dtype, so the difference to the column above is the price of 4-bit storage.

LoRA dropout is 0.05 in every adapter column (`--dropout` changes it).

Each column gets 2 warm-up steps; then the columns take turns, one timed step each per round
(so a change in machine load hits every column alike), and each reports its median.
Run: python benchmarks/train_step.py [--steps 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings

import torch

BATCH, SEQ = 4, 256


def time_round_robin(steps_by_name: dict, rounds: int) -> dict[str, float]:
    """Median ms per step of each column, the columns interleaved step by step."""
    for step in steps_by_name.values():
        for _ in range(2):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            started = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * 1000 for name, values in seconds.items()}


def floor_step_fn(model, input_ids):
    model.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step():
        inputs_embeds = embed(input_ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=inputs_embeds, labels=input_ids).loss
        loss.backward()

    return step


def adamw_step_fn(model, input_ids, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = loss_fn(model, input_ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of every adapter column")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from nibbletune import LoraSettings, QuantSettings, apply_lora, load_model
    from nibbletune.devices import resolve_compute_dtype, simd_summary
    from nibbletune.training.batches import token_loss_sum

    dtype = resolve_compute_dtype("auto")
    print(f"CPU: {platform.processor() or platform.machine()}; SIMD flags: {simd_summary()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; compute dtype {dtype}")
    print(f"model: Llama h512 x 4 layers, vocab 4096; batch {BATCH} x {SEQ} tokens; "
          f"LoRA r=16 on all linears, dropout {args.dropout}")
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=4096, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).to(dtype).eval()
    input_ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    columns = {}
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory, safe_serialization=True)
        columns["floor (frozen fp, fwd+bwd to inputs)"] = floor_step_fn(reference, input_ids)

        try:
            import bitsandbytes  # noqa: F401
            from peft import LoraConfig, get_peft_model

            quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization,
                                                            device_map="cpu", dtype=dtype)
                peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout,
                                                             target_modules="all-linear"))
            peft_model.train()
            step = adamw_step_fn(peft_model, input_ids, lambda m, ids: m(input_ids=ids, labels=ids).loss)
            columns["transformers+bitsandbytes+PEFT QLoRA"] = step
        except ImportError as exc:
            print(f"(transformers+bitsandbytes+PEFT column skipped: {exc})")

        def nibbletune_loss(m, ids):
            return token_loss_sum(m(input_ids=ids).logits, ids) / (ids.shape[0] * (ids.shape[1] - 1))

        lora = LoraSettings(r=16, alpha=32, dropout=args.dropout, target_modules="all-linear")
        model = load_model(directory, QuantSettings(quant_type="nf4", blocksize=64, double_quant=True))
        apply_lora(model, lora)
        columns["nibbletune QLoRA"] = adamw_step_fn(model.train(), input_ids, nibbletune_loss)
        unquantized = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        apply_lora(unquantized, lora)
        columns["nibbletune LoRA, unquantized base"] = adamw_step_fn(unquantized.train(), input_ids, nibbletune_loss)
        results = time_round_robin(columns, args.steps)

    floor = next(iter(results.values()))
    print(f"\n{'column':<40} {'ms/step':>10} {'x floor':>8}")
    for name, ms in results.items():
        print(f"{name:<40} {ms:>10.1f} {ms / floor:>8.2f}")
    if "transformers+bitsandbytes+PEFT QLoRA" in results:
        ratio = results["transformers+bitsandbytes+PEFT QLoRA"] / results["nibbletune QLoRA"]
        print(f"\nnibbletune is {ratio:.2f}x the speed of transformers+bitsandbytes+PEFT on this machine")
    overhead = results["nibbletune QLoRA"] / results["nibbletune LoRA, unquantized base"] - 1
    print(f"4-bit storage costs nibbletune {overhead * 100:+.1f}% over LoRA on the unquantized base")


if __name__ == "__main__":
    main()
