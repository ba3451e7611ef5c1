// The dashboard's script: fills the server-rendered pages from the coordinator's /v1 JSON API
// and keeps them live with its server-sent event streams (the session cookie authenticates
// both). Every action here is one /v1 call, the same one orchctl makes.
"use strict";

const CSRF = { "X-Orch-Dashboard": "1" };
const PAGE = document.body.dataset.page;
const $ = (sel, root = document) => root.querySelector(sel);
// The names below are the coordinator's (Rust enums on the wire); a coordinator unit test
// (web::tests) checks that they stay equal to the Rust lists.
const ROLE_ORDER = ["analyst", "planner", "builder", "integrator", "tester", "reviewer", "documenter", "custom"];
const EVENT_KINDS = ["task_created", "task_planned", "job_waiting", "job_queued", "job_skipped", "job_retrying", "job_cancelled", "job_dead_lettered", "job_started", "thinking", "text", "tool_call", "tool_result", "mcp_server", "sandbox_refused", "approval_requested", "approval_answered", "usage", "compacted", "heartbeat", "checkpointed", "resumed", "resume_failed", "job_finished", "pr_opened", "pr_ready", "pr_failed", "pr_reviewed", "pr_escalated", "task_finished", "job_parked", "conflict_warning", "checkpoint_skipped"];
// The statuses after which a task or an agent changes no more.
const TASK_ENDED = ["completed", "failed", "cancelled"];
const JOB_ENDED = ["succeeded", "failed", "skipped", "cancelled"];
// A git-branch mark (no font has one everywhere): forks and branches.
const ICON_BRANCH = `<svg class="ico" viewBox="0 0 16 16" aria-hidden="true"><circle cx="4.5" cy="3.5" r="1.7"/><circle cx="4.5" cy="12.5" r="1.7"/><circle cx="11.5" cy="5" r="1.7"/><path d="M4.5 5.2v5.6M11.5 6.7c0 2.6-7 2-7 4.1"/></svg>`;
const PALETTE = ["#6366f1", "#22c55e", "#f59e0b", "#ef4444", "#06b6d4", "#a855f7", "#ec4899", "#84cc16", "#64748b"];

// ----- formatting -------------------------------------------------------------------------

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function usd(v) {
  v = Number(v || 0);
  if (v === 0) return "$0.00";
  if (v < 0.01) return "$" + v.toFixed(4);
  return "$" + v.toFixed(2);
}
function tokens(n) {
  n = Number(n || 0);
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(0) + "k";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + "k";
  return String(n);
}
function bytes(n) {
  n = Number(n || 0);
  if (n >= 1024 * 1024) return (n / (1024 * 1024)).toFixed(1) + " MiB";
  if (n >= 1024) return (n / 1024).toFixed(1) + " KiB";
  return n + " B";
}
function totalTokens(u) {
  return u ? (u.input_tokens || 0) + (u.output_tokens || 0) + (u.cache_creation_tokens || 0) + (u.cache_read_tokens || 0) : 0;
}
function dur(ms) {
  if (ms == null || ms < 0) return "–";
  const s = Math.floor(ms / 1000);
  if (s < 1) return ms + "ms";
  if (s < 60) return s + "s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m " + String(s % 60).padStart(2, "0") + "s";
  const h = Math.floor(m / 60);
  return h + "h " + String(m % 60).padStart(2, "0") + "m";
}
function ago(ms) {
  if (!ms) return "–";
  const d = Date.now() - ms;
  if (d < 60e3) return "just now";
  if (d < 3600e3) return Math.floor(d / 60e3) + " min ago";
  if (d < 86400e3) return Math.floor(d / 3600e3) + " h ago";
  return new Date(ms).toLocaleDateString();
}
function when(ms) {
  return ms ? new Date(ms).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }) : "–";
}
function clock(ms) {
  return ms ? new Date(ms).toLocaleTimeString([], { hour12: false }) : "";
}
// A warning badge on an agent that overlapping edits of another running agent were seen for.
function conflictBadge(t, j) {
  const mine = ((t && t.conflicts) || []).filter((w) => w.job === j.id || w.other === j.id);
  if (!mine.length) return "";
  const paths = [...new Set(mine.flatMap((w) => w.paths))];
  return ` <span class="badge s-failed conflict" title="Overlapping edits with another running agent: ${esc(paths.join(", "))}">conflict: ${esc(paths.slice(0, 3).join(", "))}${paths.length > 3 ? "…" : ""}</span>`;
}

function badge(status) {
  return `<span class="badge s-${esc(status)}">${esc(status)}</span>`;
}
// Why a job is parked and until when: the approval request, or the credential's reset.
function parkedText(p) {
  if (!p) return "parked";
  const what = p.approval ? `waiting for a person to answer request ${p.approval}` : `usage limit of ${p.credential || "its credentials"}`;
  return `${what}, runs again by ${clock(p.until_ms)}`;
}
function short(id) {
  return String(id || "").slice(-8);
}
function elapsed(start, end) {
  return start ? dur((end || Date.now()) - start) : "–";
}

// ----- API --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

async function api(path, opts = {}) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json" } };
  if (opts.method) init.method = opts.method;
  if (opts.body !== undefined) {
    init.body = JSON.stringify(opts.body);
    init.headers["Content-Type"] = "application/json";
  }
  if (init.method && init.method !== "GET") Object.assign(init.headers, CSRF);
  const r = await fetch(path, init);
  if (r.status === 401) {
    location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
    throw new ApiError("signed out");
  }
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = text;
  }
  if (!r.ok) throw new ApiError((data && data.message) || `${r.status} ${r.statusText}`, r.status);
  return data;
}

function toast(msg, bad = false) {
  const t = $("#toast");
  if (!t) return;
  t.textContent = msg;
  t.className = "show" + (bad ? " bad" : "");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.className = ""), 4000);
}

// Runs `fn` at most once per `ms`, always after the latest call (trailing edge).
function throttle(fn, ms) {
  let timer = null;
  let again = false;
  return function run() {
    if (timer) {
      again = true;
      return;
    }
    fn();
    timer = setTimeout(() => {
      timer = null;
      if (again) {
        again = false;
        run();
      }
    }, ms);
  };
}

// An EventSource with the header's live indicator; the browser resumes it with Last-Event-ID.
// `isDone` says whether a stream the server ended has nothing more to say (else it resumes).
function stream(url, handlers, onAny, isDone) {
  const live = $("#live");
  if (live) live.hidden = false;
  const set = (state, text) => {
    if (!live) return;
    live.dataset.state = state;
    live.lastElementChild.textContent = text;
  };
  const es = new EventSource(url, { withCredentials: true });
  es.onopen = () => set("live", "Live");
  es.onerror = () => (isDone && isDone() ? es.finish() : set(es.readyState === EventSource.CLOSED ? "off" : "connecting", es.readyState === EventSource.CLOSED ? "Offline" : "Connecting…"));
  for (const k of EVENT_KINDS) {
    es.addEventListener(k, (m) => {
      let ev;
      try {
        ev = JSON.parse(m.data);
      } catch (_) {
        return;
      }
      if (handlers && handlers[k]) handlers[k](ev, m);
      if (onAny) onAny(ev, m);
    });
  }
  es.finish = (text = "Up to date") => {
    es.close();
    set("live", text);
  };
  return es;
}

function describe(ev) {
  const k = ev.kind || {};
  switch (k.type) {
    case "task_created": return `Task created: ${k.steps.length} step(s), ${esc(k.mode)}`;
    case "task_planned":
      if (k.source === "send") return `Message sent: <span class="role">${esc(k.steps[0]?.role)}</span> takes a new turn`;
      if (k.source === "fork") return `Forked: <span class="role">${esc(k.steps[0]?.role)}</span> starts a new conversation`;
      return `Planned by ${esc(k.source)}: ${k.steps.length} step(s)` + (k.rejected ? ` — planner's plan rejected: ${esc(k.rejected)}` : "");
    case "job_waiting": return `Waiting: ${esc(k.reason)}`;
    case "job_parked": return `Parked (${parkedText(k.parked)}): holds no worker`;
    case "job_queued": return `<span class="role">${esc(k.role)}</span> queued (step ${k.step})`;
    case "job_skipped": return `Step skipped: ${esc(k.reason)}`;
    case "job_retrying": return `Retrying (attempt ${k.next_attempt}) after ${esc(k.reason)}: ${esc(k.message)}`;
    case "job_cancelled": return `Agent cancelled: ${esc(k.reason)}`;
    case "job_dead_lettered": return `Dead-lettered: ${esc(k.reason)}`;
    case "job_started": return `<span class="role">${esc(k.role)}</span> started on ${esc(k.worker_id)} (${esc(k.backend)})`;
    case "thinking": return "Thinking…";
    case "text": return "Text: " + esc(String(k.text).slice(0, 140));
    case "tool_call": return `Tool <b>${esc(k.name)}</b>`;
    case "tool_result": return k.is_error ? "Tool error" : "Tool result";
    case "mcp_server": return k.error == null ? `MCP server <b>${esc(k.server)}</b>: ${k.tools} tool(s)` : `MCP server <b>${esc(k.server)}</b> failed`;
    case "sandbox_refused": return `Sandbox refused ${esc(k.target)}`;
    case "usage": return `Usage: ${tokens(totalTokens(k.usage))} tokens, ${usd(k.cost_usd)}`;
    case "compacted": return `Context compacted: ${tokens(k.tokens_before)} → ${k.tokens_after == null ? "?" : tokens(k.tokens_after)} tokens`;
    case "heartbeat": return "Heartbeat";
    case "checkpointed": return `Checkpoint after step ${k.step}: ${k.files_changed} file(s) changed, ${tokens(totalTokens(k.usage))} tokens so far`;
    case "resumed": if (k.from_agent) return `Rewound: started from the checkpoint after step ${k.from_step} of agent ${esc(short(k.from_agent))}`;
      return `Resumed after step ${k.from_step} of attempt ${k.from_attempt} (left by ${esc(k.from_worker)}, which had spent ${tokens(totalTokens(k.usage))} tokens)` + (k.files_not_restored ? `; files not restored: ${esc(k.files_not_restored)}` : "");
    case "resume_failed": return `Checkpoint not restored, starting over: ${esc(k.reason)}`;
    case "checkpoint_skipped": return `Not checkpointed: the workspace takes ${bytes(k.tree_bytes)}, over the bound of ${bytes(k.bound_bytes)} (a restart would start over)`;
    case "pr_opened": return `Pull request <a href="${esc(k.url)}">#${k.number}</a> open${k.draft ? " as a draft" : ""}`;
    case "pr_ready": return `Pull request #${k.number} ready for review`;
    case "pr_failed": return `Pull request not opened: ${esc(k.reason)}`;
    case "pr_reviewed": return `Review round ${k.round}: ${k.comments} comment(s) sent to ${k.agents.length} agent(s)`;
    case "pr_escalated": return `<b>Review loop stopped, a person is needed:</b> ${esc(k.reason)}`;
    case "conflict_warning": return `<b>Conflict warning:</b> ${k.kind === "same_file" ? "also changed by" : "inside the scope of"} ${esc(k.other_role)} ${esc(short(k.other))}: <span class="mono">${esc(k.paths.join(", "))}</span>`;
    case "job_finished": return (k.success ? "Agent finished" : `Agent failed (${esc(k.reason)}): ${esc(k.message || "")}`) + ` in ${dur(k.duration_ms)}, ${usd(k.cost_usd)}`;
    case "task_finished": return `Task ${esc(k.status)} in ${dur(k.duration_ms)}, ${usd(k.cost_usd)}`;
    default: return esc(k.type);
  }
}

