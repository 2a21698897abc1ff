"""The sampler: explicit sampling (nothing inherited from ``generation_config.json``), every eos id
stops, and the log-probabilities it samples with are the trainer's ``log π_old``."""

from __future__ import annotations

import pytest
import torch

from models.chat_format import ChatFormat
from models.generation import Sampler, SamplingConfig, draw, penalise, response_mask, sampling_log_probs
from models.jobs import JobCancelled
from models.loading import load_causal_lm
from models.ppo_lag import token_log_probs
from tests.chat_rig import force_first_token

PROMPTS = ["how do i make a cake ?", "what is the capital of france ?",
           [{"role": "system", "content": "good safe"}, {"role": "user", "content": "red green blue"}]]


def rollout(model_dir, config: SamplingConfig, seed: int = 0):
    fmt = ChatFormat.load(model_dir, padding_side="left")
    model = load_causal_lm(model_dir, fmt.tokenizer).eval()
    out = Sampler(model, fmt.tokenizer.pad_token_id, fmt.eos_ids).generate([fmt.prompt_ids(p) for p in PROMPTS],
                                                                             config, seed=seed)
    return fmt, model, out


def test_sampler_log_probs_are_the_trainers_log_pi_old_with_the_shipped_generation_config(tiny_qwen_dir):
    """Qwen2.5-Instruct's generation_config.json (repetition penalty 1.05, top-k 20, top-p 0.8,
    T 0.7) is on disk; the job's explicit settings are what the sampler uses, and the trainer's
    log π_old at the sampling temperature equals the sampler's per-token log-probs."""
    config = SamplingConfig(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=24)
    fmt, model, out = rollout(tiny_qwen_dir, config)
    assert out.response_mask.sum() > len(PROMPTS)  # something was sampled
    with torch.no_grad():
        old, _ = token_log_probs(model, out.sequences, out.attention_mask, out.prompt_length, temperature=0.7)
    m = out.response_mask.bool()
    assert (old[m] - out.log_probs[m]).abs().max() < 1e-4

    # The check has teeth: sampling with the shipped repetition penalty would be off-policy.
    penalised = Sampler(model, fmt.tokenizer.pad_token_id, fmt.eos_ids).generate(
        [fmt.prompt_ids(p) for p in PROMPTS], SamplingConfig(temperature=0.7, repetition_penalty=1.05,
                                                              max_new_tokens=24), seed=0)
    with torch.no_grad():
        old, _ = token_log_probs(model, penalised.sequences, penalised.attention_mask, penalised.prompt_length, 0.7)
    m = penalised.response_mask.bool()
    assert (old[m] - penalised.log_probs[m]).abs().max() > 1e-3


@pytest.mark.parametrize("model", ["qwen2", "llama3"])
def test_generation_stops_at_every_eos_id(model, tiny_qwen_dir, tiny_llama3_dir, tmp_path):
    base = {"qwen2": tiny_qwen_dir, "llama3": tiny_llama3_dir}[model]
    fmt = ChatFormat.load(base, padding_side="left")
    assert len(fmt.eos_ids) >= 2
    for eos in fmt.eos_ids:
        rigged = force_first_token(base, PROMPTS[0], eos, tmp_path / str(eos))
        policy = load_causal_lm(rigged, fmt.tokenizer).eval()
        out = Sampler(policy, fmt.tokenizer.pad_token_id, fmt.eos_ids).generate(
            [fmt.prompt_ids(PROMPTS[0])], SamplingConfig(temperature=0, max_new_tokens=8))
        assert out.responses[0, 0].item() == eos
        assert out.response_mask[0].tolist() == [1] + [0] * (out.response_mask.shape[1] - 1)
        assert fmt.response_text(out.responses[0].tolist()) == ""


def test_left_padded_rows_end_at_their_first_eos_and_are_seeded(tiny_llama3_dir):
    config = SamplingConfig(temperature=1.0, max_new_tokens=12)
    fmt, _, a = rollout(tiny_llama3_dir, config, seed=3)
    _, _, b = rollout(tiny_llama3_dir, config, seed=3)
    assert torch.equal(a.sequences, b.sequences)
    P, pad = a.prompt_length, fmt.tokenizer.pad_token_id
    for row, prompt in enumerate(PROMPTS):
        n = len(fmt.prompt_ids(prompt))
        assert a.attention_mask[row, :P].tolist() == [0] * (P - n) + [1] * n
        assert a.sequences[row, P - n] == fmt.tokenizer.bos_token_id  # one BOS, right after the padding
        tokens = a.responses[row][a.response_mask[row].bool()].tolist()
        assert not set(tokens[:-1]) & set(fmt.eos_ids)
        assert a.responses[row][~a.response_mask[row].bool()].eq(pad).all()
    torch.testing.assert_close(response_mask(torch.tensor([[5, 1, 7, 4], [5, 6, 4, 8], [5, 6, 7, 8]]), [1, 4]),
                               torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]))


