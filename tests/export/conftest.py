"""Fixtures for tests/export: one tiny Llama (+ tokenizer) and adapters, built once per session."""

import pytest
from export_helpers import TEXT, make_adapter, save_model, tiny_llama, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def token_ids(tokenizer):
    """The ids of export_helpers.TEXT, the prompt the GGUF forward checks run."""
    return tokenizer(TEXT)["input_ids"]


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer):
    """A float32 tiny Llama saved with its tokenizer."""
    return save_model(tiny_llama(vocab_size=len(tokenizer)), tmp_path_factory.mktemp("base"), tokenizer)


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, base_dir):
    """A LoRA adapter on every linear of base_dir, with random nonzero B."""
    return make_adapter(base_dir, tmp_path_factory.mktemp("adapters") / "lora")


@pytest.fixture(scope="session")
def dora_dir(tmp_path_factory, base_dir):
    """A DoRA adapter on the attention projections of base_dir."""
    return make_adapter(base_dir, tmp_path_factory.mktemp("adapters") / "dora", use_dora=True,
                        targets=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_tiny_models(single_thread):
    """Tiny models: one thread is faster than two fighting over small matmuls (restored after each module)."""
    yield
