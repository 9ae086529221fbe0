"""Session-scoped pytest fixtures for the family matrix (import them into a test module)."""

from __future__ import annotations

import pytest

from .catalog import MATRIX


@pytest.fixture(scope="session", params=MATRIX)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def family_tokenizers():
    """``name -> tokenizer`` loaded lazily from the on-disk build cache (each vocabulary built once)."""
    from transformers import AutoTokenizer

    from .catalog import tokenizer_dir

    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = AutoTokenizer.from_pretrained(tokenizer_dir(name))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def family_models():
    """``name -> model directory`` (a tiny random model of the family's architecture, with its tokenizer)."""
    from .models import model_dir

    return model_dir
