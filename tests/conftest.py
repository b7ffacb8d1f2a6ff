"""Fixtures shared by the test files: the tiny tokenizers (Llama-style and Qwen-style) and a tiny
Llama model (tests/tiny.py)."""

import pytest

from tests.tiny import qwen_tokenizer, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def qtok():
    return qwen_tokenizer()