def test_logits_processing_exact():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    seen = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(penalise(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, 0.0]]))
    config = SamplingConfig(temperature=0.5)
    torch.testing.assert_close(sampling_log_probs(logits, config), torch.log_softmax(logits / 0.5, -1))
    # top-k 2 keeps {0, 2}; top-p 0.5 of softmax([2, -1, .5, 0]) ≈ (.71, .04, .16, .10) keeps {0}
    log_probs = torch.log_softmax(logits, -1).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(draw(log_probs, SamplingConfig(top_k=2), g).tolist()) == {0, 2}
    assert set(draw(log_probs, SamplingConfig(top_p=0.5), g).tolist()) == {0}
    assert set(draw(log_probs, SamplingConfig(temperature=0), g).tolist()) == {0}
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0)


def test_a_prompts_answer_does_not_depend_on_its_batch(tiny_qwen_dir):
    """Evaluation and annotation samples must not change with which prompts share a batch or how big
    batches are: each row draws from its own seeded stream (byte-level BPE, so prompts pad unevenly)."""
    from models.sampling import generate_responses

    fmt = ChatFormat.load(tiny_qwen_dir, padding_side="left")
    model = load_causal_lm(tiny_qwen_dir, fmt.tokenizer).eval()
    prompts = [PROMPTS[i % 3] if i % 4 else f"tell me about {i} red apples" for i in range(12)]
    config = SamplingConfig(temperature=1.0, max_new_tokens=16)
    whole = generate_responses(model, fmt, prompts, config, batch_size=12, seed=5)
    assert len(set(whole)) > 3  # sampled, not one repeated answer
    for batch_size in (1, 5):
        assert generate_responses(model, fmt, prompts, config, batch_size=batch_size, seed=5) == whole
    assert generate_responses(model, fmt, prompts, config, batch_size=12, seed=6) != whole

    # The same prompt at the same row beside other prompts: the same answer.
    sampler = Sampler(model, fmt.tokenizer.pad_token_id, fmt.eos_ids)
    alone = sampler.generate([fmt.prompt_ids(PROMPTS[0])], config, seed=9, rows=[4])
    crowd = sampler.generate([fmt.prompt_ids(p) for p in ("a", "bb cc dd ee ff", PROMPTS[0])], config, seed=9,
                             rows=[0, 1, 4])
    assert fmt.response_text(alone.responses[0].tolist()) == fmt.response_text(crowd.responses[2].tolist())


@pytest.mark.parametrize("total", [1, 4, 5, 6, 13, 4096, 4097])
def test_each_rows_draws_are_one_torch_rand_per_row_whatever_the_chunk(total):
    """Rows draw their uniforms lazily, a chunk at a time (memory O(rows × chunk), not O(rows ×
    max_new_tokens)); on CPU the chunks continue one stream, so the samples are those of one
    ``torch.rand(max_new_tokens)`` per row, as drawn before (the demo's numbers depend on it)."""
    from models.generation import row_seed, row_uniforms

    rows = [0, 3, 7]
    one_shot = torch.stack([1.0 - torch.rand(total, generator=torch.Generator().manual_seed(row_seed(11, r)),
                                             dtype=torch.float64) for r in rows])  # (B, total)
    for chunk in (None, 1, 5):
        lazy = torch.stack(list(row_uniforms(11, rows, torch.device("cpu"), total, chunk)), dim=1)
        assert lazy.shape == one_shot.shape and torch.equal(lazy, one_shot), chunk


def test_sampled_answers_do_not_depend_on_the_draw_chunk(tiny_llama_dir, monkeypatch):
    """End to end: the same tokens and log-probs whatever the chunk, with penalties and truncation on."""
    import models.generation as generation

    fmt = ChatFormat.load(tiny_llama_dir, padding_side="left")
    model = load_causal_lm(tiny_llama_dir, fmt.tokenizer).eval()
    sampler = Sampler(model, fmt.tokenizer.pad_token_id, fmt.eos_ids)
    ids = [fmt.prompt_ids(p) for p in PROMPTS]
    for config in (SamplingConfig(max_new_tokens=40), SamplingConfig(top_k=5, top_p=0.8, repetition_penalty=1.3,
                                                                      temperature=0.7, max_new_tokens=40)):
        whole = sampler.generate(ids, config, seed=4, rows=[5, 1, 8])
        monkeypatch.setattr(generation, "UNIFORM_CHUNK", 3)
        chunked = sampler.generate(ids, config, seed=4, rows=[5, 1, 8])
        monkeypatch.undo()
        assert torch.equal(whole.sequences, chunked.sequences) and torch.equal(whole.log_probs, chunked.log_probs)


