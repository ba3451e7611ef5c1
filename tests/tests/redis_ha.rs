//! Redis in its production forms: behind an ACL user (and a wrong password refused, naming the
//! settings to check), and as a primary with a replica and three sentinels, whose primary is
//! SIGKILLed under load: the sentinels promote the replica, the services follow it, and the
//! ledger check finds nothing lost, run twice unnoticed or charged twice.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_tests::ledger::{assert_clean, check, submit_many};
use orch_tests::{Cluster, Options, REDIS_USER, Server, TOKEN, assert_completed, workspace_bin};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(90);

/// Starts `bin` with `args` against the cluster's servers and waits for it to exit; returns its
/// exit code and log.
fn run_to_exit(cluster: &Cluster, bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(workspace_bin(bin));
    cmd.args([
        "--nats-url",
        &cluster.nats_url,
        "--redis-url",
        &cluster.redis_url,
    ])
    .args(args)
    .env("ORCH_LOG", "info");
    let mut server = Server::spawn(&format!("{bin}-refused"), &mut cmd, cluster.dir.path());
    let code = server.wait_exit(Duration::from_secs(60));
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    let code = code.unwrap_or_else(|| panic!("{bin} still runs with a wrong password:\n{log}"));
    (code, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_log_in_as_an_acl_user_and_a_wrong_password_stops_them_naming_the_settings() {
    let cluster = Cluster::start(Options {
        redis_acl: Some("acl-secret-1".into()),
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({"prompt": "build it", "roles": ["builder"]}))
        .await;
    let task = cluster.wait_task(&task.id.to_string(), WAIT).await;
    assert_completed(&cluster, &task);

    // The default user is off: only a client that logs in gets anything from this Redis.
    let client = redis::Client::open(cluster.redis_url.as_str()).unwrap();
    let refused = client
        .get_connection()
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
    assert!(refused.is_err(), "Redis answered a client without a login");

    let data_dir = cluster.dir.path().join("refused-worker");
    let data_dir = data_dir.display().to_string();
    for (bin, args) in [
        (
            "orch-coordinator",
            vec!["--listen", "127.0.0.1:0", "--token", TOKEN],
        ),
        (
            "orch-worker",
            vec!["--id", "refused", "--data-dir", &data_dir],
        ),
    ] {
        let mut args = args;
        args.extend([
            "--redis-username",
            REDIS_USER,
            "--redis-password",
            "wrong-pass-xyzzy",
        ]);
        let (code, log) = run_to_exit(&cluster, bin, &args);
        assert_ne!(
            code,
            Some(0),
            "{bin} exited 0 with a wrong password:\n{log}"
        );
        assert!(
            log.contains("refused the credentials") && log.contains("redis-password"),
            "{bin} did not say which setting to check:\n{log}"
        );
        assert!(!log.contains("xyzzy"), "{bin} logged the password:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_primary_fails_over_to_its_replica_and_the_cluster_keeps_working() {
    // A lease longer than the failover (the sentinels' down-after 1 s, then the election and
    // promotion: 2-4 s here): the leader keeps it through the failover.
    let mut cluster = Cluster::start(Options {
        redis_sentinel: true,
        ack_wait: Duration::from_secs(2),
        coordinator_args: vec!["--leader-lease".into(), "15s".into()],
        ..Options::default()
    })
    .await;
    let ids = submit_many(&cluster, 20, 300).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let ha = cluster.redis_ha.as_ref().unwrap();
    let replica_port: u16 = ha.replica_url.rsplit(':').next().unwrap().parse().unwrap();
    let killed = Instant::now();
    cluster.kill_redis();
    let ha = cluster.redis_ha.as_ref().unwrap();
    cluster
        .eventually(Duration::from_secs(60), || async {
            match ha.primary_port() {
                Some(p) if p == replica_port => Ok(()),
                other => Err(format!("the sentinels name {other:?} as the primary")),
            }
        })
        .await;
    eprintln!(
        "sentinels promoted the replica {:?} after the kill",
        killed.elapsed()
    );
    // The leader kept its lease through the failover: it renewed it on the new primary (with
    // the default 5 s lease it gave it up and exited when the promotion took 4 s or more).
    tokio::time::sleep(2 * orch_coordinator::leader::RENEW_EVERY).await;
    let status = cluster.coordinator.child.try_wait().unwrap();
    assert!(
        status.is_none(),
        "the coordinator exited ({status:?}) after the failover\n{}",
        cluster.logs()
    );
    let ledger = check(&cluster, &ids).await;
    assert_clean(&ledger, &cluster);
    // New work is accepted, stored on the new primary and run.
    let more = submit_many(&cluster, 3, 0).await;
    assert_clean(&check(&cluster, &more).await, &cluster);
    eprintln!(
        "recovered: new tasks completed {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        orch_tests::log_contains(&cluster.coordinator.log, "Redis primary moved"),
        "the coordinator never moved to the new primary\n{}",
        cluster.logs()
    );
}

/// Copies the files of `from` into `to` (Redis's append-only files while it runs: with fsync on
/// every write, what a replica that stopped receiving at this moment would hold).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).unwrap();
        }
    }
}

/// Whether any file under `dir` contains `needle`.
fn files_contain(dir: &std::path::Path, needle: &str) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        let path = e.unwrap().path();
        if path.is_dir() {
            files_contain(&path, needle)
        } else {
            let bytes = std::fs::read(&path).unwrap();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        }
    })
}

