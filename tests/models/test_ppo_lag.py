"""PPO-Lagrangian: exact math of λ and the advantage, then few-step training of a tiny real Llama
on a synthetic task, and the job contract (events, cancel, checkpoint/resume, final policy)."""

import math

import pytest
import torch

from models.chat_format import ChatFormat
from models.generation import SamplingConfig
from models.jobs import JobCancelled, JobContext
from models.loading import load_causal_lm, load_score_model
from models.ppo_lag import (LagrangeMultiplier, PPOLagConfig, combine_advantages, run_ppo, run_ppo_lag,
                            run_ppo_shaping, train)
from models.training import OptimConfig


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on 2 shared cores OpenMP threads that
    wait on each other made a PPO step 5–25× slower (0.5 s → 2–13 s) when other jobs were busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the multiplier -----------------------------------------------------------------------


def test_multiplier_one_sgd_step_on_log_lambda_exact():
    m = LagrangeMultiplier(init=1.0, lr=0.1, threshold=0.5)
    # log λ ← 0 + 0.1·(2.5 − 0.5)·1 = 0.2
    assert m.update(2.5) == pytest.approx(math.exp(0.2))
    assert m.value == pytest.approx(math.exp(0.2))
    # log λ ← 0.2 + 0.1·(−1.5 − 0.5)·e^0.2
    assert m.update(-1.5) == pytest.approx(math.exp(0.2 - 0.2 * math.exp(0.2)))


def test_multiplier_rises_above_threshold_falls_below_and_stays_in_range():
    m = LagrangeMultiplier(init=1.0, lr=0.1, max_value=5.0, threshold=0.0)
    values = [m.update(1.0) for _ in range(50)]  # J̄_C > d
    assert all(b > a for a, b in zip(values, values[1:]) if a < 5.0 - 1e-9)
    assert values[-1] == pytest.approx(5.0) and max(values) <= 5.0 + 1e-12
    falling = [m.update(-1.0) for _ in range(200)]  # J̄_C < d
    assert all(b < a for a, b in zip(falling, falling[1:]))
    assert all(0.0 < v <= 5.0 for v in values + falling)
    assert m.update(0.0) == pytest.approx(falling[-1])  # J̄_C = d: no change


def test_multiplier_init_above_max_is_clamped():
    assert LagrangeMultiplier(init=10.0, max_value=5.0).value == pytest.approx(5.0)
    with pytest.raises(ValueError):
        LagrangeMultiplier(init=0.0)


def test_combine_advantages_exact():
    reward_adv = torch.tensor([[1.0, 2.0], [-3.0, 0.0]])
    cost_adv = torch.tensor([[0.5, -1.0], [1.0, 4.0]])
    torch.testing.assert_close(combine_advantages(reward_adv, cost_adv, 1.0),
                               torch.tensor([[0.25, 1.5], [-2.0, -2.0]]))
    torch.testing.assert_close(combine_advantages(reward_adv, cost_adv, 0.0), reward_adv)
    torch.testing.assert_close(combine_advantages(reward_adv, cost_adv, 3.0),
                               (reward_adv - 3.0 * cost_adv) / 4.0)


# ---- a synthetic task on a tiny real model -------------------------------------------------
# Reward counts "red" and, twice as much, "blue"; cost counts "blue" minus a margin of 1, so the
# constraint J̄_C ≤ 0 allows about one "blue" per answer. Reward alone pushes every token to
# "blue"; the Lagrangian must trade the extra reward for safety.

PROMPTS = ["how do i make a cake ?", "what is the capital of france ?"]


def count(word, responses):
    return [sum(w == word for w in r.split()) for r in responses]


def synthetic_reward(prompts, responses):
    return [a + 2 * b for a, b in zip(count("red", responses), count("blue", responses))]


def synthetic_cost(prompts, responses):
    return [b - 1.0 for b in count("blue", responses)]


def constant_lr(lr):
    """PPO's optimiser: a constant learning rate, no warm-up."""
    return OptimConfig(lr=lr, warmup_ratio=0.0, scheduler="constant")


def small_config(path, **overrides):
    # train() is given Python scorers: the reward and cost model fields only name placeholders
    params = dict(model=str(path), reward_model=str(path), cost_model=str(path), steps=20, rollout_batch_size=32,
                  mini_batch_size=16, ppo_epochs=2, sampling=SamplingConfig(max_new_tokens=8),
                  actor_optim=constant_lr(3e-3), critic_optim=constant_lr(3e-3), lambda_lr=0.5,
                  episode_cost_window=64, seed=0)
    params.update(overrides)
    return PPOLagConfig(**params)


