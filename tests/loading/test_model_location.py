"""Model locations: local directories are used as they are; Hub ids go through snapshot_download."""

import pytest

from nibbletune.errors import FormatError
from nibbletune.loading import model_location
from nibbletune.loading.model_location import looks_like_hub_id, resolve_model_dir


def test_existing_directory_is_used_without_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda **_: pytest.fail("fetched a local model"))
    assert resolve_model_dir(tmp_path) == tmp_path


def test_hub_id_is_fetched_with_safetensors_only(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    assert resolve_model_dir("Qwen/Qwen2.5-0.5B") == tmp_path
    assert calls[0][0] == "Qwen/Qwen2.5-0.5B"
    assert "*.safetensors" in calls[0][1] and not any(p.endswith(".bin") for p in calls[0][1])


def test_offline_hub_failure_is_one_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FormatError) as error:
        resolve_model_dir("nobody/no-such-model")
    message = str(error.value)
    assert "\n" not in message and message.startswith("nobody/no-such-model: not a local directory")


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(FormatError, match="not a directory"):
        resolve_model_dir(tmp_path / "missing" / "model")


@pytest.mark.parametrize(("name", "expected"), [
    ("meta-llama/Llama-3.1-8B", True), ("Qwen/Qwen2.5-0.5B", True), ("/abs/path", False),
    ("runs", False), ("../x/y", False), ("a/b/c", False),
])
def test_hub_id_shape(name, expected):
    assert looks_like_hub_id(name) is expected


def test_module_has_no_network_at_import():
    assert not hasattr(model_location, "snapshot_download")