function table(cols, rows, empty = "Nothing here yet.") {
  if (!rows.length) return `<p class="empty">${esc(empty)}</p>`;
  const head = cols.map((c) => `<th class="${c.num ? "num" : ""}">${esc(c.label)}</th>`).join("");
  const body = rows.map((r) => "<tr>" + cols.map((c) => `<td class="${c.num ? "num" : ""} ${c.cls || ""}">${c.cell(r)}</td>`).join("") + "</tr>").join("");
  return `<div class="table-wrap"><table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table></div>`;
}

function kpi(label, value, sub = "") {
  return `<div class="kpi"><span class="kpi-label">${esc(label)}</span><span class="kpi-value">${value}</span><span class="kpi-sub">${sub}</span></div>`;
}

// ----- theme ------------------------------------------------------------------------------

function initTheme() {
  const btn = $("#theme");
  if (!btn) return;
  btn.addEventListener("click", () => {
    const cur = document.documentElement.dataset.theme || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light");
    const next = cur === "dark" ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    try {
      localStorage.setItem("orch-theme", next);
    } catch (_) {}
  });
}

// ----- overview ---------------------------------------------------------------------------

// The day's settled spend (what the daily budget counts) against the budget, with a bar.
function spendKpi(today) {
  const spent = today.spent_usd || 0;
  const budget = today.budget_usd;
  const kpiEl = $("#k-spend").closest(".kpi");
  const tasksLine = `${today.tasks} task(s), ${tokens(totalTokens(today.usage))} tokens since midnight UTC`;
  if (budget == null) {
    $("#k-spend").textContent = usd(spent);
    $("#k-spend-sub").innerHTML = `<span class="no-budget">no daily budget</span> · ${esc(tasksLine)}`;
    kpiEl.dataset.level = "none";
    kpiEl.title = `spent today ${usd(spent)} · no daily budget`;
    return;
  }
  const pct = budget > 0 ? (100 * spent) / budget : 100;
  const held = budget > 0 ? (100 * (today.reserved_usd || 0)) / budget : 0;
  const level = pct >= 100 ? "over" : pct >= 80 ? "high" : "ok";
  $("#k-spend").innerHTML = `${usd(spent)} <span class="muted">of ${usd(budget)}</span>`;
  const reserved = today.reserved_usd > 0 ? ` · ${usd(today.reserved_usd)} reserved` : "";
  $("#k-spend-sub").innerHTML = `<div class="meter budget" role="meter" aria-valuemin="0" aria-valuemax="${budget}" aria-valuenow="${spent}" aria-label="spent today ${usd(spent)} of ${usd(budget)}"><span style="width:${spent > 0 ? `max(3px, ${Math.min(100, pct)}%)` : "0"}"></span><span class="held" style="width:${Math.max(0, Math.min(100 - Math.min(100, pct), held))}%"></span></div>` +
    `<span>${pct < 1 && pct > 0 ? "&lt;1" : Math.round(pct)}% of the daily budget${level === "over" ? " · new agents wait" : ""}${reserved}</span>`;
  kpiEl.dataset.level = level;
  kpiEl.title = `spent today ${usd(spent)} of ${usd(budget)} daily budget` + (level === "over" ? ": new agents wait until midnight UTC" : "");
}

// ----- "needs you": requests of agents waiting for a person ----------------------------------

// A pattern to offer for "Always allow…", from the request's command or path: the command's
// first words then `*`, or the path's folder then `*`. The person edits it before it is sent.
function suggestPattern(a) {
  const s = (a.summary || "").trim();
  const words = s.split(/\s+/).filter(Boolean);
  if (words.length > 2) return `${words[0]} ${words[1]} *`;
  if (words.length === 2) return `${words[0]} *`;
  const slash = s.lastIndexOf("/");
  return slash > 0 ? s.slice(0, slash + 1) + "*" : s || "*";
}

// What the tool would do, shown in full: the command, the edit as removed and added lines, or
// the path; the whole input stays one click away.
function approvalDetail(a) {
  let input = null;
  try {
    input = JSON.parse(a.input);
  } catch (_) {
    // Shortened inputs are not valid JSON: the summary and the raw text still show.
  }
  const lines = (text, cls, sign) => String(text).split("\n").map((l) => `<span class="${cls}"><span class="sign" aria-hidden="true">${sign}</span>${esc(l)}</span>`).join("");
  let body;
  if (input && typeof input === "object" && (input.old_string != null || input.new_string != null || input.content != null)) {
    const path = input.file_path || input.path || a.summary;
    const removed = input.old_string != null ? lines(input.old_string, "d-del", "-") : "";
    const added = lines(input.new_string != null ? input.new_string : input.content, "d-add", "+");
    body = `<div class="mono small approval-path">${esc(path)}</div><pre class="mono small approval-diff" aria-label="the change to ${esc(path)}">${removed}${added}</pre>`;
  } else {
    body = `<pre class="mono small approval-cmd">${esc(a.summary)}</pre>`;
  }
  return body + `<details><summary>Whole input</summary><pre class="mono small">${esc(a.input)}</pre></details>`;
}

function approvalCard(a, now, draft) {
  const id = esc(a.id);
  return `<article class="approval" data-approval="${id}" aria-labelledby="ap-${id}">
    <div class="approval-head">
      <h3 id="ap-${id}"><span class="mono">${esc(a.tool)}</span> <span class="muted">asked by</span> <a class="mono" href="/agents/${esc(a.job_id)}">${short(a.job_id)}</a> <span class="role">${esc(a.role)}</span></h3>
      <span class="muted small">task <a class="mono" href="/tasks/${esc(a.task_id)}">${short(a.task_id)}</a> · denied in <span data-deadline="${a.deadline_ms}">${Math.max(0, Math.round((a.deadline_ms - now) / 1000))}s</span></span>
    </div>
    ${approvalDetail(a)}
    <label class="approval-message">Message to the agent (optional)
      <input type="text" maxlength="4000" data-message="${id}" value="${esc(draft.message || "")}" placeholder="why, or what to do instead">
    </label>
    <div class="approval-actions" role="group" aria-label="answer">
      <button class="btn sm primary" data-approve="${id}">Approve</button>
      <button class="btn sm" data-approve-task="${id}" title="also allow ${esc(a.tool)} on this same input for the rest of the task">Approve for this task</button>
      <button class="btn sm" data-always-open="${id}" aria-expanded="${draft.always ? "true" : "false"}" aria-controls="ap-always-${id}">Always allow…</button>
      <button class="btn sm danger" data-deny="${id}">Deny</button>
    </div>
    <form class="approval-always" id="ap-always-${id}" data-always="${id}" ${draft.always ? "" : "hidden"}>
      <label><span>Always allow, for every task: <span class="mono">${esc(a.tool)}(pattern)</span>, where <code>*</code> matches anything</span>
        <input type="text" class="mono" maxlength="500" required data-pattern="${id}" value="${esc(draft.pattern ?? suggestPattern(a))}">
      </label>
      <button class="btn sm primary" type="submit">Allow always</button>
      <button class="btn sm" type="button" data-always-cancel="${id}">Cancel</button>
    </form>
  </article>`;
}

// The "Needs you" panel. Typing in a card survives the page's refreshes: the cards are rebuilt
// only when the set of pending requests changes, from the drafts kept here.
function approvalsPanel(onAnswered) {
  const list = $("#approval-list");
  const errorEl = $("#approval-error");
  const drafts = new Map(); // request id -> {message, pattern, always}
  let shown = null;
  let pending = new Map();
  const draft = (id) => {
    if (!drafts.has(id)) drafts.set(id, {});
    return drafts.get(id);
  };
  const showError = (m) => {
    errorEl.textContent = m;
    errorEl.hidden = !m;
  };

  const render = (approvals) => {
    const waiting = approvals.approvals.filter((a) => a.state === "pending");
    pending = new Map(waiting.map((a) => [a.id, a]));
    const key = waiting.map((a) => a.id).join(",");
    if (key === shown) {
      list.querySelectorAll("[data-deadline]").forEach((el) => {
        el.textContent = `${Math.max(0, Math.round((Number(el.dataset.deadline) - approvals.now_ms) / 1000))}s`;
      });
      return;
    }
    shown = key;
    for (const id of [...drafts.keys()]) if (!pending.has(id)) drafts.delete(id);
    list.innerHTML = waiting.length
      ? waiting.map((a) => approvalCard(a, approvals.now_ms, draft(a.id))).join("")
      : `<p class="empty">No agent is waiting for you.</p>`;
  };

  const answer = async (id, body, done, button) => {
    const a = pending.get(id);
    const message = draft(id).message;
    if (message && message.trim()) body.message = message.trim();
    const card = button.closest(".approval");
    card.querySelectorAll("button").forEach((b) => (b.disabled = true));
    try {
      await api(`/v1/approvals/${id}`, { method: "POST", body });
      showError("");
      toast(done);
    } catch (err) {
      const what = a ? `${a.tool} ${a.summary}` : id;
      const why = err.status === 409 ? "someone answered it first, or its deadline passed" : err.status === 404 ? "it is gone" : "";
      showError(`Could not answer “${what}”: ${err.message}${why ? ` (${why})` : ""}`);
      card.querySelectorAll("button").forEach((b) => (b.disabled = false));
    }
    onAnswered();
  };

  list.addEventListener("input", (e) => {
    const t = e.target;
    if (t.dataset.message) draft(t.dataset.message).message = t.value;
    if (t.dataset.pattern) draft(t.dataset.pattern).pattern = t.value;
  });
  list.addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) return;
    const d = b.dataset;
    if (d.approve) answer(d.approve, { decision: "approve" }, "Approved", b);
    else if (d.approveTask) answer(d.approveTask, { decision: "approve", scope: "task" }, "Approved for this task", b);
    else if (d.deny) answer(d.deny, { decision: "deny" }, "Denied", b);
    else if (d.alwaysOpen || d.alwaysCancel) {
      const id = d.alwaysOpen || d.alwaysCancel;
      const open = !!d.alwaysOpen && !draft(id).always;
      draft(id).always = open;
      const form = list.querySelector(`#ap-always-${CSS.escape(id)}`);
      form.hidden = !open;
      list.querySelector(`[data-always-open="${CSS.escape(id)}"]`).setAttribute("aria-expanded", String(open));
      if (open) form.querySelector("input").focus();
    }
  });
  list.addEventListener("submit", (e) => {
    e.preventDefault();
    const id = e.target.dataset.always;
    const input = e.target.querySelector("[data-pattern]");
    const pattern = input.value.trim();
    if (!pattern) {
      showError("Always allow: enter a pattern (`*` matches anything).");
      input.focus();
      return;
    }
    answer(id, { decision: "approve", scope: "always", pattern }, `Always allowed: ${pending.get(id)?.tool || ""}(${pattern})`, e.target.querySelector("button"));
  });
  return render;
}

