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
    out = tmp_path / "new" / "m"  # a missing parent directory is created
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


def _broken_inputs(base, adapter, root):
    """name -> (base, adapter, expected words): each input is wrong in one way."""
    import shutil

    from safetensors.torch import load_file, save_file

    def copy(src, name, edit=None):
        dst = root / name
        shutil.copytree(src, dst)
        if edit is not None:
            edit(dst)
        return dst

    def drop_b(path):
        tensors = load_file(path / "adapter_model.safetensors")
        del tensors[next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))]
        save_file(tensors, path / "adapter_model.safetensors")

    def rename_target(path):
        tensors = load_file(path / "adapter_model.safetensors")
        save_file({k.replace("q_proj", "query_key_value"): v for k, v in tensors.items()},
                  path / "adapter_model.safetensors")

    def truncate(name):
        def edit(path):
            data = (path / name).read_bytes()
            (path / name).write_bytes(data[: len(data) * 2 // 3])
        return edit

    wider = save_model(tiny_llama(seed=2, hidden=128, vocab_size=320), root / "wider")
    return {
        "different hidden sizes": (wider, adapter, "another base"),
        "adapter for another base": (base, copy(adapter, "other-arch", rename_target), "query_key_value"),
        "missing key": (base, copy(adapter, "missing", drop_b), "missing key"),
        "truncated adapter": (base, copy(adapter, "trunc-adapter", truncate("adapter_model.safetensors")), "truncated"),
        "truncated base": (copy(base, "trunc-base", truncate("model.safetensors")), adapter, "truncated"),
        "no adapter": (base, root / "nope", "not a directory"),
    }


def test_merge_bad_inputs_one_line_each(model_dirs, tmp_path, capsys):
    base, adapter = model_dirs
    for name, (bad_base, bad_adapter, words) in _broken_inputs(base, adapter, tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        assert main(["merge", str(bad_base), str(bad_adapter), str(out)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, (name, err)
        assert not out.exists(), name
    assert not list(tmp_path.glob(".*")), "a staging directory was left behind"


def test_merge_refuses_existing_output_and_keeps_it(model_dirs, tmp_path, capsys):
    base, adapter = model_dirs
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mine.txt").write_text("keep")
    assert main(["merge", str(base), str(adapter), str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--overwrite" in err
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("where", ["while merging", "while verifying"])
def test_ctrl_c_during_merge_leaves_no_output(model_dirs, tmp_path, capsys, monkeypatch, where):
    import importlib

    merge_module = importlib.import_module("nibbletune.export.merge")  # the package re-exports a `merge` function
    verify_module = importlib.import_module("nibbletune.export.verify")

    base, adapter = model_dirs
    calls = []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 or where == "while verifying":
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    if where == "while merging":
        original = merge_module.merged_lora_weight
        monkeypatch.setattr(merge_module, "merged_lora_weight", interrupt)
    else:  # every shard is written by then: only the rename is missing
        original = verify_module.check_merged
        monkeypatch.setattr(verify_module, "check_merged", interrupt)
    assert main(["merge", str(base), str(adapter), str(tmp_path / "m")]) == 130
    assert capsys.readouterr().err.strip() == "nibbletune merge: interrupted"
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the staging directory


def test_ctrl_c_during_quantize_leaves_no_output(model_dirs, tmp_path, capsys, monkeypatch):
    import importlib

    quantize_module = importlib.import_module("nibbletune.export.quantize_checkpoint")

    base, _ = model_dirs
    calls = []
    original = quantize_module.quantize

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(quantize_module, "quantize", interrupt)
    assert main(["quantize", str(base), str(tmp_path / "q")]) == 130
    assert list(tmp_path.iterdir()) == []
