"""`nibbletune export gguf MODEL OUT.gguf` and `nibbletune export gguf-lora ADAPTER OUT.gguf --base MODEL`."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the `export` subcommand and its formats."""
    parser = subparsers.add_parser("export", help="export a merged model or an adapter to GGUF (llama.cpp)")
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    model = formats.add_parser("gguf", help="a merged Llama/Mistral/Qwen2/Qwen3/Gemma 3/Phi-3 model -> one GGUF file "
                                            "(read back and checked)")
    model.add_argument("model", help="merged model directory (plain safetensors, not 4-bit)")
    model.add_argument("out", help="output .gguf file")
    model.add_argument("--type", dest="out_type", default="f16", choices=["f16", "bf16", "f32", "q8_0", "q4_0"])
    model.add_argument("--name", default=None, help="general.name (default: the model directory's name)")
    model.add_argument("--tokenizer-pre", default=None,
                       help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre) of a byte-level BPE tokenizer, "
                            "e.g. gpt-2, llama-bpe, qwen2; default: detected from tokenizer.json")
    model.add_argument("--overwrite", action="store_true")
    model.set_defaults(func=run_gguf)
    lora = formats.add_parser("gguf-lora", help="a PEFT LoRA adapter -> a llama.cpp GGUF LoRA adapter")
    lora.add_argument("adapter", help="PEFT adapter directory")
    lora.add_argument("out", help="output .gguf file")
    lora.add_argument("--base", required=True, help="the base model directory (its config.json is read)")
    lora.add_argument("--type", dest="out_type", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    lora.add_argument("--overwrite", action="store_true")
    lora.set_defaults(func=run_gguf_lora)


def run_gguf(args) -> int:
    """Export a merged model to GGUF and print what was written."""
    from ..export.atomic import human_bytes
    from ..export.gguf_export import export_gguf

    report = export_gguf(args.model, args.out, args.out_type, overwrite=args.overwrite, name=args.name,
                         tokenizer_pre=args.tokenizer_pre)
    print(f"wrote {report.out}: {report.arch}, {report.tensors} tensors, {report.out_type}, "
          f"{human_bytes(report.file_bytes)}; read back and checked (max error {report.max_rel_error:.3g} x max|w|)")
    return 0


def run_gguf_lora(args) -> int:
    """Export a LoRA adapter to a GGUF LoRA and print what was written."""
    from ..export.atomic import human_bytes
    from ..export.gguf_lora import export_gguf_lora

    report = export_gguf_lora(args.adapter, args.out, args.base, args.out_type, overwrite=args.overwrite)
    print(f"wrote {report.out}: LoRA adapter for {report.arch}, {report.tensors} tensors, {report.out_type}, "
          f"{human_bytes(report.file_bytes)}; read back and checked")
    return 0