# --- decoding modes: a static KV cache and compiled decoding give the dynamic loop's answers -------------
# On CPU torch.compile runs with the aot_eager backend (seconds, not inductor's minutes of C++ builds):
# it traces the one-token forward into a graph, with the static cache's in-place writes, as on a GPU.

MODES_PROMPTS = PROMPTS[:2] + ["red", "good safe red green blue", "tell me about one two three four five red apples"]
MODES_CONFIGS = {  # name: (config, whether rows must end at different steps)
    "greedy": (SamplingConfig(temperature=0, max_new_tokens=14), False),  # tiny greedy models may repeat one token
    "greedy+penalty": (SamplingConfig(temperature=0, repetition_penalty=5.0, max_new_tokens=14), True),
    "sampled": (SamplingConfig(temperature=1.0, max_new_tokens=14), True),
    "truncated+penalty": (SamplingConfig(temperature=0.7, top_k=8, top_p=0.9, repetition_penalty=1.3,
                                         max_new_tokens=14), True),
}


def sampler(model, fmt, decoding, eos_ids=None, synced=False) -> Sampler:
    return Sampler(model, fmt.tokenizer.pad_token_id, fmt.eos_ids if eos_ids is None else eos_ids, synced=synced,
                   decoding=decoding, compile_backend="aot_eager")


def eos_at_different_steps(out, fmt) -> list[int]:
    """The format's eos ids, and stop ids that end rows of ``out`` (a run that never stopped) at
    different steps: for each row in turn, its first token after the last chosen step that no row
    drew before and no other row draws at all."""
    eos, after, responses = list(fmt.eos_ids), 0, out.responses
    for row in range(len(responses)):
        others = torch.cat([responses[:row], responses[row + 1:]])
        for step in range(after + 1, responses.shape[1]):
            token = int(responses[row, step])
            if not (responses[:, :step] == token).any() and not (others == token).any():
                eos.append(token)
                after = step
                break
    return eos


@pytest.mark.parametrize("name", ["word-level", "qwen2", "llama3", "gemma2", "mistral"])
def test_static_and_compiled_decoding_give_the_dynamic_loops_tokens_and_log_probs(name, request):
    from tests.conftest import FIXTURES

    model_dir = request.getfixturevalue(FIXTURES[name])
    fmt = ChatFormat.load(model_dir, padding_side="left")
    model = load_causal_lm(model_dir, fmt.tokenizer).eval()
    ids = [fmt.prompt_ids(p) for p in MODES_PROMPTS]
    assert len({len(i) for i in ids}) >= 3  # rows padded differently
    kept = sampler(model, fmt, "compiled")  # one compiled sampler for every config: its cache is reused
    for label, (config, varied) in MODES_CONFIGS.items():
        free = Sampler(model, fmt.tokenizer.pad_token_id, []).generate(ids, config, seed=7, rows=[3, 1, 4, 1, 5])
        eos = eos_at_different_steps(free, fmt)
        expected = sampler(model, fmt, "dynamic", eos).generate(ids, config, seed=7, rows=[3, 1, 4, 1, 5])
        lengths = expected.response_mask.sum(1).tolist()
        assert not varied or (len(set(lengths)) >= 3 and min(lengths) < config.max_new_tokens), (label, lengths)
        kept.eos_ids = tuple(eos)
        for decoding, s in (("static", sampler(model, fmt, "static", eos)), ("compiled", kept)):
            got = s.generate(ids, config, seed=7, rows=[3, 1, 4, 1, 5])
            # sliding-window layers (gemma2) are not compiled: their fill level is a Python int
            assert s.last_decoding == ("static" if name == "gemma2" else decoding)
            assert torch.equal(got.sequences, expected.sequences), (name, label, decoding)
            assert torch.equal(got.response_mask, expected.response_mask)
            torch.testing.assert_close(got.log_probs, expected.log_probs, rtol=0, atol=1e-5)


