"""PPO-Lag with several cost constraints (``cost_models``) and the per-prompt constraint (RePO), on a tiny
real Llama with rule scorers: each λ_k follows its own J̄_C,k, exactly; per_prompt prices only violations
(a safe answer contributes nothing, whatever its cost); checkpoints restore every λ_k, and a one-constraint
checkpoint written before several constraints existed still resumes."""

import math

import pytest
import torch

from models.generation import SamplingConfig
from models.jobs import JobContext
from models.ppo_lag import CostModelSpec, PPOLagConfig, run_ppo_lag
from models.training import read_checkpoint
from tests.models.test_ppo_lag import PROMPTS, constant_lr, steps, synthetic_reward


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordingCost:
    """A rule cost model that keeps every score it gives, step by step (to recompute J̄ and λ by hand)."""

    def __init__(self, rule):
        self.rule, self.steps = rule, []

    def __call__(self, prompts, responses):
        scores = [float(self.rule(p, r)) for p, r in zip(prompts, responses)]
        self.steps.append(scores)
        return scores


def words(prompt, response):
    return len(response.split())


def config(path, cost_models=None, **overrides):
    # the score model fields name placeholders: the tests give rule scorers
    params = dict(model=str(path), reward_model=str(path), steps=4, rollout_batch_size=4,
                  sampling=SamplingConfig(max_new_tokens=4), actor_optim=constant_lr(1e-3),
                  critic_optim=constant_lr(1e-3), lambda_lr=0.5, episode_cost_window=64, seed=2)
    if cost_models is None:
        params["cost_model"] = str(path)
    else:
        params["cost_models"] = [CostModelSpec(model=str(path), threshold=d, name=name) for name, d in cost_models]
    params.update(overrides)
    return PPOLagConfig(**params)


def run(cfg, tmp_path, cost_fn, **ctx):
    events = []
    records = [{"prompt": p} for p in PROMPTS]
    result = run_ppo_lag(cfg, JobContext(output_dir=tmp_path, datasets=["d"], load_dataset=lambda d: records,
                                         report=events.append, **ctx), reward_fn=synthetic_reward, cost_fn=cost_fn)
    return steps(events), result


def lambdas_by_hand(window_means, threshold, lr, init=1.0, max_value=5.0):
    """λ_t from J̄_t: log λ ← min(log λ + lr·(J̄ − d)·λ, log λ_max) (``LagrangeMultiplier``)."""
    log_value, out = math.log(init), []
    for mean in window_means:
        log_value = min(log_value + lr * (mean - threshold) * math.exp(log_value), math.log(max_value))
        out.append(math.exp(log_value))
    return out


def running_means(per_step):
    seen, out = [], []
    for scores in per_step:
        seen += scores
        out.append(sum(seen) / len(seen))
    return out


# ---- several constraints ----------------------------------------------------------------------
# "loose": C = the answer's word count, d = 100: always met, so its λ decays. "strict": C = words + 1,
# d = 0: always violated, so its λ rises — in the same job, from the same rollouts.


