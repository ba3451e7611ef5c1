//! The agent sandbox (on by default): a builder whose model asks its shell to probe the
//! cluster (its environment, Redis, the worker's data directory and `/proc`, another tenant's
//! workspace, a local port, a host outside its allowlist) finds nothing, through the real
//! Claude Code CLI and through the native tool loop, while it still writes and runs files in
//! its workspace and reaches the model API through the worker's proxy, which adds the
//! credential the agent never sees. A job past its memory limit is killed and reported as
//! such; the worker lives on. Real NATS, Redis, worker binary and CLI; only the model API is
//! fake. What a job was allowed is on its record and in `orchctl agents show`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_shared::api::JobStatus;
use orch_shared::event::EventKind;
use orch_tests::fake_anthropic::{FakeAnthropic, Reply};
use orch_tests::{Cluster, Options, assert_completed};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

const MODEL: &str = "claude-sonnet-4-5";
const KEY: &str = "test-key-cluster";

/// Everything a probing agent tries, in sections `==name` the test reads back.
struct Probe {
    script: String,
    /// A port nothing in the sandbox may reach (the test listens on it).
    listener: TcpListener,
}

impl Probe {
    fn new(cluster: &Cluster, data_dir: &Path, other_workspace: &Path) -> Probe {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let redis_port = cluster
            .redis_url
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('/');
        let worker_pid = cluster.workers[0].pid();
        let script = format!(
            "echo ==env; env\n\
             echo ==redis; redis-cli -h 127.0.0.1 -p {redis_port} ping 2>&1\n\
             echo ==data; ls -a {data} 2>&1; cat {data}/secret.toml 2>&1\n\
             echo ==cluster; ls {cluster_dir} 2>&1\n\
             echo ==environ; cat /proc/{worker_pid}/environ 2>&1 | tr '\\0' '\\n'\n\
             echo ==other; cat {other}/secret.txt 2>&1\n\
             echo ==port; (exec 3<>/dev/tcp/127.0.0.1/{port} && echo CONNECTED) 2>&1\n\
             echo ==https; curl -sS --max-time 10 https://example.com 2>&1\n\
             echo ==build; printf 'echo built-ok' > build.sh && sh build.sh > built.txt && cat built.txt\n\
             echo ==end",
            data = data_dir.display(),
            cluster_dir = cluster.dir.path().display(),
            other = other_workspace.display(),
        );
        Probe { script, listener }
    }

    /// Checks what the probe printed (`out`): every way out refused, the workspace usable.
    fn check(&self, out: &str, other_secret: &str) {
        let sections = sections(out);
        let get = |name: &str| {
            sections
                .get(name)
                .unwrap_or_else(|| panic!("no section {name} in the probe's output:\n{out}"))
                .as_str()
        };
        assert!(
            sections.contains_key("end"),
            "the probe ran to its end:\n{out}"
        );
        let env = get("env");
        assert!(!out.contains(KEY), "the provider key leaked:\n{out}");
        for secret in ["ORCH_", "REDIS", "NATS", "test-key"] {
            assert!(!env.contains(secret), "{secret} in the environment:\n{env}");
        }
        assert!(!get("redis").contains("PONG"), "Redis answered:\n{out}");
        let data = get("data");
        assert!(
            data.contains("No such file"),
            "the worker's secret file is visible:\n{data}"
        );
        // `ls` lists at most the mount points of the job's own directories.
        for private in ["records", "sandbox", "secret.toml"] {
            assert!(
                !data.lines().any(|l| l.trim() == private),
                "{private} is visible:\n{data}"
            );
        }
        assert!(
            get("cluster").contains("No such file"),
            "the cluster's directory is visible:\n{out}"
        );
        let environ = get("environ");
        assert!(
            !environ.contains('=') && environ.contains("No such file"),
            "the worker's /proc is visible:\n{environ}"
        );
        assert!(
            !out.contains(other_secret) && get("other").contains("No such file"),
            "another job's workspace is visible:\n{out}"
        );
        assert!(
            !get("port").contains("CONNECTED"),
            "a local port was reachable:\n{out}"
        );
        assert!(
            self.listener.accept().is_err(),
            "the test's listener got a connection"
        );
        let https = get("https");
        assert!(
            https.contains("403") || https.contains("CONNECT"),
            "the proxy did not refuse a host outside the allowlist:\n{https}"
        );
        assert_eq!(get("build").trim(), "built-ok", "{out}");
    }
}

