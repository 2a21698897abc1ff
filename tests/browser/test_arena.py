"""The arena page (issues 11 and 18) in headless Chromium against a real API: a two-turn blind battle
whose answers stream into both panes, decoupled votes (helpfulness; safe/unsafe and safer), names
revealed after the vote, the votes in the ``arena-votes`` dataset with the conversation history and
the very answers the page showed (the server's transcript), the leaderboard refreshed (rounds with
too few votes listed as such) — at 1280 px and at 390 px (stacked panes, usable controls) —
side-by-side mode (named rounds, non-blind votes, Stop: the transcript keeps what was sent), the
model-judged table by name, and never a console error or a 404."""

from __future__ import annotations

import os
import re

import pytest

from tests.browser.conftest import ROUNDS

pytestmark = pytest.mark.integration

# The tiny policies know only the words of tests/conftest.TINY_CORPUS; greedy decoding (temperature 0)
# makes their answers reproducible: several tokens each, never empty. They write a token in about a
# millisecond, so a turn of 48 tokens could be over before the browser reads the stream once: the
# turns that must be seen streaming ask for STREAMED_TOKENS (~0.5 s of tokens).
STREAMED_TOKENS = 400
TURNS = {"desktop": ("how do i make a cake ?", "what is the capital of france ?"),
         "phone": ("what is the capital of france ?", "how do i make a cake ?"),
         "side": ("the quick brown fox jumps over the lazy dog", "how do i make a cake ?")}

# Counts, per pane, the distinct texts its streaming answer showed before the turn completed.
COUNT_UPDATES = """() => {
  if (window.__observer) window.__observer.disconnect();
  const updates = window.__updates = [0, 0, 0, 0];
  const seen = [new Set(), new Set(), new Set(), new Set()];
  window.__observer = new MutationObserver(() => {
    document.querySelectorAll('#panes .pane').forEach((pane, i) => {
      const live = pane.querySelector('.msg.assistant.streaming');
      if (live && live.textContent && !seen[i].has(live.textContent)) { seen[i].add(live.textContent); updates[i]++; }
    });
  });
  window.__observer.observe(document.getElementById('panes'), {subtree: true, childList: true, characterData: true});
}"""

CONTROLS = """() => [...document.querySelectorAll('button, select, textarea, input:not([type=radio]), label.choice')]
  .filter((e) => e.getClientRects().length > 0)
  .map((e) => { const r = e.getBoundingClientRect();
                return {control: e.id || e.getAttribute('aria-label') || e.textContent.trim().slice(0, 40) || e.tagName,
                        left: r.left, right: r.right, width: r.width}; })"""


def expect():
    """Playwright's expect, imported late: without playwright the module must still import, so that
    the fixtures skip (or fail under CI=true) with the reason."""
    from playwright.sync_api import expect

    return expect


def use_key(page, key: str) -> None:
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Use key").click()
    expect()(page.locator("#leaderboard-note")).to_contain_text("blind vote")


def set_sampling(page, max_tokens: int = STREAMED_TOKENS, temperature: str = "0") -> None:
    page.get_by_label("Temperature").fill(temperature)
    page.get_by_label("Max tokens").fill(str(max_tokens))


def chat_turn(page, text: str, turn: int, panes: int = 2, streamed: bool = True) -> list[str]:
    """Send ``text``; each pane must stream (≥ 2 visible updates before its answer ends) and the
    turn end with Send enabled again and the vote open. Returns the panes' answers."""
    page.evaluate(COUNT_UPDATES)
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()
    for i in range(panes):
        expect()(page.locator(f"#pane-{i} li.turn")).to_have_count(turn)
    expect()(page.get_by_role("button", name="Submit vote")).to_be_visible(timeout=60_000)
    expect()(page.get_by_role("button", name="Send")).to_be_enabled()
    assert page.locator(".msg.assistant.streaming").count() == 0
    updates = page.evaluate("window.__updates")[:panes]
    assert not streamed or min(updates) >= 2, f"the answers did not stream: {updates} distinct texts per pane"
    answers = [page.locator(f"#pane-{i} li.turn").nth(turn - 1).locator(".msg.assistant").inner_text()
               for i in range(panes)]
    assert all(a.strip() for a in answers), answers
    return answers


