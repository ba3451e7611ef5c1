//! Pull requests and the review loop end to end: real nats-server, redis-server, coordinator,
//! workers and git with bare repositories on disk; only GitHub's REST API
//! ([`FakeGitHub`], backed by the same bare repository) and the model API are fake.
//!
//! - A task submitted with `pr` opens exactly one pull request from `orch/<task-id>` to the base
//!   when it completes, with the task in its title and body, and every forge call carries the
//!   token.
//! - A signed review comment delivered to the webhook becomes one follow-up turn of the agent
//!   that wrote the file, whose commit lands on the same branch; a wrong signature is a 401
//!   that changes nothing; the same comment delivered again is not reviewed again; a finding
//!   that comes back stops the loop and asks a person.
//! - `pr` without a forge, a repository the token cannot push to and a base branch that does
//!   not exist are refused before any agent runs.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::{JobStatus, Task, TaskStatus};
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::fake_github::FakeGitHub;
use orch_tests::{Cluster, Options, assert_completed, git, orchctl_against, origin, run};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const FORGE_TOKEN: &str = "ghp_test_forge_token";
const WEBHOOK_SECRET: &str = "webhook-secret-for-tests";
const MODEL: &str = "claude-sonnet-4-5";
const WAIT: Duration = Duration::from_secs(90);

/// A cluster whose coordinator opens pull requests on `github` (token and webhook secret from
/// the environment, as a Secret would give them), with `workers` workers on the command
/// backend or, with `anthropic`, on the fake model API.
async fn cluster(
    dir: &Path,
    github: Option<&FakeGitHub>,
    anthropic: Option<&FakeAnthropic>,
    workers: usize,
) -> Cluster {
    cluster_with(dir, github, anthropic, workers, &[]).await
}

/// [`cluster`] with more worker flags.
async fn cluster_with(
    dir: &Path,
    github: Option<&FakeGitHub>,
    anthropic: Option<&FakeAnthropic>,
    workers: usize,
    worker_flags: &[&str],
) -> Cluster {
    let (coordinator_args, coordinator_env) = match github {
        Some(g) => (
            vec![
                "--forge-api-url".to_string(),
                g.url.clone(),
                "--forge-label".to_string(),
                "orchestrator".to_string(),
            ],
            vec![
                ("ORCH_FORGE_TOKEN".to_string(), FORGE_TOKEN.to_string()),
                (
                    "ORCH_FORGE_WEBHOOK_SECRET".to_string(),
                    WEBHOOK_SECRET.to_string(),
                ),
                ("ORCH_FORGE_MAX_REVIEW_ROUNDS".to_string(), "3".to_string()),
            ],
        ),
        None => (vec![], vec![]),
    };
    let config = dir.join("worker.toml");
    std::fs::write(
        &config,
        "[backends.command]\nprogram = \"sh\"\nargs = [\"-c\", \"cat > /dev/null; echo built > built.txt; echo done\", \"agent\"]\n",
    )
    .unwrap();
    let worker_env = anthropic.map_or(vec![], |a| {
        vec![
            ("ANTHROPIC_BASE_URL".into(), a.url.clone()),
            ("ANTHROPIC_API_KEY".into(), "test-key-forge".into()),
        ]
    });
    Cluster::start(Options {
        workers,
        slots: 1,
        coordinator_args,
        coordinator_env,
        worker_env,
        worker_args: ["--config", &config.display().to_string()]
            .into_iter()
            .chain(worker_flags.iter().copied())
            .map(String::from)
            .collect(),
        ..Options::default()
    })
    .await
}

/// Polls the task until `check` holds.
async fn task_until(
    cluster: &Cluster,
    id: &str,
    what: &str,
    check: impl Fn(&Task) -> bool,
) -> Task {
    cluster
        .eventually(WAIT, || async {
            let task = cluster.task(id).await;
            if check(&task) {
                Ok(task)
            } else {
                Err(format!("task {id}: waiting for {what}: {task:#?}"))
            }
        })
        .await
}

