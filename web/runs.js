// The runs view: #runs lists the jobs (live), the datasets and the rounds; #runs/<job id> is one job
// with live curves from its events (uPlot, vendored), its files, error, params and events, and Cancel
// for trainers and admins. Everything is polled every POLL_MS with the key of the header's form;
// nothing here renders a server path (the API already hides them from viewers, and the page shows
// only names, ids and numbers besides what the API returns for the key's role).
import {$, api, blobUrl, el, key} from "./api.js";

const POLL_MS = 2000;
const STAFF = ["admin", "trainer"];  // the roles that may cancel (and that see server paths)
const TERMINAL = ["succeeded", "failed", "cancelled"];
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];  // whole steps
const COLORS = ["#2f5bd3", "#b42318", "#18794e", "#b54708", "#6941c6", "#0e7090", "#c11574", "#475467"];

// The curves of a job's page: which event metrics each chart draws. A chart with no data is not shown.
const CHARTS = [
  {id: "reward", title: "Reward", keys: (k) => k === "train/reward"},
  {id: "cost", title: "Cost", keys: (k) => k === "train/cost" || k.startsWith("train/cost/")},
  {id: "episode-cost", title: "J̄_C against the threshold d", thresholds: true,
   keys: (k) => k === "train/episode_cost" || k.startsWith("train/episode_cost/")},
  {id: "lambda", title: "λ (Lagrange multiplier)", keys: (k) => k === "lagrange/lambda" || k.startsWith("lagrange/lambda/")},
  {id: "kl", title: "KL to the reference", keys: (k) => k === "train/kl"},
  {id: "length", title: "Response length (tokens)", keys: (k) => k === "train/response_length"},
  {id: "loss", title: "Losses", keys: (k) => /(^|\/|_)loss$/.test(k)},
  {id: "accuracy", title: "Accuracy", keys: (k) => /(^|\/|_)accuracy$/.test(k)},
];

const state = {
  role: null,        // the key's role (GET /v1/keys/me), fetched once per key
  roleKey: null,
  timer: null,       // the poll of the page shown
  generation: 0,     // bumped on every navigation: a poll of a page left behind stops
  job: null,         // the job page's job, its events and charts
  events: [],
  lastEvent: 0,
  charts: new Map(), // chart id → {plot, names}
  filesFor: null,    // the status the files list was read at
};

// --- navigation --------------------------------------------------------------------------------

function route() {
  const hash = location.hash;
  if (hash !== "#runs" && !hash.startsWith("#runs/")) return null;
  return {job: hash.startsWith("#runs/") ? decodeURIComponent(hash.slice(6)) : null};
}

async function show() {
  const where = route();
  state.generation++;
  clearTimeout(state.timer);
  for (const {plot} of state.charts.values()) plot.destroy();
  state.charts.clear();
  $("arena-view").hidden = where !== null;
  $("runs-view").hidden = where === null;
  $("tab-arena").removeAttribute("aria-current");
  $("tab-runs").removeAttribute("aria-current");
  $(where === null ? "tab-arena" : "tab-runs").setAttribute("aria-current", "page");
  $("view-hint").textContent = where === null ? "arena: chat with two rounds, vote, build preference data"
    : "runs: jobs with live curves, datasets, rounds";
  if (where === null) return;
  const view = $("runs-view");
  if (!key()) {
    view.replaceChildren(el("p", {class: "runs-note", text: "Enter your API key at the top of the page to see the runs."}));
    return;
  }
  try {
    await loadRole();
  } catch (e) {
    view.replaceChildren(el("p", {class: "runs-note error", role: "alert", text: e.message}));
    return;
  }
  if (where.job) showJob(where.job); else showList();
}

async function loadRole() {
  if (state.roleKey === key()) return;
  state.role = (await api("GET", "/v1/keys/me")).role;
  state.roleKey = key();
}

const staff = () => STAFF.includes(state.role);

