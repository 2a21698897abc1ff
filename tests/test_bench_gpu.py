"""bench/gpu.py: the GPU benchmark runs end to end (tiny, on CPU), and what it measures is right.

The GPU machine gets one short try at it, so every code path that can run here runs here: the
smoke run goes through the driver, one child process per variant, the PPO-Lag iteration, Beaver's
sampler in each decoding and Beaver's PPO-Lag job (issue 19; compiled with aot_eager here); the
unit checks pin the model the timings are about (the pure-torch decoder computes what
transformers' Llama computes; packed rows give each sequence its padded score; the KV cache gives
the full forward's hidden states).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    """bench/gpu.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_gpu", None)


def run_smoke(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = args[args.index("--name") + 1] if "--name" in args else "gpu"
    return proc, json.loads((tmp_path / f"{name}.json").read_text())


def test_smoke_run_measures_every_variant_and_the_ppo_split(tmp_path, gpu):
    # --impl torch: the GPU machine has no transformers, so this is the model it will time
    proc, report = run_smoke(tmp_path, "--impl", "torch")
    for v in gpu.VARIANTS:
        r = report["variants"][v.name]
        assert "error" not in r, (v.name, r)
        assert r.get("tokens_per_second", 0) > 0 or r.get("skipped"), (v.name, r)
    for name in ("plain", "compile", "packing", "compile+packing"):  # nothing here needs a GPU
        assert report["variants"][name]["tokens_per_second"] > 0
    # packed rows: fewer rows, the same real tokens, and the same scores as padded ones
    plain, packing = report["variants"]["plain"], report["variants"]["packing"]
    assert packing["rows"] < plain["rows"] and packing["real_tokens"] == plain["real_tokens"]
    assert packing["score_check_max_abs_diff"] < 0.05 * max(packing["score_check_scale"], 1.0)
    ppo = report["ppo_lag"]
    assert all(ppo[f"{phase}_seconds"] > 0 for phase in ("rollout", "scoring", "update")), ppo
    assert (tmp_path / "gpu.md").exists()
    last = proc.stdout.strip().splitlines()[-1]
    assert "x plain" in last and last.startswith("best ("), last
    # issue 19: Beaver's sampler in each decoding, all of them through to the end, and on CPU
    # (float32) each decoding's rows are the dynamic loop's, token for token
    for name, decoding in gpu.ROLLOUTS.items():
        r = report["rollouts"][name]
        assert r["decoding_used"] == decoding and not r["partial"] and r["tokens_per_second"] > 0, r
        assert r["tokens"] == r["prompts"] * r["new_tokens"]
        if decoding != "dynamic":
            assert r["agreement"]["identical_rows"] == r["agreement"]["rows"] == 4, r["agreement"]
    for name in gpu.PPO_STEPS:  # Beaver's PPO-Lag job, two steps, each split three ways
        r = report["ppo_steps"][name]
        assert len(r["steps"]) == 2 and not r["partial"], r
        assert all(step[phase] > 0 for step in r["steps"] for phase in ("rollout", "scoring", "update")), r
        assert r["steps"][-1]["sampler_logprob_gap"] < 1e-4  # the rollouts are the trainer's log π_old
    md = (tmp_path / "gpu.md").read_text()
    assert "dynamic (today's loop) tokens/s" in md and "faster steps" in md


def test_the_rollouts_alone_interleaved_end_on_their_ratio(tmp_path, gpu):
    """What the CPU measurement runs: the decodings in one child, taking turns, the fastest call each."""
    proc, report = run_smoke(tmp_path, "--variants", "rollout", "--rollout-interleave", "--rollout-repeats", "2",
                             "--name", "rollouts")
    assert not report["variants"] and set(report["rollouts"]) == set(gpu.ROLLOUTS)
    for r in report["rollouts"].values():
        assert r["interleaved"] and r["repeats"] == 2 and r["seconds"] == min(r["seconds_each"]), r
        assert r["decoding_used"] == r["decoding"] and not r["partial"]
    assert report["rollouts"]["rollout_compiled"]["agreement"]["identical_rows"] == 4
    assert (tmp_path / "rollouts.md").exists() and not (tmp_path / "gpu.json").exists()
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("rollout (") and "compiled" in last and "x dynamic (today's loop) tokens/s" in last, last


def test_agreement_counts_rows_and_the_log_prob_gap_while_they_agree(gpu):
    ref = {"check_tokens": [[1, 2, 3], [4, 5, 6]], "check_log_probs": [[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]}
    same = {"check_tokens": [[1, 2, 3], [4, 5, 6]], "check_log_probs": [[-1.0, -2.001, -3.0], [-1.0, -1.0, -1.0]]}
    forked = {"check_tokens": [[1, 2, 3], [4, 7, 6]], "check_log_probs": [[-1.0, -2.0, -3.0], [-1.5, -9.0, -9.0]]}
    a = gpu.agreement(same, ref)
    assert a["identical_rows"] == 2 and a["mean_common_prefix"] == 3 and a["max_log_prob_gap"] == pytest.approx(1e-3)
    b = gpu.agreement(forked, ref)  # row 2 forks at its second token: only its first counts
    assert b["identical_rows"] == 1 and b["mean_common_prefix"] == 2 and b["max_log_prob_gap"] == pytest.approx(0.5)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_smoke_run_with_transformers_llama(tmp_path, gpu):
    proc, report = run_smoke(tmp_path, "--impl", "hf", "--variants", "plain,compile+packing")
    for name in ("plain", "compile+packing"):
        r = report["variants"][name]
        assert r["impl"] == "hf" and r["tokens_per_second"] > 0, r
    r = report["variants"]["compile+packing"]
    assert r["score_check_max_abs_diff"] < 0.05 * max(r["score_check_scale"], 1.0), r
    assert "x plain" in proc.stdout.strip().splitlines()[-1]


def tiny_batches(gpu, shape):
    cfg = gpu.RewardBench(shape=shape, batch=6, seq_len=32, min_length=4, batches=1)
    seqs = gpu.synthetic_batches(cfg)[0]
    rows = len(gpu.pack_rows([len(s) for s in seqs], cfg.seq_len))
    return gpu.padded_batch(seqs, cfg.seq_len, "cpu"), gpu.packed_batch(seqs, cfg.seq_len, rows, "mask", "cpu")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_torch_decoder_computes_what_transformers_llama_computes(gpu):
    shape = gpu.ModelShape(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96)
    torch.manual_seed(0)
    hf = gpu.hf_score_model(shape, "sdpa", liger=False).eval()
    ours = gpu.ScoreModel(shape).eval()
    ours.load_state_dict(hf.state_dict())  # the same parameter names: strict load
    padded, packed = tiny_batches(gpu, shape)
    with torch.no_grad():
        for batch in (padded, packed):
            expected = gpu.RewardObjective(gpu.HFBackbone(hf.model), hf.score).scores(*batch.args())
            got = gpu.RewardObjective(ours.model, ours.score).scores(*batch.args())
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_packed_rows_give_each_sequence_its_padded_score(gpu):
    shape = gpu.ModelShape(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96)
    torch.manual_seed(0)
    net = gpu.ScoreModel(shape).eval()
    model = gpu.RewardObjective(net.model, net.score)
    padded, packed = tiny_batches(gpu, shape)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    assert packed.real_tokens == padded.real_tokens and packed.sum_sq_len == padded.sum_sq_len
    with torch.no_grad():
        torch.testing.assert_close(model.scores(*packed.args()), model.scores(*padded.args()), rtol=1e-4, atol=1e-5)
    # the probe that picks the packed kernel on the GPU catches one that lets sequences see each other
    assert gpu.probe_packed("mask", torch.device("cpu")) is None
    assert "differs" in gpu.probe_packed("causal", torch.device("cpu"))


def test_kv_cache_sampling_sees_what_a_full_forward_sees(gpu):
    shape = gpu.ModelShape(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96)
    torch.manual_seed(0)
    lm = gpu.CausalLM(shape).eval()
    prompts = torch.randint(3, shape.vocab, (3, 5))
    new = gpu.sample(lm, prompts, 4, torch.Generator().manual_seed(0))
    assert new.shape == (3, 4)
    seq = torch.cat([prompts, new], dim=1)
    with torch.no_grad():
        full = lm.model(seq)
        cache = gpu.KVCache(3, seq.shape[1])
        steps = [lm.model(prompts, attn=gpu.Attn("causal"), cache=cache)]
        for t in range(prompts.shape[1], seq.shape[1]):
            steps.append(lm.model(seq[:, t:t + 1], attn=gpu.Attn("decode"), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


# The GPU-only kernels cannot run here. Stand-ins with the same calling conventions, computed in
# plain torch, check this script's side of the wiring: layouts, cu_seqlens, GQA, RoPE's shapes.


def varlen_reference(q, k, v, cu, cu_k, max_q, max_k, **kwargs):
    """Causal attention per [cu[i], cu[i+1]) segment of one (N, H, D) stream."""
    if "window_size" in kwargs:  # torch's varlen_attn: causal as a window, no GQA of its own
        assert tuple(kwargs["window_size"]) == (-1, 0) and k.shape[1] == q.shape[1]
    else:  # flash-attn: causal=True, GQA inside
        assert kwargs == {"causal": True}
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    assert cu.dtype == torch.int32 and int(cu[-1]) == q.shape[0] and max_q == max_k >= int((cu[1:] - cu[:-1]).max())
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]  # (H, n, D)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(*seg, is_causal=True).transpose(0, 1)
    return out


@pytest.mark.parametrize("kind", ["flash", "varlen"])
def test_varlen_wiring_matches_the_masked_reference(gpu, monkeypatch, kind):
    kernel = varlen_reference if kind == "flash" else (varlen_reference, {"window_size": (-1, 0)})
    monkeypatch.setitem(gpu.KERNELS, kind, kernel)
    assert gpu.probe_packed(kind, torch.device("cpu")) is None


def test_liger_wiring_computes_what_the_plain_modules_compute(gpu, monkeypatch):
    def rope(q, k, cos, sin):  # Liger's contract: q, k (B, H, T, D); cos, sin (1 or B, T, D)
        assert q.shape[2] == cos.shape[1] and cos.dim() == 3
        cos, sin = cos[:, None], sin[:, None]
        return (q * cos + gpu._rotate_half(q) * sin), (k * cos + gpu._rotate_half(k) * sin)

    def norm(hidden_size, eps):
        return gpu.RMSNorm(hidden_size, eps)

    monkeypatch.setitem(gpu.KERNELS, "liger", {"rms_norm": norm, "rope": rope,
                                               "silu_mul": lambda a, b: torch.nn.functional.silu(a) * b})
    shape = gpu.ModelShape(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96)
    torch.manual_seed(0)
    plain, liger = gpu.ScoreModel(shape).eval(), gpu.ScoreModel(shape, liger=True).eval()
    liger.load_state_dict(plain.state_dict())
    for batch in tiny_batches(gpu, shape):  # padded: cos (1, T, D); packed: (B, T, D)
        with torch.no_grad():
            torch.testing.assert_close(gpu.RewardObjective(liger.model, liger.score).scores(*batch.args()),
                                       gpu.RewardObjective(plain.model, plain.score).scores(*batch.args()))
