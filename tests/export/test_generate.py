"""`nibbletune generate`: streams tokens, applies the chat template, runs a PEFT adapter trained on bitsandbytes."""

import io
import sys
import warnings

import pytest
import torch

from nibbletune.cli.main import main


def _spy_generate(monkeypatch):
    """Record the input ids each `generate` call receives and the text chunks its streamer emits."""
    from transformers import GenerationMixin, TextStreamer

    calls, chunks, puts = [], [], []
    original_generate, original_emit, original_put = GenerationMixin.generate, TextStreamer.on_finalized_text, TextStreamer.put

    def generate(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].clone())
        return original_generate(self, *args, **kwargs)

    def emit(self, text, stream_end=False):
        chunks.append(text)
        return original_emit(self, text, stream_end)

    def put(self, value):
        puts.append(value.numel())
        return original_put(self, value)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    monkeypatch.setattr(TextStreamer, "on_finalized_text", emit)
    monkeypatch.setattr(TextStreamer, "put", put)
    return calls, chunks, puts


def test_prompt_streams_token_by_token(base_dir, adapter_dir, monkeypatch, capsys):
    calls, chunks, puts = _spy_generate(monkeypatch)
    assert main(["generate", str(base_dir), "--adapter", str(adapter_dir), "--prompt", "the quick brown",
                 "--max-new-tokens", "12", "--temperature", "0", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    # the streamer gets the prompt, then each new token as it is generated; its text is what is printed
    assert puts[0] == calls[0].numel() and puts[1:] == [1] * 12
    assert "".join(chunks) + "\n" == out and out.strip()  # TextStreamer ends with a newline


def test_chat_applies_the_template_each_turn(base_dir, tokenizer, monkeypatch, capsys):
    calls, _, _ = _spy_generate(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nwhat is paris\n"))
    assert main(["generate", str(base_dir), "--chat", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert len(calls) == 2  # the blank line is skipped
    first = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"]
    assert calls[0][0].tolist() == list(first)
    second = tokenizer.decode(calls[1][0])
    assert second.startswith("<|user|>hello<|end|><|assistant|>") and second.endswith(
        "<|user|>what is paris<|end|><|assistant|>")


def test_peft_adapter_trained_on_bitsandbytes(base_dir, tmp_path, capsys):
    """An adapter made by peft on a transformers+bitsandbytes 4-bit base runs in `generate --adapter`."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32)
        bnb_base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=quantization)
        bnb_base.save_pretrained(tmp_path / "base-4bit")  # the 4-bit base the adapter trained on, as stored
        model = peft.get_peft_model(bnb_base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                                              target_modules=["q_proj", "v_proj", "down_proj"]))
        torch.manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
        model.save_pretrained(tmp_path / "peft")
        model.eval()
        from nibbletune.loading import load_tokenizer

        tokenizer = load_tokenizer(base_dir)
        input_ids = tokenizer("the quick brown", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                      max_new_tokens=8, pad_token_id=tokenizer.eos_token_id)
    expected_text = tokenizer.decode(expected[0, input_ids.shape[1]:], skip_special_tokens=True)
    (tmp_path / "base-4bit" / "tokenizer.json").write_text((base_dir / "tokenizer.json").read_text())
    (tmp_path / "base-4bit" / "tokenizer_config.json").write_text((base_dir / "tokenizer_config.json").read_text())
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "base-4bit"), "--adapter", str(tmp_path / "peft"), "--prompt",
                 "the quick brown", "--max-new-tokens", "8", "--temperature", "0", "--compute-dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == expected_text.strip() and expected_text.strip()
    assert "records no base quantization" in captured.err  # a PEFT adapter has no nibbletune.json: said so