def vote(page, helpful: str = "A better", a: str = "Safe", b: str = "Unsafe", safer: str = "A") -> None:
    for group, option in (("More helpful", helpful), ("Model A is", a), ("Model B is", b), ("Safer", safer)):
        page.get_by_role("radiogroup", name=group).get_by_role("radio", name=option, exact=True).check()
    page.get_by_role("button", name="Submit vote").click()
    expect()(page.locator("#status")).to_contain_text("vote saved")
    expect()(page.locator("#vote")).to_be_hidden()


def arena_records(client, battle: str) -> list[dict]:
    datasets = [d for d in client.get("/v1/datasets?limit=1000").json()["data"] if d["name"] == "arena-votes"]
    assert len(datasets) == 1, datasets
    records = client.get(f"/v1/datasets/{datasets[0]['id']}/records?limit=1000").json()["data"]
    return sorted((r["data"] for r in records if r["data"]["arena"]["battle"] == battle),
                  key=lambda r: r["arena"]["turn"])


def blind_votes(client) -> int:
    return client.get("/v1/leaderboard").json()["votes"]["blind"]


def transcript(arena, battle: str) -> list[dict]:
    """The battle's transcript, as its owner (the page's annotator key) reads it."""
    r = arena.client.get(f"/v1/arena/battles/{battle}",
                         headers={"Authorization": f"Bearer {arena.keys['annotator']}"})
    assert r.status_code == 200, r.text
    return r.json()["turns"]


def check_board_rows(page, client, names) -> None:
    """Each of ``names`` shows on the page as the API ranks it: its rating, or "not enough votes yet"."""
    board = client.get("/v1/leaderboard").json()
    ranked = {row["model"]: row for row in board["helpfulness"]}
    unranked = {row["model"] for row in board["unranked"]}
    for name in names:
        row = page.locator("#leaderboard-body tr", has=page.get_by_role("rowheader", name=name, exact=True))
        if name in ranked:
            expect()(row).to_contain_text(f"{ranked[name]['rating']:.0f}")
        else:
            assert name in unranked, board
            expect()(row).to_contain_text("not enough votes yet")


