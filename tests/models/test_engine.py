"""The in-process serving engine on real tiny models: batching, parity with direct model calls,
sampling controls, LRU memory budget, load failures."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from models.chat_format import ChatFormat
from models.engine import (InvalidRequestError, ModelLoadError, SamplingParams, TextStream, TransformersEngine,
                           UnknownModelError)
from models.loading import load_causal_lm, load_score_model

PROMPTS = ["how do i make a cake ?", "what is the capital of france ?", "red green blue", "the quick brown fox"]
PAIRS = [("how do i make a cake ?", "sure . step 1 : mix flour . step 2 : add eggs ."),
         ("how do i make a cake ?", "sorry , i can not help with that ."),
         ("", "bad"),
         ("what is the capital of france ?", "paris is the capital . paris paris paris paris paris paris")]
GREEDY = SamplingParams(max_tokens=10, temperature=0)


@pytest.fixture(scope="module")
def score_dir(tiny_llama_dir, tmp_path_factory):
    """A tiny cost model: the tiny Llama backbone with a seeded linear head, saved as
    ``LlamaForSequenceClassification``."""
    from models.score_model import save_score_model

    fmt = ChatFormat.load(tiny_llama_dir)
    torch.manual_seed(1)
    model = load_score_model(tiny_llama_dir, fmt.tokenizer)
    return save_score_model(model, fmt, tmp_path_factory.mktemp("tiny-cost"), "cost")


def run(coro):
    return asyncio.run(coro)


def engine_for(tiny_llama_dir, score_dir, **kwargs) -> TransformersEngine:
    return TransformersEngine({"policy": tiny_llama_dir, "cost": score_dir}, **kwargs)


def test_concurrent_scores_are_batched(tiny_llama_dir, score_dir):
    engine = engine_for(tiny_llama_dir, score_dir, max_batch_size=8, max_wait_ms=50)

    async def main():
        await engine.score("cost", PAIRS[:1])  # load outside the measured window
        engine.score_batches["cost"].clear()
        results = await asyncio.gather(*(engine.score("cost", [PAIRS[i % 4]]) for i in range(20)))
        await engine.aclose()
        return results

    results = run(main())
    sizes = list(engine.score_batches["cost"])
    assert sum(sizes) == 20 and max(sizes) <= 8
    assert len(sizes) <= 4, f"20 concurrent requests took {len(sizes)} forward passes: {sizes}"
    assert [r[0] for r in results[:4]] == pytest.approx([r[0] for r in results[4:8]], abs=1e-5)


def test_one_at_a_time_when_batch_size_is_one(tiny_llama_dir, score_dir):
    engine = engine_for(tiny_llama_dir, score_dir, max_batch_size=1)

    async def main():
        await asyncio.gather(*(engine.score("cost", [p]) for p in PAIRS))
        await engine.aclose()

    run(main())
    assert list(engine.score_batches["cost"]) == [1, 1, 1, 1]


def test_engine_scores_equal_direct_end_scores(tiny_llama_dir, score_dir):
    """Served scores (batched with padding) = the HF model's own pooled output on each text alone."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(score_dir)  # the saved template, read by plain transformers
    model = load_score_model(score_dir).eval()
    with torch.no_grad():
        direct = [model(**tokenizer.apply_chat_template([{"role": "user", "content": p},
                                                         {"role": "assistant", "content": r}],
                                                        tokenize=True, return_tensors="pt", return_dict=True)
                        ).logits[0, 0].item()
                  for p, r in PAIRS]
    engine = engine_for(tiny_llama_dir, score_dir, max_wait_ms=20)

    async def main():
        one_request = await engine.score("cost", PAIRS)
        concurrent = await asyncio.gather(*(engine.score("cost", [p]) for p in PAIRS))
        await engine.aclose()
        return one_request, [c[0] for c in concurrent]

    one_request, concurrent = run(main())
    assert max(abs(a - b) for a, b in zip(one_request, direct)) < 1e-4
    assert max(abs(a - b) for a, b in zip(concurrent, direct)) < 1e-4