/// `==name` sections of `out`, by name.
fn sections(out: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        if let Some(name) = line.strip_prefix("==") {
            current = Some(name.trim().to_string());
            map.insert(name.trim().to_string(), String::new());
        } else if let Some(c) = &current
            && let Some(s) = map.get_mut(c)
        {
            s.push_str(line);
            s.push('\n');
        }
    }
    map
}

/// The text of every tool result in a Messages API request body.
fn tool_results(body: &Value) -> String {
    let mut out = String::new();
    for m in body["messages"].as_array().into_iter().flatten() {
        for block in m["content"].as_array().into_iter().flatten() {
            if block["type"] != "tool_result" {
                continue;
            }
            match &block["content"] {
                Value::String(s) => out.push_str(s),
                Value::Array(parts) => {
                    for p in parts {
                        out.push_str(p["text"].as_str().unwrap_or_default());
                    }
                }
                _ => {}
            }
            out.push('\n');
        }
    }
    out
}

fn options(fake: &FakeAnthropic, data_dir: &Path) -> Options {
    Options {
        workers: 1,
        worker_env: vec![
            ("ANTHROPIC_BASE_URL".into(), fake.url.clone()),
            ("ANTHROPIC_API_KEY".into(), KEY.into()),
            (
                "ORCH_CLAUDE_BIN".into(),
                orch_tests::claude_cli::claude_bin().display().to_string(),
            ),
        ],
        worker_args: vec!["--data-dir".into(), data_dir.display().to_string()],
        ..Options::default()
    }
}

/// A worker data directory holding a secret, and another tenant's workspace with one.
fn secrets() -> (tempfile::TempDir, tempfile::TempDir, String) {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(
        data.path().join("secret.toml"),
        "token = \"data-dir-secret\"\n",
    )
    .unwrap();
    let other = tempfile::tempdir().unwrap();
    let secret = format!("other-tenant-secret-{}", std::process::id());
    std::fs::write(other.path().join("secret.txt"), &secret).unwrap();
    (data, other, secret)
}

