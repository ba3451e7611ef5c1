//! Redis in its highly available form, spread over machines (network namespaces on a bridge,
//! [`orch_tests::hosts`]): a primary, two replicas and three sentinels, each on a machine of
//! its own, beside three NATS nodes running every stream R3, two coordinator replicas and
//! three workers. The primary is SIGKILLed under load and the sentinels promote a replica:
//!
//! - one that is in sync;
//! - one that missed the primary's last acknowledged writes (its machine cannot reach the
//!   primary while tasks are created and run; the other replica may never be promoted), so
//!   Redis comes back older than the JetStream log and the leader replays the log past the
//!   position that replica recorded.
//!
//! Each scenario runs a bounded load, then the chaos suite's ledger check (nothing lost,
//! nothing run twice unnoticed, nothing charged twice) with its stuck-run detector, checks
//! that the day's spend is the tasks' cost once, and prints a `SCENARIO` line with its
//! figures (docs/reliability.md). `ORCH_HOSTS_LOAD=<n>` multiplies the load.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_tests::Options;
use orch_tests::hosts::{
    HostCluster, HostOptions, REDIS_PORT, completed, info_field, load, redis_at, redis_info_at,
    submit,
};
use orch_tests::ledger::{Ledger, assert_clean, check};
use std::time::{Duration, Instant};

/// The cluster: Redis with Sentinel on machines of their own, a leader lease longer than a
/// failover (`lease`), as docs/reliability.md recommends.
async fn start(lease: &str) -> HostCluster {
    HostCluster::start(HostOptions {
        redis_sentinel: true,
        cluster: Options {
            ack_wait: Duration::from_secs(2),
            coordinator_args: vec!["--leader-lease".into(), lease.into()],
            ..Options::default()
        },
        ..HostOptions::default()
    })
    .await
}

/// What a scenario reports (one line on stderr, copied into docs/reliability.md).
fn report(name: &str, ledger: &Ledger, refused: usize, promoted: Duration, recovered: Duration) {
    eprintln!(
        "SCENARIO {name}: {} tasks, 1 kill, {} lost, {} failed, {} duplicate executions, \
         {} double charges, {refused} submissions refused, replica promoted in {promoted:.1?}, \
         recovered in {recovered:.1?}",
        ledger.tasks,
        ledger.lost.len(),
        ledger.failed.len(),
        ledger.duplicate_starts,
        ledger.double_charged.len(),
    );
}

/// SIGKILLs the primary and waits until every sentinel names `want` (or, with `None`, any
/// replica) as the new one; returns the time of the kill, the promoted replica's index and
/// how long the promotion took.
async fn kill_primary(hc: &mut HostCluster, want: Option<usize>) -> (Instant, usize, Duration) {
    let ha = hc.redis_ha.clone().unwrap();
    let killed = Instant::now();
    hc.server("redis").signal(libc::SIGKILL);
    let promoted = hc
        .cluster
        .eventually(Duration::from_secs(60), || async {
            let primary = ha.primary();
            match ha.replicas.iter().position(|r| Some(r.addr) == primary) {
                Some(i) if want.is_none_or(|w| w == i) => Ok(i),
                _ => Err(format!("the sentinels name {primary:?} as the primary")),
            }
        })
        .await;
    (killed, promoted, killed.elapsed())
}