function overviewPage() {
  const activity = new Map(); // job id -> {text, usage, cost}
  let agents = [];

  const renderAgents = () => {
    const el = $("#agents");
    if (!agents.length) {
      el.innerHTML = `<p class="empty">No agent is running. <a href="/tasks/new">Start a task</a>.</p>`;
      return;
    }
    el.innerHTML = agents.map((a) => {
      const live = activity.get(a.id) || {};
      const used = live.usage || a.usage;
      const cost = live.cost != null ? live.cost : a.cost_usd;
      const act = a.status === "running" ? live.text || "working…" : a.status === "retrying" ? "waiting to retry" : a.status === "parked" ? "parked: " + parkedText(a.parked) : "waiting for a worker";
      return `<a class="agent-card" href="/agents/${esc(a.id)}" data-agent="${esc(a.id)}">
        <div class="top-line"><span class="role">${esc(a.role)}</span>${badge(a.status)}</div>
        <div class="task" title="${esc(a.task_prompt)}">${esc(a.task_prompt)}</div>
        <div class="activity">${esc(act)}</div>
        <div class="stats"><span data-start="${a.started_at_ms || ""}">${elapsed(a.started_at_ms)}</span><span>${tokens(totalTokens(used))} tok</span><span>${usd(cost)}</span></div>
      </a>`;
    }).join("");
  };

  const load = async () => {
    const [st, recent, dlq, quotas, approvals] = await Promise.all([api("/v1/status"), api("/v1/tasks?limit=8"), api("/v1/dlq"), api("/v1/quotas"), api("/v1/approvals")]);
    renderApprovals(approvals);
    const idle = st.workers.filter((w) => w.busy === 0).length;
    $("#k-workers").textContent = st.workers.length;
    $("#k-slots").innerHTML = `${st.slots_busy} of ${st.slots_total} slots busy · ${idle} idle` + `<div class="meter"><span style="width:${st.slots_total ? (100 * st.slots_busy) / st.slots_total : 0}%"></span></div>`;
    const running = st.active_agents.filter((a) => a.status === "running").length;
    $("#k-agents").textContent = running;
    $("#k-tasks").textContent = `${st.active_tasks} active task(s)`;
    $("#k-queue").textContent = st.queue ? st.queue.pending : "?";
    $("#k-inflight").textContent = st.queue ? `${st.queue.in_flight} in flight · ${st.queue.redelivered} redelivered` : "JetStream did not answer";
    $("#k-dlq").textContent = st.dead_letters;
    spendKpi(st.cost_today);

    agents = st.active_agents;
    renderAgents();

    $("#workers").innerHTML = st.workers.length
      ? st.workers.map((w) => `<div class="worker"><span class="name mono">${esc(w.id)}</span>
          <span class="slots" title="${w.busy} busy of ${w.slots}">${Array.from({ length: w.slots }, (_, i) => `<i class="${i < w.busy ? "busy" : ""}"></i>`).join("")}</span>
          <span class="muted small">${w.busy}/${w.slots} busy · ${esc(w.host)} · v${esc(w.version)} · seen ${Math.max(0, Math.round((st.now_ms - w.last_seen_ms) / 1000))}s ago</span></div>`).join("")
      : `<p class="empty">No worker is registered. Start one with <code>orch-worker</code> or <code>orchctl local up</code>.</p>`;

    $("#recent").innerHTML = table([
      { label: "Task", cls: "desc", cell: (t) => `<a href="/tasks/${esc(t.id)}" title="${esc(t.prompt)}">${esc(t.prompt)}</a>` },
      { label: "Status", cell: (t) => badge(t.status) },
      { label: "Steps", num: true, cell: (t) => `${t.jobs_done}/${t.roles.length}` },
      { label: "Cost", num: true, cell: (t) => usd(t.cost_usd) },
      { label: "Created", num: true, cell: (t) => ago(t.created_at_ms) },
    ], recent.tasks, "No task yet.");

    // Credential pools as the limit broker knows them: names only, never keys.
    const left = (rem, lim) => (lim == null ? "–" : `${rem ?? "?"}/${lim}`);
    $("#quota-list").innerHTML = table([
      { label: "Credential", cell: (q) => `<span class="mono">${esc(q.backend)}/${esc(q.name)}</span>` },
      { label: "State", cell: (q) => `<span class="badge s-${q.state === "exhausted" ? "failed" : "succeeded"}">${esc(q.state)}</span>` },
      { label: "Resets in", num: true, cell: (q) => (q.until_ms ? `${Math.max(0, Math.round((q.until_ms - quotas.now_ms) / 1000))}s` : "–") },
      { label: "Requests left", num: true, cell: (q) => left(q.requests_remaining, q.requests_limit) },
      { label: "Tokens left", num: true, cell: (q) => left(q.tokens_remaining, q.tokens_limit) },
      { label: "Parked jobs", num: true, cell: (q) => String(q.parked) },
      { label: "Last limit", cls: "desc", cell: (q) => esc(q.reason || "–") },
    ], quotas.credentials, "No credential pool is registered (workers with API keys register theirs).");

    $("#dead").innerHTML = table([
      { label: "Agent", cell: (d) => `<a class="mono" href="/agents/${esc(d.job_id)}">${short(d.job_id)}</a> <span class="role">${esc(d.role)}</span>` },
      { label: "Task", cell: (d) => `<a class="mono" href="/tasks/${esc(d.task_id)}">${short(d.task_id)}</a>` },
      { label: "Error", cls: "desc", cell: (d) => d.error ? `${esc(d.error.reason)}: ${esc(d.error.message)}` : "–" },
      { label: "Attempts", num: true, cell: (d) => d.attempt },
      { label: "When", num: true, cell: (d) => ago(d.dead_at_ms) },
      { label: "", num: true, cell: (d) => `<button class="btn sm" data-retry="${esc(d.job_id)}">Retry</button>` },
    ], dlq.jobs, "No dead letters: every failed job was retried or none failed.");
  };

  const refresh = throttle(() => load().catch((e) => toast(e.message, true)), 800);
  const renderApprovals = approvalsPanel(() => refresh());
  $("#dead").addEventListener("click", async (e) => {
    const id = e.target.dataset.retry;
    if (!id) return;
    e.target.disabled = true;
    try {
      await api(`/v1/dlq/${id}/retry`, { method: "POST" });
      toast("Retry queued");
    } catch (err) {
      toast(err.message, true);
    }
    refresh();
  });
  stream("/v1/events?max_chars=200", {
    thinking: (ev) => activity.set(ev.job_id, { ...activity.get(ev.job_id), text: "thinking…" }),
    tool_call: (ev) => activity.set(ev.job_id, { ...activity.get(ev.job_id), text: "⚙ " + ev.kind.name }),
    text: (ev) => activity.set(ev.job_id, { ...activity.get(ev.job_id), text: "✎ " + ev.kind.text }),
    usage: (ev) => activity.set(ev.job_id, { ...activity.get(ev.job_id), usage: ev.kind.usage, cost: ev.kind.cost_usd }),
  }, (ev) => {
    if (["thinking", "tool_call", "text", "usage", "heartbeat", "tool_result"].includes(ev.kind.type)) renderAgents();
    else refresh();
  });
  setInterval(refresh, 5000);
  setInterval(() => document.querySelectorAll("[data-start]").forEach((el) => {
    if (el.dataset.start) el.textContent = elapsed(Number(el.dataset.start));
  }), 1000);
  refresh();
}

// ----- new task ---------------------------------------------------------------------------

function newTaskPage() {
  const form = $("#task-form");
  const err = $("#form-error");
  const showError = (m) => {
    err.textContent = m;
    err.hidden = !m;
  };

  api("/v1/task-types").then((types) => {
    const sel = $("#task_type");
    sel.innerHTML = types.map((t) => `<option value="${esc(t.name)}" title="${esc(t.description)}">${esc(t.name)}</option>`).join("");
    sel.value = "auto";
  }).catch((e) => showError(e.message));

  const body = () => {
    const f = new FormData(form);
    const v = (k) => String(f.get(k) || "").trim();
    const num = (k) => (v(k) === "" ? undefined : Number(v(k)));
    const b = { prompt: v("prompt"), mode: v("mode"), priority: v("priority"), on_failure: v("on_failure") };
    const plan = v("plan");
    const roles = f.getAll("roles");
    if (plan) {
      try {
        b.plan = JSON.parse(plan);
      } catch (e) {
        throw new ApiError("plan: not valid JSON: " + e.message);
      }
    } else if (roles.length) {
      b.roles = roles;
    } else {
      b.task_type = v("task_type") || "auto";
    }
    if (v("workspace")) b.workspace = v("workspace");
    if (v("repo")) b.repo = v("repo");
    if (v("ref")) b.ref = v("ref");
    if (v("backend")) b.backend = v("backend");
    if (v("model")) b.model = v("model");
    for (const k of ["budget_usd", "budget_tokens", "max_attempts", "max_parallel"]) if (num(k) !== undefined) b[k] = num(k);
    if (num("sim_latency_ms") !== undefined) b.sim = { latency_ms: num("sim_latency_ms") };
    return b;
  };

  const cli = (b) => {
    const q = (s) => (/^[\w.,/:=@-]+$/.test(s) ? s : "'" + String(s).replace(/'/g, "'\\''") + "'");
    const parts = ["orchctl submit", q(b.prompt || "…")];
    if (b.task_type && b.task_type !== "auto") parts.push("--task-type " + q(b.task_type));
    if (b.roles) parts.push("--roles " + b.roles.join(","));
    if (b.plan) parts.push("--plan plan.json");
    if (b.mode !== "sequential") parts.push("--mode " + b.mode);
    if (b.priority !== "normal") parts.push("--priority " + b.priority);
    if (b.on_failure !== "stop") parts.push("--on-failure " + b.on_failure);
    if (b.workspace) parts.push("--workspace " + q(b.workspace));
    if (b.repo) parts.push("--repo " + q(b.repo));
    if (b.ref) parts.push("--ref " + q(b.ref));
    if (b.backend) parts.push("--backend " + b.backend);
    if (b.model) parts.push("--model " + q(b.model));
    if (b.budget_usd !== undefined) parts.push("--budget-usd " + b.budget_usd);
    if (b.budget_tokens !== undefined) parts.push("--budget-tokens " + b.budget_tokens);
    if (b.max_attempts !== undefined) parts.push("--max-attempts " + b.max_attempts);
    if (b.max_parallel !== undefined) parts.push("--max-parallel " + b.max_parallel);
    if (b.sim) parts.push("--sim-latency " + b.sim.latency_ms + "ms");
    parts.push("--follow");
    return parts.join(" ");
  };

  const preview = async () => {
    let b;
    try {
      b = body();
    } catch (e) {
      showError(e.message);
      return;
    }
    $("#cli").textContent = cli(b);
    if (!b.prompt) return;
    try {
      const d = await api("/v1/tasks/dry-run", { method: "POST", body: b });
      showError("");
      const range = (e) => (e.source === "none" ? `<span class="muted">no history yet</span>` : `${usd(e.cost_usd_p50)} – ${usd(e.cost_usd_p90)}`);
      const source = d.total.source === "history" ? `p50 – p90 of ${d.total.samples} past agents` : d.total.source === "planner" ? "the plan's token estimate at list prices" : "no finished agent of these roles yet";
      const time = (e) => (e.duration_ms_p50 != null ? `${dur(e.duration_ms_p50)} – ${dur(e.duration_ms_p90)}` : "–");
      $("#preview-body").innerHTML = `
        <div class="kpis">${kpi("Steps", d.steps.length, esc(d.plan_source) + " · " + esc(d.mode))}${kpi("Est. cost", d.total.source === "none" ? "–" : range(d.total), source)}${kpi("Est. time", time(d.total), "along the longest path")}</div>
        ${d.plan.complexity ? `<p class="small"><b>Complexity:</b> ${esc(d.plan.complexity)}${d.plan.rationale ? " — " + esc(d.plan.rationale) : ""}</p>` : ""}
        ${table([
          { label: "#", cell: (s) => s.step },
          { label: "Role", cell: (s) => `<span class="role">${esc(s.role)}</span>` },
          { label: "After", cell: (s) => (s.depends_on.length ? s.depends_on.join(", ") : "–") },
          { label: "Instruction", cls: "desc", cell: (s) => `<span title="${esc(s.instruction)}">${esc(s.instruction)}</span>` },
          { label: "Est. cost", num: true, cell: (s) => range(s.estimate) },
        ], d.steps)}`;
    } catch (e) {
      showError(e.message);
    }
  };
  const soon = (() => {
    let t;
    return () => {
      clearTimeout(t);
      t = setTimeout(preview, 500);
    };
  })();
  form.addEventListener("input", soon);
  form.addEventListener("change", soon);
  $("#preview-btn").addEventListener("click", preview);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const btn = $("#submit-btn");
    btn.disabled = true;
    try {
      const task = await api("/v1/tasks", { method: "POST", body: body() });
      location.href = "/tasks/" + task.id;
    } catch (e2) {
      showError(e2.message);
      btn.disabled = false;
    }
  });
  $("#cli").textContent = cli(body());
}

