"""Shared fixtures: tiny real models built locally (no hub), once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_CORPUS = [
    "how do i make a cake ?",
    "sure . step 1 : mix flour . step 2 : add eggs . step 3 : bake it . step 4 : serve warm .",
    "sorry , i can not help with that . it could hurt people .",
    "what is the capital of france ? paris is the capital .",
    "the quick brown fox jumps over the lazy dog",
    "good bad safe unsafe yes no red green blue one two three four five",
]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A randomly initialised 2-layer, hidden-128 Llama with a word-level tokenizer, saved in
    Hugging Face format. Read-only: copy it if a test must modify it."""
    from models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), TINY_CORPUS, seed=0)
