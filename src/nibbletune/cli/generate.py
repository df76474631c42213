"""`nibbletune generate MODEL`: streaming text generation on a 4-bit base (+ adapter) or a merged model."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    """Add the `generate` subcommand."""
    parser = subparsers.add_parser("generate", help="generate text (one prompt, or a chat on stdin)")
    parser.add_argument("model", help="base model directory (loaded in 4 bits) or a merged model (--merged)")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory to apply to the 4-bit base")
    parser.add_argument("--merged", action="store_true",
                        help="run MODEL as a plain transformers model (a merged checkpoint), not in 4 bits")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="text to continue")
    mode.add_argument("--chat", action="store_true", help="read user turns from stdin, one per line")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compute-dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                        help="activation dtype of the 4-bit model (default: what the adapter trained with, else auto)")
    parser.set_defaults(func=run)


def _load(args):
    import torch

    from ..errors import NibbletuneError
    from ..loading import load_adapter, load_model, load_tokenizer

    tokenizer = load_tokenizer(args.adapter) if args.adapter and _has_tokenizer(args.adapter) else load_tokenizer(args.model)
    if args.merged:
        if args.adapter:
            raise NibbletuneError("--merged runs a merged model: it takes no --adapter")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # stderr stays for errors; the reply streams to stdout
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model)
        except (OSError, ValueError) as exc:
            raise NibbletuneError(f"{args.model}: cannot load as a transformers model ({str(exc).splitlines()[0]})") from None
    else:
        quant = _base_quantization(args.adapter).with_changes(compute_dtype=args.compute_dtype)
        model = load_model(args.model, quant)
        if args.adapter:
            load_adapter(model, args.adapter, dtype=None)
    model.eval()  # LoRA dropout off: greedy decoding is deterministic
    torch.manual_seed(args.seed)
    return model, tokenizer


def _base_quantization(adapter):
    """The QuantSettings the adapter trained against (nibbletune.json, the run's config.yaml), else defaults."""
    from ..loading.base_record import recorded_base_quantization
    from ..quant import QuantSettings

    if not adapter:
        return QuantSettings()
    record = recorded_base_quantization(adapter)
    if record.from_defaults:
        print(f"note: {adapter} records no base quantization (no nibbletune.json or training config.yaml); "
              "loading the base as nf4, blocksize 64, double quant", file=sys.stderr)
    if record.settings is None:
        print(f"note: {adapter} was trained on a base without 4-bit linears; generating on the 4-bit base anyway "
              "(use `nibbletune merge` for the exact model)", file=sys.stderr)
        return QuantSettings()
    return record.settings


def _has_tokenizer(path) -> bool:
    from pathlib import Path

    return (Path(path) / "tokenizer_config.json").is_file() or (Path(path) / "tokenizer.json").is_file()


def _generate(model, tokenizer, input_ids, args) -> str:
    """Stream new tokens to stdout; return the decoded completion."""
    import torch
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sample = args.temperature > 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = {"do_sample": sample, "max_new_tokens": args.max_new_tokens, "streamer": streamer, "pad_token_id": pad}
    if sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def run(args) -> int:
    """Generate for --prompt, or run a chat loop over stdin lines with the chat template."""
    from ..errors import NibbletuneError

    if args.max_new_tokens < 1:
        raise NibbletuneError("--max-new-tokens must be at least 1")
    model, tokenizer = _load(args)
    if not args.chat:
        input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
        _generate(model, tokenizer, input_ids, args)
        return 0
    if not getattr(tokenizer, "chat_template", None):
        raise NibbletuneError(f"{args.adapter or args.model}: the tokenizer has no chat template; use --prompt instead")
    messages = []
    for line in sys.stdin:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"]
        print("assistant: ", end="", flush=True)
        reply = _generate(model, tokenizer, input_ids, args)
        messages.append({"role": "assistant", "content": reply})
    return 0