// Runs ``poll`` now and every POLL_MS while the page it belongs to is shown; it returns false to stop.
function every(poll) {
  const generation = state.generation;
  const tick = async () => {
    let again = true;
    try {
      again = await poll();
    } catch (e) {
      note(e.message, true);
      again = !(e.code >= 400 && e.code < 500 && e.code !== 429);  // a bad key or no such job: asking again won't help
    }
    if (again !== false && generation === state.generation) state.timer = setTimeout(tick, POLL_MS);
  };
  tick();
}

function note(text, error = false) {
  const line = $("runs-status");
  if (!line) return;
  line.textContent = text || "";
  line.className = "runs-note" + (error ? " error" : "");
}

// --- formatting ---------------------------------------------------------------------------------

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.round(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
  return Math.floor(s / 3600) + " h " + String(Math.floor(s / 60) % 60).padStart(2, "0") + " min";
}

function when(unix) { return unix ? new Date(unix * 1000).toLocaleString() : "—"; }

function number(x) {
  if (typeof x !== "number") return String(x);
  return Number.isInteger(x) ? String(x) : Math.abs(x) >= 1e4 || Math.abs(x) < 1e-3 ? x.toExponential(3) : x.toFixed(4);
}

function progressBar(progress) {
  if (!progress) return el("span", {class: "muted", text: "—"});
  const bar = el("span", {class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
                          "aria-valuenow": String(progress.percent)});
  bar.append(el("span", {style: `width: ${progress.percent}%`}));
  return el("span", {class: "progress"}, bar,
            el("span", {class: "percent", text: `${progress.percent.toFixed(0)} % (${progress.step}/${progress.total_steps})`}));
}

function statusBadge(status) { return el("span", {class: "status " + status, text: status}); }

// --- the list: jobs, datasets, rounds -----------------------------------------------------------

function showList() {
  const jobs = el("tbody", {id: "jobs-body"});
  $("runs-view").replaceChildren(
    el("p", {id: "runs-status", class: "runs-note", role: "status"}),
    el("section", {"aria-labelledby": "jobs-title"},
       el("h2", {id: "jobs-title", text: "Jobs"}),
       el("div", {class: "table-wrap"}, el("table", {id: "jobs"},
          el("thead", {}, el("tr", {}, ...["Job", "Type", "Status", "Progress", "ETA", "Created by", "Attempt", "Created"]
                                              .map((h) => el("th", {scope: "col", text: h})))), jobs))),
    el("div", {class: "runs-columns"},
       el("section", {"aria-labelledby": "datasets-title"}, el("h2", {id: "datasets-title", text: "Datasets"}),
          el("div", {class: "table-wrap"}, el("table", {id: "datasets"}, el("thead", {}, el("tr", {},
             ...["Dataset", "Kind", "Records", "Safe ratio", "Harm categories"].map((h) => el("th", {scope: "col", text: h})))),
             el("tbody", {id: "datasets-body"})))),
       el("section", {"aria-labelledby": "rounds-title"}, el("h2", {id: "rounds-title", text: "Rounds"}),
          el("div", {class: "table-wrap"}, el("table", {id: "rounds"}, el("thead", {}, el("tr", {},
             ...["Round", "Policy", "Reward model", "Cost model", "Made by", "Final metrics"].map((h) => el("th", {scope: "col", text: h})))),
             el("tbody", {id: "rounds-body"}))))));
  loadDatasets().catch((e) => note(e.message, true));
  loadRounds().catch((e) => note(e.message, true));
  every(async () => {
    const page = await api("GET", "/v1/jobs?limit=50");
    jobs.replaceChildren(...page.data.map(jobRow));
    if (!page.data.length) jobs.append(el("tr", {}, el("td", {colspan: "8", class: "empty", text: "No jobs yet."})));
    note("");
  });
}

