//! Leader epoch fencing: a coordinator whose lease passed to another replica (it was paused
//! or partitioned past the lease) has its task writes refused by Redis, so it cannot apply a
//! result or save a task after another replica took over; the new leader's writes go through.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_coordinator::state::{self, ResultWrite, State};
use orch_shared::job::Usage;
use orch_tests::{Cluster, Options, poll_until};
use serde_json::json;
use std::time::Duration;

async fn state(cluster: &Cluster) -> State {
    let redis = orch_config::redis::Redis::from_url(&cluster.redis_url).unwrap();
    State::connect(&redis).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_passed_on_can_write_nothing() {
    let mut cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    // A task whose job waits (no worker), then no coordinator: the lease lapses.
    let task = cluster
        .submit(json!({"prompt": "build it", "roles": ["builder"]}))
        .await;
    cluster.coordinator.signal(libc::SIGKILL);
    let _ = cluster.coordinator.wait_exit(Duration::from_secs(10));

    let old = state(&cluster).await;
    let new = state(&cluster).await;
    let short = Duration::from_millis(300);
    poll_until(Duration::from_secs(20), || async {
        match old.try_lead("old", short).await {
            Ok(true) => Ok(()),
            other => Err(format!("the lease is not free yet: {other:?}")),
        }
    })
    .await
    .unwrap();
    let old_epoch = old.leader_epoch();
    // The old leader stalls past its lease; another replica takes it.
    poll_until(Duration::from_secs(10), || async {
        match new.try_lead("new", Duration::from_secs(30)).await {
            Ok(true) => Ok(()),
            other => Err(format!("the lease did not pass on: {other:?}")),
        }
    })
    .await
    .unwrap();
    assert!(new.leader_epoch() > old_epoch, "the epoch did not move on");

    let mut stale = task.clone();
    stale.cost_usd = 42.0;
    let err = old.save_task(&stale).await.unwrap_err();
    assert!(
        matches!(err, state::Error::Fenced(e) if e == old_epoch),
        "{err}"
    );
    let job = &task.jobs[0];
    let write = ResultWrite {
        job: job.id,
        attempt: 1,
        fence: 0,
        cost_usd: 42.0,
        usage: Usage::default(),
        finished_at_ms: orch_shared::now_ms(),
        stats: None,
        session: None,
    };
    let err = old.save_result(&stale, &write).await.unwrap_err();
    assert!(matches!(err, state::Error::Fenced(_)), "{err}");
    // The old leader learns it was fenced (its campaign stops the process on this).
    tokio::time::timeout(Duration::from_secs(1), old.fenced())
        .await
        .expect("a fenced write tells the campaign");
    let stored = new.load_task(task.id).await.unwrap().unwrap();
    assert_eq!(
        stored.cost_usd, task.cost_usd,
        "a fenced write changed the task"
    );
    let now = orch_shared::now_ms();
    let today = new.today(now - now % 86_400_000).await.unwrap();
    assert_eq!(today.spent_usd, 0.0, "a fenced result was charged");

    // The current leader writes.
    new.save_task(&stale).await.unwrap();
    let stored = new.load_task(task.id).await.unwrap().unwrap();
    assert_eq!(stored.cost_usd, 42.0);
}

/// `/readyz` of the coordinator at `url`: whether it leads.
async fn leads(http: &reqwest::Client, url: &str) -> Result<(), String> {
    let r = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    if v["leader"] == true {
        Ok(())
    } else {
        Err(format!("not leading: {v}"))
    }
}

/// The whole cluster: the leader is paused (SIGSTOP) under load past its lease, the standby
/// takes over and finishes the work; the old leader, woken (SIGCONT), stops without applying
/// anything, and the ledger finds nothing lost or charged twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_woken_after_a_takeover_stops_and_the_work_is_finished_once() {
    let mut cluster = Cluster::start(Options {
        ack_wait: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let (standby, standby_url) = cluster.start_standby();
    let http = reqwest::Client::new();
    let ids = orch_tests::ledger::submit_many(&cluster, 10, 500).await;
    cluster.coordinator.signal(libc::SIGSTOP);
    cluster
        .eventually(Duration::from_secs(30), || leads(&http, &standby_url))
        .await;
    let old_url = std::mem::replace(&mut cluster.url, standby_url);
    let more = orch_tests::ledger::submit_many(&cluster, 3, 0).await;

    cluster.coordinator.signal(libc::SIGCONT);
    let code = cluster.coordinator.wait_exit(Duration::from_secs(30));
    assert!(
        matches!(code, Some(Some(c)) if c != 0),
        "the old leader kept running after it lost its lease ({code:?})\n{}",
        cluster.logs()
    );
    let log = std::fs::read_to_string(&cluster.coordinator.log).unwrap();
    assert!(
        log.contains("lost the leader lease") || log.contains("fenced out"),
        "the old leader did not say why it stopped:\n{log}"
    );
    assert!(leads(&http, &old_url).await.is_err());

    let all: Vec<String> = ids.into_iter().chain(more).collect();
    let ledger = orch_tests::ledger::check(&cluster, &all).await;
    orch_tests::ledger::assert_clean(&ledger, &cluster);
    drop(standby);
}