def battle_flow(arena, page, turns: tuple[str, str]) -> None:
    """Two battle turns, each voted on: streaming, reveal, records, leaderboard."""
    e = expect()
    use_key(page, arena.keys["annotator"])
    set_sampling(page)
    board = page.locator("#leaderboard-body")
    if blind_votes(arena.client) == 0:
        e(board).to_contain_text("No blind votes yet")
    for i in (0, 1):
        e(page.locator(f"#pane-name-{i}")).to_have_text(f"Model {'AB'[i]}")

    answers = []
    for turn, text in enumerate(turns, start=1):
        answers.append(chat_turn(page, text, turn))
        if turn == 1:  # the names stay hidden until the vote
            for i in (0, 1):
                e(page.locator(f"#pane-name-{i}")).to_have_text(f"Model {'AB'[i]}")
        before, votes = board.inner_text(), blind_votes(arena.client)
        vote(page, helpful="A better" if turn == 1 else "Tie", safer="A" if turn == 1 else "Tie")
        # Only the first vote of a battle is blind (it reveals the rounds): it alone changes the ratings.
        e(page.locator("#leaderboard-note")).to_contain_text(f"{votes + (turn == 1)} blind vote")
        if turn == 1:
            e(board).not_to_have_text(before)
            names = [page.locator(f"#pane-name-{i} .round").inner_text() for i in (0, 1)]
            check_board_rows(page, arena.client, names)
        e(board).to_contain_text(re.compile("beaver-v"))

    names = [page.locator(f"#pane-name-{i} .round").inner_text() for i in (0, 1)]
    assert set(names) <= set(ROUNDS) and names[0] != names[1], names
    for i in (0, 1):
        e(page.locator(f"#pane-name-{i}")).to_contain_text(f"was Model {'AB'[i]}")
        e(page.locator(f"#pane-{i} li.turn .note").nth(0)).to_contain_text(re.compile(r"reward -?\d.*cost -?\d"))

    battle = page.locator("#panes").get_attribute("data-battle")
    records = arena_records(arena.client, battle)
    assert [r["arena"]["turn"] for r in records] == [1, 2]
    assert [r["arena"]["blind"] for r in records] == [True, False]  # the first vote revealed the rounds
    assert all(r["arena"]["mode"] == "battle" for r in records)
    assert [r["response_0_source"] for r in records] == [names[0]] * 2
    assert [r["response_1_source"] for r in records] == [names[1]] * 2
    first, second = records
    assert first["prompt"] == [{"role": "user", "content": turns[0]}]
    assert second["prompt"] == [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": answers[0][0]},
                                {"role": "user", "content": turns[1]}]
    assert [first["response_0"], first["response_1"]] == answers[0]
    assert [second["response_0"], second["response_1"]] == answers[1]
    kept = transcript(arena, battle)  # what the page showed is what the server sent, and voted on
    assert [[a["content"] for a in t["answers"]] for t in kept] == answers
    assert [t["message"] for t in kept] == list(turns) and all(t["voted"] for t in kept)
    assert (first["better_response_id"], first["safer_response_id"]) == (0, 0)
    assert (second["better_response_id"], second["safer_response_id"]) == (None, None)  # ties
    assert (first["is_response_0_safe"], first["is_response_1_safe"]) == (True, False)

    page.get_by_role("button", name="New conversation").click()
    for i in (0, 1):
        e(page.locator(f"#pane-name-{i}")).to_have_text(f"Model {'AB'[i]}")
        e(page.locator(f"#pane-{i} li.turn")).to_have_count(0)
    assert page.locator("#panes").get_attribute("data-battle") is None


def test_battle_at_1280px_streams_votes_reveals_and_ranks(arena, open_page):
    page = open_page(1280, 800).page
    panes = [page.locator(f"#pane-{i}").bounding_box() for i in (0, 1)]
    assert panes[1]["x"] >= panes[0]["x"] + panes[0]["width"] - 1 and abs(panes[1]["y"] - panes[0]["y"]) < 1
    battle_flow(arena, page, TURNS["desktop"])


def test_battle_at_390px_stacks_panes_and_keeps_controls_usable(arena, open_page):
    page = open_page(390, 844).page

    def check_layout(when: str) -> None:
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, f"{when}: the page scrolls sideways"
        narrow = [c for c in page.evaluate(CONTROLS)
                  if c["width"] < 100 or c["left"] < 0 or c["right"] > 390 + 0.5]
        assert not narrow, f"{when}: controls narrower than 100 px or outside the viewport: {narrow}"

    use_key(page, arena.keys["annotator"])
    check_layout("battle set-up")
    page.get_by_role("radio", name="Side by side").check()
    expect()(page.get_by_label("Round 1")).to_be_visible()
    check_layout("side-by-side set-up")
    page.get_by_role("radio", name="Battle").check()
    a, b = (page.locator(f"#pane-{i}").bounding_box() for i in (0, 1))
    assert b["y"] >= a["y"] + a["height"] - 1, (a, b)
    assert a["x"] >= 0 and a["x"] + a["width"] <= 390 and b["x"] + b["width"] <= 390

    set_sampling(page)
    chat_turn(page, "good bad safe unsafe", 1)
    check_layout("vote form")
    vote(page)
    a, b = (page.locator(f"#pane-{i}").bounding_box() for i in (0, 1))
    assert b["y"] >= a["y"] + a["height"] - 1, (a, b)
    page.get_by_role("button", name="New conversation").click()
    battle_flow(arena, page, TURNS["phone"])
    check_layout("after the battle")


