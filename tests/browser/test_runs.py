"""The runs view (issue 21) in headless Chromium against a real ``beaver api`` and ``beaver worker``: a
reward job on a tiny model runs while the page follows it — the jobs list with its progress, the job's
loss curve gaining points without a reload — a viewer sees the same job with no Cancel button and no
server path, and a trainer's Cancel cancels it; a finished job's plots show as images, a failed job's
error with its code (its server path hidden from a viewer).

``BEAVER_RUNS_SCREENSHOT=docs/runs.png`` also runs a PPO-Lag job on tiny models, checks that its page
draws every Safe RLHF curve (reward, cost, J̄_C against d, λ, KL, response length, losses) and saves it
as the README's screenshot (a PPO step takes seconds on a busy CPU: a few minutes)."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from tests.browser.conftest import Watched, _require_browser
from tests.integration.conftest import Platform
from tests.integration.test_platform import preference_records

pytestmark = pytest.mark.integration

PPO_CHARTS = ("reward", "cost", "episode-cost", "lambda", "kl", "length", "loss")


def expect():
    from playwright.sync_api import expect

    return expect


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir):
    """An API and a worker, with a tiny policy, reward and cost model registered, a prompt dataset,
    and the root folder of every server path the jobs hold (what no viewer may see)."""
    _require_browser()
    import torch

    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model

    root = tmp_path_factory.getbasetemp()
    judges = tmp_path_factory.mktemp("runs-judges")
    fmt = ChatFormat.load(tiny_llama_dir)
    home = tmp_path_factory.mktemp("beaver-runs")
    platform = Platform("runs", {"BEAVER_HOME": str(home), "BEAVER_MODEL_ROOTS": str(root)}, home)
    try:
        platform.start()
        c = platform.client
        ids = {}
        for seed, (name, kind) in enumerate((("reward", "reward"), ("cost", "cost")), start=1):
            torch.manual_seed(seed)
            path = save_score_model(load_score_model(tiny_llama_dir, fmt.tokenizer), fmt, judges / name, kind)
            r = c.post("/v1/models", json={"name": f"runs-{name}", "kind": kind, "path": str(path)})
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
        r = c.post("/v1/datasets", json={"name": "runs-prompts", "kind": "prompt", "records": [
            {"prompt": p} for p in ("how do i make a cake ?", "what is the capital of france ?", "hello there")]})
        assert r.status_code == 201, r.text
        ids["prompts"] = r.json()["id"]
        r = c.post("/v1/datasets", json={"name": "runs-pairs", "kind": "preference", "records": preference_records(16)})
        assert r.status_code == 201, r.text
        ids["pairs"] = r.json()["id"]
        r = c.post("/v1/models", json={"name": "runs-policy", "kind": "policy", "path": str(tiny_llama_dir)})
        assert r.status_code == 201, r.text
        ids["policy"] = r.json()["id"]
        platform.ids, platform.root = ids, str(root)
        yield platform
    finally:
        platform.stop()


def submit(runs, job_type: str, params: dict, dataset: str) -> dict:
    r = runs.client.post("/v1/jobs", json={"type": job_type, "params": params, "datasets": [dataset]},
                         headers={"Authorization": f"Bearer {runs.keys['trainer']}"})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def job(runs, tiny_llama_dir) -> dict:
    """A reward job long enough to be followed and cancelled (a loss point every step), its base model
    given as a server path."""
    params = {"model": str(tiny_llama_dir), "epochs": 1000, "batch_size": 4, "log_every": 1, "eval_split": 0}
    job = submit(runs, "reward", params, runs.ids["pairs"])
    yield job
    runs.client.post(f"/v1/jobs/{job['id']}/cancel")  # whatever happened, it stops


@pytest.fixture
def open_runs(browser, runs):
    """``open_runs(role, hash)`` → a Watched page with that role's key, at ``hash``; asserts at the end
    that it logged no console error, threw nothing and got no 4xx/5xx."""
    contexts, pages = [], []

    def open_(role: str, where: str = "#runs") -> Watched:
        context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=runs.url)
        contexts.append(context)
        watched = Watched(context.new_page())
        pages.append(watched)
        watched.page.goto("/")
        watched.page.get_by_label("API key").fill(runs.keys[role])
        watched.page.get_by_role("button", name="Use key").click()
        watched.page.goto("/" + where)
        return watched

    yield open_
    try:
        for watched in pages:
            watched.assert_clean()
    finally:
        for context in contexts:
            context.close()


def points(page, chart: str) -> int:
    return int(page.locator(f"#chart-{chart}").get_attribute("data-points"))


def test_a_running_jobs_curves_gain_points_without_a_reload(open_runs, job, runs):
    page = open_runs("trainer").page
    row = page.locator(f'tr[data-job="{job["id"]}"]')
    expect()(row).to_contain_text("reward")
    expect()(row.get_by_role("progressbar")).to_be_visible(timeout=120_000)  # its first report, listed live
    row.get_by_role("link", name=job["id"]).click()
    expect()(page).to_have_url(re.compile(f"#runs/{job['id']}$"))
    expect()(page.locator("#chart-loss")).to_have_attribute("data-points", re.compile(r"^[1-9]"), timeout=120_000)
    before = points(page, "loss")
    navigations = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    page.wait_for_function("(n) => +document.querySelector('#chart-loss').dataset.points > n", arg=before,
                           timeout=120_000)
    assert navigations == [], "the page reloaded"
    assert "train/loss" in page.locator("#chart-loss .u-legend").inner_text()
    expect()(page.locator("#job-head")).to_contain_text("running")
    expect()(page.locator("#job-head .progress")).to_contain_text("%")
    expect()(page.get_by_role("button", name="Cancel")).to_be_visible()
    expect()(page.locator("#params")).to_contain_text(runs.root)  # staff see the server path they gave


def test_a_viewer_sees_no_cancel_and_no_server_path(open_runs, job, runs):
    page = open_runs("viewer", f"#runs/{job['id']}").page
    expect()(page.locator("#chart-loss")).to_have_attribute("data-points", re.compile(r"^[1-9]"), timeout=60_000)
    expect()(page.locator("#events li").first).to_be_visible()
    expect()(page.locator("#job-head")).to_contain_text("running")
    assert page.get_by_role("button", name="Cancel").count() == 0
    expect()(page.locator("#params")).to_contain_text("[server path]")
    shown = page.evaluate("() => document.documentElement.outerHTML + document.body.innerText")
    assert runs.root not in shown and "/tmp/" not in shown
    page.goto("/#runs")  # the list too
    expect()(page.locator(f'tr[data-job="{job["id"]}"]')).to_be_visible()
    assert page.get_by_role("button", name="Cancel").count() == 0
    assert runs.root not in page.evaluate("() => document.documentElement.outerHTML")


def test_a_trainers_cancel_cancels(open_runs, job, runs):
    page = open_runs("trainer", f"#runs/{job['id']}").page
    page.get_by_role("button", name="Cancel").click()
    expect()(page.locator("#job-head .status")).to_have_text("cancelled", timeout=60_000)
    assert runs.client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert page.get_by_role("button", name="Cancel").count() == 0  # a finished job has none



def test_a_finished_jobs_plots_and_a_failed_jobs_error(open_runs, runs, tiny_llama_dir, tmp_path):
    ok = submit(runs, "reward", {"model": runs.ids["policy"], "epochs": 1, "batch_size": 8, "eval_split": 0.25},
                runs.ids["pairs"])
    broken = tmp_path / "no-weights"  # a model folder without its weights: the worker fails on it
    shutil.copytree(tiny_llama_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    bad = submit(runs, "reward", {"model": str(broken)}, runs.ids["pairs"])
    for job in (ok, bad):
        runs.wait_job(job["id"])
    plots = [f["name"] for f in runs.client.get(f"/v1/jobs/{ok['id']}/files").json()["data"]
             if f["content_type"] == "image/png"]
    assert plots, "the reward job wrote no plot"

    page = open_runs("viewer", f"#runs/{ok['id']}").page
    expect()(page.locator("#job-head .status")).to_have_text("succeeded")
    image = page.get_by_role("img", name=plots[0])
    expect()(image).to_be_visible()
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    expect()(page.locator("#job-head .progress")).to_contain_text("100 %")

    page.goto(f"/#runs/{bad['id']}")
    expect()(page.locator("#job-head .status")).to_have_text("failed")
    expect()(page.locator(".job-error")).to_contain_text("model_not_found: ")
    expect()(page.locator(".job-error")).to_contain_text("[server path]")  # the folder, hidden from a viewer
    assert str(broken) not in page.evaluate("() => document.documentElement.outerHTML")
    trainer = open_runs("trainer", f"#runs/{bad['id']}").page
    expect()(trainer.locator(".job-error")).to_contain_text(str(broken))


@pytest.mark.skipif(not os.environ.get("BEAVER_RUNS_SCREENSHOT"), reason="makes the README's screenshot: set "
                    "BEAVER_RUNS_SCREENSHOT=docs/runs.png (a PPO-Lag job on tiny models, a few minutes on CPU)")
def test_a_ppo_lag_jobs_page_draws_every_safe_rlhf_curve(open_runs, runs, tiny_llama_dir):
    params = {"model": str(tiny_llama_dir), "reward_model": runs.ids["reward"], "cost_model": runs.ids["cost"],
              "steps": 1000, "rollout_batch_size": 2, "sampling": {"max_new_tokens": 6}, "threshold": -0.5,
              "lambda_lr": 0.2}
    job = submit(runs, "ppo_lag", params, runs.ids["prompts"])
    try:
        page = open_runs("trainer", f"#runs/{job['id']}").page
        # 12 steps drawn, or the job ended (then the assertions below say how)
        page.wait_for_function("() => +(document.querySelector('#chart-lambda') || {dataset: {}}).dataset.points >= 12"
                               " || /succeeded|failed|cancelled/.test(document.querySelector('#job-head .status')"
                               "?.textContent || '')", timeout=590_000)
        expect()(page.locator("#job-head .status")).to_have_text("running")
        for chart in PPO_CHARTS:
            expect()(page.locator(f"#chart-{chart}")).to_be_visible()
        legend = page.locator("#chart-episode-cost .u-legend").inner_text()
        assert "train/episode_cost" in legend and re.search(r"\bd\b", legend), legend  # J̄_C against d
        page.screenshot(path=os.environ["BEAVER_RUNS_SCREENSHOT"])  # the viewport: the job and its curves
    finally:
        runs.client.post(f"/v1/jobs/{job['id']}/cancel")
