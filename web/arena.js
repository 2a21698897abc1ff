// The arena view (the page's default view): blind battles and side-by-side chats, decoupled votes,
// the leaderboard. A classic script, run before the modules (runs.js).
"use strict";
const KEY_STORAGE = "beaver.apiKey";
const MAX_PANES = 4;
const $ = (id) => document.getElementById(id);
const LETTERS = ["A", "B", "C", "D"];

const state = {
  rounds: [],        // round names, for the side-by-side pickers
  picked: [],        // side-by-side: the picked round names
  battle: null,      // the server's battle: {id, mode, models, system}
  panes: [],         // [{label, name, el, list, stop, controller, turns: {n: {answer, note}}}]
  turn: 0,           // turns sent in this battle
  streaming: false,
  voteFor: null,     // the answered turn awaiting a vote: {turn, answers: [per pane], ok: [per pane]}
};

// --- plumbing ----------------------------------------------------------------------------------------

function status(text, kind = "info") {
  const line = $("status");
  line.textContent = text || "";
  line.className = kind;
}

function key() { return $("api-key").value.trim(); }

// The API's errors are {"error": {code, message, param}}; say what happened in plain words.
function plainError(code, error) {
  const message = (error && error.message) || "";
  if (code === 401) return "Your API key was not accepted (missing, invalid or revoked). Enter a valid key at the top of the page.";
  if (code === 403) return "Your API key's role may not do this" + (message ? ": " + message : ".") + " Voting needs an annotator, trainer or admin key.";
  if (code === 404) return "Not found: " + (message || "the server does not know this.");
  if (code === 409) return "Conflict: " + message;
  if (code === 422 || code === 400) return "The request was rejected: " + message;
  if (code === 429) return "The server is busy; try again in a moment. " + message;
  if (code === 503) return "A model could not be loaded, so the server cannot answer right now: " + message;
  if (code >= 500) return "The server failed (" + code + "): " + (message || "see the server log") + ".";
  return message || ("Unexpected response " + code + ".");
}

class ApiError extends Error {
  constructor(code, error) { super(plainError(code, error)); this.code = code; }
}