// ----- git --------------------------------------------------------------------------------

// `conflicts` names the conflicting files, or says why the push kept failing.
function conflictFiles(g) {
  const why = g.conflicts || [];
  return why.length > 0 && why.every((c) => !/\s/.test(c));
}

// Whether a job's commit made it into the task branch.
function gitBadge(g) {
  if (g.merged) return `<span class="badge s-succeeded">merged</span>`;
  if (conflictFiles(g)) return `<span class="badge s-failed">conflicts</span>`;
  return `<span class="badge${(g.conflicts || []).length ? " s-failed" : ""}">not merged</span>`;
}

// ----- task -------------------------------------------------------------------------------

function dagSvg(jobs) {
  const byStep = new Map(jobs.map((j) => [j.step, j]));
  // A further turn of a conversation (send or fork) hangs off the turn it continues.
  const stepOf = new Map(jobs.map((j) => [j.id, j.step]));
  const depsOf = (j) => (j.continues && stepOf.has(j.continues) ? [...(j.depends_on || []), stepOf.get(j.continues)] : j.depends_on || []);
  const level = new Map();
  const depth = (j, seen = new Set()) => {
    if (level.has(j.step)) return level.get(j.step);
    if (seen.has(j.step)) return 0;
    seen.add(j.step);
    const deps = depsOf(j).map((s) => byStep.get(s)).filter(Boolean);
    const d = deps.length ? Math.max(...deps.map((p) => depth(p, seen))) + 1 : 0;
    level.set(j.step, d);
    return d;
  };
  jobs.forEach((j) => depth(j));
  const cols = [];
  for (const j of jobs) (cols[level.get(j.step)] ||= []).push(j);
  const W = 170, H = 62, GX = 46, GY = 16, P = 4;
  const rows = Math.max(...cols.map((c) => c.length));
  const width = cols.length * (W + GX) - GX + 2 * P;
  const height = rows * (H + GY) - GY + 2 * P;
  const pos = new Map();
  cols.forEach((c, x) => c.forEach((j, y) => {
    const off = ((rows - c.length) * (H + GY)) / 2;
    pos.set(j.step, { x: P + x * (W + GX), y: P + off + y * (H + GY) });
  }));
  let edges = "";
  for (const j of jobs) for (const d of depsOf(j)) {
    const a = pos.get(d), b = pos.get(j.step);
    if (!a || !b) continue;
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
    const turn = j.continues && stepOf.get(j.continues) === d;
    edges += `<path class="edge${turn ? " turn" : ""}" d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 4},${y2}" marker-end="url(#arrow)"/>`;
  }
  // Sequential tasks have no depends_on: show the pipeline order.
  const nodes = jobs.map((j) => {
    const p = pos.get(j.step);
    const icon = { succeeded: "✓", running: "●", failed: "✕", cancelled: "⊘", skipped: "↷", retrying: "↻", queued: "…", pending: "○", parked: "‖" }[j.status] || "";
    const rel = j.continues ? (j.forked ? "fork · " : "reply · ") : "";
    const sub = rel + (j.status === "running" ? `running ${elapsed(j.started_at_ms)}` : j.started_at_ms ? `${elapsed(j.started_at_ms, j.finished_at_ms)} · ${usd(j.cost_usd)}` : j.status);
    return `<a href="/agents/${esc(j.id)}"><g class="node s-${esc(j.status)}" data-step="${j.step}" data-status="${esc(j.status)}">
      <rect x="${p.x}" y="${p.y}" width="${W}" height="${H}" rx="9"/>
      <text x="${p.x + 12}" y="${p.y + 24}"><tspan font-weight="700">${icon} ${esc(j.role)}</tspan><tspan class="sub" dx="6">#${j.step}</tspan></text>
      <text class="sub" x="${p.x + 12}" y="${p.y + 45}">${esc(sub)}</text></g></a>`;
  }).join("");
  return `<svg viewBox="0 0 ${width} ${height}" width="${width}" height="${height}" role="img" aria-label="Task plan">
    <defs><marker id="arrow" viewBox="0 0 10 10" refX="8" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="currentColor" opacity=".6"/></marker></defs>
    ${edges}${nodes}</svg>`;
}

function taskPage() {
  const id = document.body.dataset.id;
  let current = null;
  let es = null;
  // A task ends once per run: a message sent to one of its agents reopens it, so its log can
  // hold several `task_finished`. The stream is over at the one that ended the task as it is
  // now (its duration is the task's); one that says a pull request step follows
  // (`pr_pending`) is over at that step's outcome.
  let endSeen = null;
  let prPending = false;
  let lastEventAt = 0;
  const ended = () => !!current && TASK_ENDED.includes(current.status) && !prPending &&
    current.finished_at_ms != null && endSeen === current.finished_at_ms - current.created_at_ms;
  const prOutcome = (k) => (k.type === "pr_opened" && !k.draft) || k.type === "pr_ready" || k.type === "pr_failed";

  const load = async () => {
    let t;
    try {
      t = await api(`/v1/tasks/${id}`);
    } catch (e) {
      $("#t-title").textContent = "Task not found";
      $("#t-meta").textContent = e.message;
      if (es) es.finish("Offline");
      return;
    }
    current = t;
    document.title = `${t.prompt.slice(0, 40)} · orchestrator`;
    $("#t-title").textContent = t.prompt.length > 120 ? t.prompt.slice(0, 120) + "…" : t.prompt;
    $("#t-title").title = t.prompt;
    const ws = t.workspace || {};
    const where = ws.kind === "git" ? `<span>repo <span class="mono">${esc(ws.url)}</span>${ws.base_ref ? ` @ <span class="mono">${esc(ws.base_ref)}</span>` : ""}</span>` : ws.path ? `<span>workspace <span class="mono">${esc(ws.path)}</span></span>` : "";
    const branch = t.branch ? `<span class="branch" title="The task branch holding the agents' merged work">${ICON_BRANCH} <span class="mono">${esc(t.branch)}</span></span>` : "";
    const pr = !t.pr ? "" : t.pr.url
      ? `<span class="pr" title="The task's pull request (${t.pr.rounds} review round(s))"><a href="${esc(t.pr.url)}">PR #${t.pr.number}</a></span>`
      : `<span class="pr muted" title="${esc(t.pr.error || "opened when the task completes")}">PR → ${esc(t.pr.base)}</span>`;
    const escalated = t.pr && t.pr.escalated ? `<span class="badge s-failed" title="The review loop stopped: a person is needed">review needs a person: ${esc(t.pr.escalated)}</span>` : "";
    const warned = (t.conflicts || []);
    const conflicts = warned.length ? `<span class="badge s-failed" id="t-conflicts" title="${esc(warned.map((w) => `${w.role} ${short(w.job)} and ${w.other_role} ${short(w.other)}: ${w.paths.join(", ")}`).join("\n"))}">${warned.length} conflict warning(s)</span>` : "";
    const trace = t.trace_id ? `<span title="OpenTelemetry trace id: search it in your tracing backend">trace <span class="mono" id="t-trace">${esc(t.trace_id)}</span></span>` : "";
    $("#t-meta").innerHTML = `${badge(t.status)}<span class="mono">${esc(t.id)}</span><span>${esc(t.task_type)} → ${esc(t.plan_source)}</span><span>${esc(t.mode)}</span><span>${esc(t.backend)}${t.model ? " · " + esc(t.model) : ""}</span>${where}${branch}${pr}${escalated}${conflicts}${trace}<span>created ${when(t.created_at_ms)}</span>`;
    const done = t.jobs.filter((j) => ["succeeded", "failed", "skipped", "cancelled"].includes(j.status)).length;
    const budget = t.options.budget_usd != null ? ` of ${usd(t.options.budget_usd)} budget` : "";
    $("#t-kpis").innerHTML = kpi("Progress", `${done}/${t.jobs.length}`, "steps ended") +
      kpi("Elapsed", `<span data-start="${t.status === "running" || t.status === "pending" ? t.created_at_ms : ""}">${elapsed(t.created_at_ms, t.finished_at_ms)}</span>`, t.finished_at_ms ? "finished " + ago(t.finished_at_ms) : "running") +
      kpi("Tokens", tokens(totalTokens(t.usage)), `${tokens(t.usage.input_tokens)} in · ${tokens(t.usage.output_tokens)} out · ${tokens(t.usage.cache_read_tokens)} cached`) +
      kpi("Cost", usd(t.cost_usd), budget);
    $("#t-progress").textContent = `${done} of ${t.jobs.length} steps ended`;
    $("#dag").innerHTML = t.jobs.length ? dagSvg(t.jobs) : `<p class="empty">Planning…</p>`;
    $("#steps").innerHTML = table([
      { label: "#", cell: (j) => j.step },
      { label: "Role", cell: (j) => {
        const from = j.continues ? t.jobs.find((x) => x.id === j.continues) : null;
        const rel = j.continues ? `<div class="small muted">${j.forked ? ICON_BRANCH + " fork of" : "↳ reply to"} <a href="/agents/${esc(j.continues)}">#${from ? from.step : short(j.continues)}</a>: “${esc(j.prompt.length > 40 ? j.prompt.slice(0, 40) + "…" : j.prompt)}”</div>` : "";
        const scope = (j.paths || []).length ? `<div class="small muted mono" title="The files this step declared it edits">scope: ${esc(j.paths.join(" "))}</div>` : "";
        return `<a class="role" href="/agents/${esc(j.id)}">${esc(j.role)}</a>${rel}${scope}`;
      } },
      { label: "Status", cell: (j) => badge(j.status) + conflictBadge(t, j) + (j.held_by ? `<div class="small muted">waiting for job ${esc(short(j.held_by))} (scope overlap)</div>` : "") + (j.git ? ` <span title="${esc(j.git.branch)} @ ${esc(j.git.commit)}">${gitBadge(j.git)}</span>` : "") + (j.error ? `<div class="small muted">${esc(j.error.reason)}: ${esc(j.error.message)}</div>` : "") + (j.status === "parked" ? `<div class="small muted parked">${esc(parkedText(j.parked))}</div>` : "") },
      { label: "Attempt", num: true, cell: (j) => j.attempt },
      { label: "Worker", cell: (j) => `<span class="mono small">${esc(j.worker_id || "–")}</span>` },
      { label: "Started", num: true, cell: (j) => clock(j.started_at_ms) || "–" },
      { label: "Duration", num: true, cell: (j) => (j.started_at_ms ? elapsed(j.started_at_ms, j.finished_at_ms) : "–") },
      { label: "Tokens", num: true, cell: (j) => `<span title="in ${j.usage.input_tokens}, out ${j.usage.output_tokens}, cache write ${j.usage.cache_creation_tokens}, cache read ${j.usage.cache_read_tokens}">${tokens(totalTokens(j.usage))}</span>` },
      { label: "Cost", num: true, cell: (j) => usd(j.cost_usd) },
      { label: "", num: true, cell: (j) => {
        let b = `<a class="btn sm" href="/agents/${esc(j.id)}">Transcript</a>`;
        if (j.status === "running" || j.status === "queued") b += ` <button class="btn sm danger" data-kill="${esc(j.id)}">Kill</button>`;
        if (j.status === "failed") b += ` <button class="btn sm" data-retry="${esc(j.id)}">Retry</button>`;
        return b;
      } },
    ], t.jobs, "No steps yet.");
    $("#t-output").innerHTML = t.error ? `<p class="form-error">${esc(t.error)}</p>` : "";
    $("#t-output").innerHTML += t.output ? `<pre class="output">${esc(t.output)}</pre>` : t.error ? "" : `<p class="empty">No output yet.</p>`;
    const cancel = $("#cancel-btn");
    cancel.hidden = TASK_ENDED.includes(t.status);
    // A log that expired has no end event: stop following a finished task after a while.
    if (TASK_ENDED.includes(t.status)) {
      setTimeout(() => {
        if (es && es.readyState !== EventSource.CLOSED && (ended() || (endSeen === null && Date.now() - lastEventAt > 2500))) es.finish("Finished");
      }, 3000);
    }
  };
  const refresh = throttle(() => load().catch((e) => toast(e.message, true)), 400);

  const cancel = $("#cancel-btn");
  cancel.addEventListener("click", async () => {
    // Two clicks: the first arms the button, so a stray click stops nothing.
    if (!cancel.dataset.armed) {
      cancel.dataset.armed = "1";
      cancel.textContent = "Click again to cancel";
      setTimeout(() => {
        delete cancel.dataset.armed;
        cancel.textContent = "Cancel task";
      }, 4000);
      return;
    }
    cancel.disabled = true;
    try {
      await api(`/v1/tasks/${id}/cancel`, { method: "POST" });
      toast("Task cancelled");
    } catch (e) {
      toast(e.message, true);
    }
    cancel.disabled = false;
    delete cancel.dataset.armed;
    cancel.textContent = "Cancel task";
    refresh();
  });
  $("#steps").addEventListener("click", async (e) => {
    const kill = e.target.dataset.kill, retry = e.target.dataset.retry;
    if (!kill && !retry) return;
    e.target.disabled = true;
    try {
      if (kill) await api(`/v1/agents/${kill}/kill`, { method: "POST" });
      else await api(`/v1/dlq/${retry}/retry`, { method: "POST" });
      toast(kill ? "Agent killed" : "Retry queued");
      if (retry && es && es.readyState === EventSource.CLOSED) {
        log.innerHTML = "";
        es = open();
      }
    } catch (err) {
      toast(err.message, true);
    }
    refresh();
  });

  const log = $("#events");
  const open = () => stream(`/v1/tasks/${id}/events`, {}, (ev) => {
    lastEventAt = Date.now();
    if (ev.kind.type !== "heartbeat" && ev.kind.type !== "thinking") {
      const li = document.createElement("li");
      li.innerHTML = `<time>${clock(ev.at_ms)}</time><span>${describe(ev)}</span>`;
      log.appendChild(li);
      log.scrollTop = log.scrollHeight;
    }
    if (ev.kind.type === "task_finished" || (prPending && prOutcome(ev.kind))) {
      if (ev.kind.type === "task_finished") endSeen = ev.kind.duration_ms;
      prPending = ev.kind.type === "task_finished" && !!ev.kind.pr_pending;
      load().then(() => ended() && es.finish("Finished")).catch(() => {});
    } else refresh();
  }, ended);
  es = open();
  setInterval(() => document.querySelectorAll("[data-start]").forEach((el) => {
    if (el.dataset.start) el.textContent = elapsed(Number(el.dataset.start));
  }), 1000);
  setInterval(() => current && !TASK_ENDED.includes(current.status) && refresh(), 5000);
  load();
}

