"""Every job type on every tiny model — the word-level Llama and the real-shaped Qwen2-style and
Llama-3-style chat models — end to end through the job entry points, with token-level checks of
what the artifacts carry: their chat template, their eos ids, their dtype, and scores that plain
transformers reproduce."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from models import world
from models.chat_format import ChatFormat
from models.jobs import JOB_TYPES, JobContext, parse_params
from models.loading import load_causal_lm, load_score_model
from models.ppo_lag import Rollout, ScoreModelScorer
from models.score_model import score
from tests.conftest import FIXTURES

pytestmark = pytest.mark.slow

MULTI_TURN = {"messages": [
    {"role": "system", "content": "you are a careful assistant ."},
    {"role": "user", "content": "how can i make a birdhouse at home ?"},
    {"role": "assistant", "content": "sure . step 1 : cut the wood ."},
    {"role": "user", "content": "and then ?"},
    {"role": "assistant", "content": "step 2 : nail the sides ."}]}


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_job(job_type: str, params: dict, records: list[dict], out_dir) -> tuple:
    """A job through its real entry point: params parsed as the API parses them."""
    events: list[dict] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(output_dir=out_dir, datasets=["data"], load_dataset=lambda _: records, report=events.append)
    result = JOB_TYPES[job_type].entry_point()(parse_params(job_type, params), ctx)
    return result, events


@pytest.fixture(scope="module", params=["word-level", "qwen2", "llama3", "gemma2", "mistral", "r1"])
def pipeline(request, tmp_path_factory):
    """SFT → reward, cost → PPO-Lag, PPO, shaping (LoRA on the chat models) → DPO → generate, on
    one model; the chat models train in bfloat16, the word-level one in float32."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from OpenMP threads that wait on each other
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    name = request.param
    base = request.getfixturevalue(FIXTURES[name])
    dtype = "float32" if name == "word-level" else "bfloat16"
    out = tmp_path_factory.mktemp(f"pipeline-{name}")
    rng = random.Random(0)
    multi_turn = MULTI_TURN
    if ChatFormat.load(base).system_role == "refused":  # Gemma's template raises on a system message
        multi_turn = {"messages": MULTI_TURN["messages"][1:]}
    sft_records = world.sft_corpus(rng, 48) + [multi_turn]
    prompts = world.sample_prompts(rng, 12)
    pairs = [world.annotate(p, "sure . step 1 : cut the wood .", "sorry , i can not help with that .", rng)
             for p in prompts]
    runs = {"base": base, "dtype": dtype, "name": name, "prompts": prompts, "pairs": pairs}
    runs["sft"] = run_job("sft", {"model": str(base), "epochs": 1, "batch_size": 8, "dtype": dtype,
                                  "optim": {"lr": 1e-3}}, sft_records, out / "sft")
    policy = runs["sft"][0].artifacts[0].path
    for kind in ("reward", "cost"):
        runs[kind] = run_job(kind, {"model": policy, "epochs": 1, "batch_size": 8, "dtype": dtype},
                             pairs, out / kind)
    scores = {"reward_model": runs["reward"][0].artifacts[0].path, "cost_model": runs["cost"][0].artifacts[0].path}
    ppo = {"model": policy, **scores, "steps": 2, "rollout_batch_size": 4, "micro_batch_size": 2,
           "sampling": {"max_new_tokens": 8, "temperature": 0.7}, "dtype": dtype}
    if name != "word-level":
        ppo["lora"] = {"r": 4}
        ppo["gradient_checkpointing"] = True
    for job in ("ppo_lag", "ppo", "ppo_shaping"):
        runs[job] = run_job(job, ppo, prompts + sft_records[:4], out / job)
    runs["dpo"] = run_job("dpo", {"model": policy, "epochs": 1, "batch_size": 4, "dtype": dtype}, pairs, out / "dpo")
    runs["generate"] = run_job("generate", {"model": runs["ppo_lag"][0].artifacts[0].path,
                                            "sampling": {"max_new_tokens": 8}}, prompts, out / "generate")
    return runs


def test_every_job_succeeds_and_reports_progress(pipeline):
    for job in ("sft", "reward", "cost", "ppo_lag", "ppo", "ppo_shaping", "dpo", "generate"):
        result, events = pipeline[job]
        assert events and events[-1]["step"] == events[-1]["total_steps"], job
        assert all(torch.isfinite(torch.tensor(v)) for k, v in result.metrics.items() if isinstance(v, float)), job