/// Delivers a webhook payload, signed with `secret` (unsigned with `None`).
async fn deliver(
    cluster: &Cluster,
    secret: Option<&str>,
    event: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    let mut req = cluster
        .http()
        .post(format!("{}/v1/forge/github/webhook", cluster.url))
        .header("content-type", "application/json")
        .header("x-github-event", event);
    if let Some(secret) = secret {
        req = req.header(
            "x-hub-signature-256",
            orch_shared::signature::sign(secret, &bytes),
        );
    }
    let resp = req.body(bytes).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Runs `orchctl` against the cluster off the runtime's threads: (exit code, stdout, stderr).
async fn cli(cluster: &Cluster, home: &Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = orchctl_against(cluster, home);
    cmd.args(args);
    tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .unwrap()
}

/// A `pull_request_review_comment` delivery for pull request `number` from `branch`.
fn review_delivery(number: u64, branch: &str, comment: &str) -> Value {
    json!({
        "action": "created",
        "comment": {"body": comment, "path": "src/lib.rs"},
        "pull_request": {"number": number, "head": {"ref": branch, "sha": "ignored"}},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_pr_opens_one_pull_request_with_the_task_in_its_body() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let github = FakeGitHub::start(FORGE_TOKEN).await;
    github.add_repo("acme/app", &bare, "main", true);
    let cluster = cluster(dir.path(), Some(&github), None, 1).await;

    let task = cluster
        .submit(json!({
            "prompt": "build the thing\nwith details on the second line",
            "roles": ["analyst", "builder"],
            "backend": "command",
            "repo": bare.display().to_string(),
            "pr": {"repo": "acme/app", "labels": ["agents"]},
        }))
        .await;
    let id = task.id.to_string();
    let pr = task
        .pr
        .clone()
        .expect("the task records the pull request it asked for");
    assert_eq!((pr.repo.as_str(), pr.base.as_str()), ("acme/app", "main"));
    assert_eq!(pr.head, format!("orch/{id}"));
    assert_eq!(pr.number, None, "opened only when the task completes");

    let task = task_until(&cluster, &id, "the pull request", |t| {
        t.pr.as_ref()
            .is_some_and(|p| p.url.is_some() || p.error.is_some())
    })
    .await;
    assert_completed(&cluster, &task);
    let pr = task.pr.clone().unwrap();
    assert_eq!(pr.error, None, "{}", cluster.logs());
    let pulls = github.pulls();
    assert_eq!(pulls.len(), 1, "one pull request: {pulls:#?}");
    let pull = &pulls[0];
    assert_eq!(pr.number, Some(pull.number));
    assert_eq!(
        pr.url.as_deref(),
        Some(format!("https://github.example/acme/app/pull/{}", pull.number).as_str())
    );
    assert_eq!(
        (pull.base.as_str(), pull.head.as_str()),
        ("main", pr.head.as_str())
    );
    assert_eq!(pull.title, "orch: build the thing");
    assert!(!pull.draft);
    assert_eq!(pull.labels, ["orchestrator", "agents"]);
    assert!(pull.body.contains(&format!("Task `{id}`")), "{}", pull.body);
    for job in &task.jobs {
        assert!(
            pull.body.contains(&format!("`{}`", job.id)),
            "agent {} in {}",
            job.id,
            pull.body
        );
    }
    assert!(pull.body.contains("`built.txt`"), "{}", pull.body);
    assert!(
        pull.body.contains("> with details on the second line"),
        "{}",
        pull.body
    );
    assert!(
        pull.body.contains(&format!("${:.4} in all", task.cost_usd)),
        "{}",
        pull.body
    );
    // The branch the pull request shows is the task branch the workers pushed.
    assert_eq!(
        git(&bare, &["show", &format!("{}:built.txt", pr.head)]),
        "built"
    );

    // Every call carried the token, and none was sent without it.
    let calls = github.calls();
    assert!(calls.iter().all(|c| c.authorized), "{calls:#?}");
    assert!(
        calls
            .iter()
            .any(|c| c.method == "GET" && c.path == "/repos/acme/app"),
        "the push permission was checked at submit: {calls:#?}"
    );

    // The task shows its pull request in the listing.
    let (status, list) = cluster.get("/v1/tasks").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["tasks"][0]["pr_url"], json!(pr.url.clone().unwrap()));

    // `orchctl pr sync` (as after a coordinator failover) opens nothing more: nothing to
    // review yet. `orchctl tasks show` names the pull request.
    let home = tempfile::tempdir().unwrap();
    let url = pr.url.clone().unwrap();
    let (code, out, err) = cli(&cluster, home.path(), &["pr", "sync", &id]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("no new review comments\npull request: {url}\n")
    );
    assert_eq!(github.pulls().len(), 1);
    let (code, out, err) = cli(&cluster, home.path(), &["tasks", "show", &id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("pull request") && out.contains(&url), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pr_input_is_refused_before_any_agent_runs() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let github = FakeGitHub::start(FORGE_TOKEN).await;
    github.add_repo("acme/app", &bare, "main", true);
    github.add_repo("acme/readonly", &bare, "main", false);
    // No workers: nothing could run anyway, and the refusal must come first.
    let with_forge = cluster(dir.path(), Some(&github), None, 0).await;
    let submit = |pr: Value, git_ref: Option<&str>| {
        let mut body = json!({
            "prompt": "p", "roles": ["builder"], "backend": "command",
            "repo": bare.display().to_string(), "pr": pr,
        });
        if let Some(r) = git_ref {
            body["ref"] = json!(r);
        }
        body
    };
    for (body, field, words) in [
        (
            submit(json!({"repo": "acme/readonly"}), None),
            "pr.repo",
            "cannot push to acme/readonly",
        ),
        (
            submit(json!({"repo": "acme/app"}), Some("release")),
            "ref",
            "base branch release does not exist on acme/app",
        ),
        (
            submit(json!({"repo": "acme/missing"}), None),
            "pr.repo",
            "acme/missing not found",
        ),
    ] {
        let (status, err) = with_forge.post("/v1/tasks", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
        assert_eq!(err["code"], "invalid_field");
        let message = err["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("{field}: ")), "{message}");
        assert!(message.contains(words), "{message}");
    }
    let (_, list) = with_forge.get("/v1/tasks").await;
    assert_eq!(list["tasks"], json!([]), "no task was created");
    assert!(
        !github.calls().iter().any(|c| c.method == "POST"),
        "nothing was written to the forge"
    );
    drop(with_forge);

    let without = cluster(dir.path(), None, None, 0).await;
    let (status, err) = without.post("/v1/tasks", &submit(json!({}), None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(
        err["message"],
        "pr: no forge is configured on the coordinator (set forge-token or forge-token-file)"
    );
    // The same from the command line: one line on stderr naming the field, exit status 2.
    let home = tempfile::tempdir().unwrap();
    let repo = bare.display().to_string();
    let (code, out, err) = cli(
        &without,
        home.path(),
        &[
            "submit",
            "p",
            "--roles",
            "builder",
            "--backend",
            "command",
            "--repo",
            &repo,
            "--pr",
        ],
    )
    .await;
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("pr: no forge is configured"), "{err}");
    let (_, list) = without.get("/v1/tasks").await;
    assert_eq!(list["tasks"], json!([]), "no task was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_review_comment_becomes_one_turn_and_one_commit_and_a_repeated_finding_escalates()
{
    let dir = tempfile::tempdir().unwrap();
    // At `<dir>/acme/origin.git`, so that `pr: {}` finds `acme/origin` in its path.
    let bare = origin(&dir.path().join("acme"));
    let github = FakeGitHub::start(FORGE_TOKEN).await;
    github.add_repo("acme/origin", &bare, "main", true);
    // The builder's first turn writes the file; its follow-up turn rewrites it.
    let anthropic = FakeAnthropic::start([
        Reply::tool_use(
            "write_file",
            json!({"path": "src/lib.rs", "content": "pub fn parse() { panic!() }\n"}),
        ),
        Reply::text("## Summary\nWrote the parser.\n\n## Files\n- src/lib.rs"),
        Reply::tool_use(
            "write_file",
            json!({"path": "src/lib.rs", "content": "pub fn parse() -> Result<(), String> { Err(\"bad\".into()) }\n"}),
        ),
        Reply::text("## Summary\nThe parser returns an error.\n\n## Files\n- src/lib.rs"),
    ])
    .await;
    let cluster = cluster(dir.path(), Some(&github), Some(&anthropic), 1).await;
    let task = cluster
        .submit(json!({
            "prompt": "write the parser", "roles": ["builder"],
            "backend": "anthropic", "model": MODEL,
            "repo": bare.display().to_string(), "pr": {},
        }))
        .await;
    let id = task.id.to_string();
    let branch = format!("orch/{id}");
    let task = task_until(&cluster, &id, "the pull request", |t| {
        t.pr.as_ref()
            .is_some_and(|p| p.url.is_some() || p.error.is_some())
    })
    .await;
    assert_completed(&cluster, &task);
    // `pr: {}` takes owner/name from the repository's path.
    let number = task.pr.as_ref().unwrap().number.expect("opened");
    let builder = task.jobs[0].id;
    let first_head = git(&bare, &["rev-parse", &branch]);

    // A reviewer comments on the builder's file.
    let comment = "Return an error instead of panicking.";
    github.add_review_comment(number, "src/lib.rs", 1, comment);
    let delivery = review_delivery(number, &branch, comment);

    // A wrong signature, or none: 401, and nothing changes.
    for secret in [Some("not-the-secret"), None] {
        let (status, err) =
            deliver(&cluster, secret, "pull_request_review_comment", &delivery).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
        assert_eq!(err["code"], "unauthorized");
    }
    let unchanged = cluster.task(&id).await;
    assert_eq!(unchanged.jobs.len(), 1);
    assert_eq!(unchanged.pr, task.pr);
    assert_eq!(anthropic.messages_served(), 2);

    // Signed: one follow-up turn of the builder.
    let (status, synced) = deliver(
        &cluster,
        Some(WEBHOOK_SECRET),
        "pull_request_review_comment",
        &delivery,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{synced}");
    let outcome = synced["outcome"].as_str().unwrap();
    assert!(
        outcome.starts_with("review round 1: 1 comment(s) sent"),
        "{outcome}"
    );
    // The same delivery again (GitHub redelivers): the comment is not reviewed twice.
    let (status, again) = deliver(
        &cluster,
        Some(WEBHOOK_SECRET),
        "pull_request_review_comment",
        &delivery,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    let task = task_until(&cluster, &id, "the review turn", |t| {
        t.status.is_terminal() && t.jobs.len() == 2
    })
    .await;
    assert_completed(&cluster, &task);
    assert_eq!(task.jobs.len(), 2, "one follow-up turn: {task:#?}");
    let turn = &task.jobs[1];
    assert_eq!(turn.continues, Some(builder), "the builder owns src/lib.rs");
    assert_eq!(turn.status, JobStatus::Succeeded);
    assert!(turn.prompt.contains(comment), "{}", turn.prompt);
    assert!(
        turn.prompt.contains("`src/lib.rs` line 1"),
        "{}",
        turn.prompt
    );
    // The turn continued the builder's conversation: the model saw the first turn too.
    let asked = anthropic.message_requests();
    assert_eq!(asked.len(), 4);
    let last = asked[3].body.to_string();
    assert!(
        last.contains("write the parser") && last.contains(comment),
        "{last}"
    );

    // One new commit on the same branch, on top of the reviewed head.
    let second_head = git(&bare, &["rev-parse", &branch]);
    assert_ne!(second_head, first_head);
    assert_eq!(
        git(
            &bare,
            &[
                "rev-list",
                "--count",
                &format!("{first_head}..{second_head}")
            ]
        ),
        "1"
    );
    assert!(git(&bare, &["show", &format!("{branch}:src/lib.rs")]).contains("Result<(), String>"));
    let pr = task.pr.clone().unwrap();
    assert_eq!(pr.rounds, 1);
    assert_eq!(pr.reviewed_heads, std::slice::from_ref(&first_head));

    // The reviewer says the same thing again: the loop stops and asks a person.
    github.add_review_comment(
        number,
        "src/lib.rs",
        1,
        "return an error instead of panicking",
    );
    let (status, synced) = cluster
        .post(&format!("/v1/tasks/{id}/pr/sync"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{synced}");
    let outcome = synced["outcome"].as_str().unwrap();
    assert!(
        outcome.starts_with("escalated: the same finding came back"),
        "{outcome}"
    );
    let task = cluster.task(&id).await;
    assert_eq!(task.status, TaskStatus::Completed);
    assert_eq!(task.jobs.len(), 2, "no turn after an escalation");
    let pr = task.pr.clone().unwrap();
    assert!(
        pr.escalated.as_deref().unwrap().contains("same finding"),
        "{pr:#?}"
    );
    assert_eq!(anthropic.messages_served(), 4);
    let comments = &github.pulls()[0].comments;
    assert!(
        comments
            .last()
            .unwrap()
            .contains("A person needs to look at this pull request"),
        "{comments:#?}"
    );
    // Once stopped, the loop stays stopped.
    let (_, synced) = deliver(
        &cluster,
        Some(WEBHOOK_SECRET),
        "pull_request_review_comment",
        &delivery,
    )
    .await;
    assert!(
        synced["outcome"]
            .as_str()
            .unwrap()
            .contains("waits for a person"),
        "{synced}"
    );
    assert_eq!(github.pulls().len(), 1);
    assert!(github.calls().iter().all(|c| c.authorized));
}

/// Whether `github` received a request to create a pull request on `repo`.
fn creates(github: &FakeGitHub, repo: &str) -> usize {
    let path = format!("/repos/{repo}/pulls");
    github
        .calls()
        .iter()
        .filter(|c| c.method == "POST" && c.path == path)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_the_leader_died_before_opening_is_opened_once_by_the_next_leader() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let github = FakeGitHub::start(FORGE_TOKEN).await;
    github.add_repo("acme/app", &bare, "main", true);
    let mut cluster = cluster(dir.path(), Some(&github), None, 1).await;
    let submit = json!({
        "prompt": "build the thing", "roles": ["builder"], "backend": "command",
        "repo": bare.display().to_string(), "pr": {"repo": "acme/app"},
    });

    // The coordinator asks GitHub to open the pull request and dies before GitHub acts on it.
    github.stall_creates(true);
    let first = cluster.submit(submit.clone()).await.id.to_string();
    cluster
        .eventually(WAIT, || async {
            match creates(&github, "acme/app") {
                1 => Ok(()),
                n => Err(format!("{n} requests to open a pull request")),
            }
        })
        .await;
    let task = cluster.task(&first).await;
    assert_completed(&cluster, &task);
    assert_eq!(task.pr.as_ref().unwrap().number, None);
    assert!(github.pulls().is_empty());
    github.stall_creates(false);
    cluster.restart_coordinator().await;

    // The next leader opens it, once, from the record alone.
    let task = task_until(&cluster, &first, "the pull request", |t| {
        t.pr.as_ref().is_some_and(|p| p.url.is_some())
    })
    .await;
    let pulls = github.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:#?}");
    assert_eq!(pulls[0].head, format!("orch/{first}"));
    assert_eq!(task.pr.unwrap().number, Some(pulls[0].number));
    assert_eq!(
        creates(&github, "acme/app"),
        2,
        "the lost request and one more"
    );

    // The same when Redis is lost too: its rebuild from the log brings the task back, and
    // its pull request still to open with it.
    github.stall_creates(true);
    let second = cluster.submit(submit).await.id.to_string();
    cluster
        .eventually(WAIT, || async {
            match creates(&github, "acme/app") {
                3 => Ok(()),
                n => Err(format!("{n} requests to open a pull request")),
            }
        })
        .await;
    assert_completed(&cluster, &cluster.task(&second).await);
    github.stall_creates(false);
    cluster.rebuild_redis_from_the_log().await;
    let task = task_until(&cluster, &second, "the pull request", |t| {
        t.pr.as_ref().is_some_and(|p| p.url.is_some())
    })
    .await;
    assert_completed(&cluster, &task);
    let pulls = github.pulls();
    assert_eq!(pulls.len(), 2, "{pulls:#?}");
    assert_eq!(pulls[1].head, format!("orch/{second}"));
    assert_eq!(creates(&github, "acme/app"), 4);
    // The first one was not opened again.
    assert_eq!(
        cluster.task(&first).await.pr.unwrap().number,
        Some(pulls[0].number)
    );
    assert!(github.calls().iter().all(|c| c.authorized));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_a_check_opens_a_draft_while_the_check_runs_and_marks_it_ready_when_it_passes()
{
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let github = FakeGitHub::start(FORGE_TOKEN).await;
    github.add_repo("acme/app", &bare, "main", true);
    // The check waits for the test's word (a file, which the sandbox's private /tmp would
    // hide), so the pull request is seen while it runs.
    let cluster = cluster_with(dir.path(), Some(&github), None, 1, &["--sandbox", "off"]).await;
    let go = dir.path().join("go");
    let check = format!(
        "while [ ! -e {} ]; do sleep 0.1; done; test \"$(cat built.txt)\" = built && echo all good",
        go.display()
    );
    let task = cluster
        .submit(json!({
            "prompt": "build the thing", "roles": ["builder"], "backend": "command",
            "repo": bare.display().to_string(), "pr": {"repo": "acme/app"},
            "check": check,
        }))
        .await;
    let id = task.id.to_string();
    assert!(task.pr.as_ref().unwrap().draft_while_checking);

    let task = task_until(&cluster, &id, "the draft pull request", |t| {
        t.pr.as_ref().is_some_and(|p| p.url.is_some())
    })
    .await;
    assert!(!task.status.is_terminal(), "the check is still running");
    assert!(task.pr.as_ref().unwrap().draft);
    let pulls = github.pulls();
    assert_eq!(pulls.len(), 1);
    assert!(pulls[0].draft, "opened as a draft");
    assert!(
        pulls[0].body.contains("**not run**"),
        "no verdict yet: {}",
        pulls[0].body
    );

    std::fs::write(&go, "").unwrap();
    let task = task_until(&cluster, &id, "the ready pull request", |t| {
        t.status.is_terminal() && t.pr.as_ref().is_some_and(|p| !p.draft)
    })
    .await;
    assert_completed(&cluster, &task);
    let pulls = github.pulls();
    assert_eq!(pulls.len(), 1, "the same pull request: {pulls:#?}");
    assert!(!pulls[0].draft, "marked ready for review");
    assert!(
        pulls[0].body.contains("**passed** after 1 of at most"),
        "the check's result in the description: {}",
        pulls[0].body
    );
    let calls = github.calls();
    assert!(
        calls.iter().any(|c| c.method == "POST"
            && c.path == "/graphql"
            && c.body.to_string().contains("markPullRequestReadyForReview")),
        "{calls:#?}"
    );
    assert!(calls.iter().all(|c| c.authorized));

    // `pr.draft: false`: the pull request opens when the task completes, ready for review.
    let task = cluster
        .submit(json!({
            "prompt": "build it again", "roles": ["builder"], "backend": "command",
            "repo": bare.display().to_string(), "pr": {"repo": "acme/app", "draft": false},
            "check": "true",
        }))
        .await;
    assert!(!task.pr.as_ref().unwrap().draft_while_checking);
    let id = task.id.to_string();
    let task = task_until(&cluster, &id, "the pull request", |t| {
        t.pr.as_ref().is_some_and(|p| p.url.is_some())
    })
    .await;
    assert_completed(&cluster, &task);
    let pulls = github.pulls();
    assert_eq!(pulls.len(), 2);
    assert!(!pulls[1].draft);
    assert!(pulls[1].body.contains("**passed**"), "{}", pulls[1].body);
}

/// Commits `.orch.toml` holding `text` on top of `branch` of `bare` (through the `seed` clone)
/// and pushes it to `branch`.
fn commit_repo_config(seed: &Path, bare: &Path, branch: &str, text: &str) {
    git(seed, &["checkout", "-q", "-B", branch, "main"]);
    orch_tests::commit_and_push(
        seed,
        bare,
        &[(".orch.toml", text)],
        "repository config",
        branch,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_config_file_fills_what_the_submit_leaves_out_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // At `<dir>/acme/origin.git`: `acme/origin` on the forge, told from the path.
    let bare = origin(&dir.path().join("acme"));
    let seed = dir.path().join("acme").join("seed");
    commit_repo_config(
        &seed,
        &bare,
        "main",
        "# the team's settings\n[check]\ncommand = \"test \\\"$(cat built.txt)\\\" = built && echo checked\"\nrounds = 2\n\n[pr]\nopen = true\nlabels = [\"from-file\"]\ndraft = false\n",
    );
    commit_repo_config(
        &seed,
        &bare,
        "broken",
        "[check]\ncommand = \"make\"\nrounds = \"two\"\n",
    );
    let github = FakeGitHub::start(FORGE_TOKEN).await;
    github.add_repo("acme/origin", &bare, "main", true);
    let cluster = cluster(dir.path(), Some(&github), None, 1).await;
    let repo = bare.display().to_string();

    // Neither a check nor a pull request asked for: both come from the file.
    let task = cluster
        .submit(json!({
            "prompt": "build the thing", "roles": ["builder"], "backend": "command",
            "repo": repo,
        }))
        .await;
    let check = task.check.clone().expect("the file's check");
    assert_eq!(
        check.command,
        "test \"$(cat built.txt)\" = built && echo checked"
    );
    assert_eq!(check.max_rounds, 2);
    let pr = task.pr.clone().expect("the file asks for a pull request");
    assert_eq!(
        (pr.repo.as_str(), pr.base.as_str()),
        ("acme/origin", "main")
    );
    assert_eq!(pr.labels, ["from-file"]);
    assert!(!pr.draft_while_checking, "draft = false");
    let id = task.id.to_string();
    let task = task_until(&cluster, &id, "the pull request", |t| {
        t.pr.as_ref().is_some_and(|p| p.url.is_some())
    })
    .await;
    assert_completed(&cluster, &task);
    let check = task.check.as_ref().unwrap();
    assert_eq!((check.passed, check.rounds), (Some(true), 1), "{check:?}");
    assert!(check.output_tail.contains("checked"), "{check:?}");
    let pulls = github.pulls();
    assert_eq!(pulls.len(), 1);
    assert_eq!(pulls[0].labels, ["orchestrator", "from-file"]);
    assert!(!pulls[0].draft);
    assert!(pulls[0].body.contains("**passed**"), "{}", pulls[0].body);
    assert!(
        github
            .calls()
            .iter()
            .any(|c| c.path == "/repos/acme/origin/contents/.orch.toml" && c.authorized),
        "the file was read through the forge with the token"
    );

    // What the submit gives wins over the file: its check (with its own rounds) and labels.
    let task = cluster
        .submit(json!({
            "prompt": "build it again", "roles": ["builder"], "backend": "command",
            "repo": repo, "check": "echo overridden", "pr": {"labels": ["mine"]},
        }))
        .await;
    let check = task.check.clone().unwrap();
    assert_eq!(
        (check.command.as_str(), check.max_rounds),
        ("echo overridden", 3)
    );
    assert_eq!(task.pr.clone().unwrap().labels, ["mine"]);
    let task = cluster.wait_task(&task.id.to_string(), WAIT).await;
    assert_completed(&cluster, &task);
    assert!(
        task.check
            .as_ref()
            .unwrap()
            .output_tail
            .contains("overridden"),
        "{:?}",
        task.check
    );

    // A malformed file on the base: a 400 naming the file and the key, and no task.
    let ids = |list: Value| -> Vec<String> {
        list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = ids(cluster.get("/v1/tasks").await.1);
    let (status, err) = cluster
        .post(
            "/v1/tasks",
            &json!({
                "prompt": "p", "roles": ["builder"], "backend": "command",
                "repo": repo, "ref": "broken",
            }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["code"], "invalid_field");
    let message = err["message"].as_str().unwrap();
    assert!(
        message.starts_with(".orch.toml: check.rounds: "),
        "{message}"
    );
    // The same from the command line: one line on stderr, exit status 2.
    let home = tempfile::tempdir().unwrap();
    let (code, out, stderr) = cli(
        &cluster,
        home.path(),
        &[
            "submit",
            "p",
            "--roles",
            "builder",
            "--backend",
            "command",
            "--repo",
            &repo,
            "--ref",
            "broken",
        ],
    )
    .await;
    assert_eq!(code, 2, "{out}{stderr}");
    assert!(stderr.contains(".orch.toml: check.rounds"), "{stderr}");
    assert_eq!(
        ids(cluster.get("/v1/tasks").await.1),
        before,
        "no task was created"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_of_a_task_with_pr_sees_the_pull_request_before_its_stream_ends() {
    let dir = tempfile::tempdir().unwrap();
    let bare = origin(dir.path());
    let github = FakeGitHub::start(FORGE_TOKEN).await;
    github.add_repo("acme/app", &bare, "main", true);
    let cluster = cluster(dir.path(), Some(&github), None, 1).await;
    let home = tempfile::tempdir().unwrap();
    let repo = bare.display().to_string();
    let (code, out, err) = cli(
        &cluster,
        home.path(),
        &[
            "submit",
            "build the thing",
            "--roles",
            "builder",
            "--backend",
            "command",
            "--repo",
            &repo,
            "--pr",
            "--pr-repo",
            "acme/app",
            "--follow",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let url = "https://github.example/acme/app/pull/1";
    // The live view announces it as it happens, and the final record shows it.
    assert!(
        err.contains(&format!("pull request #1 open: {url}")),
        "stderr: {err}"
    );
    assert!(out.contains(url), "stdout: {out}");

    // The task's event stream ends with the pull request's outcome, after `task_finished`.
    let pulls = github.pulls();
    assert_eq!(pulls.len(), 1);
    let (_, list) = cluster.get("/v1/tasks").await;
    let id = list["tasks"][0]["id"].as_str().unwrap().to_string();
    let events = cluster.events(&id, None).await;
    let kinds: Vec<&str> = events.iter().map(|(_, e)| e.kind.name()).collect();
    let finished = kinds.iter().position(|k| *k == "task_finished").unwrap();
    assert_eq!(kinds.last(), Some(&"pr_opened"), "{kinds:?}");
    assert!(finished < kinds.len() - 1, "{kinds:?}");
    assert!(
        matches!(
            &events[finished].1.kind,
            orch_shared::event::EventKind::TaskFinished {
                pr_pending: true,
                ..
            }
        ),
        "{events:#?}"
    );
    // `orchctl logs --task ID -f` on the finished task prints up to the same end.
    let (code, out, err) = cli(&cluster, home.path(), &["logs", "--task", &id, "-f"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.trim_end()
            .ends_with(&format!("pull request #1 open: {url}")),
        "{out}"
    );
}
