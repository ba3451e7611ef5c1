//! Page templates: plain format strings around a shared layout. Every value that comes from a
//! request goes through [`escape`]; live data is filled in by `app.js` from the `/v1` API.

use orch_shared::role::Role;

/// HTML-escapes text for element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes everything but unreserved characters (for a query value).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// Sets the theme before the first paint (a stored choice, else the system's), so a dark page
/// never flashes white.
const THEME_BOOT: &str = "<script>try{var t=localStorage.getItem('orch-theme');if(t)document.documentElement.dataset.theme=t}catch(e){}</script>";

const NAV: [(&str, &str, &str); 4] = [
    ("overview", "/", "Overview"),
    ("new", "/tasks/new", "New task"),
    ("history", "/history", "History"),
    ("costs", "/costs", "Costs"),
];

fn head(title: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{title} · orchestrator</title>
<link rel="icon" href="/ui/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/ui/app.css">
{THEME_BOOT}
</head>
"#,
        title = escape(title)
    )
}

/// The layout of every signed-in page: header with navigation, live indicator, theme switch
/// and logout; `page` names the script's page handler, `data` adds `data-*` attributes.
fn layout(page: &str, active: &str, title: &str, data: &[(&str, &str)], body: &str) -> String {
    let nav: String = NAV
        .iter()
        .map(|(key, href, label)| {
            let current = if *key == active {
                r#" aria-current="page""#
            } else {
                ""
            };
            format!(r#"<a href="{href}"{current}>{label}</a>"#)
        })
        .collect();
    let attrs: String = data
        .iter()
        .map(|(k, v)| format!(r#" data-{k}="{}""#, escape(v)))
        .collect();
    format!(
        r#"{head}<body data-page="{page}"{attrs}>
<header class="top">
  <a class="brand" href="/"><img src="/ui/icon.svg" alt="" width="22" height="22"><span>orchestrator</span></a>
  <nav class="tabs">{nav}</nav>
  <div class="top-right">
    <span id="live" class="live" data-state="connecting" hidden title="Server-sent events from the coordinator"><i></i><span>Connecting…</span></span>
    <button type="button" id="theme" class="icon-btn" title="Switch light / dark theme" aria-label="Switch theme">◐</button>
    <form method="post" action="/logout"><button class="icon-btn" title="Log out" aria-label="Log out">⎋</button></form>
  </div>
</header>
<main>
{body}
</main>
<div id="toast" role="status" aria-live="polite"></div>
<script src="/ui/app.js"></script>
</body>
</html>
"#,
        head = head(title),
    )
}

pub fn login(next: &str, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!(r#"<p class="form-error" role="alert">{}</p>"#, escape(e)))
        .unwrap_or_default();
    format!(
        r#"{head}<body data-page="login" class="login-body">
<main class="login">
  <div class="login-card">
    <div class="brand big"><img src="/ui/icon.svg" alt="" width="36" height="36"><span>orchestrator</span></div>
    <h1>Sign in to the cluster</h1>
    <p class="muted">Use an API token of this coordinator (its <code>--token</code>, or <code>ORCH_TOKEN</code> in your orchctl config). It is kept in a secure session cookie, never in the page.</p>
    {error}
    <form method="post" action="/login" class="stack">
      <input type="hidden" name="next" value="{next}">
      <label>API token<input type="password" name="token" id="token" autocomplete="current-password" required autofocus></label>
      <button class="btn primary" type="submit">Sign in</button>
    </form>
  </div>
</main>
<script src="/ui/app.js"></script>
</body>
</html>
"#,
        head = head("Sign in"),
        next = escape(next),
    )
}

pub fn overview() -> String {
    layout(
        "overview",
        "overview",
        "Overview",
        &[],
        r#"<div class="page-head"><h1>Cluster overview</h1><a class="btn primary" href="/tasks/new">+ New task</a></div>
<section class="kpis" id="kpis">
  <div class="kpi"><span class="kpi-label">Workers</span><span class="kpi-value" id="k-workers">–</span><span class="kpi-sub" id="k-slots"></span></div>
  <div class="kpi"><span class="kpi-label">Running agents</span><span class="kpi-value" id="k-agents">–</span><span class="kpi-sub" id="k-tasks"></span></div>
  <div class="kpi"><span class="kpi-label">Queue</span><span class="kpi-value" id="k-queue">–</span><span class="kpi-sub" id="k-inflight"></span></div>
  <div class="kpi"><span class="kpi-label">Dead letters</span><span class="kpi-value" id="k-dlq">–</span><span class="kpi-sub"><a href="/#dlq">review</a></span></div>
  <div class="kpi"><span class="kpi-label">Spend today</span><span class="kpi-value" id="k-spend">–</span><span class="kpi-sub" id="k-spend-sub"></span></div>
</section>
<section class="panel" id="approvals">
  <div class="panel-head"><h2>Needs you</h2><span class="muted small">agents waiting for your approval · <code>orchctl approvals list</code></span></div>
  <p id="approval-error" class="form-error" role="alert" hidden></p>
  <div id="approval-list" aria-live="polite"><p class="empty">Loading…</p></div>
</section>
<section class="panel">
  <div class="panel-head"><h2>Running agents</h2><span class="muted small">live · <code>orchctl status</code></span></div>
  <div id="agents" class="agent-grid"><p class="empty">Loading…</p></div>
</section>
<div class="cols">
  <section class="panel">
    <div class="panel-head"><h2>Workers</h2><span class="muted small"><code>orchctl workers list</code></span></div>
    <div id="workers"><p class="empty">Loading…</p></div>
  </section>
  <section class="panel">
    <div class="panel-head"><h2>Recent tasks</h2><a class="small" href="/history">All history →</a></div>
    <div id="recent"><p class="empty">Loading…</p></div>
  </section>
</div>
<section class="panel" id="quotas">
  <div class="panel-head"><h2>Provider quotas</h2><span class="muted small"><code>orchctl quotas</code></span></div>
  <div id="quota-list"><p class="empty">Loading…</p></div>
</section>
<section class="panel" id="dlq">
  <div class="panel-head"><h2>Dead letters</h2><span class="muted small"><code>orchctl dlq list</code> · <code>orchctl dlq retry JOB</code></span></div>
  <div id="dead"><p class="empty">Loading…</p></div>
</section>"#,
    )
}

pub fn new_task() -> String {
    // Every role but `custom` (which a plan names, not a checkbox), in pipeline order.
    let roles: String = Role::ALL
        .iter()
        .map(|r| r.as_str())
        .filter(|r| *r != Role::Custom.as_str())
        .map(|r| {
            format!(
                r#"<label class="chip-check"><input type="checkbox" name="roles" value="{r}"><span>{r}</span></label>"#
            )
        })
        .collect();
    let body = format!(
        r#"<div class="page-head"><h1>New task</h1></div>
<div class="cols wide-left">
<form id="task-form" class="panel stack" autocomplete="off">
  <label>Description<textarea name="prompt" id="prompt" rows="4" required placeholder="e.g. analyze the parser and build a cache for it"></textarea></label>
  <div class="row">
    <label>Task type<select name="task_type" id="task_type"><option value="auto">auto</option></select></label>
    <label>Mode<select name="mode"><option value="sequential">sequential</option><option value="parallel">parallel</option></select></label>
    <label>Priority<select name="priority"><option value="normal">normal</option><option value="high">high</option><option value="low">low</option></select></label>
  </div>
  <fieldset><legend>Roles <span class="muted small">(a custom workflow in this order; leave empty to use the task type)</span></legend><div class="chips">{roles}</div></fieldset>
  <div class="row">
    <label>Workspace<input name="workspace" placeholder="scratch directory (default), or an absolute path"></label>
    <label>Repository<input name="repo" placeholder="or a git URL: each agent works in a clone"></label>
    <label>Ref<input name="ref" placeholder="HEAD" title="The branch, tag or commit of the repository to start from"></label>
  </div>
  <div class="row">
    <label>Budget (USD)<input name="budget_usd" type="number" min="0" step="0.01" placeholder="none"></label>
    <label>Budget (tokens)<input name="budget_tokens" type="number" min="0" step="1" placeholder="none"></label>
  </div>
  <details>
    <summary>Advanced</summary>
    <div class="stack">
      <div class="row">
        <label>Backend<select name="backend"><option value="">worker default</option><option>sim</option><option>claude-code</option><option>anthropic</option><option>openai</option><option>command</option></select></label>
        <label>Model<input name="model" placeholder="default"></label>
        <label>On failure<select name="on_failure"><option value="stop">stop</option><option value="continue">continue</option></select></label>
      </div>
      <div class="row">
        <label>Max attempts<input name="max_attempts" type="number" min="1" placeholder="3"></label>
        <label>Max parallel<input name="max_parallel" type="number" min="1" placeholder="no cap"></label>
        <label>Sim latency (ms)<input name="sim_latency_ms" type="number" min="0" placeholder="backend default"></label>
      </div>
      <label>Plan (JSON DAG, overrides type and roles)<textarea name="plan" rows="5" placeholder='{{"steps": [{{"role": "analyst", "scope": "map the parser"}}, {{"role": "builder", "scope": "add the cache", "depends_on": [0]}}]}}'></textarea></label>
    </div>
  </details>
  <p id="form-error" class="form-error" hidden></p>
  <div class="actions">
    <button type="button" class="btn" id="preview-btn">Preview plan &amp; cost</button>
    <button type="submit" class="btn primary" id="submit-btn">Submit task</button>
  </div>
  <div class="cli"><span class="muted small">Same with orchctl:</span><code id="cli"></code></div>
</form>
<section class="panel" id="preview">
  <div class="panel-head"><h2>Plan preview</h2><span class="muted small">dry run · nothing runs</span></div>
  <div id="preview-body"><p class="empty">Describe the task and press <b>Preview</b> to see the plan and its estimated cost.</p></div>
</section>
</div>"#
    );
    layout("new", "new", "New task", &[], &body)
}

pub fn task(id: &str) -> String {
    let body = r#"<div class="page-head">
  <div><a class="small" href="/history">← History</a><h1 id="t-title">Task</h1><div id="t-meta" class="meta"></div></div>
  <div class="actions"><button type="button" class="btn danger" id="cancel-btn" hidden>Cancel task</button></div>
</div>
<section class="kpis" id="t-kpis"></section>
<section class="panel">
  <div class="panel-head"><h2>Plan</h2><span class="muted small" id="t-progress"></span></div>
  <div id="dag" class="dag"></div>
</section>
<section class="panel">
  <div class="panel-head"><h2>Steps</h2><span class="muted small"><code>orchctl tasks show ID</code></span></div>
  <div id="steps"></div>
</section>
<div class="cols">
  <section class="panel">
    <div class="panel-head"><h2>Event log</h2><span class="muted small">live</span></div>
    <ol id="events" class="events"></ol>
  </section>
  <section class="panel">
    <div class="panel-head"><h2>Result</h2></div>
    <div id="t-output"><p class="empty">No output yet.</p></div>
  </section>
</div>"#;
    layout("task", "", "Task", &[("id", id)], body)
}

pub fn agent(id: &str) -> String {
    let body = format!(
        r#"<div class="page-head">
  <div><a class="small" id="a-back" href="/">← Task</a><h1 id="a-title">Agent</h1><div id="a-meta" class="meta"></div></div>
  <div class="actions"><button type="button" class="btn danger" id="kill-btn" hidden>Kill agent</button></div>
</div>
<section class="kpis" id="a-kpis"></section>
<div class="cols wide-left">
  <section class="panel">
    <div class="panel-head"><h2>Transcript</h2><span class="muted small">live · <code>orchctl logs</code> follows the same stream</span></div>
    <div id="a-asked" hidden></div>
    <div id="transcript" class="transcript"><p class="empty">Waiting for the agent…</p></div>
  </section>
  <div class="stack">
    <section class="panel" id="talk">
      <div class="panel-head"><h2>Talk to the agent</h2><span class="muted small" id="talk-state"></span></div>
      <form id="talk-form" class="stack" autocomplete="off">
        <label for="a-message" class="sr-only">Message</label>
        <textarea id="a-message" name="message" rows="3" maxlength="100000" placeholder="Your next message, e.g. “go on” or “now add tests for it”"></textarea>
        <p id="talk-reason" class="muted small" hidden></p>
        <p id="talk-error" class="form-error" role="alert" hidden></p>
        <div class="actions">
          <button type="submit" class="btn primary" id="send-btn" disabled title="Continue this conversation: the agent answers as a new turn of the task">Send</button>
          <button type="button" class="btn" id="fork-btn" disabled title="Start a separate conversation from this point; this one stays as it is">Fork</button>
        </div>
        <p class="muted small">Each message runs as a new agent of this task that resumes this one's session. <b>Send</b> continues the conversation; <b>Fork</b> branches off it, leaving this agent's thread as it is.</p>
        <div class="cli"><span class="muted small">Same with orchctl:</span><code id="talk-cli"></code></div>
      </form>
    </section>
    <section class="panel" id="turns-panel" hidden>
      <div class="panel-head"><h2>Conversation</h2><span class="muted small" id="turns-count"></span></div>
      <ol id="turns" class="turns"></ol>
    </section>
    <section class="panel" id="git-panel" hidden>
      <div class="panel-head"><h2>Git</h2><span id="git-state"></span></div>
      <dl id="git" class="facts"></dl>
    </section>
    <section class="panel">
      <div class="panel-head"><h2>Files</h2></div>
      <div id="a-files"><p class="empty">None yet.</p></div>
    </section>
  </div>
</div>
<section class="panel" id="changes">
  <div class="panel-head"><h2>Changes</h2><div class="actions"><span class="muted small" id="diff-stat"></span><code class="small" id="diff-cli">orchctl agents diff {id}</code><button type="button" class="btn sm" id="diff-toggle" hidden>Collapse all</button></div></div>
  <div id="diff"><p class="empty">The diff of what this agent changed shows here when it finishes.</p></div>
</section>"#,
        id = escape(id)
    );
    layout("agent", "", "Agent", &[("id", id)], &body)
}

pub fn history() -> String {
    let body = r#"<div class="page-head"><h1>Task history</h1><span class="muted small"><code>orchctl tasks list</code></span></div>
<form id="filters" class="panel filters">
  <label class="grow">Search<input type="search" name="search" placeholder="words of the description, or an id prefix"></label>
  <label>Status<select name="status"><option value="">any</option><option>pending</option><option>running</option><option>completed</option><option>failed</option><option>cancelled</option></select></label>
  <label>From<input type="date" name="from"></label>
  <label>To<input type="date" name="to"></label>
  <label>Min $<input type="number" name="min_cost" min="0" step="0.0001" class="narrow"></label>
  <label>Max $<input type="number" name="max_cost" min="0" step="0.0001" class="narrow"></label>
  <label>Sort<select name="sort"><option value="created">date</option><option value="cost">cost</option><option value="duration">duration</option><option value="tokens">tokens</option></select></label>
  <label>Order<select name="order"><option value="desc">desc</option><option value="asc">asc</option></select></label>
  <label>Per page<select name="limit"><option>20</option><option>50</option><option>100</option></select></label>
  <div class="actions"><button class="btn primary" type="submit">Apply</button><button class="btn" type="reset" id="reset">Reset</button></div>
</form>
<section class="panel">
  <div id="history-table"><p class="empty">Loading…</p></div>
  <div class="pager"><button class="btn" id="first" type="button" disabled>« First</button><span id="page-no" class="muted small"></span><button class="btn" id="next" type="button" disabled>Next »</button></div>
</section>"#;
    layout("history", "history", "History", &[], body)
}

pub fn costs() -> String {
    let body = r#"<div class="page-head"><h1>Costs</h1>
  <form id="cost-opts" class="inline-form">
    <label>Range<select name="range"><option value="24h">last 24 hours</option><option value="7d" selected>last 7 days</option><option value="30d">last 30 days</option></select></label>
    <label>By<select name="by"><option value="role">role</option><option value="model">model</option></select></label>
  </form>
</div>
<section class="kpis" id="c-kpis"></section>
<section class="panel">
  <div class="panel-head"><h2 id="chart-title">Spend over time</h2><span class="muted small"><code>orchctl</code> reports the same from <code>/v1/reports/cost</code></span></div>
  <div id="chart" class="chart"><p class="empty">Loading…</p></div>
  <div id="legend" class="legend"></div>
</section>
<div class="cols">
  <section class="panel">
    <div class="panel-head"><h2>Tokens by kind</h2></div>
    <div id="tokens"></div>
  </section>
  <section class="panel">
    <div class="panel-head"><h2 id="breakdown-title">Breakdown</h2></div>
    <div id="breakdown"></div>
  </section>
</div>
<section class="panel">
  <div class="panel-head"><h2>Export</h2></div>
  <div class="export" id="export"></div>
</section>"#;
    layout("costs", "costs", "Costs", &[], body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_neutralises_markup() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn url_encode_keeps_paths_readable() {
        assert_eq!(url_encode("/tasks/a b?c"), "/tasks/a%20b%3Fc");
    }

    #[test]
    fn agent_page_offers_talk_and_a_diff_with_their_orchctl_verbs() {
        let html = agent("0190-abc");
        for needle in [
            r#"id="send-btn""#,
            r#"id="fork-btn""#,
            r#"id="diff""#,
            "orchctl agents diff 0190-abc",
        ] {
            assert!(html.contains(needle), "{needle}");
        }
    }

    #[test]
    fn pages_carry_no_secret_and_name_their_handler() {
        let html = task("0190-abc");
        assert!(html.contains(r#"data-page="task""#));
        assert!(html.contains(r#"data-id="0190-abc""#));
        assert!(!login("/", None).contains("token\" value"));
    }
}