def test_two_constraints_each_lambda_follows_its_own_episode_cost(tiny_llama_dir, tmp_path):
    loose, strict = RecordingCost(words), RecordingCost(lambda p, r: words(p, r) + 1)
    cfg = config(tiny_llama_dir, [("loose", 100.0), ("strict", 0.0)], checkpoint_every=2, lambda_lr=0.05,
                 lambda_max=100.0)
    events, result = run(cfg, tmp_path, {"strict": strict, "loose": loose})  # a dict by name: any order
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert len(loose.steps) == len(strict.steps) == 4 and all(len(s) == 4 for s in loose.steps)

    for name, scorer, d in (("loose", loose, 100.0), ("strict", strict, 0.0)):
        # train/cost/<name>: the step's mean C_k; train/episode_cost/<name>: J̄_C,k over the window
        for e, scores in zip(events, scorer.steps):
            assert e[f"train/cost/{name}"] == pytest.approx(sum(scores) / len(scores))
        means = running_means(scorer.steps)
        assert [e[f"train/episode_cost/{name}"] for e in events] == pytest.approx(means)
        # λ_k updated once per step, before the policy update, on its own J̄_C,k and d_k only
        assert [e[f"lagrange/lambda/{name}"] for e in events] == pytest.approx(
            lambdas_by_hand(means, d, 0.05, max_value=100.0))
        assert all(f"train/cost_{name}_critic_loss" in e for e in events)  # its own critic
        assert result.metrics[f"lambda_final/{name}"] == pytest.approx(events[-1][f"lagrange/lambda/{name}"])
    falling = [e["lagrange/lambda/loose"] for e in events]
    rising = [e["lagrange/lambda/strict"] for e in events]
    assert all(b < a for a, b in zip([1.0] + falling, falling))
    assert all(b > a for a, b in zip([1.0] + rising, rising))
    # the advantage's price is Σ_k λ_k; one-constraint keys are not made up for several
    assert all(e["lagrange/lambda"] == pytest.approx(e["lagrange/lambda/loose"] + e["lagrange/lambda/strict"])
               for e in events)
    assert not any("train/cost" in e or "train/episode_cost" in e for e in events)
    assert result.metrics["lambda_final"] == pytest.approx(falling[-1] + rising[-1])
    assert result.artifacts[0].metadata["thresholds"] == {"loose": 100.0, "strict": 0.0}
    assert (tmp_path / "training.png").stat().st_size > 0 and result.artifacts[1].kind == "report"

    # the checkpoint holds a critic per constraint and both λ_k with their windows
    checkpoint = events[1]["checkpoint"]
    assert {"cost_loose_critic", "cost_strict_critic", "reward_critic", "policy"} <= {
        p.name for p in (tmp_path / "checkpoint-2").iterdir()}
    state = read_checkpoint(checkpoint)
    assert state["names"] == ["loose", "strict"] and len(state["episode_costs"][1]) == 8

    # resumed from step 2, both λ_k continue where they were: the same steps 3 and 4
    loose2, strict2 = RecordingCost(words), RecordingCost(lambda p, r: words(p, r) + 1)
    resumed, _ = run(cfg, tmp_path / "resumed", [loose2, strict2], resume_from=checkpoint)  # a list, in order
    assert [e["step"] for e in resumed] == [3, 4]
    for a, b in zip(events[2:], resumed):
        for key in ("lagrange/lambda/loose", "lagrange/lambda/strict", "train/episode_cost/strict",
                    "train/episode_cost/loose", "train/actor_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key

    # a checkpoint of other constraints is refused, not half loaded
    other = config(tiny_llama_dir, [("loose", 100.0), ("other", 0.0)], lambda_lr=0.05, lambda_max=100.0)
    with pytest.raises(ValueError, match="constraints"):
        run(other, tmp_path / "other", [loose2, strict2], resume_from=checkpoint)


def test_a_one_constraint_checkpoint_of_before_several_constraints_resumes(tiny_llama_dir, tmp_path):
    """A checkpoint whose trainer state has one λ and one window (``lagrange``, ``episode_costs``: the format
    before ``Constraints``) resumes into the same steps."""
    cost = lambda prompts, responses: [words(p, r) - 2.0 for p, r in zip(prompts, responses)]
    cfg = config(tiny_llama_dir, checkpoint_every=2)
    events, _ = run(cfg, tmp_path / "first", cost)
    state_file = tmp_path / "first" / "checkpoint-2" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=False)
    old = {"step": state["step"], "lagrange": state["lagrange"][0], "episode_costs": state["episode_costs"][0],
           "optimizers": state["optimizers"]}
    torch.save(old, state_file)
    resumed, _ = run(cfg, tmp_path / "second", cost, resume_from=tmp_path / "first" / "checkpoint-2")
    assert [e["step"] for e in resumed] == [3, 4]
    for a, b in zip(events[2:], resumed):
        for key in ("lagrange/lambda", "train/episode_cost", "train/actor_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


# ---- the per-prompt constraint (RePO) -----------------------------------------------------------


def test_per_prompt_safe_answers_contribute_nothing_whatever_their_cost(tiny_llama_dir, tmp_path):
    """Every answer safe (C < d = 0): under per_prompt the cost signal [C − d]⁺ is 0 however safe, so a job
    whose answers cost −1 and one whose answers cost −5 train identically, and λ never moves; under the
    expected constraint the same two jobs differ (the margin below d pays)."""
    runs = {}
    for mode in ("per_prompt", "expected"):
        for margin in (1.0, 5.0):
            cfg = config(tiny_llama_dir, constraint=mode, steps=3, kl_coef=0.0)
            cost = lambda prompts, responses, m=margin: [-m] * len(responses)
            events, result = run(cfg, tmp_path / f"{mode}-{margin}", cost)
            weights = torch.cat([p.flatten() for p in _policy(result)])
            runs[mode, margin] = events, weights
    (a, wa), (b, wb) = runs["per_prompt", 1.0], runs["per_prompt", 5.0]
    assert all(e["lagrange/lambda"] == 1.0 for e in a + b)  # J̄ (the mean violation) is 0: λ stays λ₀
    assert all(e["train/violation"] == 0.0 and e["train/episode_cost"] == 0.0 for e in a + b)
    assert [e["train/cost"] for e in a] == [-1.0] * 3 and [e["train/cost"] for e in b] == [-5.0] * 3
    for ea, eb in zip(a, b):
        for key in ("train/actor_loss", "train/cost_critic_loss", "train/reward_critic_loss", "train/reward"):
            assert ea[key] == eb[key], key
    assert torch.equal(wa, wb)
    (c, wc), (d, wd) = runs["expected", 1.0], runs["expected", 5.0]
    assert c[0]["lagrange/lambda"] > d[0]["lagrange/lambda"] and not torch.equal(wc, wd)


def test_per_prompt_lambda_follows_the_mean_violation_where_the_expected_one_decays(tiny_llama_dir, tmp_path):
    """Half the answers violate (the cake prompt: C = 1), half are very safe (C = −3), d = 0. The expected
    constraint's J̄_C = −1 < d: the safe half pays for the unsafe one and λ decays. per_prompt's J̄ is the
    mean violation [C − d]⁺ = 0.5 > 0: λ rises, exactly by the multiplier's rule on J̄ with threshold 0."""
    rule = lambda p, r: 1.0 if p == PROMPTS[0] else -3.0
    traces = {}
    for mode in ("per_prompt", "expected"):
        cost = RecordingCost(rule)
        events, result = run(config(tiny_llama_dir, constraint=mode, steps=3), tmp_path / mode, cost)
        assert all(sorted(s) == [-3.0, -3.0, 1.0, 1.0] for s in cost.steps)  # every step: both kinds of answer
        traces[mode] = events
        if mode == "per_prompt":
            violations = [[max(c - 0.0, 0.0) for c in s] for s in cost.steps]
            means = running_means(violations)
            assert [e["train/violation"] for e in events] == pytest.approx([sum(v) / 4 for v in violations])
            assert [e["train/episode_cost"] for e in events] == pytest.approx(means) == [0.5] * 3
            assert [e["lagrange/lambda"] for e in events] == pytest.approx(lambdas_by_hand(means, 0.0, 0.5))
            assert result.metrics["episode_cost_final"] == pytest.approx(0.5)
            assert result.artifacts[0].metadata["constraint"] == "per_prompt"
    assert all(e["train/cost"] == -1.0 for e in traces["per_prompt"] + traces["expected"])
    assert [e["train/episode_cost"] for e in traces["expected"]] == pytest.approx([-1.0] * 3)
    assert traces["per_prompt"][-1]["lagrange/lambda"] > 1.0 > traces["expected"][-1]["lagrange/lambda"]
    assert "train/violation" not in traces["expected"][0]


def test_per_prompt_with_two_constraints_reports_each_violation(tiny_llama_dir, tmp_path):
    a = RecordingCost(lambda p, r: 1.0 if p == PROMPTS[0] else -3.0)  # half the answers violate d = 0
    b = RecordingCost(lambda p, r: -1.0)  # none violates
    cfg = config(tiny_llama_dir, [("a", 0.0), ("b", 0.0)], constraint="per_prompt", steps=2)
    events, _ = run(cfg, tmp_path, {"a": a, "b": b})
    assert [e["train/violation/a"] for e in events] == [0.5, 0.5]
    assert [e["train/violation/b"] for e in events] == [0.0, 0.0]
    assert [e["lagrange/lambda/b"] for e in events] == [1.0, 1.0]  # no violation: λ_b stays
    assert events[-1]["lagrange/lambda/a"] > events[0]["lagrange/lambda/a"] > 1.0


def _policy(result):
    from safetensors.torch import load_file

    weights = load_file(f"{result.artifacts[0].path}/model.safetensors")
    return [weights[k].float() for k in sorted(weights)]


@pytest.mark.parametrize("constraint", ["expected", "per_prompt"])
def test_reward_only_ppo_scores_every_cost_model_for_telemetry(tiny_llama_dir, tmp_path, constraint):
    from models.ppo_lag import run_ppo

    a, b = RecordingCost(words), RecordingCost(lambda p, r: -1.0)
    cfg = config(tiny_llama_dir, [("a", 0.0), ("b", 0.0)], constraint=constraint, steps=2)
    events = []
    records = [{"prompt": p} for p in PROMPTS]
    result = run_ppo(cfg, JobContext(output_dir=tmp_path, datasets=["d"], load_dataset=lambda d: records,
                                     report=events.append), reward_fn=synthetic_reward, cost_fn={"a": a, "b": b})
    events = steps(events)
    assert len(a.steps) == len(b.steps) == 2
    for e, scores in zip(events, a.steps):
        assert e["train/cost/a"] == pytest.approx(sum(scores) / len(scores)) and e["train/cost/b"] == -1.0
        assert e["lagrange/lambda"] == 0.0 and not any(k.startswith("lagrange/lambda/") for k in e)
        assert "train/reward_critic_loss" in e and not any(k.startswith("train/cost_") for k in e)
    assert ("train/violation/b" in events[0]) == (constraint == "per_prompt")
    assert result.metrics["lambda_final"] == 0.0 and "episode_cost_final/a" in result.metrics