/// Nothing charged twice: the day's spend in Redis (now the promoted replica) is the sum of
/// the tasks' costs, and that sum is not zero.
async fn assert_spent_once(hc: &HostCluster, ids: &[String]) {
    let redis = orch_config::redis::Redis::from_url(&hc.cluster.redis_url).unwrap();
    let state = orch_coordinator::state::State::connect(&redis)
        .await
        .unwrap();
    let mut cost = 0.0;
    for id in ids {
        cost += hc.cluster.task(id).await.cost_usd;
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

/// The leading coordinator kept its lease through the failover (the lease outlasts it).
fn assert_coordinators_run(hc: &mut HostCluster) {
    for host in hc.coordinator_hosts.clone() {
        let server = hc.server(&format!("coordinator-{}", host.name));
        let status = server.child.try_wait().unwrap();
        assert!(
            status.is_none(),
            "coordinator-{} exited ({status:?}) after the failover\n{}",
            host.name,
            hc.cluster.logs()
        );
    }
}

/// The primary dies under load; a replica that has every write is promoted; the services
/// follow it and the work finishes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_primary_killed_under_load_fails_over_to_an_in_sync_replica() {
    let mut hc = start("15s").await;
    let (mut ids, mut refused) = submit(&hc.cluster, "before", load(12), 1000).await;
    let (killed, promoted, promotion) = kill_primary(&mut hc, None).await;
    let (after, r) = submit(&hc.cluster, "after", load(6), 100).await;
    refused += r;
    let recovered = completed(&hc.cluster, &after, killed).await;
    ids.extend(after);
    let ledger = check(&hc.cluster, &ids).await;
    report(
        "redis-failover-in-sync",
        &ledger,
        refused,
        promotion,
        recovered,
    );
    assert_clean(&ledger, &hc.cluster);
    assert_spent_once(&hc, &ids).await;
    assert_coordinators_run(&mut hc);
    let replica = hc.redis_ha.as_ref().unwrap().replicas[promoted]
        .name
        .clone();
    assert!(
        orch_tests::log_contains(&hc.cluster.coordinator.log, "Redis primary moved"),
        "the leader never moved to the promoted replica {replica}\n{}",
        hc.cluster.logs()
    );
}

/// The primary dies under load, and the replica promoted is one that missed its last
/// acknowledged writes: tasks created, run and completed while that replica's machine could
/// not reach the primary. Redis is then older than the log; the leader replays the log past
/// the position the replica holds, and every task is there, completed, charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_primary_killed_fails_over_to_a_replica_that_missed_the_last_writes() {
    // The lease outlasts the cut and the failover: the stale replica holds the lease as it
    // was when the cut began, and the leader renews it there.
    let mut hc = start("60s").await;
    let ha = hc.redis_ha.clone().unwrap();
    let (stale, other) = (ha.replicas[0].clone(), ha.replicas[1].clone());
    // Only the stale replica may be promoted.
    let mut conn = redis_at(other.addr, REDIS_PORT).unwrap();
    redis::cmd("CONFIG")
        .arg(&["SET", "replica-priority", "0"][..])
        .query::<()>(&mut conn)
        .unwrap();
    hc.cluster
        .eventually(Duration::from_secs(60), || async {
            let seen: Vec<bool> = ha
                .sentinels
                .iter()
                .map(|s| {
                    let Some(mut c) = redis_at(s.addr, orch_tests::hosts::SENTINEL_PORT) else {
                        return false;
                    };
                    let replicas: Vec<std::collections::HashMap<String, String>> =
                        redis::cmd("SENTINEL")
                            .arg(&["REPLICAS", orch_tests::REDIS_MASTER][..])
                            .query(&mut c)
                            .unwrap_or_default();
                    replicas.iter().any(|r| {
                        r.get("ip") == Some(&other.addr.to_string())
                            && r.get("slave-priority").is_some_and(|p| p == "0")
                    })
                })
                .collect();
            if seen.iter().all(|s| *s) {
                Ok(())
            } else {
                Err(format!("sentinels that know replica-priority 0: {seen:?}"))
            }
        })
        .await;

    let (mut ids, mut refused) = submit(&hc.cluster, "before", load(5), 200).await;
    completed(&hc.cluster, &ids, Instant::now()).await;
    // The leader records the log position every second: the stale replica gets one
    // covering `before` before its machine is cut from the primary.
    tokio::time::sleep(2 * orch_coordinator::catchup::RECORD_EVERY).await;
    // Both ways: a route on one side alone still lets the primary's stream in until its
    // window fills.
    stale.cut_from(hc.redis_host.addr);
    hc.redis_host.cut_from(stale.addr);
    let (missed, r) = submit(&hc.cluster, "missed", load(8), 200).await;
    refused += r;
    completed(&hc.cluster, &missed, Instant::now()).await;
    // The stale replica has none of them (it answers the test, which it still reaches).
    let mut on_stale = redis_at(stale.addr, REDIS_PORT).unwrap();
    for id in &missed {
        let key = orch_shared::keys::task(id.parse().unwrap());
        let there: bool = redis::cmd("EXISTS").arg(&key).query(&mut on_stale).unwrap();
        assert!(!there, "the stale replica has task {id}");
    }
    let primary = redis_info_at(hc.redis_host.addr, REDIS_PORT, "replication").unwrap();
    let behind = redis_info_at(stale.addr, REDIS_PORT, "replication").unwrap();
    let primary_offset: u64 = info_field(&primary, "master_repl_offset")
        .unwrap()
        .parse()
        .unwrap();
    let stale_offset: u64 = info_field(&behind, "slave_repl_offset")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        stale_offset < primary_offset,
        "the cut replica is not behind: offset {stale_offset} of {primary_offset}"
    );
    ids.extend(missed.iter().cloned());

    let (killed, _, promotion) = kill_primary(&mut hc, Some(0)).await;
    stale.heal_from(hc.redis_host.addr);
    hc.redis_host.heal_from(stale.addr);
    let (after, r) = submit(&hc.cluster, "after", load(5), 100).await;
    refused += r;
    let recovered = completed(&hc.cluster, &after, killed).await;
    ids.extend(after);
    let ledger = check(&hc.cluster, &ids).await;
    report(
        "redis-failover-stale",
        &ledger,
        refused,
        promotion,
        recovered,
    );
    assert_clean(&ledger, &hc.cluster);
    assert_spent_once(&hc, &ids).await;
    assert_coordinators_run(&mut hc);
    assert!(
        orch_tests::log_contains(
            &hc.cluster.coordinator.log,
            "Redis was behind the log: caught up"
        ),
        "the leader never caught the promoted replica up with the log\n{}",
        hc.cluster.logs()
    );
}