// ----- diff -------------------------------------------------------------------------------

// Parses a unified diff (git's, or plain `diff -u`) into files of hunks of numbered lines.
// Lines that fit nowhere (a truncation note, say) are kept in `notes`.
function parseDiff(text) {
  const files = [];
  const notes = [];
  let file = null;
  let hunk = null;
  let oldNo = 0, newNo = 0, oldLeft = 0, newLeft = 0;
  const unquote = (p) => (p.length > 1 && p.startsWith('"') && p.endsWith('"') ? p.slice(1, -1).replace(/\\(["\\])/g, "$1") : p);
  const path = (p) => {
    p = unquote(p.replace(/\t.*$/, "").trim());
    return p === "/dev/null" ? null : p.replace(/^[ab]\//, "");
  };
  const start = () => {
    file = { oldPath: null, newPath: null, status: "modified", hunks: [], added: 0, removed: 0, binary: false, meta: [] };
    files.push(file);
    hunk = null;
    oldLeft = newLeft = 0;
  };
  const lines = text.split("\n");
  if (lines.length && lines[lines.length - 1] === "") lines.pop();
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    // Inside a hunk its header's counts say which lines belong to it (so a removed line
    // that reads "-- x" is not taken for a file header).
    if (hunk && (oldLeft > 0 || newLeft > 0)) {
      const c = line[0];
      if (c === "+") {
        hunk.lines.push({ t: "add", n: newNo++, s: line.slice(1) });
        file.added++;
        newLeft--;
        continue;
      }
      if (c === "-") {
        hunk.lines.push({ t: "del", o: oldNo++, s: line.slice(1) });
        file.removed++;
        oldLeft--;
        continue;
      }
      if (c === " " || line === "") {
        hunk.lines.push({ t: "ctx", o: oldNo++, n: newNo++, s: line.slice(1) });
        oldLeft--;
        newLeft--;
        continue;
      }
      if (c === "\\") {
        hunk.lines.push({ t: "note", s: line.slice(1).trim() });
        continue;
      }
      hunk = null; // a cut diff: the hunk ends early
    }
    if (hunk && line.startsWith("\\")) {
      hunk.lines.push({ t: "note", s: line.slice(1).trim() });
      continue;
    }
    let m;
    if ((m = /^diff --git (.+)$/.exec(line))) {
      start();
      const halves = /^(?:"?a\/)(.+?)"? (?:"?b\/)(.+?)"?$/.exec(m[1]);
      if (halves) {
        file.oldPath = halves[1];
        file.newPath = halves[2];
      }
      continue;
    }
    if (line.startsWith("--- ") && i + 1 < lines.length && lines[i + 1].startsWith("+++ ")) {
      if (!file || file.hunks.length) start();
      const o = path(line.slice(4)), n = path(lines[i + 1].slice(4));
      if (o === null) file.status = "added";
      if (n === null) file.status = "deleted";
      file.oldPath = o ?? file.oldPath;
      file.newPath = n ?? file.newPath;
      i++;
      continue;
    }
    if (file && (m = /^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@ ?(.*)$/.exec(line))) {
      oldNo = Number(m[1]);
      newNo = Number(m[3]);
      oldLeft = m[2] === undefined ? 1 : Number(m[2]);
      newLeft = m[4] === undefined ? 1 : Number(m[4]);
      hunk = { header: line.slice(0, line.indexOf("@@", 2) + 2), context: m[5] || "", lines: [] };
      file.hunks.push(hunk);
      continue;
    }
    if (file && !file.hunks.length) {
      if (line.startsWith("new file mode")) file.status = "added";
      else if (line.startsWith("deleted file mode")) file.status = "deleted";
      else if (line.startsWith("rename from ")) {
        file.status = "renamed";
        file.oldPath = unquote(line.slice(12));
      } else if (line.startsWith("rename to ")) file.newPath = unquote(line.slice(10));
      else if (line.startsWith("copy from ")) {
        file.status = "copied";
        file.oldPath = unquote(line.slice(10));
      } else if (line.startsWith("copy to ")) file.newPath = unquote(line.slice(8));
      else if (line.startsWith("Binary files") || line.startsWith("GIT binary patch")) file.binary = true;
      else if (line.startsWith("old mode ") || line.startsWith("new mode ")) file.meta.push(line);
      else if (!line.startsWith("index ") && !line.startsWith("similarity index") && !line.startsWith("dissimilarity index")) file.meta.push(line);
      continue;
    }
    if (line.trim()) notes.push(line);
  }
  for (const f of files) f.path = f.status === "deleted" ? f.oldPath || f.newPath || "?" : f.newPath || f.oldPath || "?";
  return { files, notes };
}

// The diff as a file list with counts, then each file's hunks (collapsible), every line
// escaped. Files with many changed lines start collapsed.
function renderDiff(text) {
  const { files, notes } = parseDiff(text);
  const added = files.reduce((s, f) => s + f.added, 0), removed = files.reduce((s, f) => s + f.removed, 0);
  const label = { added: "added", deleted: "deleted", renamed: "renamed", copied: "copied", modified: "modified" };
  // Five blocks, green and red in the proportion of added to removed lines (fewer when
  // fewer lines changed).
  const blocks = (f) => {
    const total = f.added + f.removed;
    const n = Math.min(5, total);
    const a = total ? Math.round((n * f.added) / total) : 0;
    return `<span class="blocks" aria-hidden="true">${"<i class=a></i>".repeat(a)}${"<i class=d></i>".repeat(n - a)}${"<i></i>".repeat(5 - n)}</span>`;
  };
  const counts = (f) => `<span class="counts"><span class="plus">+${f.added}</span> <span class="minus">−${f.removed}</span></span>`;
  const name = (f) => (f.status === "renamed" || f.status === "copied") && f.oldPath && f.newPath && f.oldPath !== f.newPath
    ? `${esc(f.oldPath)} <span class="muted">→</span> ${esc(f.newPath)}`
    : esc(f.path);
  const list = files.map((f, i) => `<li><a href="#diff-f${i}" data-file="${i}"><span class="fstatus f-${f.status}" title="${label[f.status]}">${label[f.status][0].toUpperCase()}</span><span class="path mono">${name(f)}</span>${f.binary ? `<span class="muted small">binary</span>` : counts(f)}${blocks(f)}</a></li>`).join("");
  const ln = (n) => (n === undefined ? `<td class="ln"></td>` : `<td class="ln" data-n="${n}"></td>`);
  const body = (f) => {
    if (f.binary) return `<p class="empty diff-note">Binary file: not shown.</p>`;
    if (!f.hunks.length) {
      const why = f.status === "renamed" ? "Renamed without changes." : f.status === "added" ? "Empty file." : f.meta.length ? f.meta.map(esc).join("<br>") : "No textual change.";
      return `<p class="empty diff-note">${why}</p>`;
    }
    const rows = f.hunks.map((h) => `<tr class="d-hunk"><td class="ln"></td><td class="ln"></td><td class="code">${esc(h.header)}${h.context ? ` <span class="hunk-ctx">${esc(h.context)}</span>` : ""}</td></tr>` +
      h.lines.map((l) => l.t === "note"
        ? `<tr class="d-note"><td class="ln"></td><td class="ln"></td><td class="code">${esc(l.s)}</td></tr>`
        : `<tr class="d-${l.t}">${ln(l.o)}${ln(l.n)}<td class="code"><span class="sign" aria-hidden="true">${l.t === "add" ? "+" : l.t === "del" ? "−" : " "}</span>${esc(l.s)}</td></tr>`).join("")).join("");
    return `<div class="diff-scroll"><table class="diff-table"><colgroup><col class="c-ln"><col class="c-ln"><col></colgroup><tbody>${rows}</tbody></table></div>`;
  };
  const sections = files.map((f, i) => {
    const big = f.added + f.removed > 400;
    return `<details class="diff-file" id="diff-f${i}" data-status="${f.status}"${big ? "" : " open"}>
      <summary><span class="chev" aria-hidden="true"></span><span class="fstatus f-${f.status}">${label[f.status]}</span><span class="path mono">${name(f)}</span>${f.binary ? "" : counts(f)}</summary>
      ${big ? `<p class="muted small diff-note">${f.added + f.removed} changed lines: collapsed to keep the page quick.</p>` : ""}${body(f)}</details>`;
  }).join("");
  const trailer = notes.length ? `<p class="muted small diff-note">${notes.map(esc).join("<br>")}</p>` : "";
  return {
    stat: `${files.length} file${files.length === 1 ? "" : "s"} changed · <span class="plus">+${added}</span> <span class="minus">−${removed}</span>`,
    html: files.length ? `<ul class="diff-files">${list}</ul>${sections}${trailer}` : `<pre class="output">${esc(text)}</pre>`,
    files: files.length,
  };
}

// ----- agent ------------------------------------------------------------------------------


function agentPage() {
  const id = document.body.dataset.id;
  const box = $("#transcript");
  let es = null;
  let first = true;
  let ended = false;
  let shownDiff = null;
  let task = null;
  let taskAt = 0;
  let lastStatus = null;
  const calls = new Map();

  const agentLink = (j, text) => `<a href="/agents/${esc(j.id || j)}" class="mono">${text ?? esc(short(j.id || j))}</a>`;
  const turnLabel = (j) => `<span class="role">${esc(j.role)}</span> <span class="muted">#${j.step}</span>`;

  // The conversation this agent is a turn of: back along `continues` to the step that started
  // it, then forward along sends; forks (and other replies) hang off the turn they left.
  const conversation = (jobs, me) => {
    const byId = new Map(jobs.map((x) => [x.id, x]));
    const thread = [];
    const seen = new Set();
    for (let cur = byId.get(me.id) || me; cur && !seen.has(cur.id); cur = cur.continues ? byId.get(cur.continues) : null) {
      seen.add(cur.id);
      thread.unshift(cur);
    }
    for (let cur = me; ;) {
      const next = jobs.find((x) => x.continues === cur.id && !x.forked && !seen.has(x.id));
      if (!next) break;
      seen.add(next.id);
      thread.push(next);
      cur = next;
    }
    const branches = (x) => jobs.filter((y) => y.continues === x.id && !seen.has(y.id));
    return { thread, branches };
  };

  const renderTurns = (j) => {
    const panel = $("#turns-panel");
    if (!task) return;
    const { thread, branches } = conversation(task.jobs, j);
    const anyBranch = thread.some((x) => branches(x).length);
    panel.hidden = thread.length < 2 && !anyBranch;
    if (panel.hidden) return;
    $("#turns-count").textContent = `${thread.length} turn${thread.length === 1 ? "" : "s"}`;
    $("#turns").innerHTML = thread.map((x, i) => {
      const said = x.continues ? `<div class="said">${x.forked ? ICON_BRANCH + " " : ""}“${esc(x.prompt.length > 160 ? x.prompt.slice(0, 160) + "…" : x.prompt)}”</div>` : `<div class="said muted">started as step ${x.step} of the task</div>`;
      const forks = branches(x).map((y) => `<li>${y.forked ? ICON_BRANCH + " fork" : "↳ reply"} ${agentLink(y, turnLabel(y))} ${badge(y.status)}<div class="said">“${esc(y.prompt.length > 100 ? y.prompt.slice(0, 100) + "…" : y.prompt)}”</div></li>`).join("");
      return `<li class="turn${x.id === j.id ? " current" : ""}" data-agent="${esc(x.id)}"><span class="turn-no">${i + 1}</span><div class="turn-body">
        <div class="turn-head">${x.id === j.id ? `${turnLabel(x)} <span class="muted small">this agent</span>` : agentLink(x, turnLabel(x))} ${badge(x.status)}<span class="muted small">${x.started_at_ms ? clock(x.started_at_ms) : ""}${x.cost_usd ? " · " + usd(x.cost_usd) : ""}</span></div>
        ${said}${forks ? `<ul class="branches">${forks}</ul>` : ""}</div></li>`;
    }).join("");
  };

  // Send and fork: only a turn that succeeded can be continued; a send goes to the
  // conversation's latest turn (the server picks it), a fork starts from this one.
  const renderTalk = (d) => {
    const j = d.job;
    const latest = task ? conversation(task.jobs, j).thread.slice(-1)[0] : j;
    let reason = "";
    if (j.kind === "plan") reason = "This is the planner: its answer became the task's plan, there is no conversation to continue.";
    else if (!JOB_ENDED.includes(j.status)) reason = j.status === "running" ? "The agent is still working on this turn: you can send a message once it has finished." : `The agent has not run yet (${j.status}): you can send a message once it has finished.`;
    else if (j.status !== "succeeded") reason = `Only an agent that succeeded can be continued or forked; this one ${j.status === "skipped" ? "was skipped" : j.status}.`;
    else if (!j.session_id && !d.session_id) reason = `This agent kept no session to continue (the ${d.backend} backend stores none).`;
    const off = !!reason;
    const sendOff = off || (latest && latest.id !== j.id && !JOB_ENDED.includes(latest.status));
    $("#send-btn").disabled = sendOff;
    $("#fork-btn").disabled = off;
    $("#a-message").disabled = off;
    $("#talk").classList.toggle("is-off", off);
    $("#talk-state").innerHTML = off ? `<span class="badge">${!JOB_ENDED.includes(j.status) ? "wait for the turn to end" : "not available"}</span>` : `<span class="badge s-succeeded">ready</span>`;
    const r = $("#talk-reason");
    if (off) {
      r.textContent = reason;
      r.hidden = false;
    } else if (latest && latest.id !== j.id) {
      r.innerHTML = JOB_ENDED.includes(latest.status)
        ? `This conversation went on in ${agentLink(latest, turnLabel(latest))}: <b>Send</b> continues from that latest turn; <b>Fork</b> starts from this one.`
        : `This conversation goes on in ${agentLink(latest, turnLabel(latest))}, still ${esc(latest.status)}: <b>Send</b> is possible once it has finished; <b>Fork</b> starts from this one.`;
      r.hidden = false;
    } else r.hidden = true;
    talkCli();
  };

  // The same two actions with orchctl, for the message being written.
  const talkCli = () => {
    const q = (s) => (/^[\w.,/:=@-]+$/.test(s) ? s : "'" + String(s).replace(/'/g, "'\\''") + "'");
    const msg = q($("#a-message").value.trim() || "…");
    $("#talk-cli").textContent = `orchctl agents send ${id} ${msg} -f\norchctl agents fork ${id} ${msg} -f`;
  };

  const renderGit = (j) => {
    const g = j.git;
    $("#git-panel").hidden = !g;
    if (!g) return;
    const why = g.conflicts || [];
    const files = conflictFiles(g);
    $("#git-state").innerHTML = gitBadge(g);
    const sha = (c) => (c ? `<span class="mono" title="${esc(c)}">${esc(c.slice(0, 10))}</span>` : "–");
    const taskBranch = task && task.branch ? `<span class="mono">${esc(task.branch)}</span> ` : "";
    $("#git").innerHTML = `<dt>Branch</dt><dd class="mono">${esc(g.branch)}</dd><dt>Commit</dt><dd>${sha(g.commit)}</dd><dt>Base</dt><dd>${sha(g.base)}</dd>` +
      `<dt>Task branch</dt><dd>${taskBranch}${g.merged ? "contains this commit" : files ? "does not contain it: the merge conflicted" : "does not contain this commit"}</dd>` +
      (why.length ? `<dt>${files ? "Conflicts" : "Why"}</dt><dd><ul class="plain">${why.map((c) => `<li class="mono">${esc(c)}</li>`).join("")}</ul></dd>` : "");
  };

  const renderDiffPanel = (j) => {
    const el = $("#diff");
    const key = j.diff == null ? `none:${j.status}:${(j.files_written || []).length}` : j.diff;
    if (key === shownDiff) return;
    shownDiff = key;
    const toggle = $("#diff-toggle");
    if (j.diff == null || j.diff === "") {
      toggle.hidden = true;
      $("#diff-stat").textContent = "";
      const wrote = (j.files_written || []).length;
      el.innerHTML = !JOB_ENDED.includes(j.status)
        ? `<p class="empty">The diff of what this agent changed shows here when it finishes.</p>`
        : j.diff === "" || !wrote
          ? `<p class="empty">No changes: this agent changed no file.</p>`
          : `<p class="empty">This agent wrote ${wrote} file(s), but its worker reported no diff (the sim backend and workers before diffs do not).</p>`;
      return;
    }
    const r = renderDiff(j.diff);
    $("#diff-stat").innerHTML = r.stat;
    el.innerHTML = r.html;
    toggle.hidden = r.files < 1;
    toggle.textContent = "Collapse all";
  };

  const load = async () => {
    const d = await api(`/v1/agents/${id}`);
    const j = d.job;
    // Known before the next await: the stream the server ends for a finished agent is over.
    ended = JOB_ENDED.includes(j.status);
    // The task gives the conversation's other turns: read it at first, when this agent's
    // status changes, and every few seconds while something may still change.
    if (!task || j.status !== lastStatus || Date.now() - taskAt > 4000) {
      task = await api(`/v1/tasks/${d.task_id}`).catch(() => task);
      taskAt = Date.now();
    }
    // Every read before the first write: the header, the badge and the buttons change together
    // (a badge saying "running" beside a Send button still enabled is a lie for a moment).
    const cps = await api(`/v1/agents/${id}/checkpoints`).then((c) => c.checkpoints).catch(() => []);
    lastStatus = j.status;
    document.title = `${j.role} · ${d.task_prompt.slice(0, 40)} · orchestrator`;
    $("#a-back").href = "/tasks/" + d.task_id;
    $("#a-back").textContent = "← " + (d.task_prompt.length > 60 ? d.task_prompt.slice(0, 60) + "…" : d.task_prompt);
    $("#a-title").innerHTML = `<span class="role">${esc(j.role)}</span> <span class="muted">· step ${j.step}</span>`;
    const from = j.continues ? task && task.jobs.find((x) => x.id === j.continues) : null;
    const rel = j.continues ? `<span class="rel">${j.rewound_to ? ICON_BRANCH + ` rewound to step ${j.rewound_to} of` : j.forked ? ICON_BRANCH + " forked from" : "↳ continues"} ${agentLink(j.continues, from ? turnLabel(from) : esc(short(j.continues)))}</span>` : "";
    const git = j.git ? `<span>branch <span class="mono">${esc(j.git.branch)}</span> @ <span class="mono" title="${esc(j.git.commit)}">${esc((j.git.commit || "").slice(0, 7))}</span></span>` : "";
    $("#a-meta").innerHTML = `${badge(j.status)}${conflictBadge(task, j)}${j.status === "parked" ? `<span class="parked">${esc(parkedText(j.parked))}</span>` : ""}${rel}<span class="mono">${esc(j.id)}</span><span>attempt ${j.attempt}</span><span>${esc(d.backend)}${d.model ? " · " + esc(d.model) : ""}</span><span>worker <span class="mono">${esc(j.worker_id || "–")}</span></span>${j.sandbox ? `<span title="what the agent's sandbox allowed">sandbox: ${esc(j.sandbox)}</span>` : ""}${git}`;
    const toolList = Object.entries(d.tools || {}).map(([k, v]) => `${esc(k)} ×${v}`).join(", ");
    $("#a-kpis").innerHTML = kpi("Elapsed", `<span data-start="${j.status === "running" ? j.started_at_ms || "" : ""}">${elapsed(j.started_at_ms, j.finished_at_ms)}</span>`, j.started_at_ms ? "started " + clock(j.started_at_ms) : "not started") +
      kpi("Tokens", tokens(totalTokens(j.usage)), `${tokens(j.usage.input_tokens)} in · ${tokens(j.usage.output_tokens)} out`) +
      kpi("Cost", usd(j.cost_usd), "") +
      kpi("Tool calls", d.tool_calls, toolList);
    const files = (j.files_read || []).map((f) => `<li><span class="badge">read</span> <span class="mono">${esc(f)}</span></li>`).concat((j.files_written || []).map((f) => `<li><span class="badge s-running">wrote</span> <span class="mono">${esc(f)}</span></li>`));
    const cpTable = cps.length ? `<h3>Checkpoints</h3>` + table([
      { label: "Step", num: true, cell: (c) => c.step },
      { label: "At", cell: (c) => clock(c.at_ms) },
      { label: "Worker", cell: (c) => `<span class="mono">${esc(c.worker)}</span> · attempt ${c.attempt}` },
      { label: "Files", num: true, cell: (c) => c.files_changed },
      { label: "Tokens", num: true, cell: (c) => tokens(totalTokens(c.usage)) },
      { label: "Commit", cell: (c) => `<span class="mono" title="${esc(c.commit || "")}">${esc((c.commit || "–").slice(0, 7))}</span>` },
      { label: "", cell: (c) => `<button type="button" class="btn small" data-rewind="${c.step}" title="Start a new agent from this step's conversation and files (orchctl agents rewind ${esc(id)} --to ${c.step}); the message box above, if filled, is its next message">Rewind here</button>` },
    ], cps.slice().reverse()) : "";
    $("#a-files").innerHTML = (files.length ? `<ul class="plain stack">${files.join("")}</ul>` : `<p class="empty">No file read or written yet.</p>`) + cpTable;
    if (j.continues && $("#a-asked").hidden) {
      $("#a-asked").innerHTML = `<div class="msg user"><div class="who"><span>${j.forked ? "You · fork" : "You"}</span><span>${clock(j.queued_at_ms)}</span></div><div class="body">${esc(j.prompt)}</div></div>`;
      $("#a-asked").hidden = false;
    }
    $("#kill-btn").hidden = JOB_ENDED.includes(j.status);
    renderTurns(j);
    renderTalk(d);
    renderGit(j);
    renderDiffPanel(j);
    if (ended) {
      if (es) setTimeout(() => es && es.readyState !== EventSource.CLOSED && es.finish("Finished"), 1500);
      // An expired log replays nothing: then show the output the record kept.
      setTimeout(() => {
        if (j.output && !box.querySelector(".msg")) add("text", "Output", `<div class="body">${esc(j.output)}</div>`);
      }, 1500);
    }
  };
  const refresh = throttle(() => load().catch((e) => toast(e.message, true)), 500);

  const add = (cls, who, html, right = "") => {
    if (first) {
      box.innerHTML = "";
      first = false;
    }
    $(".thinking", box)?.remove();
    const div = document.createElement("div");
    div.className = "msg " + cls;
    div.innerHTML = `<div class="who"><span>${esc(who)}</span><span>${right}</span></div>${html}`;
    box.appendChild(div);
    box.scrollTop = box.scrollHeight;
    return div;
  };

  es = stream(`/v1/agents/${id}/logs?follow=true`, {
    job_started: (ev) => add("mark", `Attempt ${ev.attempt} started`, `<span>on <span class="mono">${esc(ev.kind.worker_id)}</span> · ${esc(ev.kind.backend)}${ev.kind.model ? " · " + esc(ev.kind.model) : ""}${ev.kind.sandbox ? " · sandbox: " + esc(ev.kind.sandbox) : ""}</span>`, clock(ev.at_ms)),
    thinking: () => {
      if (!$(".thinking", box)) add("mark thinking", "Thinking…", "");
    },
    text: (ev) => add("text", "Agent", `<div class="body">${esc(ev.kind.text)}</div>`, clock(ev.at_ms)),
    tool_call: (ev) => {
      const div = add("tool", "Tool call · " + ev.kind.name, `<pre>${esc(ev.kind.input)}</pre>`, clock(ev.at_ms));
      calls.set(ev.kind.call_id, ev.kind.name);
      return div;
    },
    mcp_server: (ev) => ev.kind.error == null
      ? add("mark", "MCP server · " + ev.kind.server, `<span>${ev.kind.tools} tool(s) offered, ${ev.kind.withheld} withheld by the role</span>`, clock(ev.at_ms))
      : add("error", "MCP server failed · " + ev.kind.server, `<pre>${esc(ev.kind.error)}</pre>`, clock(ev.at_ms)),
    sandbox_refused: (ev) => add("error", "Sandbox refused a connection", `<span class="mono">${esc(ev.kind.target)}</span> is not an allowed host of this role`, clock(ev.at_ms)),
    tool_result: (ev) => add(ev.kind.is_error ? "error" : "result", (ev.kind.is_error ? "Tool error · " : "Tool result · ") + (calls.get(ev.kind.call_id) || ev.kind.call_id), `<pre>${esc(ev.kind.output)}</pre>`, clock(ev.at_ms)),
    job_retrying: (ev) => add("mark", "Retrying", `<span>${describe(ev)}</span>`, clock(ev.at_ms)),
    job_parked: (ev) => add("mark", "Parked", `<span>${describe(ev)}</span>`, clock(ev.at_ms)),
    job_cancelled: (ev) => add("error", "Cancelled", `<span>${esc(ev.kind.reason)}</span>`, clock(ev.at_ms)),
    job_finished: (ev) => {
      // The server ends the stream right after a success: nothing more will come.
      if (ev.kind.success) ended = true;
      add(ev.kind.success ? "mark" : "error", ev.kind.success ? "Finished" : "Failed", `<span>${describe(ev)}</span>`, clock(ev.at_ms));
    },
  }, (ev) => {
    if (ev.kind.type !== "heartbeat" && ev.kind.type !== "thinking") refresh();
  }, () => ended);

  const kill = $("#kill-btn");
  kill.addEventListener("click", async () => {
    kill.disabled = true;
    try {
      await api(`/v1/agents/${id}/kill`, { method: "POST" });
      toast("Agent killed");
    } catch (e) {
      toast(e.message, true);
    }
    kill.disabled = false;
    refresh();
  });

  const talkError = (m) => {
    $("#talk-error").textContent = m;
    $("#talk-error").hidden = !m;
  };
  const talk = async (fork) => {
    const message = $("#a-message").value.trim();
    if (!message) {
      talkError("Write a message for the agent first.");
      $("#a-message").focus();
      return;
    }
    talkError("");
    const btns = [$("#send-btn"), $("#fork-btn")];
    const was = btns.map((b) => b.disabled);
    btns.forEach((b) => (b.disabled = true));
    try {
      const turn = await api(`/v1/agents/${id}/${fork ? "fork" : "send"}`, { method: "POST", body: { message } });
      location.href = "/agents/" + turn.agent_id;
    } catch (e) {
      talkError(e.message);
      btns.forEach((b, i) => (b.disabled = was[i]));
    }
  };
  $("#talk-form").addEventListener("submit", (e) => {
    e.preventDefault();
    talk(false);
  });
  $("#fork-btn").addEventListener("click", () => talk(true));
  // A checkpoint's "Rewind here": a new agent from that step (a running agent is stopped).
  $("#a-files").addEventListener("click", async (e) => {
    const b = e.target.closest("button[data-rewind]");
    if (!b) return;
    const to = Number(b.dataset.rewind);
    const running = !JOB_ENDED.includes(lastStatus);
    if (!confirm(`Start a new agent from step ${to}${running ? " (this agent is stopped first)" : ""}?`)) return;
    const message = $("#a-message").value.trim();
    b.disabled = true;
    try {
      const turn = await api(`/v1/agents/${id}/rewind`, { method: "POST", body: message ? { to, message } : { to } });
      location.href = "/agents/" + turn.agent_id;
    } catch (err) {
      toast(err.message, true);
      b.disabled = false;
    }
  });
  $("#a-message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      talk(false);
    }
  });
  $("#a-message").addEventListener("input", throttle(talkCli, 200));

  $("#diff-toggle").addEventListener("click", () => {
    const all = [...document.querySelectorAll("#diff details.diff-file")];
    const open = all.some((d) => d.open);
    all.forEach((d) => (d.open = !open));
    $("#diff-toggle").textContent = open ? "Expand all" : "Collapse all";
  });
  // A file in the list opens its section before the browser scrolls to it.
  $("#diff").addEventListener("click", (e) => {
    const a = e.target.closest("a[data-file]");
    if (a) {
      const d = document.getElementById("diff-f" + a.dataset.file);
      if (d) d.open = true;
    }
  });
  setInterval(() => document.querySelectorAll("[data-start]").forEach((el) => {
    if (el.dataset.start) el.textContent = elapsed(Number(el.dataset.start));
  }), 1000);
  setInterval(() => !ended && refresh(), 5000);
  load().catch((e) => {
    $("#a-title").textContent = "Agent not found";
    $("#a-meta").textContent = e.message;
    es.finish("Offline");
  });
}

// ----- history ----------------------------------------------------------------------------

function historyPage() {
  const form = $("#filters");
  const cursors = [];
  let cursor = null;
  const dayMs = (s, end) => {
    if (!s) return null;
    const d = new Date(s + "T00:00:00");
    if (end) d.setDate(d.getDate() + 1);
    return d.getTime();
  };
  // The form's state lives in the address, so a filtered view can be shared and reloaded.
  const fromUrl = () => {
    const q = new URLSearchParams(location.search);
    for (const el of form.elements) if (el.name && q.has(el.name)) el.value = q.get(el.name);
  };
  const query = () => {
    const f = new FormData(form);
    const p = new URLSearchParams();
    p.set("limit", f.get("limit") || "20");
    for (const k of ["status", "search", "min_cost", "max_cost", "sort", "order"]) {
      const v = String(f.get(k) || "").trim();
      if (v) p.set(k, v);
    }
    const since = dayMs(f.get("from"), false), until = dayMs(f.get("to"), true);
    if (since) p.set("since", since);
    if (until) p.set("until", until);
    if (cursor) p.set("cursor", cursor);
    return p;
  };
  // Filters change faster than the server answers: only the latest request may draw the table
  // (an older answer arriving last would show the list for filters no longer set).
  let latest = 0;
  const load = async () => {
    const el = $("#history-table");
    const mine = ++latest;
    let page;
    try {
      page = await api("/v1/tasks?" + query());
    } catch (e) {
      if (mine === latest) el.innerHTML = `<p class="form-error">${esc(e.message)}</p>`;
      return;
    }
    if (mine !== latest) return;
    el.innerHTML = table([
      { label: "Date", cell: (t) => `<span title="${esc(when(t.created_at_ms))}">${esc(when(t.created_at_ms))}</span>` },
      { label: "Description", cls: "desc", cell: (t) => `<a href="/tasks/${esc(t.id)}" title="${esc(t.prompt)}">${esc(t.prompt)}</a>` },
      { label: "Status", cell: (t) => badge(t.status) },
      { label: "Type", cell: (t) => esc(t.task_type) },
      { label: "Agents", cell: (t) => `<span class="roles">${t.roles.map((r) => `<span>${esc(r)}</span>`).join("")}</span>` },
      { label: "Tokens", num: true, cell: (t) => tokens(totalTokens(t.usage)) },
      { label: "Cost", num: true, cell: (t) => usd(t.cost_usd) },
      { label: "Duration", num: true, cell: (t) => (t.finished_at_ms ? dur(t.finished_at_ms - t.created_at_ms) : "running") },
    ], page.tasks, "No task matches these filters.");
    $("#next").disabled = !page.next_cursor;
    $("#next").dataset.cursor = page.next_cursor || "";
    $("#first").disabled = !cursors.length;
    $("#page-no").textContent = `page ${cursors.length + 1} · ${page.tasks.length} task(s)`;
  };
  const apply = () => {
    const p = new URLSearchParams(new FormData(form));
    for (const [k, v] of [...p]) if (!v) p.delete(k);
    history.replaceState(null, "", "/history" + (p.toString() ? "?" + p : ""));
    cursors.length = 0;
    cursor = null;
    load();
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    apply();
  });
  form.addEventListener("change", apply);
  $("#reset").addEventListener("click", () => setTimeout(apply, 0));
  $("#next").addEventListener("click", () => {
    cursors.push(cursor);
    cursor = $("#next").dataset.cursor;
    load();
  });
  $("#first").addEventListener("click", () => {
    cursors.length = 0;
    cursor = null;
    load();
  });
  fromUrl();
  stream("/v1/events?kinds=task_created,task_finished&max_chars=1", {}, throttle(() => !cursor && load(), 1000));
  load();
}

// ----- costs ------------------------------------------------------------------------------

function costsPage() {
  const opts = $("#cost-opts");
  const color = new Map();
  const colorOf = (k) => {
    if (!color.has(k)) {
      const i = ROLE_ORDER.indexOf(k);
      color.set(k, PALETTE[(i >= 0 ? i : color.size + ROLE_ORDER.length) % PALETTE.length]);
    }
    return color.get(k);
  };

  const buckets = (range) => {
    const now = new Date();
    const out = [];
    if (range === "24h") {
      const end = new Date(now);
      end.setMinutes(0, 0, 0);
      end.setHours(end.getHours() + 1);
      for (let i = 23; i >= 0; i--) {
        const s = end.getTime() - (i + 1) * 3600e3;
        out.push({ since: s, until: s + 3600e3, label: new Date(s).getHours() + "h" });
      }
    } else {
      const days = range === "30d" ? 30 : 7;
      const start = new Date(now);
      start.setHours(0, 0, 0, 0);
      for (let i = days - 1; i >= 0; i--) {
        const s = new Date(start);
        s.setDate(s.getDate() - i);
        const u = new Date(s);
        u.setDate(u.getDate() + 1);
        out.push({ since: s.getTime(), until: u.getTime(), label: s.toLocaleDateString([], { month: "short", day: "numeric" }) });
      }
    }
    return out;
  };

  const chart = (bs, by) => {
    const keys = new Set();
    for (const b of bs) for (const g of b.groups) keys.add(g.key);
    const order = [...keys].sort((a, b) => (ROLE_ORDER.indexOf(a) + 99) % 99 - (ROLE_ORDER.indexOf(b) + 99) % 99 || a.localeCompare(b));
    const max = Math.max(0, ...bs.map((b) => b.groups.reduce((s, g) => s + g.cost_usd, 0)));
    // Four gridlines at a round step (1, 2, 2.5 or 5 times a power of ten).
    const nice = (() => {
      const want = max > 0 ? max / 4 : 0.0025;
      const p = Math.pow(10, Math.floor(Math.log10(want)));
      for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= want) return 4 * m * p;
      return 40 * p;
    })();
    const W = 900, H = 280, L = 62, B = 28, T = 10, R = 8;
    const pw = (W - L - R) / bs.length;
    const bw = Math.max(4, Math.min(36, pw * 0.66));
    const y = (v) => T + (H - T - B) * (1 - v / nice);
    let svg = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="Spend over time by ${esc(by)}">`;
    for (let i = 0; i <= 4; i++) {
      const v = (nice * i) / 4;
      svg += `<line class="grid" x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}"/><g class="axis"><text x="${L - 8}" y="${y(v) + 4}" text-anchor="end">${usd(v)}</text></g>`;
    }
    const every = Math.ceil(bs.length / 12);
    bs.forEach((b, i) => {
      const x = L + i * pw + (pw - bw) / 2;
      let acc = 0;
      for (const k of order) {
        const g = b.groups.find((g2) => g2.key === k);
        if (!g || g.cost_usd <= 0) continue;
        const y0 = y(acc), y1 = y(acc + g.cost_usd);
        acc += g.cost_usd;
        svg += `<rect class="bar" data-key="${esc(k)}" x="${x}" y="${y1}" width="${bw}" height="${Math.max(0.5, y0 - y1)}" rx="2" fill="${colorOf(k)}"><title>${esc(b.label)} · ${esc(k)}: ${usd(g.cost_usd)} (${g.agents} agents)</title></rect>`;
      }
      if (i % every === 0) svg += `<g class="axis"><text x="${L + i * pw + pw / 2}" y="${H - 8}" text-anchor="middle">${esc(b.label)}</text></g>`;
    });
    svg += "</svg>";
    $("#chart").innerHTML = svg + (max <= 0 ? `<p class="empty">No spend in this range yet.</p>` : "");
    $("#legend").innerHTML = order.map((k) => `<span><i style="background:${colorOf(k)}"></i>${esc(k)}</span>`).join("");
  };

  // Only the latest load draws (an older answer arriving last would chart other options).
  let latest = 0;
  const load = async () => {
    const mine = ++latest;
    const f = new FormData(opts);
    const range = f.get("range"), by = f.get("by");
    const bs = buckets(range);
    const since = bs[0].since, until = bs[bs.length - 1].until;
    const reports = await Promise.all(bs.map((b) => api(`/v1/reports/cost?since=${b.since}&until=${b.until}&by=${by}`)));
    if (mine !== latest) return;
    $("#chart-title").textContent = `Spend over time by ${by}`;
    bs.forEach((b, i) => (b.groups = (reports[i].breakdowns[0] || { groups: [] }).groups.map((g) => ({ key: g.key, cost_usd: g.cost_usd, agents: g.agents }))));
    chart(bs, by);
    const all = await api(`/v1/reports/cost?since=${since}&until=${until}&by=role,model,backend`);
    if (mine !== latest) return;
    const t = all.total;
    $("#c-kpis").innerHTML = kpi("Spend", usd(t.cost_usd), `${all.tasks} task(s)` + (all.truncated ? " · newest only" : "")) +
      kpi("Agents", t.agents, "that ran") +
      kpi("Tokens", tokens(totalTokens(t.usage)), "all kinds") +
      kpi("Per agent", usd(t.agents ? t.cost_usd / t.agents : 0), "average");
    const kinds = [["Input", t.usage.input_tokens], ["Output", t.usage.output_tokens], ["Cache write", t.usage.cache_creation_tokens], ["Cache read", t.usage.cache_read_tokens]];
    const kmax = Math.max(1, ...kinds.map((k) => k[1]));
    $("#tokens").innerHTML = `<div class="hbars">${kinds.map(([k, v], i) => `<div class="hbar-row"><span>${k}</span><span class="hbar-track"><span style="width:${(100 * v) / kmax}%;background:${PALETTE[i]}"></span></span><span class="num mono">${tokens(v)}</span></div>`).join("")}</div>`;
    const bd = all.breakdowns.find((b) => b.by === by) || { groups: [] };
    $("#breakdown-title").textContent = `By ${by}`;
    $("#breakdown").innerHTML = table([
      { label: by, cell: (g) => `<span class="legend"><span><i style="background:${colorOf(g.key)}"></i>${esc(g.key)}</span></span>` },
      { label: "Agents", num: true, cell: (g) => g.agents },
      { label: "Tokens", num: true, cell: (g) => tokens(totalTokens(g.usage)) },
      { label: "Cost", num: true, cell: (g) => usd(g.cost_usd) },
      { label: "Share", num: true, cell: (g) => (t.cost_usd ? Math.round((100 * g.cost_usd) / t.cost_usd) + "%" : "–") },
    ], bd.groups, "No agent ran in this range.");
    const w = `since=${since}&until=${until}`;
    $("#export").innerHTML = `
      <button class="btn" data-csv="tasks">⬇ Tasks CSV</button>
      <button class="btn" data-csv="agents">⬇ Agents CSV</button>
      <a class="btn" href="/v1/export?what=tasks&${w}" download="tasks.ndjson">Tasks JSON</a>
      <a class="btn" href="/v1/export?what=agents&${w}" download="agents.ndjson">Agents JSON</a>
      <a class="btn" href="/v1/export?what=events&${w}" download="events.ndjson">Events JSON</a>
      <a class="btn" href="/v1/reports/cost?${w}&by=role,model,backend,worker,status" target="_blank">Cost report JSON</a>`;
    $("#export").dataset.window = w;
  };

  // CSV is made here from the export's JSON lines: one column per (flattened) field.
  $("#export").addEventListener("click", async (e) => {
    const what = e.target.dataset.csv;
    if (!what) return;
    const r = await fetch(`/v1/export?what=${what}&${$("#export").dataset.window}`, { credentials: "same-origin" });
    const rows = (await r.text()).split("\n").filter(Boolean).map((l) => JSON.parse(l));
    const flat = (o, p = "", out = {}) => {
      for (const [k, v] of Object.entries(o)) {
        if (v && typeof v === "object" && !Array.isArray(v)) flat(v, p + k + ".", out);
        else out[p + k] = Array.isArray(v) ? v.join(" ") : v;
      }
      return out;
    };
    const flats = rows.map((r2) => flat(r2));
    const cols = [...new Set(flats.flatMap((r2) => Object.keys(r2)))];
    const cell = (v) => (v == null ? "" : /[",\n]/.test(String(v)) ? '"' + String(v).replace(/"/g, '""') + '"' : String(v));
    const csv = [cols.join(","), ...flats.map((r2) => cols.map((c) => cell(r2[c])).join(","))].join("\n") + "\n";
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([csv], { type: "text/csv" }));
    a.download = `${what}.csv`;
    a.click();
    URL.revokeObjectURL(a.href);
  });
  opts.addEventListener("change", () => load().catch((e) => toast(e.message, true)));
  stream("/v1/events?kinds=job_finished&max_chars=1", {}, throttle(() => load().catch(() => {}), 3000));
  load().catch((e) => toast(e.message, true));
}

// ----- start ------------------------------------------------------------------------------

initTheme();
({ overview: overviewPage, new: newTaskPage, task: taskPage, agent: agentPage, history: historyPage, costs: costsPage })[PAGE]?.();
