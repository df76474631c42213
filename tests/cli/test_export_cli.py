"""Exit codes and messages of `nibbletune quantize / merge / export / generate` (in-process)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))

from export_helpers import make_adapter, save_model, tiny_llama, train_tokenizer

from nibbletune.cli.main import main


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = train_tokenizer()
    base = save_model(tiny_llama(vocab_size=len(tokenizer)), root / "base", tokenizer)
    return base, make_adapter(base, root / "lora")


def test_quantize_then_refuse_existing(model_dirs, tmp_path, capsys):
    base, _ = model_dirs
    assert main(["quantize", str(base), str(tmp_path / "q"), "--no-double-quant"]) == 0
    assert "quantized 14 linear weights" in capsys.readouterr().out
    assert main(["quantize", str(base), str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and len(err.splitlines()) == 1


def test_merge_prints_figures_and_requantize_hint(model_dirs, tmp_path, capsys):
    base, adapter = model_dirs
    out = tmp_path / "m"
    assert main(["merge", str(base), str(adapter), str(out), "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert "top-1 agreement" in text and "bfloat16 (16-bit)" in text and f"nibbletune quantize {out}" in text


def test_merge_base_16bit_warns(model_dirs, tmp_path, capsys):
    base, adapter = model_dirs
    assert main(["merge", str(base), str(adapter), str(tmp_path / "m"), "--base-16bit", str(base), "--dtype", "float32"]) == 0
    assert "not in this merge" in capsys.readouterr().err


def test_merge_failed_verification_exit_code(model_dirs, tmp_path, capsys):
    base, adapter = model_dirs
    code = main(["merge", str(base), str(adapter), str(tmp_path / "m"), "--dtype", "bfloat16", "--tolerance", "1e-9"])
    assert code == 2 and "does not reproduce" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_merge_bad_inputs(model_dirs, tmp_path, capsys):
    base, _ = model_dirs
    assert main(["merge", str(base), str(tmp_path / "nope"), str(tmp_path / "m")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_export_gguf(model_dirs, tmp_path, capsys):
    pytest.importorskip("gguf")
    base, _ = model_dirs
    assert main(["export", "gguf", str(base), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    assert "read back and checked" in capsys.readouterr().out
    assert main(["export", "gguf", str(base), str(tmp_path / "m.gguf")]) == 2


def test_export_gguf_lora(model_dirs, tmp_path, capsys):
    pytest.importorskip("gguf")
    base, adapter = model_dirs
    assert main(["export", "gguf-lora", str(adapter), str(tmp_path / "a.gguf"), "--base", str(base)]) == 0
    assert "LoRA adapter" in capsys.readouterr().out


def test_generate_prompt_and_chat(model_dirs, capsys, monkeypatch):
    import io

    base, adapter = model_dirs
    assert main(["generate", str(base), "--adapter", str(adapter), "--prompt", "the quick", "--max-new-tokens", "4",
                 "--compute-dtype", "float32"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nwhat is paris\n"))
    assert main(["generate", str(base), "--chat", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.count("assistant:") == 2


def test_generate_chat_without_template(tmp_path, capsys):
    tokenizer = train_tokenizer(chat_template=False)
    base = save_model(tiny_llama(vocab_size=len(tokenizer)), tmp_path / "base", tokenizer)
    assert main(["generate", str(base), "--chat"]) == 2
    assert "no chat template" in capsys.readouterr().err
