"""GRPO-Lagrangian (critic-free Safe RLHF): exact values of the group normalisation, the combined
advantage, the rectified cost and the vector λ update; then few-step jobs of a tiny real Llama on a
synthetic task (λ rises while J̄_C > d and the cost falls; two constraints move their own λ_k), the job
contract (events, checkpoint/resume, artifact), LoRA on the Qwen2-style model, and two ranks."""

import math

import pytest
import torch

from models.chat_format import ChatFormat
from models.generation import SamplingConfig
from models.grpo_lag import GRPOLagConfig, group_rows, run_grpo, run_grpo_lag, unshard_groups
from models.jobs import JobContext, ParamsError, parse_params
from models.loading import load_causal_lm
from models.ppo_lag import CostModelSpec
from models.rl import Constraint, Constraints, combine_advantages, group_normalize, rectified_cost
from models.training import LoraConfig, OptimConfig
from tests.ranks import run_on_ranks

# ---- exact values -------------------------------------------------------------------------


def test_group_normalize_exact_and_a_group_that_all_scores_the_same_carries_no_signal():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0])
    z = group_normalize(scores, 4, eps=0.0 + 1e-6)
    # group 1: mean 2, population std sqrt(0.5): Z = (S − 2)/sqrt(0.5)
    s = math.sqrt(0.5)
    torch.testing.assert_close(z[:4], torch.tensor([-1 / s, 1 / s, 0.0, 0.0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z[4:], torch.zeros(4))  # all the same: A = 0, not NaN
    # groups are consecutive answers of one prompt: G = 2 pairs them differently
    torch.testing.assert_close(group_normalize(scores, 2)[:4], torch.tensor([-1.0, 1.0, 0.0, 0.0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        group_normalize(scores, 3)


def test_combined_advantage_with_one_and_two_constraints_exact():
    z_r = torch.tensor([1.0, -1.0, 0.5])
    z_a = torch.tensor([2.0, 0.0, -1.0])
    z_b = torch.tensor([0.0, 1.0, 1.0])
    # one: (Z_R − λ·Z_C)/(1 + λ), λ = 1
    torch.testing.assert_close(combine_advantages(z_r, z_a, 1.0), torch.tensor([-0.5, -0.5, 0.75]))
    # two: (Z_R − 1·Z_a − 3·Z_b)/(1 + 1 + 3)
    torch.testing.assert_close(combine_advantages(z_r, [z_a, z_b], [1.0, 3.0]), torch.tensor([-0.2, -0.8, -0.3]))
    torch.testing.assert_close(combine_advantages(z_r, [z_a, z_b], [0.0, 0.0]), z_r)
    with pytest.raises(ValueError):
        combine_advantages(z_r, [z_a, z_b], [1.0])


def test_rectified_cost_exact():
    torch.testing.assert_close(rectified_cost(torch.tensor([-2.0, 0.5, 1.0, 3.0]), 1.0),
                               torch.tensor([0.0, 0.0, 0.0, 2.0]))


def test_vector_lambda_update_expected_and_per_prompt_and_state_round_trip():
    specs = [Constraint("violence", None, 0.0), Constraint("privacy", None, 1.0)]
    expected = Constraints(specs, "expected", init=1.0, lr=0.1, window=3)
    # J̄_violence = mean(1, 2) = 1.5 > 0; J̄_privacy = mean(0, 1) = 0.5 < 1
    assert expected.record([[1.0, 2.0], [0.0, 1.0]]) == [1.5, 0.5]
    lams = expected.update()
    assert lams[0] == pytest.approx(math.exp(0.1 * 1.5))  # log λ ← 0 + lr·(J̄ − d)·λ
    assert lams[1] == pytest.approx(math.exp(0.1 * -0.5))  # the other falls, independently
    metrics = expected.metrics()
    assert metrics["lagrange/lambda"] == pytest.approx(sum(lams))
    assert metrics["lagrange/lambda/privacy"] == pytest.approx(lams[1]) and metrics["train/episode_cost/violence"] == 1.5
    # the window keeps the last 3 episodes: violence (1, 2, 4) → 7/3
    assert expected.record([[4.0], [1.0]])[0] == pytest.approx(7 / 3)

    per_prompt = Constraints(specs, "per_prompt", init=1.0, lr=0.1)
    # the signal is [C − d]⁺: violence (1, 0) → 0.5; privacy [0.5 − 1]⁺, [3 − 1]⁺ → (0, 2) → 1
    assert per_prompt.record([[1.0, -3.0], [0.5, 3.0]]) == [0.5, 1.0]
    lams = per_prompt.update()
    assert lams == pytest.approx([math.exp(0.05), math.exp(0.1)])  # threshold 0 on the violation
    torch.testing.assert_close(per_prompt.signal(1, torch.tensor([0.5, 3.0])), torch.tensor([0.0, 2.0]))

    restored = Constraints(specs, "expected", init=1.0, lr=0.1, window=3)
    restored.load_state_dict(expected.state_dict())
    assert restored.values == expected.values and restored.means() == expected.means()
    with pytest.raises(ValueError):  # another job's constraints
        Constraints(specs[:1], "expected").load_state_dict(expected.state_dict())


def test_groups_are_never_split_across_ranks_and_come_back_in_the_global_order():
    from models.distributed import Ranks

    # 4 prompts, G = 2: rank 0 holds prompts 0 and 2 (rows 0, 1, 4, 5), rank 1 prompts 1 and 3
    assert group_rows(4, 2, Ranks(0, 2, 0)) == [0, 1, 4, 5]
    assert group_rows(4, 2, Ranks(1, 2, 0)) == [2, 3, 6, 7]
    assert group_rows(2, 3, Ranks(0, 1, 0)) == [0, 1, 2, 3, 4, 5]
    gathered = [0, 1, 4, 5] + [2, 3, 6, 7]  # all_gather: rank 0's answers, then rank 1's
    assert unshard_groups(gathered, 2, 2) == list(range(8))


def test_config_bounds_and_the_job_types():
    base = {"model": "m", "reward_model": "r", "cost_model": "c"}
    assert parse_params("grpo_lag", base).group_size == 4
    assert parse_params("grpo_lag", base).objective == "lagrangian"
    assert parse_params("grpo", {"model": "m", "reward_model": "r"}).objective == "reward"  # no cost needed
    for bad in (1, 65):
        with pytest.raises(ParamsError) as e:
            parse_params("grpo_lag", {**base, "group_size": bad})
        assert e.value.param == "params.group_size"
    with pytest.raises(ParamsError) as e:  # no critics in GRPO
        parse_params("grpo_lag", {**base, "reward_critic": "r"})
    assert e.value.param == "params.reward_critic"
    with pytest.raises(ParamsError):  # set by the job type
        parse_params("grpo", {**base, "objective": "lagrangian"})
    with pytest.raises(ValueError, match="cost_model"):
        parse_params("grpo_lag", {"model": "m", "reward_model": "r"})


# ---- a synthetic task on a tiny real model -------------------------------------------------
# As tests/models/test_ppo_lag.py: reward counts "red" and, twice as much, "blue"; cost counts
# "blue" minus 1 (J̄_C ≤ 0 allows about one "blue" per answer); a second cost counts "red".

PROMPTS = ["how do i make a cake ?", "what is the capital of france ?"]


def count(word, responses):
    return [sum(w == word for w in r.split()) for r in responses]


def synthetic_reward(prompts, responses):
    return [a + 2 * b for a, b in zip(count("red", responses), count("blue", responses))]


def synthetic_cost(prompts, responses):
    return [b - 1.0 for b in count("blue", responses)]


def red_cost(prompts, responses):
    return [float(r) for r in count("red", responses)]


def constant_lr(lr):
    return OptimConfig(lr=lr, warmup_ratio=0.0, scheduler="constant")


def steps(events):
    """The step events (the job's first event names its rollout engine)."""
    return [e for e in events if "step" in e]


def job_context(tmp_path, events, prompts=PROMPTS, **kwargs):
    records = [{"prompt": p, "red_team": False} for p in prompts] + [
        {"prompt": "how do i make a cake ?", "response": "sure . step 1 : mix flour ."}]
    return JobContext(output_dir=tmp_path, datasets=["prompts"], load_dataset=lambda d: records,
                      report=events.append, **kwargs)


def synthetic_config(path, **overrides):
    # the scorers are Python rules: the model fields only name placeholders
    params = dict(model=str(path), reward_model=str(path), cost_model=str(path), steps=16, rollout_batch_size=8,
                  group_size=4, ppo_epochs=2, mini_batch_size=16, sampling=SamplingConfig(max_new_tokens=8),
                  actor_optim=constant_lr(3e-3), lambda_lr=0.5, episode_cost_window=64, ptx_coef=0.0, seed=0)
    params.update(overrides)
    return GRPOLagConfig(**params)


@pytest.mark.slow
def test_grpo_lag_lambda_rises_while_the_cost_is_over_the_threshold_and_the_cost_falls(tiny_llama_dir, tmp_path):
    lag, grpo = [], []
    run_grpo_lag(synthetic_config(tiny_llama_dir), job_context(tmp_path / "lag", lag),
                 reward_fn=synthetic_reward, cost_fn=synthetic_cost)
    run_grpo(synthetic_config(tiny_llama_dir), job_context(tmp_path / "grpo", grpo),
             reward_fn=synthetic_reward, cost_fn=synthetic_cost)
    lag, grpo = steps(lag), steps(grpo)
    mean = lambda events, key: sum(e[key] for e in events) / len(events)
    # λ rises at every step whose J̄_C (including that step's episodes) is over d = 0, falls below
    lambdas = [1.0] + [e["lagrange/lambda"] for e in lag]
    for before, e, after in zip(lambdas, lag, lambdas[1:]):
        if e["train/episode_cost"] > 0 and before < 5.0 - 1e-9:
            assert after > before
        elif e["train/episode_cost"] < 0:
            assert after < before
    assert max(lambdas) > 1.0 and all(0.0 < v <= 5.0 for v in lambdas)
    # the cost falls under GRPO-Lag, while reward-only GRPO drives it up for the reward
    assert mean(lag[-3:], "train/cost") < mean(lag[:3], "train/cost")
    assert mean(grpo[-3:], "train/cost") > mean(lag[-3:], "train/cost") + 0.5
    assert mean(grpo[-3:], "train/reward") > mean(grpo[:3], "train/reward")
    assert all(e["lagrange/lambda"] == 0.0 for e in grpo)


@pytest.mark.slow
def test_two_constraints_move_their_own_lambdas(tiny_llama_dir, tmp_path):
    # "blue" (d = −5: violated by every answer) and "red" (d = 50: met by every answer of 8 tokens)
    config = synthetic_config(tiny_llama_dir, cost_model=None, steps=4, cost_models=[
        CostModelSpec(str(tiny_llama_dir), -5.0, "blue"), CostModelSpec(str(tiny_llama_dir), 50.0, "red")])
    events = []
    run_grpo_lag(config, job_context(tmp_path, events), reward_fn=synthetic_reward, cost_fn=[synthetic_cost, red_cost])
    events = steps(events)
    blue = [e["lagrange/lambda/blue"] for e in events]
    red = [e["lagrange/lambda/red"] for e in events]
    assert all(b > a for a, b in zip([1.0] + blue, blue))  # violated: rises every step
    assert all(b < a for a, b in zip([1.0] + red, red))  # met: falls every step
    for e in events:
        assert e["lagrange/lambda"] == pytest.approx(e["lagrange/lambda/blue"] + e["lagrange/lambda/red"])
        assert {"train/cost/blue", "train/cost/red", "train/episode_cost/blue", "train/episode_cost/red"} <= set(e)


# ---- the job: events, checkpoint and resume, artifact -------------------------------------

EVENT_KEYS = {"step", "total_steps", "message", "train/reward", "train/cost", "train/episode_cost", "lagrange/lambda",
              "train/kl", "train/kl_k3", "train/actor_loss", "train/clip_fraction", "train/entropy",
              "train/response_length", "train/ptx_loss", "time/rollout", "time/scoring", "time/update",
              "rollout/weights_version", "rollout/stale_updates"}


def test_grpo_lag_job_with_score_models_checkpoints_and_resumes(tiny_llama_dir, tmp_path):
    # reward and cost models: the tiny Llama with fresh score heads, loaded as a trained one would be
    config = dict(model=str(tiny_llama_dir), reward_model=str(tiny_llama_dir), cost_model=str(tiny_llama_dir),
                  steps=4, rollout_batch_size=2, group_size=3, sampling=SamplingConfig(max_new_tokens=4),
                  checkpoint_every=2, lambda_lr=1.0, seed=1)
    events = []
    result = run_grpo_lag(GRPOLagConfig(**config), job_context(tmp_path / "first", events))
    assert events[0]["rollout_engine"] == "hf"
    events = steps(events)
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert all(EVENT_KEYS <= set(e) for e in events)
    assert not any("critic" in k for e in events for k in e)  # four networks: no critic
    assert len({e["lagrange/lambda"] for e in events}) == 4  # λ moved every step
    artifact = result.artifacts[0]
    assert artifact.kind == "policy" and artifact.metadata["trainer"] == "grpo_lag"
    assert artifact.metadata["threshold"] == 0.0 and artifact.metadata["group_size"] == 3
    load_causal_lm(artifact.path, ChatFormat.load(artifact.path).tokenizer)

    checkpoint = events[1]["checkpoint"]
    assert checkpoint.endswith("checkpoint-2")
    resumed = []
    run_grpo_lag(GRPOLagConfig(**config), job_context(tmp_path / "second", resumed, resume_from=checkpoint))
    resumed = steps(resumed)
    assert [e["step"] for e in resumed] == [3, 4]
    for a, b in zip(events[2:], resumed):  # the same λ, window, optimizer, weights and seeds
        assert b["lagrange/lambda"] == pytest.approx(a["lagrange/lambda"], rel=1e-4)
        assert b["train/episode_cost"] == pytest.approx(a["train/episode_cost"], rel=1e-4, abs=1e-5)
        assert b["train/reward"] == pytest.approx(a["train/reward"], rel=1e-4, abs=1e-5)


def test_grpo_lag_with_lora_on_the_qwen2_style_model(tiny_qwen_dir, tmp_path):
    from models import world

    prompts = [p for p, *_ in world.prompts()][:4] if hasattr(world, "prompts") else PROMPTS
    config = GRPOLagConfig(model=str(tiny_qwen_dir), reward_model=str(tiny_qwen_dir), cost_model=str(tiny_qwen_dir),
                           steps=2, rollout_batch_size=2, group_size=2, lora=LoraConfig(r=4),
                           sampling=SamplingConfig(max_new_tokens=4), actor_optim=constant_lr(1e-2), seed=0)
    events = []
    result = run_grpo_lag(config, job_context(tmp_path, events, prompts=prompts))
    events = steps(events)
    assert [e["step"] for e in events] == [1, 2]
    # the reference is the base (adapters off): the KL is 0 before the first update moves the adapters
    assert events[0]["train/kl"] == pytest.approx(0.0, abs=1e-5)
    assert events[1]["train/kl"] != pytest.approx(0.0, abs=1e-7)
    path = result.artifacts[0].path
    load_causal_lm(path, ChatFormat.load(path).tokenizer)  # the merged policy, in HF format


# ---- two ranks ----------------------------------------------------------------------------

RANK_PROMPTS = ["how do i make a cake ?", "what is the capital of france ?", "paris", "good or bad ?"]
RANK_KEYS = ("train/actor_loss", "train/reward", "train/cost", "lagrange/lambda", "train/kl_k3", "train/ptx_loss")


def train_grpo_lag(model_dir: str, output_dir: str, rollout_batch_size: int) -> dict:
    """A 3-step grpo_lag job (score models: the tiny Llama with fresh heads, PTX on one sft record,
    micro-batches of 2); every step's event, run on each rank."""
    from models import distributed

    config = GRPOLagConfig(model=model_dir, reward_model=model_dir, cost_model=model_dir, steps=3,
                           rollout_batch_size=rollout_batch_size, group_size=2, micro_batch_size=2,
                           sampling=SamplingConfig(temperature=1.0, max_new_tokens=4), actor_optim=constant_lr(1e-3),
                           lambda_lr=2.0, seed=3)
    events = []
    run_grpo_lag(config, job_context(output_dir, events, prompts=RANK_PROMPTS))
    return {"events": [{k: e[k] for k in (*RANK_KEYS, "step")} for e in steps(events)],
            "rank": distributed.current().rank}


@pytest.mark.slow
def test_two_ranks_train_what_one_rank_trains_on_the_global_batch(tiny_llama_dir, tmp_path):
    one = train_grpo_lag(str(tiny_llama_dir), str(tmp_path / "one"), rollout_batch_size=4)
    two = run_on_ranks(2, f"{__name__}:train_grpo_lag", {"model_dir": str(tiny_llama_dir),
                                                         "output_dir": str(tmp_path / "two"), "rollout_batch_size": 2},
                       tmp_path / "ranks")
    assert [r["rank"] for r in two] == [0, 1]
    assert [e["step"] for e in one["events"]] == [e["step"] for e in two[0]["events"]] == [1, 2, 3]
    assert len({e["lagrange/lambda"] for e in one["events"]}) == 3
    for rank in two:
        for a, b in zip(one["events"], rank["events"]):
            for key in RANK_KEYS:
                assert b[key] == pytest.approx(a[key], abs=1e-4), (rank["rank"], a["step"], key)