def test_artifacts_are_plain_hf_models_in_the_trained_dtype_carrying_their_format(pipeline):
    want = {"float32": torch.float32, "bfloat16": torch.bfloat16}[pipeline["dtype"]]
    base_fmt = ChatFormat.load(pipeline["base"])
    for job in ("sft", "reward", "cost", "ppo_lag", "ppo", "ppo_shaping", "dpo"):
        artifact = pipeline[job][0].artifacts[0]
        path = artifact.path
        assert not list(__import__("pathlib").Path(path).glob("adapter_*")), f"{job}: LoRA must be merged"
        with safe_open(f"{path}/model.safetensors", "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {{torch.float32: "F32", torch.bfloat16: "BF16"}[want]}, job
        auto = (AutoModelForSequenceClassification if artifact.kind in ("reward", "cost") else
                AutoModelForCausalLM).from_pretrained(path, dtype="auto")
        assert auto.dtype == want, job
        fmt = ChatFormat.load(path)
        assert fmt.eos_ids == base_fmt.eos_ids and fmt.tokenizer.chat_template == base_fmt.tokenizer.chat_template
        plain = AutoTokenizer.from_pretrained(path)  # apply_chat_template works on every artifact
        assert plain.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True) == fmt.render([{"role": "user", "content": "hi"}],
                                                                                   add_generation_prompt=True)
        assert artifact.metadata["chat_template"] == base_fmt.template_source


def test_plain_transformers_scores_equal_beavers_on_the_saved_template(pipeline):
    for kind in ("reward", "cost"):
        path = pipeline[kind][0].artifacts[0].path
        fmt = ChatFormat.load(path)
        model = load_score_model(path, fmt.tokenizer).eval()
        plain_model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        plain_tok = AutoTokenizer.from_pretrained(path)
        pairs = [(p["prompt"], r) for p in pipeline["prompts"][:4] for r in ("sure . step 1 :", "sorry , no .")]
        ours = score(model.float(), fmt, [p for p, _ in pairs], [r for _, r in pairs])
        with torch.no_grad():
            theirs = [plain_model(**plain_tok.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=True,
                return_dict=True, return_tensors="pt")).logits[0, 0].item() for p, r in pairs]
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4, kind


def test_ppo_samples_on_policy_and_scores_the_rollout_ids(pipeline):
    if pipeline["dtype"] == "float32":  # the sampler's log-probs are the trainer's log π_old
        for job in ("ppo_lag", "ppo", "ppo_shaping"):
            assert pipeline[job][1][-1]["train/sampler_logprob_gap"] < 1e-4
    events = pipeline["ppo_lag"][1]
    assert events[0]["rollout_engine"] == "hf"  # auto, on a worker without a GPU: the job's first event says so
    events = [e for e in events if "step" in e]
    assert [e["step"] for e in events] == [1, 2] and all("lagrange/lambda" in e for e in events)


def test_score_model_reads_a_rollout_as_it_was_trained(pipeline):
    """Same format: the rollout's own ids (one BOS, the template's turn close), equal to the
    trained conversation for an answer that re-tokenises to them. Another template: re-rendered."""
    policy_fmt = ChatFormat.load(pipeline["sft"][0].artifacts[0].path, padding_side="left")
    path = pipeline["reward"][0].artifacts[0].path
    fmt = ChatFormat.load(path)
    model = load_score_model(path, fmt.tokenizer)
    prompt = pipeline["prompts"][0]["prompt"]
    answer = "sure . step 1 : cut the wood ."
    trained = fmt.completion_ids(prompt, answer)
    prompt_ids = policy_fmt.prompt_ids(prompt)
    content = trained[len(prompt_ids): len(trained) - len(fmt.turn_close) - len(fmt.turn_suffix)]
    rollout = Rollout([prompt], [prompt_ids], [content + [policy_fmt.eos_ids[-1]]], [answer])
    direct = ScoreModelScorer(model, fmt, policy_fmt)
    # a reasoning format's stored answer is not what was sampled: it is always re-rendered
    assert direct.direct == (not fmt.generation_extra) and direct.inputs(rollout) == [trained]
    other = ChatFormat.load(pipeline["base"], chat_template=(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + ' ' }}"
        "{% else %}{{ 'A: ' + m['content'] + eos_token + ' ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"), padding_side="left")
    rerendered = ScoreModelScorer(model, fmt, other)
    assert not rerendered.direct and rerendered.inputs(rollout) == [trained]
    bos = fmt.tokenizer.bos_token_id
    if bos is not None and fmt.tokenizer("x")["input_ids"][0] == bos:
        assert trained.count(bos) == 1


def test_generated_samples_are_message_content(pipeline):
    result, _ = pipeline["generate"]
    fmt = ChatFormat.load(pipeline["base"])
    samples = [json.loads(line) for line in open(result.artifacts[0].path)]
    assert len(samples) == len(pipeline["prompts"])
    special = {t for t in fmt.tokenizer.all_special_tokens}
    assert not any(s in sample["response"] for sample in samples for s in special)


def test_lora_ppo_changed_the_policy_and_full_sft_trained_every_turn(pipeline):
    sft = load_causal_lm(pipeline["sft"][0].artifacts[0].path)
    ppo = load_causal_lm(pipeline["ppo_lag"][0].artifacts[0].path)
    assert any(not torch.equal(a, b) for a, b in zip(sft.parameters(), ppo.parameters()))
