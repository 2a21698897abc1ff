"""The arena page in a real browser: Debian's Chromium, headless, driven by Playwright, against a real
``beaver api`` subprocess (embedded backend) serving three rounds of tiny Llama policies.

Chromium comes from the system (``make test`` installs Debian's ``chromium`` package when
``/usr/bin/chromium`` is missing); Playwright never downloads a browser here. Without Chromium or the
``playwright`` package the tests are skipped with the reason, and fail under CI=true.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.integration.conftest import Platform

CHROMIUM = os.environ.get("BEAVER_CHROMIUM", "/usr/bin/chromium")
ROUNDS = ("beaver-v1", "beaver-v2", "beaver-v3")
MIN_VOTES = 2


def _require_browser() -> None:
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the playwright package is missing (pip install -e '.[dev]')"
    if problem is None and not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        problem = f"Chromium is missing at {CHROMIUM} (make test installs it: apt-get install chromium)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem + " (CI=true: the browser tests must run)")
        pytest.skip(problem)


class ArenaPlatform(Platform):
    """``beaver api`` alone: chat, votes and the leaderboard need no worker."""

    def start_worker(self) -> None:
        self.worker_proc = None


@pytest.fixture(scope="package")
def arena(tmp_path_factory):
    """A running API with rounds beaver-v1..v3 (different policies, shared reward and cost models)
    and an annotator key for the page."""
    _require_browser()
    import torch

    from models.chat_format import ChatFormat
    from models.loading import load_score_model
    from models.score_model import save_score_model
    from models.tiny import build_tiny_llama
    from tests.conftest import TINY_CORPUS

    root = tmp_path_factory.mktemp("arena-models")
    # A context of 1024 so that two turns of STREAMED_TOKENS fit (the default is 512).
    policies = [build_tiny_llama(root / f"policy-{i}", TINY_CORPUS, seed=seed, max_position_embeddings=1024)
                for i, seed in enumerate((11, 12, 13), start=1)]
    fmt = ChatFormat.load(policies[0])
    judges = {}
    for seed, kind in ((1, "reward"), (2, "cost")):
        torch.manual_seed(seed)
        judges[kind] = save_score_model(load_score_model(policies[0], fmt.tokenizer), fmt, root / kind, kind)

    home = tmp_path_factory.mktemp("beaver-arena")
    # A round is ranked from 2 blind votes: the tests see rounds listed as "not enough votes yet", then ranked.
    platform = ArenaPlatform("arena", {"BEAVER_HOME": str(home), "BEAVER_MODEL_ROOTS": str(root),
                                       "BEAVER_LEADERBOARD_MIN_VOTES": str(MIN_VOTES)}, home)
    try:
        platform.start()
        platform.keys["annotator"] = platform.cli("keys", "create", "--name", "test-annotator",
                                                  "--role", "annotator").split()[-1]
        c = platform.client
        ids = {}
        for kind, path in judges.items():
            r = c.post("/v1/models", json={"name": f"arena-{kind}", "kind": kind, "path": str(path)})
            assert r.status_code == 201, r.text
            ids[kind] = r.json()["id"]
        for name, path in zip(ROUNDS, policies):
            r = c.post("/v1/models", json={"name": f"{name}-policy", "kind": "policy", "path": str(path)})
            assert r.status_code == 201, r.text
            r = c.post("/v1/rounds", json={"name": name, "policy": r.json()["id"], "reward_model": ids["reward"],
                                           "cost_model": ids["cost"]})
            assert r.status_code == 201, r.text
        yield platform
    finally:
        platform.stop()


@pytest.fixture(scope="package")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Watched:
    """A page whose console errors, uncaught exceptions and failed responses are collected."""

    def __init__(self, page):
        self.page = page
        self.errors: list[str] = []
        self.failed: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.method} {r.url}: {r.failure}")
                if "ERR_ABORTED" not in (r.failure or "") else None)  # a Stop aborts its stream on purpose
        page.on("response", lambda r: self.failed.append(f"{r.status} {r.request.method} {r.url}")
                if r.status >= 400 else None)

    def assert_clean(self) -> None:
        assert not self.errors, self.errors
        assert not self.failed, self.failed


@pytest.fixture
def open_page(browser, arena):
    """``open_page(width, height)`` → a Watched page on the arena; asserts at the end that it logged
    no console error, threw nothing and got no 4xx/5xx."""
    contexts, pages = [], []

    def open_(width: int = 1280, height: int = 800) -> Watched:
        context = browser.new_context(viewport={"width": width, "height": height}, base_url=arena.url)
        contexts.append(context)
        watched = Watched(context.new_page())
        pages.append(watched)
        watched.page.goto("/")
        return watched

    yield open_
    try:
        for watched in pages:
            watched.assert_clean()
    finally:
        for context in contexts:
            context.close()

