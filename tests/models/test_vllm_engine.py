"""The vLLM side without a vLLM server: the command that starts one, local detokenization of the
token ids vLLM returns, and a clear error when a server is unreachable. Agreement with a real
server is tests/integration/test_vllm.py."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from models.engine import ModelLoadError, SamplingParams, UnknownModelError
from models.loading import load_tokenizer
from models.vllm_engine import VLLMEngine, VLLMModel, _Decoder, vllm_command


def test_vllm_command():
    cmd = vllm_command("/models/cost", 8002, "pooling", python="/venv/bin/python", dtype="float32")
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "/models/cost" and cmd[cmd.index("--port") + 1] == "8002"
    assert cmd[cmd.index("--runner") + 1] == "pooling"
    policy = vllm_command("/models/policy", 8001)
    assert "--runner" not in policy and policy[0] == sys.executable
    with pytest.raises(ValueError, match="runner"):
        vllm_command("/m", 1, "embed")


def test_decoder_detokenizes_locally_and_applies_stop(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    ids = tokenizer("sure . step 1 : mix flour")["input_ids"]
    decoder = _Decoder(tokenizer, SamplingParams(stop=("mix",)), prompt_tokens=7)
    first = decoder.chunk({"token_ids": ids[:3], "finish_reason": None})
    last = decoder.chunk({"token_ids": ids[3:] + [tokenizer.eos_token_id], "finish_reason": "stop"})
    assert first.text + last.text == "sure . step 1 : " and last.finish_reason == "stop"
    assert decoder.finished and last.prompt_tokens == 7 and last.completion_tokens == 6  # through "mix"

    decoder = _Decoder(tokenizer, SamplingParams(), prompt_tokens=1)
    done = decoder.chunk({"token_ids": ids + [tokenizer.eos_token_id], "finish_reason": "stop"})
    assert done.text == "sure . step 1 : mix flour" and tokenizer.eos_token_id not in done.token_ids


def test_unreachable_server_is_a_load_error(tiny_llama_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = VLLMEngine({"p": VLLMModel(f"http://127.0.0.1:{port}", tiny_llama_dir, served_name="p")})

    async def main():
        with pytest.raises(ModelLoadError, match="unreachable"):
            await engine.score("p", [("", "hi")])
        with pytest.raises(UnknownModelError):
            await engine.complete("nope", "hi", SamplingParams())
        await engine.aclose()

    asyncio.run(main())
    assert "p" in engine.health()["failed"]
