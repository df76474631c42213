"""Fixtures for tests/loading."""

import pytest
from loading_helpers import build_model


@pytest.fixture(scope="session")
def saved_family(tmp_path_factory):
    """family -> (fp32 model, directory it is saved in); built once per session."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model = build_model(family)
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path, safe_serialization=True)
            cache[family] = (model, path)
        return cache[family]

    return get