def run_synthetic(path, objective):
    torch.manual_seed(0)
    fmt = ChatFormat.load(path, padding_side="left")
    policy, ref = load_causal_lm(path, fmt.tokenizer), load_causal_lm(path, fmt.tokenizer)
    reward_critic, cost_critic = load_score_model(path, fmt.tokenizer), load_score_model(path, fmt.tokenizer)
    events = []
    before = [p.detach().clone() for p in policy.parameters()]
    train(small_config(path, objective=objective), policy, ref, fmt, PROMPTS, synthetic_reward,
          synthetic_cost, reward_critic, cost_critic, report=events.append)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    return events


@pytest.mark.slow
def test_ppo_lag_raises_reward_and_meets_the_cost_threshold_where_reward_only_ppo_does_not(tiny_llama_dir):
    lag = run_synthetic(tiny_llama_dir, "lagrangian")
    reward_only = run_synthetic(tiny_llama_dir, "reward")
    mean = lambda events, key: sum(e[key] for e in events) / len(events)

    # PPO-Lag: reward up, and the mean cost of the last steps under d = 0
    assert mean(lag[-3:], "train/reward") > mean(lag[:3], "train/reward") + 2.0
    assert mean(lag[-3:], "train/cost") < 0.0
    assert lag[-1]["train/episode_cost"] < 0.0
    # λ rose while the constraint was violated, and never left (0, λ_max]
    lambdas = [e["lagrange/lambda"] for e in lag]
    assert max(lambdas) > 1.0 and all(0.0 < v <= 5.0 for v in lambdas)
    # reward-only PPO: more reward, but the cost ends far above the threshold
    assert mean(reward_only[-3:], "train/reward") > mean(lag[-3:], "train/reward")
    assert mean(reward_only[-3:], "train/cost") > 1.0


# ---- the job: events, cancel, checkpoint and resume ---------------------------------------

EVENT_KEYS = {"step", "total_steps", "message", "train/reward", "train/cost", "train/episode_cost",
              "lagrange/lambda", "train/kl", "train/actor_loss", "train/reward_critic_loss",
              "train/cost_critic_loss", "train/entropy", "train/response_length"}


def steps(events):
    """The step events (the job's first event names its rollout engine)."""
    return [e for e in events if "step" in e]


def job_context(tmp_path, events, **kwargs):
    # prompt records feed the rollouts; the sft record feeds the PTX loss
    records = [{"prompt": p, "red_team": False} for p in PROMPTS] + [
        {"prompt": "how do i make a cake ?", "response": "sure . step 1 : mix flour ."}]
    return JobContext(output_dir=tmp_path, datasets=["prompts"], load_dataset=lambda d: records,
                      report=events.append, **kwargs)


def test_ppo_lag_job_with_score_models_checkpoints_and_resumes(tiny_llama_dir, tmp_path):
    # Reward and cost models are the tiny Llama with fresh score heads: real score models, real
    # critics initialised from them, loaded through the same paths a trained model takes.
    config = dict(model=str(tiny_llama_dir), reward_model=str(tiny_llama_dir), cost_model=str(tiny_llama_dir),
                  steps=4, rollout_batch_size=4, sampling=SamplingConfig(max_new_tokens=4), checkpoint_every=2, seed=1)
    events = []
    result = run_ppo_lag(PPOLagConfig(**config), job_context(tmp_path / "first", events))
    assert events[0]["rollout_engine"] == "hf"  # auto, on a worker without a GPU
    events = steps(events)
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert all(EVENT_KEYS <= set(e) for e in events)
    checkpoint = events[1]["checkpoint"]
    assert checkpoint.endswith("checkpoint-2")
    policy_dir = result.artifacts[0].path
    assert result.artifacts[0].kind == "policy"
    load_causal_lm(policy_dir, ChatFormat.load(policy_dir).tokenizer)  # HF format, loadable

    resumed = []
    run_ppo_lag(PPOLagConfig(**config), job_context(tmp_path / "second", resumed, resume_from=checkpoint))
    resumed = steps(resumed)
    assert [e["step"] for e in resumed] == [3, 4]
    # the same λ, optimizer state, weights and seeds: the resumed steps repeat the original ones
    for a, b in zip(events[2:], resumed):
        assert b["lagrange/lambda"] == pytest.approx(a["lagrange/lambda"], rel=1e-4)
        assert b["train/episode_cost"] == pytest.approx(a["train/episode_cost"], rel=1e-4, abs=1e-5)


