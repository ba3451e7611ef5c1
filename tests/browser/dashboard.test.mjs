// End-to-end tests of the web dashboard in a real browser: Debian's chromium driven by
// playwright-core, against a real local cluster with `sim` agents started by
// tests/tests/dashboard.rs, which runs one scenario per call:
//
//   ORCH_URL=http://127.0.0.1:PORT ORCH_TOKEN=... ORCH_ARTIFACTS=dir node dashboard.test.mjs SCENARIO
//
// Every step prints one line with its duration; a failure prints the step, the error and takes
// a screenshot (`failure-<scenario>.png`) next to the pages' screenshots.
import { chromium } from "playwright-core";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const URL_ = process.env.ORCH_URL;
const TOKEN = process.env.ORCH_TOKEN;
const ART = process.env.ORCH_ARTIFACTS || "target/test-artifacts/dashboard";
const SCENARIO = process.argv[2];
if (!URL_ || !TOKEN || !SCENARIO) {
  console.error("usage: ORCH_URL=... ORCH_TOKEN=... node dashboard.test.mjs SCENARIO");
  process.exit(2);
}
mkdirSync(ART, { recursive: true });

function assert(cond, msg) {
  if (!cond) throw new Error("assertion failed: " + msg);
}

let page;
async function step(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    console.log(`ok   ${SCENARIO} / ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    console.log(`FAIL ${SCENARIO} / ${name} (${Date.now() - t0} ms): ${e && e.stack ? e.stack : e}`);
    if (page) await page.screenshot({ path: join(ART, `failure-${SCENARIO}.png`), fullPage: true }).catch(() => {});
    throw e;
  }
}
const shot = (name) => page.screenshot({ path: join(ART, `${name}.png`), fullPage: true });

async function login(p, token = TOKEN) {
  await p.goto(URL_ + "/login");
  await p.fill("#token", token);
  await Promise.all([p.waitForNavigation(), p.click("button[type=submit]")]);
}

async function submitViaApi(body) {
  const r = await fetch(URL_ + "/v1/tasks", {
    method: "POST",
    headers: { Authorization: "Bearer " + TOKEN, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  assert(r.ok, `submit answered ${r.status}`);
  return r.json();
}

const scenarios = {
  // Without a token nothing is shown and the API refuses; with a wrong one the login says so;
  // the right one is kept in an HttpOnly, SameSite=Strict cookie and never appears in the page.
  async refused(ctx) {
    await step("a page without a session redirects to the login", async () => {
      await page.goto(URL_ + "/history");
      assert(new URL(page.url()).pathname === "/login", "landed on " + page.url());
      assert((await page.textContent("h1")).includes("Sign in"), "login heading");
    });
    await step("the API refuses a browser without a token", async () => {
      const r = await page.request.get(URL_ + "/v1/status");
      assert(r.status() === 401, "status " + r.status());
      const es = await page.evaluate(async (u) => (await fetch(u + "/v1/tasks")).status, URL_);
      assert(es === 401, "fetch status " + es);
    });
    const here = async (token) => {
      await page.fill("#token", token);
      await Promise.all([page.waitForNavigation(), page.click("button[type=submit]")]);
    };
    await step("a wrong token is refused with a message", async () => {
      await page.goto(URL_ + "/history");
      await here("not-the-token");
      assert(new URL(page.url()).pathname === "/login", "still on the login page");
      await page.waitForSelector(".form-error");
      await shot("login-refused");
    });
    await step("the right token signs in with a secure session cookie", async () => {
      await here(TOKEN);
      await page.waitForSelector("#history-table tbody tr, #history-table .empty");
      assert(new URL(page.url()).pathname === "/history", "back to the page first asked for: " + page.url());
      const cookies = await ctx.cookies();
      const c = cookies.find((x) => x.name === "orch_session");
      assert(c && c.httpOnly && c.sameSite === "Strict", "cookie flags " + JSON.stringify(c));
      const html = await page.content();
      assert(!html.includes(TOKEN), "the token is in the page source");
      assert(!(await page.evaluate(() => document.cookie)).includes("orch_session"), "script can read the cookie");
    });
    await step("a write with the cookie but without the dashboard header is refused", async () => {
      const status = await page.evaluate(async (u) => (await fetch(u + "/v1/tasks", { method: "POST", headers: { "Content-Type": "application/json" }, body: '{"prompt":"x"}' })).status, URL_);
      assert(status === 401, "status " + status);
    });
    await step("logging out ends the session", async () => {
      await Promise.all([page.waitForNavigation(), page.click("form[action='/logout'] button")]);
      await page.goto(URL_ + "/");
      assert(new URL(page.url()).pathname === "/login", "after logout: " + page.url());
    });
  },

  // Submit from the form after a dry-run preview, watch the steps turn done live, read a
  // transcript; the overview's live grid on a wide and a narrow screen, in both themes.
  async live() {
    await step("log in", () => login(page));
    await step("the overview shows workers and slots", async () => {
      await page.waitForFunction(() => document.querySelectorAll("#workers .worker").length >= 2);
      await page.waitForSelector("#live[data-state=live]");
      await page.waitForFunction(() => (document.querySelector("#k-spend-sub")?.textContent || "").includes("no daily budget"));
      await shot("overview-idle");
    });
    let taskUrl;
    await step("the form previews the plan and its estimate", async () => {
      await page.click("nav a[href='/tasks/new']");
      await page.waitForFunction(() => document.querySelectorAll("#task_type option").length > 3);
      await page.fill("#prompt", "analyze the parser and build a cache for it");
      await page.click("details summary");
      await page.fill("input[name=sim_latency_ms]", "1500");
      await page.click("#preview-btn");
      await page.waitForFunction(() => document.querySelectorAll("#preview-body tbody tr").length >= 2);
      const roles = await page.$$eval("#preview-body tbody tr .role", (els) => els.map((e) => e.textContent));
      assert(roles.includes("analyst") && roles.includes("builder"), "previewed roles " + roles);
      assert((await page.textContent("#cli")).startsWith("orchctl submit"), "orchctl equivalent shown");
      await shot("new-task-preview");
    });
    await step("submitting opens the task, whose steps turn done live", async () => {
      await Promise.all([page.waitForURL(/\/tasks\/[0-9a-f-]{36}$/), page.click("#submit-btn")]);
      taskUrl = page.url();
      await page.waitForSelector("#dag .node");
      // Seen running, then succeeded, without a reload: the page follows the event stream.
      await page.waitForSelector("#dag .node[data-status=running]", { timeout: 15000 });
      await page.waitForSelector("#events li");
      await shot("task-running");
      await page.waitForFunction(() => {
        const n = [...document.querySelectorAll("#dag .node")];
        return n.length >= 2 && n.every((e) => e.dataset.status === "succeeded");
      }, null, { timeout: 30000 });
      await page.waitForSelector("#t-meta .badge.s-completed");
      assert(page.url() === taskUrl, "no navigation happened");
      await shot("task-completed");
    });
    await step("an agent's transcript shows text, tool calls and results", async () => {
      await page.click("#steps tbody tr:first-child a.role");
      await page.waitForURL(/\/agents\//);
      await page.waitForSelector("#transcript .msg.tool pre");
      await page.waitForSelector("#transcript .msg.result");
      await page.waitForSelector("#transcript .msg.text");
      await page.waitForSelector("#diff .empty");
      assert(await page.isVisible("#send-btn") && await page.isVisible("#fork-btn"), "send and fork are offered");
      await shot("agent-transcript");
    });
    await step("the overview shows running agents live", async () => {
      await page.goto(URL_ + "/");
      await page.waitForSelector("#live[data-state=live]");
      await submitViaApi({ prompt: "survey the repository", roles: ["analyst", "reviewer", "documenter"], mode: "parallel", sim: { latency_ms: 6000 } });
      await page.waitForFunction(() => document.querySelectorAll("#agents .agent-card").length >= 3, null, { timeout: 10000 });
      await page.waitForFunction(() => [...document.querySelectorAll("#agents .activity")].some((e) => /thinking|⚙|✎/.test(e.textContent)), null, { timeout: 10000 });
      await page.waitForFunction(() => document.querySelector("#workers .slots i.busy"));
      await shot("overview-running");
    });
    await step("narrow screen and dark theme", async () => {
      await page.setViewportSize({ width: 390, height: 844 });
      await shot("overview-narrow");
      await page.click("#theme");
      const theme = await page.evaluate(() => document.documentElement.dataset.theme);
      assert(theme === "dark" || theme === "light", "theme " + theme);
      if (theme !== "dark") await page.click("#theme");
      await shot("overview-narrow-dark");
      await page.setViewportSize({ width: 1280, height: 900 });
      await page.goto(taskUrl);
      await page.waitForSelector("#dag .node");
      await shot("task-dark");
    });
  },

  // Cancel a running task from its page: its agents stop and the page says so, live.
  async cancel() {
    await step("log in", () => login(page));
    const task = await submitViaApi({ prompt: "a long survey", roles: ["analyst", "builder", "tester"], sim: { latency_ms: 30000 } });
    await step("the task page shows the running step and a cancel button", async () => {
      await page.goto(URL_ + "/tasks/" + task.id);
      await page.waitForSelector("#dag .node[data-status=running]", { timeout: 15000 });
      assert(await page.isVisible("#cancel-btn"), "cancel button visible");
    });
    await step("cancel (two clicks) stops the task within seconds", async () => {
      const t0 = Date.now();
      await page.click("#cancel-btn");
      assert((await page.textContent("#cancel-btn")).includes("again"), "first click arms the button");
      await page.click("#cancel-btn");
      await page.waitForSelector("#t-meta .badge.s-cancelled", { timeout: 10000 });
      await page.waitForFunction(() => !document.querySelector("#dag .node[data-status=running]"));
      assert(Date.now() - t0 < 10000, "cancelled in " + (Date.now() - t0) + " ms");
      assert(!(await page.isVisible("#cancel-btn")), "cancel button hidden once cancelled");
      await shot("task-cancelled");
    });
  },

  // An agent waiting for a person (the Rust side has a request pending): the overview's
  // "Needs you" panel shows the command and answers it with one click.
  async approvals() {
    await step("log in", () => login(page));
    await step("the overview lists the pending request with its command", async () => {
      await page.waitForSelector("#approval-list [data-approve]", { timeout: 15000 });
      const text = await page.textContent("#approval-list");
      assert(text.includes("Bash") && text.includes(process.env.ORCH_COMMAND), "panel: " + text);
      await shot("overview-needs-you");
    });
    await step("approve answers it and the panel empties", async () => {
      await page.click("#approval-list [data-approve]");
      await page.waitForFunction(() => !document.querySelector("#approval-list [data-approve]"), null, { timeout: 10000 });
      assert((await page.textContent("#approval-list")).includes("No agent is waiting"), "empty panel");
    });
  },

  // The "Needs you" panel's other answers (the Rust side has four requests pending, one per
  // task, and checks what each agent was told): for this task, always with an edited pattern,
  // a denial with a message, and a request answered elsewhere first, whose error the page shows.
  async grants() {
    const env = (k) => process.env[k];
    const card = (cmd) => page.locator("#approval-list article.approval", { hasText: cmd });
    const gone = (cmd) => card(cmd).waitFor({ state: "detached", timeout: 10000 });
    // The page's own refresh timers are held still while the raced request is answered
    // elsewhere, so its card is still shown when the person clicks.
    await page.clock.install();
    await step("log in", () => login(page));
    await step("each request shows with its command and every answer", async () => {
      for (const k of ["ORCH_TASK_CMD", "ORCH_ALWAYS_CMD", "ORCH_DENY_CMD", "ORCH_RACED_CMD"]) {
        await card(env(k)).waitFor({ timeout: 15000 });
        const c = card(env(k));
        assert((await c.locator("pre.approval-cmd").textContent()) === env(k), "command shown for " + k);
        for (const name of ["Approve", "Approve for this task", "Always allow…", "Deny"]) {
          assert(await c.getByRole("button", { name, exact: true }).isVisible(), `button ${name} on ${k}`);
        }
        assert(await c.getByLabel("Message to the agent (optional)").isVisible(), "message field");
      }
      await shot("overview-needs-you-answers");
    });
    await step("approve for this task", async () => {
      await card(env("ORCH_TASK_CMD")).getByRole("button", { name: "Approve for this task" }).click();
      await gone(env("ORCH_TASK_CMD"));
    });
    await step("always allow offers a pattern from the command, edited before it is sent", async () => {
      const c = card(env("ORCH_ALWAYS_CMD"));
      const open = c.getByRole("button", { name: "Always allow…" });
      await open.click();
      assert((await open.getAttribute("aria-expanded")) === "true", "the button says the form is open");
      const pattern = c.getByLabel(/Always allow, for every task/);
      assert((await pattern.inputValue()) === "cargo test *", "suggested " + (await pattern.inputValue()));
      assert(await pattern.evaluate((el) => el === document.activeElement), "the pattern has the focus");
      await pattern.fill(env("ORCH_PATTERN"));
      await shot("overview-always-allow");
      await pattern.press("Enter");
      await gone(env("ORCH_ALWAYS_CMD"));
    });
    await step("deny with a message", async () => {
      const c = card(env("ORCH_DENY_CMD"));
      await c.getByLabel("Message to the agent (optional)").fill(env("ORCH_DENY_MESSAGE"));
      await c.getByRole("button", { name: "Deny", exact: true }).click();
      await gone(env("ORCH_DENY_CMD"));
    });
    await step("a request answered elsewhere first: the page says so", async () => {
      await page.clock.pauseAt(Date.now() + 1000);
      const { approvals } = await (await fetch(URL_ + "/v1/approvals", { headers: { Authorization: "Bearer " + TOKEN } })).json();
      const raced = approvals.find((a) => a.summary === env("ORCH_RACED_CMD"));
      const r = await fetch(URL_ + "/v1/approvals/" + raced.id, {
        method: "POST",
        headers: { Authorization: "Bearer " + TOKEN, "Content-Type": "application/json" },
        body: JSON.stringify({ decision: "approve" }),
      });
      assert(r.ok, "answered elsewhere: " + r.status);
      await card(env("ORCH_RACED_CMD")).getByRole("button", { name: "Deny", exact: true }).click();
      const alert = page.locator("#approvals").getByRole("alert");
      await alert.waitFor({ timeout: 10000 });
      const text = await alert.textContent();
      assert(text.includes(env("ORCH_RACED_CMD")) && text.includes("answered already"), "error: " + text);
      await page.clock.resume();
      await gone(env("ORCH_RACED_CMD"));
      assert(await alert.isVisible(), "the error outlives the card");
      assert((await page.textContent("#approval-list")).includes("No agent is waiting"), "empty panel");
      await shot("overview-answer-conflict");
    });
  },

  // The overview's "spend today" against the daily budget the coordinator was started with
  // (the Rust side ran one task, so the day's spend is above zero).
  async budget() {
    await step("log in", () => login(page));
    await step("the overview shows the day's spend against the budget, with a bar", async () => {
      await page.waitForFunction(() => (document.querySelector("#k-spend")?.textContent || "").includes("of $0.02"));
      const value = await page.textContent("#k-spend");
      assert(/^\$0\.\d+ of \$0\.02$/.test(value.trim()), "spend KPI reads " + value);
      const sub = await page.textContent("#k-spend-sub");
      assert(sub.includes("% of the daily budget"), "budget share: " + sub);
      const share = await page.$eval("#k-spend-sub .meter span", (e) => e.getBoundingClientRect().width / e.parentElement.getBoundingClientRect().width);
      assert(share > 0.1 && share < 1, "the bar fills " + share + " of its track");
      const title = await page.$eval("#k-spend", (e) => e.closest(".kpi").title);
      assert(title.startsWith("spent today $") && title.includes("of $0.02"), "title " + title);
      await shot("overview-budget");
    });
    await step("the budget reads on a narrow screen in the dark theme", async () => {
      await page.setViewportSize({ width: 390, height: 844 });
      await page.click("#theme");
      if ((await page.evaluate(() => document.documentElement.dataset.theme)) !== "dark") await page.click("#theme");
      await page.waitForSelector("#k-spend-sub .meter");
      await shot("overview-budget-narrow-dark");
    });
  },

  // A command agent edited a git working tree (the Rust side waited for it): its page lists
  // the changed files with counts and shows each file's hunks, escaped, collapsible.
  async diff() {
    const agent = process.env.ORCH_AGENT;
    assert(agent, "ORCH_AGENT is set");
    await step("log in", () => login(page));
    await step("the agent page lists the changed files with their counts", async () => {
      await page.goto(URL_ + "/agents/" + agent);
      await page.waitForSelector("#a-meta .badge.s-succeeded");
      await page.waitForSelector("#diff .diff-file", { timeout: 10000 });
      const files = await page.$$eval("#diff .diff-files li", (els) => els.map((e) => [".fstatus", ".path", ".counts"].map((c) => e.querySelector(c)?.textContent.trim()).join(" ")));
      assert(files.length === 4, "four files changed: " + JSON.stringify(files));
      const find = (p) => files.find((f) => f.includes(p)) || "";
      assert(/^A src\/cache\.rs \+14 −0$/.test(find("cache.rs")), "added file: " + find("cache.rs"));
      assert(/^D notes\/old\.txt \+0 −1$/.test(find("old.txt")), "deleted file: " + find("old.txt"));
      assert(/^M src\/parser\.rs \+4 −1$/.test(find("parser.rs")), "edited file: " + find("parser.rs"));
      assert((await page.textContent("#diff-stat")).includes("4 files changed"), "summary");
    });
    await step("hunks show added and removed lines with line numbers", async () => {
      const parser = await page.$("details.diff-file:has(summary:has-text('src/parser.rs'))");
      assert(parser, "parser.rs section");
      const removed = await parser.$$eval("tr.d-del td.code", (els) => els.map((e) => e.textContent));
      const added = await parser.$$eval("tr.d-add td.code", (els) => els.map((e) => e.textContent));
      assert(removed.some((l) => l.includes("Token::Word(word))")), "removed line: " + removed);
      assert(added.some((l) => l.includes("word.to_lowercase()")), "added line: " + added);
      assert(added.some((l) => l.includes("cache::get(input)")), "inserted line: " + added);
      const numbers = await parser.$$eval("tr.d-add td.ln", (els) => els.map((e) => e.dataset.n || ""));
      assert(numbers.includes("10"), "new line numbers: " + numbers);
      await page.waitForSelector("#diff tr.d-hunk");
    });
    await step("markup in the diff is shown as text, never run", async () => {
      const readme = await page.$("details.diff-file:has(summary:has-text('README.md'))");
      const text = await readme.$$eval("tr.d-add td.code", (els) => els.map((e) => e.textContent).join("\n"));
      assert(text.includes("<b>never</b>") && text.includes("<script>alert(1)</script>"), "literal markup: " + text);
      assert((await page.$$("#diff td.code b, #diff td.code script")).length === 0, "markup became elements");
    });
    await step("each file collapses and expands", async () => {
      const first = "#diff details.diff-file:first-of-type";
      assert(await page.$eval(first, (d) => d.open), "files start open");
      await page.click(first + " > summary");
      assert(!(await page.$eval(first, (d) => d.open)), "collapsed by its header");
      await page.click("#diff-toggle");
      assert(await page.$$eval("#diff details.diff-file", (ds) => ds.every((d) => !d.open)), "collapse all");
      await page.click("#diff-toggle");
      assert(await page.$$eval("#diff details.diff-file", (ds) => ds.every((d) => d.open)), "expand all");
      await page.click("#diff .diff-files a[data-file='0']");
    });
    await step("a command agent keeps no session: send and fork say why", async () => {
      assert(await page.isDisabled("#send-btn"), "send disabled");
      assert((await page.textContent("#talk-reason")).includes("no session"), "reason shown");
      await page.evaluate(() => window.scrollTo(0, 0));
      await shot("agent-diff");
      await page.$eval("#changes", (e) => e.scrollIntoView());
      await page.screenshot({ path: join(ART, "agent-diff-viewport.png") });
    });
    await step("the diff reads on a narrow screen in both themes", async () => {
      await page.setViewportSize({ width: 390, height: 844 });
      await page.$eval("#changes", (e) => e.scrollIntoView());
      const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      assert(overflow <= 1, "the page scrolls sideways by " + overflow + "px");
      await page.screenshot({ path: join(ART, "agent-diff-narrow.png") });
      await page.click("#theme");
      if ((await page.evaluate(() => document.documentElement.dataset.theme)) !== "dark") await page.click("#theme");
      await page.screenshot({ path: join(ART, "agent-diff-narrow-dark.png") });
      await page.setViewportSize({ width: 1280, height: 900 });
      await page.$eval("#changes", (e) => e.scrollIntoView());
      await page.screenshot({ path: join(ART, "agent-diff-dark.png") });
      await page.click("#theme");
    });
    await step("in a git workspace the agent page shows its branch and commit, the task its branch", async () => {
      await page.goto(URL_ + "/agents/" + process.env.ORCH_GIT_AGENT);
      await page.waitForSelector("#git-panel:not([hidden]) #git dd");
      const facts = await page.textContent("#git");
      assert(/Branch\s*\S+/.test(facts) && /Commit\s*[0-9a-f]{7}/.test(facts), "git facts: " + facts);
      assert((await page.textContent("#git-state")).trim() === "merged", "merged into the task branch");
      assert((await page.textContent("#git")).includes("contains this commit"), "the task branch has it");
      assert((await page.textContent("#a-meta")).includes("branch"), "branch in the header");
      await page.waitForSelector("#diff .diff-file");
      await page.evaluate(() => window.scrollTo(0, 0));
      await shot("agent-git");
      await page.click("#a-back");
      await page.waitForSelector("#t-meta .branch");
      assert((await page.textContent("#t-meta .branch")).trim().length > 3, "task branch");
      await page.waitForSelector("#steps .badge.s-succeeded");
      await shot("task-git");
    });
  },

  // Talk to a sim agent: while it runs the buttons wait with a reason; once it finished, send
  // "go on" (a new agent continues it and runs to the end), then fork that turn.
  async turns() {
    await step("log in", () => login(page));
    const task = await submitViaApi({ prompt: "write docs for the parser", roles: ["documenter"], sim: { latency_ms: 2500 } });
    const first = task.jobs[0].id;
    await step("while the agent runs, send and fork wait with the reason", async () => {
      await page.goto(URL_ + "/agents/" + first);
      await page.waitForSelector("#a-meta .badge.s-running", { timeout: 15000 });
      assert(await page.isDisabled("#send-btn"), "send disabled while running");
      assert(await page.isDisabled("#fork-btn"), "fork disabled while running");
      const reason = await page.textContent("#talk-reason");
      assert(/still working/.test(reason), "reason: " + reason);
      await shot("agent-talk-running");
    });
    let second;
    await step("once it finished, send a message: a new agent continues it", async () => {
      await page.waitForSelector("#a-meta .badge.s-succeeded", { timeout: 20000 });
      await page.waitForFunction(() => !document.querySelector("#send-btn").disabled);
      await page.fill("#a-message", "go on");
      assert((await page.textContent("#talk-cli")).includes(`orchctl agents send ${first} 'go on'`), "orchctl equivalent");
      await Promise.all([page.waitForURL((u) => /\/agents\//.test(u.pathname) && !u.pathname.endsWith(first)), page.click("#send-btn")]);
      second = new URL(page.url()).pathname.split("/").pop();
      await page.waitForSelector(`#a-meta .rel a[href='/agents/${first}']`);
      assert((await page.textContent("#a-meta .rel")).includes("continues"), "continues link");
      assert((await page.textContent("#a-asked")).includes("go on"), "the message heads the transcript");
    });
    await step("the new turn runs and finishes live", async () => {
      await page.waitForSelector("#a-meta .badge.s-running, #a-meta .badge.s-succeeded", { timeout: 15000 });
      await page.waitForSelector("#a-meta .badge.s-succeeded", { timeout: 20000 });
      await page.waitForSelector("#transcript .msg.text");
      await page.waitForFunction(() => document.querySelectorAll("#turns .turn").length === 2);
      assert(await page.isVisible("#turns .turn.current"), "this turn is marked");
      await shot("agent-sent");
    });
    await step("fork the new turn: another agent starts from it", async () => {
      await page.waitForFunction(() => !document.querySelector("#fork-btn").disabled);
      await page.fill("#a-message", "try another approach");
      await Promise.all([page.waitForURL((u) => !u.pathname.endsWith(second)), page.click("#fork-btn")]);
      await page.waitForSelector(`#a-meta .rel a[href='/agents/${second}']`);
      assert((await page.textContent("#a-meta .rel")).includes("forked from"), "forked-from link");
      await page.waitForSelector("#a-meta .badge.s-succeeded", { timeout: 30000 });
      await page.waitForFunction(() => document.querySelectorAll("#turns .turn").length === 3);
      await shot("agent-forked");
    });
    await step("the task shows the conversation's turns", async () => {
      await page.click("#a-back");
      await page.waitForFunction(() => document.querySelectorAll("#dag .node").length === 3);
      await page.waitForSelector("#dag .edge.turn", { state: "attached" });
      const rows = await page.$$eval("#steps tbody tr", (els) => els.map((e) => e.textContent));
      assert(rows[1].includes("reply to") && rows[2].includes("fork of"), "steps: " + rows);
      await page.waitForSelector("#t-meta .badge.s-completed", { timeout: 20000 });
      // The log holds one end per run of the task: the page reads on past the first.
      await page.waitForFunction(() => [...document.querySelectorAll("#events li")].some((li) => li.textContent.includes("Forked:")) &&
        [...document.querySelectorAll("#events li")].filter((li) => li.textContent.includes("Task completed")).length === 3, null, { timeout: 15000 });
      await page.waitForSelector("#live[data-state=live]");
      await shot("task-turns");
    });
  },

  // The history's filters on the cluster's durable history, and the cost chart (the Rust
  // side submitted three tasks and waited for them).
  async history() {
    await step("log in", () => login(page));
    await step("the history lists every task", async () => {
      await page.goto(URL_ + "/history");
      await page.waitForFunction(() => document.querySelectorAll("#history-table tbody tr").length >= 3);
      await shot("history");
    });
    await step("search narrows the list", async () => {
      await page.fill("input[name=search]", "parser");
      await page.click("#filters button[type=submit]");
      await page.waitForFunction(() => {
        const rows = [...document.querySelectorAll("#history-table tbody tr")];
        return rows.length === 1 && rows[0].textContent.includes("parser");
      });
      assert(new URL(page.url()).searchParams.get("search") === "parser", "filters kept in the address");
      await shot("history-search");
    });
    await step("status, cost range and sort filter on the server", async () => {
      await page.fill("input[name=search]", "");
      await page.selectOption("select[name=status]", "failed");
      await page.waitForSelector("#history-table .empty");
      await page.selectOption("select[name=status]", "completed");
      await page.fill("input[name=min_cost]", "0");
      await page.selectOption("select[name=sort]", "cost");
      await page.selectOption("select[name=order]", "asc");
      await page.waitForFunction(() => document.querySelectorAll("#history-table tbody tr").length >= 3);
      const tomorrow = new Date(Date.now() + 2 * 86400e3).toISOString().slice(0, 10);
      await page.fill("input[name=from]", tomorrow);
      await page.dispatchEvent("input[name=from]", "change");
      await page.waitForSelector("#history-table .empty");
      await page.click("#reset");
      await page.waitForFunction(() => document.querySelectorAll("#history-table tbody tr").length >= 3);
    });
    await step("pagination pages through the history", async () => {
      await page.selectOption("select[name=limit]", "20");
      await page.goto(URL_ + "/history?limit=20");
      await page.evaluate(() => {
        const sel = document.querySelector("select[name=limit]");
        sel.innerHTML += '<option value="2">2</option>';
        sel.value = "2";
        sel.dispatchEvent(new Event("change", { bubbles: true }));
      });
      await page.waitForFunction(() => document.querySelectorAll("#history-table tbody tr").length === 2 && !document.querySelector("#next").disabled);
      await page.click("#next");
      await page.waitForFunction(() => document.querySelector("#page-no").textContent.startsWith("page 2"));
      await page.click("#first");
      await page.waitForFunction(() => document.querySelector("#page-no").textContent.startsWith("page 1"));
    });
    await step("the cost page charts spend by role and by model", async () => {
      await page.click("nav a[href='/costs']");
      await page.waitForSelector("#chart svg rect.bar");
      const keys = await page.$$eval("#chart rect.bar", (els) => [...new Set(els.map((e) => e.dataset.key))]);
      assert(keys.includes("builder"), "roles in the chart: " + keys);
      await page.waitForSelector("#tokens .hbar-row");
      await page.waitForSelector("#export a[href^='/v1/export?what=tasks']");
      await page.waitForSelector("#export a[href^='/v1/reports/cost']");
      await shot("costs");
      await page.selectOption("select[name=by]", "model");
      await page.waitForFunction(() => document.querySelector("#chart-title").textContent.includes("model"));
      await page.waitForSelector("#chart svg rect.bar");
      await page.selectOption("select[name=range]", "24h");
      await page.waitForSelector("#chart svg rect.bar");
      await shot("costs-by-model-24h");
    });
    await step("the CSV export downloads the tasks", async () => {
      const [download] = await Promise.all([page.waitForEvent("download"), page.click("#export [data-csv=tasks]")]);
      const path = join(ART, "tasks.csv");
      await download.saveAs(path);
      const { readFileSync } = await import("node:fs");
      const csv = readFileSync(path, "utf8");
      assert(csv.split("\n")[0].includes("prompt") && csv.includes("parser"), "csv: " + csv.slice(0, 200));
    });
  },
};

const profile = mkdtempSync(join(tmpdir(), "orch-chromium-"));
// A fresh profile per run (playwright takes it as the persistent context's directory, the same
// as --user-data-dir).
const ctx = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.ORCH_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1280, height: 900 },
  acceptDownloads: true,
});
let code = 0;
try {
  page = ctx.pages()[0] || (await ctx.newPage());
  const errors = [];
  page.on("pageerror", (e) => {
    errors.push(String(e));
    console.log("page error:", String(e));
  });
  page.on("console", (m) => m.type() === "error" && console.log("console:", m.text()));
  const run = scenarios[SCENARIO];
  if (!run) throw new Error("no such scenario: " + SCENARIO);
  await run(ctx);
  assert(!errors.length, "script errors in the page: " + errors.join("; "));
} catch (e) {
  if (!String(e).includes("assertion failed") && !String(e).includes("Timeout")) console.log("error:", e);
  code = 1;
} finally {
  await ctx.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
process.exit(code);