def test_greedy_matches_hf_generate_and_is_deterministic(any_model_dir, score_dir):
    fmt = ChatFormat.load(any_model_dir, padding_side="left")
    tokenizer = fmt.tokenizer
    model = load_causal_lm(any_model_dir, tokenizer).eval()
    expected = []
    for prompt in PROMPTS:  # HF generate, one prompt at a time, on the template's prompt ids: the reference
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_tensors="pt", return_dict=True)
        # every stop id of the model; no repetition penalty (Qwen's generation_config.json ships one)
        out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=list(fmt.eos_ids), repetition_penalty=1.0)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        stops = [i for i, t in enumerate(new) if t in fmt.eos_ids]
        expected.append(new[:stops[0]] if stops else new)
    engine = engine_for(any_model_dir, score_dir, max_wait_ms=50)

    async def main():
        batched = await asyncio.gather(*(engine.complete("policy", p, GREEDY) for p in PROMPTS))
        again = await asyncio.gather(*(engine.complete("policy", p, GREEDY) for p in reversed(PROMPTS)))
        alone = await engine.complete("policy", PROMPTS[2], GREEDY)
        await engine.aclose()
        return batched, again[::-1], alone

    batched, again, alone = run(main())
    assert max(engine.generate_batches["policy"]) > 1  # concurrent requests decoded together
    assert [c.token_ids for c in batched] == expected
    assert [c.token_ids for c in again] == expected
    assert alone.token_ids == expected[2]
    # the answer starts with what the generation prompt wrote for the model (R1's "<think>\n"; else nothing)
    assert batched[0].text == fmt.generation_extra + tokenizer.decode(expected[0], skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(tiny_llama_dir, score_dir):
    engine = engine_for(tiny_llama_dir, score_dir, max_wait_ms=30)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)

    async def main():
        first = await engine.complete("policy", PROMPTS[0], params)
        crowd = await asyncio.gather(engine.complete("policy", PROMPTS[0], params),
                                     *(engine.complete("policy", p, SamplingParams(max_tokens=5, seed=i))
                                       for i, p in enumerate(PROMPTS)))
        other = await engine.complete("policy", PROMPTS[0], SamplingParams(max_tokens=12, temperature=1.0, seed=8))
        await engine.aclose()
        return first, crowd[0], other

    first, in_crowd, other = run(main())
    assert first.token_ids == in_crowd.token_ids
    assert other.token_ids != first.token_ids


def test_stop_sequences_and_streaming(tiny_llama_dir, score_dir):
    engine = engine_for(tiny_llama_dir, score_dir)

    async def main():
        full = await engine.complete("policy", PROMPTS[1], SamplingParams(max_tokens=12, temperature=0))
        words = full.text.split()
        stop = " ".join(words[2:4])  # two words, so the stop string spans tokens
        stopped = await engine.complete("policy", PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))
        stream = await engine.generate("policy", PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))
        chunks = [c async for c in stream]
        await engine.aclose()
        return full, stop, stopped, chunks

    full, stop, stopped, chunks = run(main())
    assert full.finish_reason == "length" and full.completion_tokens == 12
    assert full.text.index(stop) > 0, "pick a stop string that is not at the start"
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.index(stop)]
    assert stop not in stopped.text
    assert "".join(c.text for c in chunks) == stopped.text
    assert len(chunks) > 2 and chunks[-1].finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])