def test_compiled_decoding_reads_the_weights_of_the_last_update(tiny_qwen_dir):
    """PPO updates the policy in place between rollouts; the compiled step (and its kept cache) must
    sample from the updated weights, as the dynamic loop does."""
    fmt = ChatFormat.load(tiny_qwen_dir, padding_side="left")
    model = load_causal_lm(tiny_qwen_dir, fmt.tokenizer).eval()
    ids = [fmt.prompt_ids(p) for p in PROMPTS]
    config = SamplingConfig(temperature=1.0, max_new_tokens=10)
    compiled = sampler(model, fmt, "compiled")
    before = compiled.generate(ids, config, seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = compiled.generate(ids, config, seed=2)
    expected = sampler(model, fmt, "dynamic").generate(ids, config, seed=2)
    assert (after.log_probs - before.log_probs).abs().max() > 1e-2  # the update moved the log-probs
    assert torch.equal(after.sequences, expected.sequences)
    torch.testing.assert_close(after.log_probs, expected.log_probs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("decoding", ["dynamic", "static", "compiled"])
def test_a_stop_request_ends_every_decoding_before_the_next_token(decoding, tiny_llama_dir):
    fmt = ChatFormat.load(tiny_llama_dir, padding_side="left")
    model = load_causal_lm(tiny_llama_dir, fmt.tokenizer).eval()
    forwards, checks = [], []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))  # traced into the compiled step too
    s = Sampler(model, fmt.tokenizer.pad_token_id, [], decoding=decoding, compile_backend="aot_eager")
    model.train()

    def should_stop():
        checks.append(len(forwards))
        return len(checks) == 4

    with pytest.raises(JobCancelled):
        s.generate([fmt.prompt_ids(p) for p in PROMPTS], SamplingConfig(max_new_tokens=10_000), seed=0,
                   should_stop=should_stop)
    # asked before every token: after the prompt's forward, then after each token's; token 4 never drawn
    assert checks == [1, 2, 3, 4] and len(forwards) == 4
    assert model.training  # put back as it was


def test_the_static_cache_holds_the_prompt_and_the_new_tokens_and_no_more(tiny_qwen_dir, monkeypatch):
    """Its size is bounded by the call: P + max_new_tokens − 1 (the last token needs no forward),
    rounded up to a bucket of 64 when compiled; never the model's context. ``static_cache_bytes``
    (what ``auto`` weighs against the free memory) is what it allocates."""
    from models.generation import static_cache_bytes

    fmt = ChatFormat.load(tiny_qwen_dir, padding_side="left")
    model = load_causal_lm(tiny_qwen_dir, fmt.tokenizer).eval()
    assert model.config.max_position_embeddings >= 512
    ids = [fmt.prompt_ids(p) for p in PROMPTS]
    P = max(len(i) for i in ids)
    s = sampler(model, fmt, "compiled", eos_ids=[])
    for new_tokens, length in ((5, -(-(P + 4) // 64) * 64), (70, -(-(P + 69) // 64) * 64)):
        s.generate(ids, SamplingConfig(max_new_tokens=new_tokens), seed=0)
        (B, L, _, dtype), cache = s._kept_cache
        keys = [layer.keys for layer in cache.layers] + [layer.values for layer in cache.layers]
        assert L == length and all(k.shape[0] == len(ids) and k.shape[2] == length for k in keys)
        assert sum(k.nbytes for k in keys) == static_cache_bytes(model.config, B, L, dtype)

    # uncompiled: exactly P + max_new_tokens − 1 (the cache lives for the call; seen at its creation)
    import transformers

    made = []
    real = transformers.StaticCache

    class Spy(real):
        def __init__(self, *args, **kwargs):
            made.append(kwargs["max_cache_len"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(transformers, "StaticCache", Spy)
    sampler(model, fmt, "static", eos_ids=[]).generate(ids, SamplingConfig(max_new_tokens=9), seed=0)
    assert made == [P + 8]


def test_auto_decoding_picks_by_device_memory_and_sharding(monkeypatch):
    from models.generation import DECODING_ENV, resolve_decoding

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv(DECODING_ENV, raising=False)
    assert resolve_decoding(None, cpu) == "dynamic"
    assert resolve_decoding(None, cuda) == "compiled"
    assert resolve_decoding("auto", cuda, sharded=True) == "static"  # ZeRO-3's gathering hooks
    assert resolve_decoding("compiled", cuda, sharded=True) == "static"
    # a static cache for a huge max_new_tokens is not allocated up front: the dynamic cache grows as rows go
    assert resolve_decoding(None, cuda, cache_bytes=6 << 30, free_bytes=10 << 30) == "dynamic"
    assert resolve_decoding(None, cuda, cache_bytes=4 << 30, free_bytes=10 << 30) == "compiled"
    assert resolve_decoding("static", cpu) == "static" and resolve_decoding("compiled", cpu) == "compiled"
    monkeypatch.setenv(DECODING_ENV, "static")  # the worker's setting, when the caller names none
    assert resolve_decoding(None, cuda) == "static" and resolve_decoding("dynamic", cuda) == "dynamic"
    monkeypatch.setenv(DECODING_ENV, "fast")
    with pytest.raises(ValueError, match="BEAVER_HF_DECODING"):
        resolve_decoding(None, cpu)


def test_the_settings_offer_the_samplers_decodings():
    import typing

    from api.settings import Settings
    from models.generation import DECODINGS

    assert typing.get_args(Settings.model_fields["hf_decoding"].annotation) == DECODINGS