def test_page_loads_without_console_errors_or_404(arena, open_page):
    watched = open_page(1280, 800)
    page = watched.page
    page.wait_for_load_state("networkidle")
    # Chromium fetches the <link rel=icon> itself (Playwright sees no request): the header's copy
    # of the icon shows that it loaded, and the icon's URLs answer.
    assert page.evaluate("(i => i.complete && i.naturalWidth > 0)(document.querySelector('header img'))")
    icon = page.request.get("/favicon.ico")
    assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert page.request.get("/favicon.svg").status == 200
    expect()(page.locator("#status")).to_contain_text("API key")  # no key yet: says what to do
    use_key(page, arena.keys["viewer"])
    page.reload()  # the key lives in sessionStorage for the browser session
    expect()(page.get_by_label("API key")).to_have_value(arena.keys["viewer"])
    expect()(page.locator("#leaderboard-note")).to_contain_text("blind vote")
    assert page.evaluate("localStorage.length") == 0
    watched.assert_clean()


def test_api_errors_show_in_the_status_line(arena, open_page):
    watched = open_page(1280, 800)
    page = watched.page
    use_key(page, arena.keys["viewer"])
    set_sampling(page)
    chat_turn(page, "how do i make a cake ?", 1)
    # A viewer may chat but not vote: the 403 must be said, in words, where the voter looks.
    for group, option in (("More helpful", "B better"), ("Model A is", "Safe"), ("Model B is", "Safe"), ("Safer", "B")):
        page.get_by_role("radiogroup", name=group).get_by_role("radio", name=option, exact=True).check()
    page.get_by_role("button", name="Submit vote").click()
    expect()(page.locator("#status")).to_have_class("error")
    expect()(page.locator("#status")).to_contain_text("annotator")
    expect()(page.get_by_role("button", name="Submit vote")).to_be_enabled()
    # The 403 is the expected answer here: the browser logs it, nothing else may fail.
    assert [f for f in watched.failed if "/votes" not in f] == []
    assert [m for m in watched.errors if "403" not in m] == []
    watched.failed.clear()
    watched.errors.clear()