async fn probe_through(backend: &str, tool: &str, input: impl Fn(&str) -> Value) {
    let (data, other, other_secret) = secrets();
    // The script needs the cluster's ports: the fake learns its replies once they are known.
    let fake = FakeAnthropic::start([]).await;
    let cluster = Cluster::start(options(&fake, data.path())).await;
    let probe = Probe::new(&cluster, data.path(), other.path());
    fake.push([
        Reply::tool_use(tool, input(&probe.script)),
        Reply::text("## Summary\nProbed."),
    ]);
    let ws = tempfile::tempdir().unwrap();
    let task = cluster
        .submit(json!({
            "prompt": "probe", "roles": ["builder"], "backend": backend, "model": MODEL,
            "workspace": ws.path().display().to_string(), "max_attempts": 1,
        }))
        .await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(90))
        .await;
    assert_completed(&cluster, &task);
    let requests = fake.message_requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    // The model API was reached (through the proxy, for the CLI) with the real key.
    for r in &requests {
        assert_eq!(r.headers.get("x-api-key").map(String::as_str), Some(KEY));
    }
    let out = tool_results(&requests[1].body);
    probe.check(&out, &other_secret);
    // What it built is in its workspace.
    assert_eq!(
        std::fs::read_to_string(ws.path().join("built.txt"))
            .unwrap()
            .trim(),
        "built-ok"
    );
    assert!(
        cluster.logs().contains("sandbox: refused a connection"),
        "the refused host is logged"
    );
    // What the job was allowed is on its record and in `orchctl agents show`.
    let job = &task.jobs[0];
    let allowed = job.sandbox.as_deref().unwrap_or_default();
    assert!(
        allowed.contains("network: the model API, crates.io")
            && allowed.contains("memory: 4096 MiB"),
        "{job:#?}"
    );
    let home = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) =
        orch_tests::run(orch_tests::orchctl_against(&cluster, home.path()).args([
            "agents",
            "show",
            &job.id.to_string(),
        ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("sandbox") && l.contains("crates.io")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_code_builder_probing_the_cluster_finds_no_way_out() {
    probe_through(
        "claude-code",
        "Bash",
        |script| json!({"command": script, "description": "probe"}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_loop_builder_probing_the_cluster_finds_no_way_out() {
    probe_through("anthropic", "bash", |script| json!({"command": script})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_on_one_worker_cannot_read_each_others_workspace() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(a.path().join("secret.txt"), "secret-of-a").unwrap();
    std::fs::write(b.path().join("secret.txt"), "secret-of-b").unwrap();
    // Both jobs try both files; each may read only its own.
    let script = format!(
        "cat {}/secret.txt {}/secret.txt 2>&1; true",
        a.path().display(),
        b.path().display()
    );
    let fake = FakeAnthropic::start([
        Reply::tool_use("bash", json!({"command": script})),
        Reply::tool_use("bash", json!({"command": script})),
        Reply::text("## Summary\nRead."),
        Reply::text("## Summary\nRead."),
    ])
    .await;
    let data = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(options(&fake, data.path())).await;
    let mut ids = vec![];
    for ws in [&a, &b] {
        let task = cluster
            .submit(json!({
                "prompt": "read", "roles": ["builder"], "backend": "anthropic", "model": MODEL,
                "workspace": ws.path().display().to_string(), "max_attempts": 1,
            }))
            .await;
        ids.push(task.id.to_string());
    }
    for task in cluster.wait_all(&ids, Duration::from_secs(90)).await {
        assert_completed(&cluster, &task);
    }
    let outs: Vec<String> = fake
        .message_requests()
        .iter()
        .map(|r| tool_results(&r.body))
        .filter(|o| !o.is_empty())
        .collect();
    assert_eq!(outs.len(), 2, "{outs:#?}");
    for out in &outs {
        let (sees_a, sees_b) = (out.contains("secret-of-a"), out.contains("secret-of-b"));
        assert!(
            sees_a != sees_b,
            "a job saw both workspaces, or none: {out}"
        );
    }
}

/// A one-worker cluster whose worker reads `config` (a `command` backend and role limits).
async fn command_cluster(config: &Path, data_dir: &Path) -> Cluster {
    Cluster::start(Options {
        workers: 1,
        worker_args: vec![
            "--config".into(),
            config.display().to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ],
        ..Options::default()
    })
    .await
}

/// Runs one `command` job as `role`, once, and waits for its task to end.
async fn run_command(cluster: &Cluster, prompt: &str, role: &str) -> orch_shared::api::Task {
    let task = cluster
        .submit(json!({
            "prompt": prompt, "roles": [role], "backend": "command", "max_attempts": 1,
        }))
        .await;
    cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(60))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_memory_limit_is_killed_and_reported_and_the_worker_lives_on() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("worker.toml");
    // The builder holds 200 MB in a shell variable; its role allows 64 MiB.
    std::fs::write(
        &config,
        "[backends.command]\nprogram = \"bash\"\nprompt = \"arg\"\n\
         args = [\"-c\", \"v=$(head -c 200000000 /dev/zero | tr '\\\\0' a); echo ${#v}\"]\n\
         [roles.builder]\nmemory_max_mb = 64\n\
         [roles.documenter]\nmemory_max_mb = 1024\n",
    )
    .unwrap();
    let cluster = command_cluster(&config, &data.path().join("data")).await;
    let task = run_command(&cluster, "hog", "builder").await;
    let job = &task.jobs[0];
    assert_eq!(job.status, JobStatus::Failed, "{task:#?}");
    let error = job.error.as_ref().unwrap();
    assert!(
        error.message.contains("out of memory") && error.message.contains("64 MiB"),
        "{error:#?}"
    );
    // The worker survived and runs the next job (the same program within a larger limit).
    let task = run_command(&cluster, "fits", "documenter").await;
    assert_completed(&cluster, &task);
    assert_eq!(task.jobs[0].output.as_deref(), Some("200000000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_gets_no_more_cpu_than_its_role_allows() {
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("worker.toml");
    // A busy loop for 2 s of wall-clock time, then the CPU time it got (user + system, in
    // milliseconds, from the shell's `times`); the builder's role allows a fifth of a core.
    std::fs::write(
        &config,
        "[backends.command]\nprogram = \"bash\"\nprompt = \"arg\"\n\
         args = [\"-c\", \"(while :; do :; done) & p=$!; sleep 2; kill $p; wait $p; \
         times > /tmp/t; tail -n 1 /tmp/t | awk '{ split($1, u, \\\"m\\\"); split($2, k, \\\"m\\\"); \
         printf \\\"%d\\\", (u[1] * 60 + u[2] + k[1] * 60 + k[2]) * 1000 }'\"]\n\
         [roles.builder]\ncpus = 0.2\n",
    )
    .unwrap();
    let cluster = command_cluster(&config, &data.path().join("data")).await;
    let task = run_command(&cluster, "spin", "builder").await;
    assert_completed(&cluster, &task);
    let job = &task.jobs[0];
    let cpu_ms: u64 = job.output.as_deref().unwrap().trim().parse().unwrap();
    // At most 0.2 s of CPU per second of wall-clock time (plus a period's rounding): an
    // unlimited loop gets a whole core for the 2 s.
    assert!(
        cpu_ms > 0 && cpu_ms < 700,
        "the loop got {cpu_ms} ms of CPU in 2 s"
    );
    let allowed = job.sandbox.as_deref().unwrap_or_default();
    assert!(allowed.contains("cpu: 0.2 core(s)"), "{allowed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_reaches_the_hosts_it_allows_through_the_proxy_and_no_other() {
    let fake = FakeAnthropic::start([]).await;
    let port = fake.url.rsplit(':').next().unwrap().to_string();
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("worker.toml");
    // The builder may reach the fake's port (standing in for a package registry), nothing else.
    std::fs::write(
        &config,
        format!("[roles.builder]\nallowed_hosts = [\"127.0.0.1:{port}\"]\n"),
    )
    .unwrap();
    let mut opts = options(&fake, &data.path().join("data"));
    opts.worker_args
        .extend(["--config".into(), config.display().to_string()]);
    let cluster = Cluster::start(opts).await;
    let redis_port = cluster
        .redis_url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/');
    // Loopback is excluded from the proxy by NO_PROXY: name it explicitly, as a tunnel.
    let curl = "curl -sS --max-time 10 --noproxy '' -x \"$HTTP_PROXY\" --proxytunnel";
    let script = format!(
        "echo ==allowed; {curl} http://127.0.0.1:{port}/tunnel-probe 2>&1; echo\n\
         echo ==refused; {curl} http://127.0.0.1:{redis_port}/ 2>&1\n\
         echo ==end"
    );
    fake.push([
        Reply::tool_use("bash", json!({"command": script})),
        Reply::text("## Summary\nFetched."),
    ]);
    let task = cluster
        .submit(json!({
            "prompt": "fetch", "roles": ["builder"], "backend": "anthropic", "model": MODEL,
            "max_attempts": 1,
        }))
        .await;
    let task = cluster
        .wait_task(&task.id.to_string(), Duration::from_secs(60))
        .await;
    assert_completed(&cluster, &task);
    let out = tool_results(&fake.message_requests()[1].body);
    let sections = sections(&out);
    assert!(
        sections["allowed"].contains("not a Messages API route"),
        "the allowed host did not answer through the tunnel:\n{out}"
    );
    assert!(
        fake.requests().iter().any(|r| r.path == "/tunnel-probe"),
        "the allowed host saw no request"
    );
    assert!(
        sections["refused"].contains("403"),
        "a host outside the allowlist was not refused:\n{out}"
    );
    assert!(
        cluster.logs().contains(&format!("127.0.0.1:{redis_port}")),
        "the refusal is logged with its target"
    );
    // And is an event of the job.
    let id = task.id.to_string();
    let target = format!("127.0.0.1:{redis_port}");
    cluster
        .eventually(Duration::from_secs(10), || async {
            let refused = cluster.events(&id, None).await.into_iter().any(
                |(_, e)| matches!(&e.kind, EventKind::SandboxRefused { target: t } if *t == target),
            );
            match refused {
                true => Ok(()),
                false => Err("no sandbox_refused event"),
            }
        })
        .await;
}