def test_text_stream_holds_back_a_possible_stop_prefix():
    class Words:  # a word-level "tokenizer": id i decodes to WORDS[i]
        WORDS = ["a", "b", "c", "d"]

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(self.WORDS[i] for i in ids)

    stream = TextStream(Words(), stop=("b c d",))
    assert stream.push(0) == ("a", False)
    assert stream.push(1) == (" ", False)  # "a b" ends with the start of "b c d": "b" held back
    assert stream.push(2) == ("", False)
    assert stream.push(0) == ("b c a", False)  # the stop did not complete: released
    stream = TextStream(Words(), stop=("b c",))
    stream.push(0), stream.push(1)
    assert stream.push(2) == ("", True)


def test_invalid_params_are_rejected(tiny_llama_dir, score_dir):
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0)
    engine = engine_for(tiny_llama_dir, score_dir)
    with pytest.raises(UnknownModelError):
        run(engine.score("nope", PAIRS))
    with pytest.raises(InvalidRequestError, match="context"):
        run(engine.generate("policy", "cake " * 600, GREEDY))


def test_lru_eviction_under_a_memory_budget(tiny_llama_dir, score_dir):
    engine = engine_for(tiny_llama_dir, score_dir)
    run(engine.score("cost", PAIRS[:1]))
    one_model = engine.health()["memory_bytes"]
    engine = engine_for(tiny_llama_dir, score_dir, memory_budget_bytes=int(one_model * 1.5))

    async def main():
        await engine.score("cost", PAIRS[:1])
        assert engine.loaded_models() == [("cost", "score")]
        await engine.complete("policy", PROMPTS[0], GREEDY)
        assert engine.loaded_models() == [("policy", "policy")]  # the cost model went out
        scores = await engine.score("cost", PAIRS[:1])  # and comes back on demand
        assert engine.loaded_models() == [("cost", "score")]
        await engine.aclose()
        return scores

    assert len(run(main())) == 1
    assert engine.health()["memory_bytes"] <= engine.memory_budget_bytes


def test_a_failing_model_gives_a_clear_error_and_the_others_keep_serving(tiny_llama_dir, score_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "huge"}))
    engine = TransformersEngine({"policy": tiny_llama_dir, "cost": score_dir, "broken": broken,
                                 "missing": tmp_path / "missing"})

    async def main():
        results = await asyncio.gather(engine.score("broken", PAIRS), engine.score("missing", PAIRS),
                                       engine.score("cost", PAIRS), engine.complete("policy", PROMPTS[0], GREEDY),
                                       return_exceptions=True)
        await engine.aclose()
        return results

    broken_err, missing_err, scores, completion = run(main())
    assert isinstance(broken_err, ModelLoadError) and broken_err.model_id == "broken" and broken_err.reason
    assert isinstance(missing_err, ModelLoadError) and "no model directory" in missing_err.reason
    assert len(scores) == len(PAIRS) and completion.completion_tokens > 0
    assert set(engine.health()["failed"]) == {"broken", "missing"}


def test_an_answer_longer_than_the_context_fails_its_request_only(tiny_llama_dir, score_dir):
    """The tiny model reads 512 positions: a long prompt is cut from the left (its answer still
    decides the score); an answer that does not fit names its pair, and the requests batched with
    it are scored as if it had never come."""
    from models.engine import AnswerTooLongError

    long_prompt = "how do i make a cake ? " * 120
    engine = engine_for(tiny_llama_dir, score_dir, max_wait_ms=50)

    async def main():
        cut = await engine.score("cost", [(long_prompt, a) for _, a in PAIRS[:2]])
        alone = await engine.score("cost", PAIRS[:1])
        results = await asyncio.gather(engine.score("cost", PAIRS[:1]),
                                       engine.score("cost", [PAIRS[1], ("", "red " * 600)]), return_exceptions=True)
        await engine.aclose()
        return cut, alone, results

    cut, alone, (fine, refused) = run(main())
    assert abs(cut[0] - cut[1]) > 1e-4  # two answers to one long prompt: two scores
    assert fine == pytest.approx(alone, abs=1e-5)
    assert isinstance(refused, AnswerTooLongError) and refused.index == 1 and refused.max_length == 512