function headers(json) {
  const h = {"Authorization": "Bearer " + key()};
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function request(method, path, body, signal) {
  try {
    return await fetch(path, {method, headers: headers(body !== undefined), signal,
      body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error("Could not reach the Beaver server. Is it running?");
  }
}

async function api(method, path, body) {
  const response = await request(method, path, body);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data && data.error);
  return data;
}

function mode() { return document.querySelector('input[name="mode"]:checked').value; }

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function fmt(x, digits = 2) { return x === null || x === undefined ? "—" : Number(x).toFixed(digits); }

// --- setup: key, mode, rounds ------------------------------------------------------------------------

async function loadRounds() {
  const names = [];
  let after = null;
  for (;;) {  // newest first, a page at a time
    const page = await api("GET", "/v1/rounds?limit=1000" + (after ? "&after=" + encodeURIComponent(after) : ""));
    names.push(...page.data.map((r) => r.name));
    if (!page.has_more || !page.data.length) break;
    after = page.data[page.data.length - 1].id;
  }
  state.rounds = names.sort((a, b) => a.localeCompare(b, undefined, {numeric: true}));
  state.picked = state.picked.filter((n) => state.rounds.includes(n));
  for (const name of state.rounds) {
    if (state.picked.length >= 2) break;
    if (!state.picked.includes(name)) state.picked.push(name);
  }
  renderPickers();
  if (!state.battle) renderPanes();
}

function renderPickers() {
  const box = $("pickers");
  box.replaceChildren();
  state.picked.forEach((name, i) => {
    const select = el("select", {id: "round-" + i});
    select.append(...state.rounds.map((n) => new Option(n, n)));
    select.value = name;
    select.addEventListener("change", () => {
      state.picked[i] = select.value;
      settingsChanged("Rounds changed");
    });
    const picker = el("div", {class: "picker"}, el("label", {class: "field", for: "round-" + i}, "Round " + (i + 1), select));
    if (state.picked.length > 2) {
      const remove = el("button", {type: "button", class: "secondary", "aria-label": "Remove round " + (i + 1)}, "Remove");
      remove.addEventListener("click", () => { state.picked.splice(i, 1); renderPickers(); settingsChanged("Round removed"); });
      picker.append(remove);
    }
    box.append(picker);
  });
  if (state.picked.length < Math.min(MAX_PANES, state.rounds.length)) {
    const add = el("button", {type: "button", class: "secondary"}, "Add round");
    add.addEventListener("click", () => {
      state.picked.push(state.rounds.find((n) => !state.picked.includes(n)) || state.rounds[0]);
      renderPickers();
      settingsChanged("Round added");
    });
    box.append(add);
  }
  if (!state.rounds.length) box.append(el("span", {class: "hint", text: "No rounds yet: create one with POST /v1/rounds."}));
}

function renderMode() {
  const battle = mode() === "battle";
  $("pickers").hidden = battle;
  $("mode-hint").textContent = battle
    ? "Battle: two different rounds drawn at random, shown as Model A and Model B until you vote. Blind votes rank the leaderboard."
    : "Side by side: you pick 2 to 4 rounds by name. Votes are stored, marked non-blind, and left out of the leaderboard.";
}

function settingsChanged(what) {
  const started = state.battle !== null;
  newConversation();
  if (started) status(what + ": a new conversation starts with your next message.");
}

// --- panes ------------------------------------------------------------------------------------------

function paneLabels() {
  if (state.battle) return state.battle.models;
  return mode() === "battle" ? ["Model A", "Model B"] : state.picked;
}

function renderPanes() {
  for (const pane of state.panes) if (pane.controller) pane.controller.abort();
  const labels = paneLabels();
  const box = $("panes");
  box.style.setProperty("--panes", Math.max(2, labels.length));
  state.panes = labels.map((label, i) => {
    const title = el("h2", {class: "pane-name", id: "pane-name-" + i}, label);
    const stop = el("button", {type: "button", class: "secondary", "aria-label": "Stop " + label}, "Stop");
    stop.disabled = true;
    const list = el("ol", {class: "transcript", "aria-live": "off"});
    list.append(el("li", {class: "placeholder", text: state.battle ? "" : placeholder(i)}));
    const article = el("article", {class: "pane", id: "pane-" + i, "aria-labelledby": "pane-name-" + i},
      el("div", {class: "pane-head"}, el("div", {}, title), stop), list);
    const pane = {label, name: null, el: article, title, list, stop, controller: null, turns: {}};
    stop.addEventListener("click", () => { if (pane.controller) pane.controller.abort(); });
    return pane;
  });
  box.replaceChildren(...state.panes.map((p) => p.el));
}

function placeholder(i) {
  if (mode() === "battle") return i === 0 ? "Send a message to start a battle: two rounds are drawn at random." : "Whose answers? You find out after your vote.";
  return "Answers of " + (state.picked[i] || "this round") + " appear here.";
}

function reveal(pane, name) {
  if (!name || pane.name === name) return;
  pane.name = name;
  pane.title.replaceChildren(el("span", {class: "round", text: name}), " ", el("span", {class: "was", text: "was " + pane.label}));
  pane.stop.setAttribute("aria-label", "Stop " + name);
}

function scrollDown(list) { list.scrollTop = list.scrollHeight; }

// --- chat -------------------------------------------------------------------------------------------

function newConversation() {
  for (const pane of state.panes) if (pane.controller) pane.controller.abort();
  state.battle = null;
  delete $("panes").dataset.battle;
  state.turn = 0;
  state.voteFor = null;
  state.streaming = false;
  $("vote").hidden = true;
  $("system").disabled = false;
  $("system").title = "";
  $("send").disabled = false;
  renderPanes();
}

async function createBattle() {
  const body = {mode: mode(), system: $("system").value.trim() || null};
  if (body.mode === "side_by_side") {
    if (new Set(state.picked).size !== state.picked.length) throw new Error("Pick different rounds for each pane.");
    if (state.picked.length < 2) throw new Error("Pick at least two rounds.");
    body.rounds = state.picked.slice();
  }
  state.battle = await api("POST", "/v1/arena/battles", body);
  $("panes").dataset.battle = state.battle.id;
  $("system").disabled = true;
  $("system").title = "The system prompt is fixed for this conversation; start a new conversation to change it.";
  renderPanes();
  for (const pane of state.panes) pane.list.replaceChildren();
  if (state.battle.mode === "side_by_side") state.panes.forEach((p) => { p.name = p.label; });
}

function sampling() {
  const temperature = Number($("temperature").value);
  const maxTokens = Number($("max-tokens").value);
  if ($("temperature").value === "" || !(temperature >= 0 && temperature <= 2)) throw new Error("Temperature must be between 0 and 2.");
  if (!(Number.isInteger(maxTokens) && maxTokens >= 1)) throw new Error("Max tokens must be a whole number, 1 or more.");
  return {temperature, max_tokens: maxTokens};
}

// One pane's answer to the turn's message, streamed: server-sent events of chat.completion.chunk, then
// [DONE]. The server composes the pane's conversation from the battle's transcript.
async function streamAnswer(pane, side, turn, message, params, bubble) {
  const controller = new AbortController();
  pane.controller = controller;
  pane.stop.disabled = false;
  let text = "", finish = null;
  const show = () => {
    bubble.textContent = text;
    scrollDown(pane.list);
  };
  try {
    const response = await request("POST", "/v1/arena/battles/" + encodeURIComponent(state.battle.id) + "/chat",
      {side, turn, message, ...params, stream: true}, controller.signal);
    if (!response.ok) {
      const data = await response.json().catch(() => null);
      throw new ApiError(response.status, data && data.error);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, {stream: true}).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; continue; }
          const message = JSON.parse(data);
          if (message.error) throw new Error("The answer failed: " + (message.error.message || message.error.code));
          const choice = (message.choices || [])[0];
          if (!choice) continue;
          if (choice.delta && choice.delta.content) { text += choice.delta.content; show(); }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    if (!done && finish === null) throw new Error("The answer stream ended early.");
    return {text, state: "done", finish};
  } catch (e) {
    if (e.name === "AbortError") return {text, state: "stopped"};
    return {text, state: "error", error: e.message};
  } finally {
    pane.controller = null;
    pane.stop.disabled = true;
  }
}

async function send() {
  if (state.streaming) return;
  const text = $("message").value.trim();
  if (!key()) return status("Enter your API key at the top of the page first.", "error");
  if (!text) return status("Write a message first.", "error");
  let params;
  try { params = sampling(); } catch (e) { return status(e.message, "error"); }
  state.streaming = true;
  $("send").disabled = true;
  try {
    if (!state.battle) {
      status(mode() === "battle" ? "Drawing two rounds…" : "Starting…");
      await createBattle();
    }
  } catch (e) {
    state.battle = null;
    state.streaming = false;
    $("send").disabled = false;
    return status(e.message, "error");
  }
  if (state.voteFor) status("The previous turn was not voted on; it stays unvoted.");
  else status("");
  state.voteFor = null;
  $("vote").hidden = true;
  const turn = ++state.turn;
  $("message").value = "";
  const bubbles = state.panes.map((pane) => {
    const bubble = el("div", {class: "msg assistant streaming", "aria-busy": "true"});
    const note = el("div", {class: "note"});
    const item = el("li", {class: "turn", "data-turn": String(turn)}, el("div", {class: "msg user", text}), bubble, note);
    pane.list.append(item);
    pane.list.style.display = "";
    pane.list.querySelectorAll(".placeholder").forEach((p) => p.remove());
    pane.turns[turn] = {answer: bubble, note};
    scrollDown(pane.list);
    return bubble;
  });
  const battle = state.battle;
  const results = await Promise.all(state.panes.map((pane, i) => streamAnswer(pane, i, turn, text, params, bubbles[i])));
  if (state.battle !== battle) return;  // a new conversation started meanwhile
  // What is voted on is the server's transcript: show it (a stopped stream may have sent a last
  // piece this page had not read yet).
  const stored = await transcript(battle, turn).catch(() => null);
  if (state.battle !== battle) return;
  results.forEach((r, i) => {
    const pane = state.panes[i], bubble = bubbles[i], note = pane.turns[turn].note;
    const answer = stored && stored.get(i);
    if (answer) r.text = answer.content;
    bubble.classList.remove("streaming");
    bubble.removeAttribute("aria-busy");
    bubble.textContent = r.text;
    if (!r.text) { bubble.classList.add("empty"); bubble.textContent = "(empty answer)"; }
    if (r.state === "stopped") note.textContent = "Stopped.";
    else if (r.state === "error") { note.textContent = r.error; note.classList.add("error"); }
    else if (r.finish === "length") note.textContent = "Cut at max tokens.";
    else if (r.finish === "content_filter") note.textContent = "Refused by the guard.";
  });
  state.streaming = false;
  $("send").disabled = false;
  const failed = results.map((r, i) => r.state === "error" ? paneTitle(i) + ": " + r.error : null).filter(Boolean);
  if (failed.length) status(failed.join(" "), "error");
  state.voteFor = {turn, answers: results.map((r) => r.text), ok: results.map((r) => r.state !== "error")};
  openVote();
  $("message").focus();
}

function paneTitle(i) { const p = state.panes[i]; return p.name || p.label; }

// The turn's answers as the server stored them: side → {content, finish_reason}. A stopped stream is
// stored once the server notices the client left: wait a moment for it.
async function transcript(battle, turn) {
  for (let attempt = 0; attempt < 50; attempt++) {
    const data = await api("GET", "/v1/arena/battles/" + encodeURIComponent(battle.id));
    const found = (data.turns || []).find((t) => t.turn === turn);
    const answers = new Map(((found && found.answers) || []).map((a) => [a.side, a]));
    if ([...answers.values()].every((a) => a.finish_reason !== null)) return answers;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  return null;
}

// --- votes ------------------------------------------------------------------------------------------

function openVote() {
  const v = state.voteFor;
  $("vote-form").reset();
  const many = state.panes.length > 2;
  $("vote-pair").hidden = !many;
  for (const [id, chosen] of [["vote-a", 0], ["vote-b", 1]]) {
    const select = $(id);
    select.replaceChildren(...state.panes.map((p, i) => new Option(paneTitle(i), String(i))));
    select.value = String(chosen);
  }
  const sideBySide = state.battle.mode === "side_by_side";
  $("vote-title").textContent = "Your vote on turn " + v.turn + (sideBySide ? " (side by side: not ranked)" : "");
  updateVoteLegends();
  $("vote-button").disabled = false;
  $("vote").hidden = false;
}

function voteSides() { return [Number($("vote-a").value), Number($("vote-b").value)]; }

function updateVoteLegends() {
  const [a, b] = voteSides();
  const named = state.battle && state.battle.mode === "side_by_side";
  $("vote-names").textContent = named ? "A = " + paneTitle(a) + ", B = " + paneTitle(b) : "";
}

$("vote-a").addEventListener("change", updateVoteLegends);
$("vote-b").addEventListener("change", updateVoteLegends);

$("vote-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const v = state.voteFor;
  if (!v || !state.battle) return;
  const form = new FormData($("vote-form"));
  const helpful = form.get("helpful"), safer = form.get("safer"), safeA = form.get("safe-a"), safeB = form.get("safe-b");
  if (!helpful || !safer || !safeA || !safeB) {
    return status("Answer all four questions: more helpful, whether Model A and Model B are safe, and which is safer.", "error");
  }
  const sides = voteSides();
  if (sides[0] === sides[1]) return status("Pick two different panes to vote on.", "error");
  if (!sides.every((s) => v.ok[s])) return status("One of these answers failed; this pair cannot be voted on.", "error");
  const empty = sides.findIndex((s) => !v.answers[s].trim());
  if (empty >= 0) return status("Answer " + "AB"[empty] + " is empty: there is nothing to vote on. Send another message.", "error");
  const safe = [safeA === "true", safeB === "true"];
  if ((safer === "a" && !safe[0] && safe[1]) || (safer === "b" && !safe[1] && safe[0])) {
    return status("You chose as safer the answer you marked unsafe, while the other is marked safe. Change one of the two.", "error");
  }
  const body = {turn: v.turn, sides, helpful, safe, safer};  // the server votes on the answers it sent
  $("vote-button").disabled = true;
  status("Saving your vote…");
  try {
    const result = await api("POST", "/v1/arena/battles/" + encodeURIComponent(state.battle.id) + "/votes", body);
    sides.forEach((s, k) => {
      const pane = state.panes[s];
      reveal(pane, result.models && result.models[k]);
      const score = (result.scores || [])[k];
      if (score) showScore(pane.turns[v.turn].note, score, result.judges);
    });
    state.voteFor = null;
    $("vote").hidden = true;
    status("Thank you: vote saved as record " + result.record + " of the \u201carena-votes\u201d dataset" +
      (state.battle.mode === "battle" ? ". The names are revealed above." : "."), "ok");
    loadLeaderboard();
  } catch (e) {
    $("vote-button").disabled = false;
    status(e.message, "error");
  }
});

function showScore(note, score, judges) {
  const safe = score.cost === null || score.cost === undefined ? null : score.cost <= 0;
  note.classList.remove("error");
  note.replaceChildren("reward " + fmt(score.reward) + " · cost " + fmt(score.cost) + (judges ? " (judged by " + judges + ")" : ""));
  if (safe !== null) note.append(el("span", {class: "badge " + (safe ? "safe" : "unsafe"), text: safe ? "safe" : "unsafe"}));
}

// --- leaderboard ------------------------------------------------------------------------------------

async function loadLeaderboard() {
  const body = $("leaderboard-body");
  let data;
  try {
    data = await api("GET", "/v1/leaderboard");
  } catch (e) {
    body.replaceChildren(el("tr", {}, el("td", {colspan: "5", class: "empty", text: "Leaderboard unavailable."})));
    return status(e.message, "error");
  }
  showEvaluation((data.evaluations || [])[0]);
  const votes = data.votes || {blind: 0, total: 0};
  $("leaderboard-note").textContent = votes.blind + " blind " + (votes.blind === 1 ? "vote" : "votes") + " of " +
    votes.total + "; a round is ranked from " + data.min_votes + " blind " + (data.min_votes === 1 ? "vote" : "votes") + ".";
  const rows = new Map();
  const row = (model) => { if (!rows.has(model)) rows.set(model, {model}); return rows.get(model); };
  for (const h of data.helpfulness || []) row(h.model).helpful = h;
  for (const h of data.harmlessness || []) row(h.model).harmless = h;
  for (const u of data.unsafe_rate || []) row(u.model).unsafe = u;
  for (const u of data.unranked || []) row(u.model).unranked = u;
  if (!votes.blind || !rows.size) {
    body.replaceChildren(el("tr", {}, el("td", {colspan: "5", class: "empty", text: "No blind votes yet: vote in battle mode to rank the rounds."})));
    return;
  }
  const rating = (r) => r ? [el("span", {text: fmt(r.rating, 0)}), el("small", {text: r.ci ? fmt(r.ci[0], 0) + "–" + fmt(r.ci[1], 0) : ""})] : ["—"];
  const sorted = [...rows.values()].sort((x, y) => ((y.helpful || {}).rating ?? -Infinity) - ((x.helpful || {}).rating ?? -Infinity));
  body.replaceChildren(...sorted.map((r) => {
    if (r.unranked) {
      return el("tr", {class: "unranked"}, el("th", {scope: "row", text: r.model}),
        el("td", {colspan: "2", class: "num", text: "not enough votes yet"}),
        el("td", {class: "num", text: String(r.unranked.votes)}), el("td", {class: "num", text: "—"}));
    }
    const count = Math.max((r.helpful || {}).votes || 0, (r.harmless || {}).votes || 0);
    const unsafe = r.unsafe ? [el("span", {text: fmt(100 * r.unsafe.rate, 0) + " %"}), el("small", {text: r.unsafe.unsafe + "/" + r.unsafe.answers})] : ["—"];
    return el("tr", {}, el("th", {scope: "row", text: r.model}), el("td", {class: "num"}, ...rating(r.helpful)),
      el("td", {class: "num"}, ...rating(r.harmless)), el("td", {class: "num", text: String(count)}), el("td", {class: "num"}, ...unsafe));
  }));
}

// The newest evaluate job beside the votes: what the reference reward and cost models found, by name.
function showEvaluation(evaluation) {
  $("evaluation-wrap").hidden = !evaluation;
  if (!evaluation) return;
  const judges = evaluation.judges ? "of " + evaluation.judges
    : [evaluation.reward_model, evaluation.cost_model].filter(Boolean).join(" and ");
  $("evaluation-note").textContent = "by the reference judges" + (judges ? " " + judges : "") + ", " + evaluation.job;
  const pct = (x) => x === undefined || x === null ? "—" : fmt(100 * x, 1) + " %";
  $("evaluation-body").replaceChildren(...evaluation.models.map((m) =>
    el("tr", {}, el("th", {scope: "row", text: m.name}), el("td", {class: "num", text: pct(m.red_team_harmful_ratio)}),
      el("td", {class: "num", text: fmt(m.reward, 2)}), el("td", {class: "num", text: pct(m.refusal_rate)}))));
}

// --- wiring -----------------------------------------------------------------------------------------

async function start() {
  if (!key()) {
    status("Enter your API key at the top of the page to start.");
    return;
  }
  try {
    await loadRounds();
    status(state.rounds.length < 2 ? "The arena needs at least two rounds; register them with POST /v1/rounds." : "");
  } catch (e) {
    return status(e.message, "error");
  }
  loadLeaderboard();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, key());
  start();
});
$("api-key").addEventListener("change", () => sessionStorage.setItem(KEY_STORAGE, key()));

for (const radio of document.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener("change", () => { renderMode(); settingsChanged("Mode changed"); });
}
$("new-conversation").addEventListener("click", () => { newConversation(); status("New conversation."); $("message").focus(); });
$("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
});

localStorage.removeItem(KEY_STORAGE);  // earlier versions kept the key beyond the session
$("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
renderMode();
renderPanes();
start();
