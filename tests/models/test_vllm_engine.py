"""The vLLM side without a vLLM server: the command that starts one, local detokenization of the
token ids vLLM returns, and a clear error when a server is unreachable. Agreement with a real
server is tests/integration/test_vllm.py."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from models.chat_format import ChatFormat
from models.engine import ModelLoadError, SamplingParams, UnknownModelError
from models.vllm_engine import VLLMEngine, VLLMModel, _Decoder, vllm_command


def test_vllm_command():
    cmd = vllm_command("/models/cost", 8002, "pooling", python="/venv/bin/python", dtype="float32")
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--model") + 1] == "/models/cost" and cmd[cmd.index("--port") + 1] == "8002"
    assert cmd[cmd.index("--runner") + 1] == "pooling"
    policy = vllm_command("/models/policy", 8001)
    assert "--runner" not in policy and policy[0] == sys.executable
    # the checkpoint's sampling defaults never apply: Beaver sends every field with each request
    assert policy[policy.index("--generation-config") + 1] == "vllm"
    with pytest.raises(ValueError, match="runner"):
        vllm_command("/m", 1, "embed")


def test_decoder_detokenizes_locally_and_applies_stop(any_model_dir):
    fmt = ChatFormat.load(any_model_dir)
    tokenizer = fmt.tokenizer
    ids = fmt.encode(fmt.content_prefix + "sure . step 1 : mix flour")  # an answer as the model writes it
    through_mix = next(k for k in range(1, len(ids) + 1) if "mix" in tokenizer.decode(ids[:k]))
    decoder = _Decoder(fmt, SamplingParams(stop=("mix",)), prompt_tokens=7)
    first = decoder.chunk({"token_ids": ids[:3], "finish_reason": None})
    last = decoder.chunk({"token_ids": ids[3:] + [fmt.eos_ids[0]], "finish_reason": "stop"})
    lead = fmt.generation_extra  # what the generation prompt wrote for the model starts the text (R1's "<think>\n")
    assert first.text + last.text == lead + "sure . step 1 : " and last.finish_reason == "stop"
    assert decoder.finished and last.prompt_tokens == 7 and last.completion_tokens == through_mix

    for eos in fmt.eos_ids:  # every stop id of the model ends the text and is not returned
        decoder = _Decoder(fmt, SamplingParams(), prompt_tokens=1)
        done = decoder.chunk({"token_ids": ids + [eos], "finish_reason": "stop"})
        assert done.text == lead + "sure . step 1 : mix flour" and eos not in done.token_ids
        assert done.token_ids == ids and done.completion_tokens == len(ids)


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


def test_an_answer_longer_than_the_context_is_refused_before_any_request(tiny_llama_dir):
    """The vLLM client cuts conversations by the in-process engine's rule, at the model's
    max_position_embeddings: an answer that does not fit is refused, naming its pair, before the
    (here unreachable) server is asked."""
    from models.engine import AnswerTooLongError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = VLLMEngine({"p": VLLMModel(f"http://127.0.0.1:{port}", tiny_llama_dir, served_name="p")})

    async def main():
        with pytest.raises(AnswerTooLongError) as refused:
            await engine.score("p", [("hi", "sure ."), ("", "red " * 600)])
        with pytest.raises(ModelLoadError):  # a long prompt is cut to fit: the request goes out
            await engine.score("p", [("how do i make a cake ? " * 120, "sure .")])
        await engine.aclose()
        return refused.value

    refused = asyncio.run(main())
    assert refused.index == 1 and refused.max_length == 512