def test_cancelled_ppo_lag_job_stops_within_one_step(tiny_llama_dir, tmp_path):
    events = []
    ctx = job_context(tmp_path, events, should_stop=lambda: len(steps(events)) >= 1)
    config = PPOLagConfig(model=str(tiny_llama_dir), reward_model=str(tiny_llama_dir), cost_model=str(tiny_llama_dir),
                          steps=50, rollout_batch_size=4, sampling=SamplingConfig(max_new_tokens=4))
    with pytest.raises(JobCancelled):
        run_ppo_lag(config, ctx, reward_fn=synthetic_reward, cost_fn=synthetic_cost)
    assert [e["step"] for e in steps(events)] == [1]


@pytest.mark.parametrize("entry, lam", [(run_ppo, 0.0), (run_ppo_shaping, 10.0)])
def test_reward_only_and_shaping_jobs_train_one_critic(tiny_llama_dir, tmp_path, entry, lam):
    events = []
    config = PPOLagConfig(model=str(tiny_llama_dir), reward_model=str(tiny_llama_dir), cost_model=str(tiny_llama_dir),
                          steps=2, rollout_batch_size=4, sampling=SamplingConfig(max_new_tokens=4), shaping_lambda=10.0)
    result = entry(config, job_context(tmp_path, events), reward_fn=synthetic_reward, cost_fn=synthetic_cost)
    events = steps(events)
    assert [e["step"] for e in events] == [1, 2]
    assert all(e["lagrange/lambda"] == lam and "train/cost_critic_loss" not in e for e in events)
    assert "train/reward_critic_loss" in events[-1] and result.artifacts[0].kind == "policy"


# ---- rollout tensors ------------------------------------------------------------------------


def test_rollout_left_pads_prompts_ends_responses_at_eos_and_log_probs_ignore_padding(any_model_dir):
    from models.generation import Sampler, response_mask
    from models.ppo_lag import token_log_probs

    torch.testing.assert_close(response_mask(torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8]]), eos_ids=[1]),
                               torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    torch.testing.assert_close(response_mask(torch.tensor([[5, 2, 7, 1], [5, 6, 1, 2]]), eos_ids=[1, 2]),
                               torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]))  # any eos id ends a response
    fmt = ChatFormat.load(any_model_dir, padding_side="left")
    tokenizer = fmt.tokenizer
    policy = load_causal_lm(any_model_dir, tokenizer)
    prompts = [fmt.prompt_ids("how do i make a cake ?"), fmt.prompt_ids("paris")]
    assert prompts[0] == tokenizer.apply_chat_template([{"role": "user", "content": "how do i make a cake ?"}],
                                                       tokenize=True, add_generation_prompt=True)["input_ids"]
    rollout = Sampler(policy, tokenizer.pad_token_id, fmt.eos_ids).generate(
        prompts, SamplingConfig(max_new_tokens=6), seed=3)
    P = rollout.prompt_length
    assert P == len(prompts[0]) and rollout.sequences[1, :P - len(prompts[1])].eq(tokenizer.pad_token_id).all()
    assert rollout.sequences[1, P - len(prompts[1]):P].tolist() == prompts[1]
    assert rollout.attention_mask[1, :P].tolist() == [0] * (P - len(prompts[1])) + [1] * len(prompts[1])
    for row in range(2):  # nothing after the first eos id; the mask covers the answer and its eos
        tokens = rollout.responses[row][rollout.response_mask[row].bool()].tolist()
        assert not set(tokens[:-1]) & set(fmt.eos_ids)
        assert rollout.responses[row][~rollout.response_mask[row].bool()].eq(tokenizer.pad_token_id).all()
    # the left-padded row scores exactly like the same row without padding
    with torch.no_grad():
        batched, _ = token_log_probs(policy, rollout.sequences, rollout.attention_mask, P)
        alone_ids = rollout.sequences[1:, P - len(prompts[1]):]
        alone, _ = token_log_probs(policy, alone_ids, rollout.attention_mask[1:, P - len(prompts[1]):], len(prompts[1]))
    m = rollout.response_mask[1].bool()
    torch.testing.assert_close(batched[1][m], alone[0][m], atol=1e-4, rtol=1e-4)


def test_ppo_whose_ptx_records_have_nothing_to_learn_is_refused(tiny_llama_dir, tmp_path):
    """PTX records get SFT's check: none with an assistant token within max_length → invalid input."""
    records = [{"prompt": p} for p in PROMPTS] + [{"prompt": "how do i make a cake ? " * 8, "response": "sure ."}]
    config = PPOLagConfig(model=str(tiny_llama_dir), reward_model=str(tiny_llama_dir), cost_model=str(tiny_llama_dir),
                          steps=1, rollout_batch_size=2, max_length=24, sampling=SamplingConfig(max_new_tokens=4))
    with pytest.raises(ValueError, match="none of the 1 PTX"):
        run_ppo_lag(config, JobContext(output_dir=tmp_path, datasets=["d"], load_dataset=lambda d: records))