function jobRow(job) {
  return el("tr", {"data-job": job.id},
    el("td", {}, el("a", {href: "#runs/" + encodeURIComponent(job.id), text: job.id})),
    el("td", {text: job.type}),
    el("td", {}, statusBadge(job.status)),
    el("td", {}, progressBar(job.progress)),
    el("td", {class: "num", text: duration(job.progress && job.progress.eta_seconds)}),
    el("td", {text: job.created_by || "—"}),
    el("td", {class: "num", text: String(job.attempt)}),
    el("td", {text: when(job.created_at)}));
}

async function loadDatasets() {
  const page = await api("GET", "/v1/datasets?limit=50");
  const body = $("datasets-body");
  if (!body) return;
  body.replaceChildren(...page.data.map((d) => {
    const stats = d.stats || {};
    const harms = Object.entries(stats.harm_categories || {}).slice(0, 4).map(([c, n]) => `${c} (${n})`).join(", ");
    return el("tr", {},
      el("th", {scope: "row"}, d.name, el("small", {text: d.id})),
      el("td", {text: d.kind}),
      el("td", {class: "num", text: String(d.num_records)}),
      el("td", {class: "num", text: typeof stats.safe_ratio === "number" ? (100 * stats.safe_ratio).toFixed(1) + " %" : "—"}),
      el("td", {text: harms || "—"}));
  }));
  if (!page.data.length) body.append(el("tr", {}, el("td", {colspan: "5", class: "empty", text: "No datasets yet."})));
}

async function loadRounds() {
  const page = await api("GET", "/v1/rounds?limit=50");
  const models = new Map();  // model id → the model (name, job, metrics), each read once
  const model = async (id) => {
    if (!id) return null;
    if (!models.has(id)) models.set(id, api("GET", "/v1/models/" + encodeURIComponent(id)).catch(() => null));
    return models.get(id);
  };
  // v0 → v1 → v2 …: oldest first
  const rounds = page.data.slice().sort((a, b) => a.name.localeCompare(b.name, undefined, {numeric: true}));
  const rows = await Promise.all(rounds.map(async (r) => {
    const [policy, reward, cost] = await Promise.all([model(r.policy_model_id), model(r.reward_model_id), model(r.cost_model_id)]);
    // The round's own metrics (its evaluation), else the final metrics of the job that made its policy; numbers only.
    const metrics = Object.entries(Object.keys(r.metrics || {}).length ? r.metrics : (policy && policy.metrics) || {})
      .filter(([, v]) => typeof v === "number").slice(0, 6);
    const job = policy && policy.job_id;
    return el("tr", {},
      el("th", {scope: "row", text: r.name}),
      el("td", {text: policy ? policy.name : "—"}),
      el("td", {text: reward ? reward.name : "—"}),
      el("td", {text: cost ? cost.name : "—"}),
      el("td", {}, job ? el("a", {href: "#runs/" + encodeURIComponent(job), text: job}) : "—"),
      el("td", {class: "metrics"}, ...metrics.map(([k, v]) => el("span", {text: `${k} ${number(v)}`}))));
  }));
  const body = $("rounds-body");
  if (!body) return;
  body.replaceChildren(...rows);
  if (!rows.length) body.append(el("tr", {}, el("td", {colspan: "6", class: "empty", text: "No rounds yet."})));
}

// --- one job -----------------------------------------------------------------------------------

