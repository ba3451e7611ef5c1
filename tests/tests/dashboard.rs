//! The web dashboard in a real browser: each test starts a real cluster (`sim` agents, or a
//! `command` agent that edits a git working tree) and runs one scenario of
//! `tests/browser/dashboard.test.mjs` (Debian's `chromium` driven by `playwright-core`) against
//! it. Screenshots of every page go to `target/test-artifacts/dashboard/`.
//!
//! Needs `node`, `/usr/bin/chromium` and `npm ci` in `tests/browser` (`scripts/deps.sh` installs
//! them); a missing one fails the test with what to run, never skips it.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{JobStatus, TaskStatus};
use orch_tests::{Cluster, Options, TOKEN, orchctl_against, run};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

/// Runs one browser scenario against `cluster`; panics with the script's output and the
/// cluster's logs when it fails.
async fn run_scenario(cluster: &Cluster, scenario: &str) {
    run_scenario_with(cluster, scenario, &[]).await;
}

/// [`run_scenario`] with more environment for the script (ids it should open, say).
async fn run_scenario_with(cluster: &Cluster, scenario: &str, vars: &[(&str, String)]) {
    let root = workspace_root();
    let browser_dir = root.join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci --prefix tests/browser` (scripts/deps.sh does)"
    );
    let chromium =
        std::env::var("ORCH_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_string());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's `chromium` (scripts/deps.sh does)"
    );
    let artifacts = root.join("target/test-artifacts/dashboard");
    let started = Instant::now();
    let mut cmd = Command::new("node");
    cmd.arg("dashboard.test.mjs")
        .arg(scenario)
        .current_dir(&browser_dir)
        .env("ORCH_URL", &cluster.url)
        .env("ORCH_TOKEN", TOKEN)
        .env("ORCH_ARTIFACTS", &artifacts)
        .env("ORCH_CHROMIUM", &chromium)
        .envs(vars.iter().map(|(k, v)| (*k, v)));
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join the browser run")
        .expect("run node (is it installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!(
        "{stdout}{stderr}browser scenario `{scenario}` took {:?}",
        started.elapsed()
    );
    assert!(
        output.status.success(),
        "browser scenario `{scenario}` failed ({}); screenshots in {}\n{stdout}\n{stderr}\n{}",
        output.status,
        artifacts.display(),
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_refuses_without_a_token() {
    let cluster = Cluster::start(Options::default()).await;
    run_scenario(&cluster, "refused").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_submits_a_task_and_watches_its_steps_finish_live() {
    let cluster = Cluster::start(Options::default()).await;
    run_scenario(&cluster, "live").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_cancels_a_running_task() {
    let cluster = Cluster::start(Options::default()).await;
    run_scenario(&cluster, "cancel").await;
    let (_, v) = cluster.get("/v1/tasks?status=cancelled").await;
    assert_eq!(
        v["tasks"].as_array().map(Vec::len),
        Some(1),
        "the task the page cancelled is cancelled in the API: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_filters_history_and_charts_costs() {
    let cluster = Cluster::start(Options::default()).await;
    let prompts = [
        "analyze the parser and build a cache for it",
        "write docs for the CLI",
        "fix the login crash",
    ];
    let mut ids = vec![];
    for prompt in prompts {
        ids.push(cluster.submit(json!({ "prompt": prompt })).await.id);
    }
    for id in ids {
        let task = cluster
            .wait_task(&id.to_string(), Duration::from_secs(60))
            .await;
        assert_eq!(task.status, TaskStatus::Completed, "{}", cluster.logs());
    }
    run_scenario(&cluster, "history").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_days_spend_against_the_daily_budget() {
    let cluster = Cluster::start(Options {
        // Small enough that the bar shows what two sim agents spend; the estimate a job
        // reserves before its role has history fits under it.
        coordinator_args: [
            "--daily-budget-usd",
            "0.02",
            "--default-job-estimate-usd",
            "0.005",
        ]
        .map(String::from)
        .to_vec(),
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({ "prompt": "analyze the parser", "roles": ["analyst", "builder"] }))
        .await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(60))
        .await;
    assert_eq!(task.status, TaskStatus::Completed, "{}", cluster.logs());

    let (_, status) = cluster.get("/v1/status").await;
    let today = &status["cost_today"];
    assert_eq!(today["budget_usd"].as_f64(), Some(0.02), "{status}");
    let spent = today["spent_usd"].as_f64().unwrap_or_default();
    assert!(
        (spent - task.cost_usd).abs() < 1e-9,
        "the day's spend is the settled cost of the task's agents: {spent} vs {}",
        task.cost_usd
    );

    let home = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(orchctl_against(&cluster, home.path()).arg("status"));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("daily budget") && stdout.contains("of $0.0200"),
        "orchctl status shows the spend against the budget:\n{stdout}"
    );

    run_scenario(&cluster, "budget").await;
}

/// The `command` agent of the diff test: edits a file (a line changed, lines added), adds one,
/// deletes one and appends markup to the README that the page must show as text.
const EDIT_SCRIPT: &str = r#"cat >/dev/null
awk '{ print } /^pub fn parse/ { print "    if let Some(hit) = cache::get(input) {"; print "        return hit;"; print "    }" }' src/parser.rs > src/parser.rs.new
mv src/parser.rs.new src/parser.rs
sed -i 's/Token::Word(word))/Token::Word(word.to_lowercase()))/' src/parser.rs
cat > src/cache.rs <<'END'
//! A small cache of parsed inputs, so the same input is never tokenized twice.

use crate::parser::Token;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

fn cache() -> &'static Mutex<HashMap<String, Vec<Token>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Vec<Token>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

pub fn get(input: &str) -> Option<Vec<Token>> {
    cache().lock().ok()?.get(input).cloned()
}
END
rm notes/old.txt
printf '\n## Cache\nParsed inputs are cached: <b>never</b> parsed twice & "quoted" <script>alert(1)</script>.\n' >> README.md
printf '## Summary\nAdded a cache to the parser.\n'
"#;

const PARSER_RS: &str = "//! A tiny tokenizer.

#[derive(Clone, Debug, PartialEq)]
pub enum Token {
    Word(String),
    Number(i64),
}

pub fn parse(input: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    for word in input.split_whitespace() {
        let word = word.to_string();
        match word.parse::<i64>() {
            Ok(n) => tokens.push(Token::Number(n)),
            Err(_) => tokens.push(Token::Word(word)),
        }
    }
    tokens
}
";

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(out.status.success(), "git {args:?}: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_diff_of_what_a_command_agent_changed() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    std::fs::create_dir_all(repo.join("notes")).unwrap();
    std::fs::write(repo.join("src/parser.rs"), PARSER_RS).unwrap();
    std::fs::write(repo.join("README.md"), "# parser\n\nA tiny tokenizer.\n").unwrap();
    std::fs::write(repo.join("notes/old.txt"), "to be removed\n").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "start"]);
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", '''{EDIT_SCRIPT}''']\nprompt = \"stdin\"\n"
        ),
    )
    .unwrap();
    let cluster = Cluster::start(Options {
        workers: 1,
        worker_args: vec!["--config".into(), config.display().to_string()],
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({
            "prompt": "add a cache to the parser",
            "roles": ["builder"],
            "backend": "command",
            "workspace": repo.display().to_string(),
        }))
        .await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(60))
        .await;
    assert_eq!(task.status, TaskStatus::Completed, "{}", cluster.logs());
    let agent = task.jobs[0].id.to_string();
    // The same work in a clone of the repository: the agent's commit lands on its branch and
    // is merged into the task branch.
    let cloned = cluster
        .submit(json!({
            "prompt": "add a cache to the parser, in a clone",
            "roles": ["builder"],
            "backend": "command",
            "repo": repo.display().to_string(),
            "ref": "main",
        }))
        .await;
    let cloned = cluster
        .wait_task(&cloned.id.to_string(), Duration::from_secs(60))
        .await;
    assert_eq!(cloned.status, TaskStatus::Completed, "{}", cluster.logs());
    assert!(cloned.branch.is_some(), "{cloned:#?}");
    let git_agent = cloned.jobs[0].id.to_string();
    run_scenario_with(
        &cluster,
        "diff",
        &[("ORCH_AGENT", agent), ("ORCH_GIT_AGENT", git_agent)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_sends_a_message_to_an_agent_and_forks_it() {
    let cluster = Cluster::start(Options::default()).await;
    run_scenario(&cluster, "turns").await;
    let (_, v) = cluster.get("/v1/tasks?limit=1").await;
    let id = v["tasks"][0]["id"].as_str().expect("the task").to_string();
    let task = cluster.task(&id).await;
    assert_eq!(task.jobs.len(), 3, "{task:#?}");
    let (first, sent, forked) = (&task.jobs[0], &task.jobs[1], &task.jobs[2]);
    assert_eq!(sent.continues, Some(first.id));
    assert!(!sent.forked);
    assert_eq!(sent.prompt, "go on");
    assert_eq!(forked.continues, Some(sent.id));
    assert!(forked.forked);
    for job in &task.jobs {
        assert_eq!(job.status, JobStatus::Succeeded, "{task:#?}");
    }
}

/// The overview's "Needs you" panel: an agent's pending request (asked through the worker's
/// approval broker, as a worker would) shows with its command, and its Approve button answers
/// it: the agent gets the approval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_approves_a_request_an_agent_is_waiting_on() {
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let (_, v) = cluster
        .post("/v1/tasks", &json!({"prompt": "p", "roles": ["builder"]}))
        .await;
    let task: orch_shared::api::Task = serde_json::from_value(v).unwrap();
    let redis = orch_config::redis::Redis::from_url(&cluster.redis_url).unwrap();
    let state = orch_worker::state::State::connect(&redis).await.unwrap();
    let broker = orch_worker::approvals::Broker::new(state, Duration::from_secs(120));
    let command = "npm install left-pad";
    let job = orch_shared::job::JobSpec::new(
        task.id,
        orch_shared::ids::JobId::new(),
        orch_shared::role::Role::Builder,
        "build",
    );
    let asking = tokio::spawn(async move {
        let (events, _rx) = orch_worker::agent::Events::new();
        broker
            .ask(
                &job,
                "Bash",
                &json!({"command": command}),
                &events,
                &tokio_util::sync::CancellationToken::new(),
            )
            .await
    });
    run_scenario_with(
        &cluster,
        "approvals",
        &[("ORCH_COMMAND", command.to_string())],
    )
    .await;
    assert_eq!(
        asking.await.unwrap(),
        orch_worker::approvals::Verdict::Allow
    );
}

/// An agent's request, asked through the worker's approval broker (real Redis, as a worker
/// asks for its agent), for a new job of a new task (`None`) or of task `task`.
struct Asker {
    broker: orch_worker::approvals::Broker,
}

impl Asker {
    async fn new(cluster: &Cluster) -> Self {
        let redis = orch_config::redis::Redis::from_url(&cluster.redis_url).unwrap();
        let state = orch_worker::state::State::connect(&redis).await.unwrap();
        Self {
            broker: orch_worker::approvals::Broker::new(state, Duration::from_secs(300)),
        }
    }

    /// Asks to run `command` with `Bash` for a new job of `task`; the verdict is what the
    /// agent would be told.
    fn ask(
        &self,
        task: orch_shared::ids::TaskId,
        command: &str,
    ) -> tokio::task::JoinHandle<orch_worker::approvals::Verdict> {
        let broker = self.broker.clone();
        let job = orch_shared::job::JobSpec::new(
            task,
            orch_shared::ids::JobId::new(),
            orch_shared::role::Role::Builder,
            "build",
        );
        let input = json!({ "command": command });
        tokio::spawn(async move {
            let (events, _rx) = orch_worker::agent::Events::new();
            broker
                .ask(
                    &job,
                    "Bash",
                    &input,
                    &events,
                    &tokio_util::sync::CancellationToken::new(),
                )
                .await
        })
    }
}

async fn new_task(cluster: &Cluster) -> orch_shared::ids::TaskId {
    let (_, v) = cluster
        .post("/v1/tasks", &json!({"prompt": "p", "roles": ["builder"]}))
        .await;
    serde_json::from_value::<orch_shared::api::Task>(v)
        .unwrap()
        .id
}

/// The requests `GET /v1/approvals` lists for `task`.
async fn approvals_of(
    cluster: &Cluster,
    task: orch_shared::ids::TaskId,
) -> Vec<orch_shared::api::Approval> {
    let (_, v) = cluster.get("/v1/approvals").await;
    let list: orch_shared::api::ApprovalList = serde_json::from_value(v).unwrap();
    list.approvals
        .into_iter()
        .filter(|a| a.task_id == task.to_string())
        .collect()
}

/// The "Needs you" panel's answers beyond a plain yes: "Approve for this task" (the task's
/// next identical request is allowed without asking), "Always allow…" with a pattern the
/// person edits (another task's matching request is allowed without asking), a denial with a
/// message the agent is told, and a request someone else answered first: the page says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_answers_for_the_task_always_and_with_a_message() {
    use orch_worker::approvals::Verdict;
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let asker = Asker::new(&cluster).await;
    let (task_cmd, always_cmd, deny_cmd, raced_cmd) = (
        "npm install left-pad",
        "cargo test -p orch-shared",
        "rm -rf build",
        "make release",
    );
    let (t_task, t_always, t_deny, t_raced) = (
        new_task(&cluster).await,
        new_task(&cluster).await,
        new_task(&cluster).await,
        new_task(&cluster).await,
    );
    let for_task = asker.ask(t_task, task_cmd);
    let always = asker.ask(t_always, always_cmd);
    let denied = asker.ask(t_deny, deny_cmd);
    let raced = asker.ask(t_raced, raced_cmd);
    let message = "use `cargo clean` instead";
    run_scenario_with(
        &cluster,
        "grants",
        &[
            ("ORCH_TASK_CMD", task_cmd.to_string()),
            ("ORCH_ALWAYS_CMD", always_cmd.to_string()),
            ("ORCH_PATTERN", "cargo *".to_string()),
            ("ORCH_DENY_CMD", deny_cmd.to_string()),
            ("ORCH_DENY_MESSAGE", message.to_string()),
            ("ORCH_RACED_CMD", raced_cmd.to_string()),
        ],
    )
    .await;

    // For this task: the agent was allowed, and the task's next identical request is allowed
    // at once, without a new request in the queue.
    assert_eq!(for_task.await.unwrap(), Verdict::Allow);
    assert_eq!(asker.ask(t_task, task_cmd).await.unwrap(), Verdict::Allow);
    let listed = approvals_of(&cluster, t_task).await;
    assert_eq!(listed.len(), 1, "no second request: {listed:#?}");
    assert_eq!(listed[0].state, "approved");
    assert_eq!(
        listed[0].grant.as_deref(),
        Some(format!("Bash({task_cmd})").as_str())
    );

    // Always, with the edited pattern: another task's matching command needs nobody.
    assert_eq!(always.await.unwrap(), Verdict::Allow);
    let listed = approvals_of(&cluster, t_always).await;
    assert_eq!(
        listed[0].grant.as_deref(),
        Some("Bash(cargo *)"),
        "{listed:#?}"
    );
    let other = new_task(&cluster).await;
    assert_eq!(
        asker.ask(other, "cargo build --release").await.unwrap(),
        Verdict::Allow
    );
    assert!(approvals_of(&cluster, other).await.is_empty());

    // Denied with a message: the agent is told it.
    match denied.await.unwrap() {
        Verdict::Deny(told) => assert!(told.contains(message), "the agent was told: {told}"),
        v => panic!("expected a denial, got {v:?}"),
    }
    let listed = approvals_of(&cluster, t_deny).await;
    assert_eq!(listed[0].state, "denied");
    assert_eq!(listed[0].message.as_deref(), Some(message));

    // The raced request keeps the first answer (the scenario's, through the API).
    assert_eq!(raced.await.unwrap(), Verdict::Allow);
}