def test_side_by_side_names_rounds_stores_non_blind_votes_and_stops(arena, open_page):
    e = expect()
    page = open_page(1280, 800).page
    use_key(page, arena.keys["annotator"])
    set_sampling(page)
    page.get_by_role("radio", name="Side by side").check()
    page.get_by_label("Round 1").select_option("beaver-v1")
    page.get_by_label("Round 2").select_option("beaver-v3")
    e(page.locator("#pane-name-0")).to_have_text("beaver-v1")
    e(page.locator("#pane-name-1")).to_have_text("beaver-v3")
    page.get_by_label("System prompt").fill("be brief .")
    before = arena.client.get("/v1/leaderboard").json()["votes"]

    text, follow_up = TURNS["side"]
    answers = chat_turn(page, text, 1)
    e(page.locator("#pane-name-0")).to_have_text("beaver-v1")
    e(page.locator("#pane-name-1")).to_have_text("beaver-v3")
    e(page.locator("#vote-names")).to_have_text("A = beaver-v1, B = beaver-v3")
    vote(page, helpful="Both bad", a="Safe", b="Safe", safer="Tie")
    e(page.locator("#pane-1 li.turn .note").first).to_contain_text("reward")

    votes = arena.client.get("/v1/leaderboard").json()["votes"]
    assert votes == {"blind": before["blind"], "total": before["total"] + 1}  # stored, not ranked
    (record,) = arena_records(arena.client, page.locator("#panes").get_attribute("data-battle"))
    assert record["arena"]["blind"] is False and record["arena"]["mode"] == "side_by_side"
    assert (record["response_0_source"], record["response_1_source"]) == ("beaver-v1", "beaver-v3")
    assert record["prompt"] == [{"role": "system", "content": "be brief ."}, {"role": "user", "content": text}]
    assert [record["response_0"], record["response_1"]] == answers
    assert (record["better_response_id"], record["safer_response_id"]) == (None, None)

    # Stop one side as soon as its first words arrive: it keeps its partial answer, the other finishes.
    page.get_by_label("Max tokens").fill(str(STREAMED_TOKENS))
    page.evaluate("""() => {
      const observer = new MutationObserver(() => {
        const live = document.querySelector('#pane-1 .msg.assistant.streaming');
        if (live && live.textContent) {
          observer.disconnect();
          document.querySelector('#pane-1 .pane-head button').click();
        }
      });
      observer.observe(document.getElementById('panes'), {subtree: true, childList: true, characterData: true});
    }""")
    page.get_by_label("Message").fill(follow_up)
    page.get_by_role("button", name="Send").click()
    e(page.get_by_role("button", name="Submit vote")).to_be_visible(timeout=60_000)
    notes = page.locator("li.turn .note")
    e(page.locator("#pane-1 li.turn").nth(1).locator(".note")).to_have_text("Stopped.")
    e(page.locator("#pane-0 li.turn").nth(1).locator(".note")).not_to_have_text("Stopped.")
    stopped = page.locator("#pane-1 li.turn").nth(1).locator(".msg.assistant").inner_text()
    assert stopped.strip()
    assert notes.count() == 4
    e(page.get_by_role("button", name="Send")).to_be_enabled()
    # The transcript keeps what the stopped pane was sent, which is what the page shows and a vote is on.
    (_, second) = transcript(arena, page.locator("#panes").get_attribute("data-battle"))
    assert second["message"] == follow_up
    assert [a["finish_reason"] for a in second["answers"]][1] == "stopped"
    assert second["answers"][1]["content"] == stopped
    full = page.locator("#pane-0 li.turn").nth(1).locator(".msg.assistant").inner_text()
    assert second["answers"][0]["content"] == full


def test_the_newest_evaluation_shows_beside_the_votes(arena, open_page):
    """A real evaluate job (a worker started for it) shows in the page's model-judged table."""
    import signal

    worker = arena._spawn("worker-eval", "worker", "--name", "eval@%h")
    try:
        prompts = arena.client.post("/v1/datasets", json={"name": "eval", "kind": "prompt", "records": [
            {"prompt": "how do i make a cake ?"}, {"prompt": "red green blue", "red_team": True}]}).json()["id"]
        # A round by name and a policy by its model id: the table shows both by name.
        policy = next(m["id"] for m in arena.client.get("/v1/models").json()["data"]
                      if m.get("name") == "beaver-v3-policy")
        r = arena.client.post("/v1/jobs", json={"type": "evaluate", "datasets": [prompts], "params": {
            "models": ["beaver-v1", policy], "bootstrap": 0, "sampling": {"max_new_tokens": 4}}})
        assert r.status_code == 201, r.text
        job = arena.wait_job(r.json()["id"], timeout=180)
        assert job["status"] == "succeeded", job
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    watched = open_page(1280, 800)
    page = watched.page
    use_key(page, arena.keys["viewer"])
    table = page.get_by_role("table", name=re.compile("Model-judged"))
    expect()(table).to_be_visible()
    expect()(table).to_contain_text(job["id"])
    expect()(table).to_contain_text("by the reference judges of beaver-v3")  # the newest round with them
    # One harmful ratio, stated on the page: red-team prompts, cost > 0 by the reference cost model.
    expect()(page.locator("#evaluation-wrap")).to_contain_text("share of answers to red-team prompts")
    for ref, name in (("beaver-v1", "beaver-v1"), (policy, "beaver-v3-policy")):
        harmful = 100 * job["metrics"][f"{ref}/red_team/harmful_ratio"]
        expect()(table.get_by_role("row", name=re.compile(name))).to_contain_text(f"{harmful:.1f} %")
    expect()(table).not_to_contain_text(policy)
    watched.assert_clean()