function showJob(jobId) {
  state.job = null;
  state.events = [];
  state.lastEvent = 0;
  state.filesFor = null;
  $("runs-view").replaceChildren(
    el("p", {}, el("a", {href: "#runs", text: "← All runs"})),
    el("p", {id: "runs-status", class: "runs-note", role: "status"}),
    el("section", {id: "job-head", "aria-label": "Job"}),
    el("section", {"aria-labelledby": "charts-title"}, el("h2", {id: "charts-title", text: "Curves"}),
       el("p", {id: "charts-empty", class: "runs-note", text: "No curves yet: they appear with the job's first steps."}),
       el("div", {id: "charts", class: "charts"})),
    el("section", {"aria-labelledby": "files-title"}, el("h2", {id: "files-title", text: "Files"}),
       el("div", {id: "files", class: "files"})),
    el("section", {"aria-labelledby": "params-title"}, el("h2", {id: "params-title", text: "Params"}),
       el("pre", {id: "params", class: "params"})),
    el("section", {"aria-labelledby": "events-title"}, el("h2", {id: "events-title", text: "Events"}),
       el("ol", {id: "events", class: "events"})));
  every(async () => {
    const job = await api("GET", "/v1/jobs/" + encodeURIComponent(jobId));
    let more = true;
    while (more) {  // every event since the last poll
      const page = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}/events?limit=500&after=${state.lastEvent}`);
      state.events.push(...page.data);
      if (page.data.length) state.lastEvent = page.data[page.data.length - 1].id;
      appendEvents(page.data);
      more = page.has_more && page.data.length > 0;
    }
    state.job = job;
    renderHead(job);
    renderCharts(job);
    if (state.filesFor !== job.status) {
      state.filesFor = job.status;
      renderFiles(job).catch((e) => note(e.message, true));
    }
    note("");
    return !TERMINAL.includes(job.status);  // a finished job's events are all read: stop polling
  });
}

function renderHead(job) {
  const head = $("job-head");
  const facts = [
    ["Status", statusBadge(job.status)],
    ["Progress", progressBar(job.progress)],
    ["ETA", duration(job.progress && job.progress.eta_seconds)],
    ["Attempt", String(job.attempt)],
    ["Created by", job.created_by || "—"],
    ["Created", when(job.created_at)],
    ["Started", when(job.started_at)],
    ["Finished", when(job.finished_at)],
    ["Datasets", job.datasets.join(", ") || "—"],
    ["Models made", job.result_models.join(", ") || "—"],
  ];
  const title = el("div", {class: "job-title"}, el("h2", {text: `${job.type} · ${job.id}`}));
  if (staff() && !TERMINAL.includes(job.status)) {
    const cancel = el("button", {type: "button", id: "cancel-job", class: "danger", text: "Cancel"});
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        renderHead(await api("POST", `/v1/jobs/${encodeURIComponent(job.id)}/cancel`));
        note("Cancel requested: the job stops within seconds.");
      } catch (e) {
        cancel.disabled = false;
        note(e.message, true);
      }
    });
    title.append(cancel);
  }
  head.replaceChildren(title,
    el("dl", {class: "facts"}, ...facts.map(([k, v]) => el("div", {}, el("dt", {text: k}), el("dd", {}, v)))));
  if (job.error) {
    head.append(el("p", {class: "job-error", role: "alert"}, el("strong", {text: job.error.code}), ": " + job.error.message));
  }
  $("params").textContent = JSON.stringify(job.params, null, 2);
}

// Each chart's series from the events: x = the step, one line per metric (the newest value at a step
// wins: a re-run attempt draws over the old one).
function seriesOf(chart) {
  const values = new Map();  // metric → Map(step → value)
  for (const e of state.events) {
    const data = e.data || {};
    if (typeof data.step !== "number") continue;
    for (const [k, v] of Object.entries(data)) {
      if (typeof v !== "number" || !chart.keys(k)) continue;
      if (!values.has(k)) values.set(k, new Map());
      values.get(k).set(data.step, v);
    }
  }
  // Several constraints: λ and J̄_C per constraint, and the sum of the λ_k.
  const perConstraint = [...values.keys()].some((k) => /^(lagrange\/lambda|train\/episode_cost)\//.test(k));
  const names = [...values.keys()].sort();
  const label = (k) => k === "lagrange/lambda" && perConstraint ? "Σ λ_k" : k;
  return {values, names, label};
}

function thresholds(job) {
  const p = job.params || {};
  if (Array.isArray(p.cost_models) && p.cost_models.length) {
    return p.cost_models.map((c) => [`d (${c.name})`, c.threshold]).filter(([, d]) => typeof d === "number");
  }
  return typeof p.threshold === "number" ? [["d", p.threshold]] : [];
}

function renderCharts(job) {
  const box = $("charts");
  let shown = 0;
  for (const chart of CHARTS) {
    const {values, names, label} = seriesOf(chart);
    if (!names.length) continue;
    shown++;
    const steps = [...new Set(names.flatMap((k) => [...values.get(k).keys()]))].sort((a, b) => a - b);
    const data = [steps, ...names.map((k) => steps.map((s) => values.get(k).has(s) ? values.get(k).get(s) : null))];
    const lines = names.map(label);
    if (chart.thresholds) {
      for (const [name, d] of thresholds(job)) {
        lines.push(name);
        data.push(steps.map(() => d));
      }
    }
    let entry = state.charts.get(chart.id);
    if (entry && entry.lines.join("|") !== lines.join("|")) {  // a new line (e.g. an eval loss): draw it anew
      entry.plot.destroy();
      entry.card.remove();
      entry = null;
    }
    if (!entry) {
      const card = el("figure", {class: "chart", id: "chart-" + chart.id, "data-chart": chart.id});
      box.append(card);
      const plot = new uPlot({
        title: chart.title, width: Math.max(card.clientWidth - 8, 260), height: 200,
        scales: {x: {time: false}},
        axes: [{label: "step", incrs: STEP_INCREMENTS}, {}],
        series: [{label: "step"}, ...lines.map((name, i) => ({
          label: name, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
          dash: name.startsWith("d") && chart.thresholds && i >= names.length ? [6, 4] : undefined,
          points: {show: steps.length < 40},
        }))],
      }, data, card);
      entry = {plot, card, lines};
      state.charts.set(chart.id, entry);
    } else {
      entry.plot.setData(data);
    }
    entry.card.dataset.points = String(entry.plot.data[0].length);  // the steps the chart draws (read by the tests)
  }
  $("charts-empty").hidden = shown > 0;
}

window.addEventListener("resize", () => {
  for (const {plot, card} of state.charts.values()) plot.setSize({width: Math.max(card.clientWidth - 8, 260), height: 200});
});

async function renderFiles(job) {
  const page = await api("GET", `/v1/jobs/${encodeURIComponent(job.id)}/files`);
  const box = $("files");
  if (!box) return;
  box.replaceChildren();
  if (!page.data.length) box.append(el("p", {class: "runs-note", text: "No files yet."}));
  for (const file of page.data) {
    const path = `/v1/jobs/${encodeURIComponent(job.id)}/files/${file.name.split("/").map(encodeURIComponent).join("/")}`;
    if (file.content_type.startsWith("image/")) {
      const img = el("img", {alt: file.name});
      box.append(el("figure", {class: "plot"}, img, el("figcaption", {text: file.name})));
      blobUrl(path).then((url) => { img.src = url; }).catch((e) => note(e.message, true));
    } else {
      const link = el("a", {href: "#", class: "file", text: `${file.name} (${file.bytes} bytes)`});
      link.addEventListener("click", async (event) => {  // the file needs the key: fetched, then saved
        event.preventDefault();
        try {
          const a = el("a", {href: await blobUrl(path), download: file.name.split("/").pop()});
          a.click();
        } catch (e) {
          note(e.message, true);
        }
      });
      box.append(link);
    }
  }
}

function appendEvents(events) {
  const list = $("events");
  if (!list) return;
  for (const e of events) {
    const item = el("li", {class: "event " + e.level},
      el("time", {datetime: new Date(e.created_at * 1000).toISOString(), text: new Date(e.created_at * 1000).toLocaleTimeString()}),
      el("span", {class: "level", text: e.level}),
      el("span", {class: "message", text: e.message}));
    if (e.data && e.data.traceback) item.append(el("details", {}, el("summary", {text: "traceback"}), el("pre", {text: e.data.traceback})));
    list.append(item);
  }
}

// --- wiring ------------------------------------------------------------------------------------

window.addEventListener("hashchange", show);
$("key-form").addEventListener("submit", () => { if (route()) show(); });
show();