/// Redis comes back older than the log, as a failover to a replica that missed the primary's
/// last acknowledged writes leaves it: its data is replaced by a copy taken before the last
/// tasks were even created. The leader sees another Redis server, replays the log past the
/// position that copy recorded, and every task is there, completed, charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_last_writes_catches_up_from_the_log() {
    let mut cluster = Cluster::start(Options {
        ack_wait: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let first = submit_many(&cluster, 5, 100).await;
    assert_clean(&check(&cluster, &first).await, &cluster);
    // The leader records the position every second: the copy holds one covering `first`.
    tokio::time::sleep(2 * orch_coordinator::catchup::RECORD_EVERY).await;
    let data = cluster.dir.path().join("redis");
    let copy = cluster.dir.path().join("redis-behind");
    copy_dir(&data, &copy);

    let later = submit_many(&cluster, 5, 100).await;
    assert_clean(&check(&cluster, &later).await, &cluster);
    for id in &later {
        assert!(!files_contain(&copy, id), "the copy already has task {id}");
    }
    cluster.kill_redis();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&copy, &data).unwrap();
    cluster.start_redis();

    // Every task is known again (a task Redis lost answers 404 until the replay).
    cluster
        .eventually(Duration::from_secs(60), || async {
            for id in &later {
                let (status, _) = cluster.get(&format!("/v1/tasks/{id}")).await;
                if status != reqwest::StatusCode::OK {
                    return Err(format!("task {id}: {status}"));
                }
            }
            Ok(())
        })
        .await;
    let all: Vec<String> = first.iter().chain(&later).cloned().collect();
    assert_clean(&check(&cluster, &all).await, &cluster);
    assert!(
        orch_tests::log_contains(
            &cluster.coordinator.log,
            "Redis was behind the log: caught up"
        ),
        "the coordinator never caught up\n{}",
        cluster.logs()
    );

    // Nothing charged twice: the day's spend is the tasks' cost, once.
    let redis = orch_config::redis::Redis::from_url(&cluster.redis_url).unwrap();
    let state = orch_coordinator::state::State::connect(&redis)
        .await
        .unwrap();
    let mut cost = 0.0;
    for id in &all {
        cost += cluster.task(id).await.cost_usd;
    }
    assert!(
        cost > 0.0,
        "the simulated agents cost nothing: the check would be empty"
    );
    let now = orch_shared::now_ms();
    let today = state.today(now - now % 86_400_000).await.unwrap();
    assert!(
        (today.spent_usd - cost).abs() < 1e-9,
        "spent {} today for tasks costing {cost}",
        today.spent_usd
    );
}
