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
