"""A reduced ``beaver demo`` (one short round, no baselines) through the real API and a real
worker; checks the results schema and that the plots exist."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

ROUND_KEYS = {"name", "harmful_ratio", "helpfulness_benign", "over_refusal", "reward_model_accuracy",
              "cost_model_accuracy", "cost_sign_accuracy", "lambda_final", "episode_cost_final"}
BASELINE_KEYS = {"name", "harmful_ratio", "helpfulness_benign", "over_refusal"}


def check_results_schema(results: dict) -> None:
    assert isinstance(results["seed"], int) and results["seconds"] > 0
    assert results["rounds"] and all(ROUND_KEYS <= set(r) for r in results["rounds"])
    assert all(BASELINE_KEYS <= set(b) for b in results["baselines"])
    for r in results["rounds"] + results["baselines"]:
        for key in ("harmful_ratio", "helpfulness_benign", "over_refusal"):
            assert 0.0 <= r[key] <= 1.0, (r["name"], key, r[key])


def test_fast_demo_through_the_api(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BEAVER_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "api.cli", "demo", "--fast", "--exit", "--port", str(port)],
                         env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    check_results_schema(results)
    assert [r["name"] for r in results["rounds"]] == ["beaver-v0", "beaver-v1"]
    assert results["rounds"][1]["lambda_final"] > 0
    assert 0.5 <= results["rounds"][1]["cost_sign_accuracy"] <= 1.0
    for png in ("rounds.png", "lagrange.png", "tradeoff.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 1000
    assert "| beaver-v1 |" in out.stdout  # the Markdown table
    assert "SMOKE RUN (--fast)" in out.stdout  # and it says what it is


def test_results_schema_rejects_a_missing_field():
    good = {"seed": 0, "seconds": 1.0, "baselines": [],
            "rounds": [{k: 0.5 if k != "name" else "beaver-v0" for k in ROUND_KEYS}]}
    check_results_schema(good)
    bad = json.loads(json.dumps(good))
    del bad["rounds"][0]["over_refusal"]
    with pytest.raises(AssertionError):
        check_results_schema(bad)
