//! The cluster spread over machines (network namespaces on a bridge, [`orch_tests::hosts`]),
//! in the failures production sees: a worker's machine cut off mid-job and healed, the leading
//! coordinator cut off from Redis and (alone) from NATS, SIGKILLs of NATS nodes (the work
//! stream's leader, the node every service was given) and a whole machine lost. Three NATS
//! nodes run every stream R3. Each scenario runs a bounded load, then the chaos suite's
//! ledger check (nothing lost, nothing run twice unnoticed, nothing charged twice) with its
//! stuck-run detector, and prints a `SCENARIO` line with its figures (docs/reliability.md).
//!
//! `ORCH_HOSTS_LOAD=<n>` multiplies the load (1 by default, a few minutes for the file).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_tests::eventually;
use orch_tests::hosts::{HostCluster, HostOptions, completed, http, load, submit};
use orch_tests::ledger::{Ledger, assert_clean, check};
use std::time::{Duration, Instant};

/// What a scenario reports (one line on stderr, copied into docs/reliability.md).
fn report(name: &str, ledger: &Ledger, kills: usize, refused: usize, recovered: Duration) {
    eprintln!(
        "SCENARIO {name}: {} tasks, {kills} faults, {} lost, {} failed, {} duplicate executions, \
         {} double charges, {refused} submissions refused, recovered in {recovered:.1?}",
        ledger.tasks,
        ledger.lost.len(),
        ledger.failed.len(),
        ledger.duplicate_starts,
        ledger.double_charged.len(),
    );
}

/// Waits until the coordinator replica `i` leads; points the cluster's API calls at it.
async fn follow_leader(hc: &mut HostCluster, i: usize) {
    let url = hc.coordinator_urls[i].clone();
    let http = http();
    hc.cluster
        .eventually(Duration::from_secs(60), || async {
            let r = http
                .get(format!("{url}/readyz"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            if v["leader"] == true {
                Ok(())
            } else {
                Err(format!("replica {i} does not lead: {v}"))
            }
        })
        .await;
    hc.cluster.url = url;
    // The cluster's coordinator (whose exit its API calls report) is the one that leads.
    let name = format!("coordinator-{}", hc.coordinator_hosts[i].name);
    let c = &mut hc.cluster;
    if c.coordinator.name != name {
        let at = c.others.iter().position(|s| s.name == name).unwrap();
        std::mem::swap(&mut c.coordinator, &mut c.others[at]);
    }
}

/// A worker's machine is cut off while it runs jobs: its jobs are redelivered to the other
/// worker once their ack wait passes, and when the machine comes back, what the cut-off
/// worker finished late is not applied a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_machine_cut_off_mid_job_and_healed_runs_nothing_twice_unnoticed() {
    let mut hc = HostCluster::start(HostOptions {
        worker_hosts: Some(2),
        ..HostOptions::default()
    })
    .await;
    let (mut ids, mut refused) = submit(&hc.cluster, "before", load(8), 4000).await;
    let victim = hc.cluster.running_on(&ids[0], 0).await;
    let cut = Instant::now();
    hc.worker_hosts[victim].cut();
    let (after, r) = submit(&hc.cluster, "after", load(4), 100).await;
    refused += r;
    ids.extend(after);
    let recovered = completed(&hc.cluster, &ids, cut).await;
    hc.worker_hosts[victim].heal();
    // Back: the worker takes jobs again (some of these land on it).
    let (healed, r) = submit(&hc.cluster, "healed", load(6), 500).await;
    refused += r;
    completed(&hc.cluster, &healed, cut).await;
    ids.extend(healed);
    let ledger = check(&hc.cluster, &ids).await;
    report("worker-machine-cut", &ledger, 1, refused, recovered);
    assert_clean(&ledger, &hc.cluster);
    assert!(
        hc.server(&format!("worker-{victim}")).is_running(),
        "the cut-off worker stopped\n{}",
        hc.cluster.logs()
    );
}

/// The leading coordinator loses Redis (a blackhole route on its machine): its lease runs
/// out, the standby takes over, and the work submitted before and after completes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_cut_off_from_redis_gives_way_to_the_standby() {
    let mut hc = HostCluster::start(HostOptions {
        coordinator_hosts: true,
        ..HostOptions::default()
    })
    .await;
    let (mut ids, mut refused) = submit(&hc.cluster, "before", load(10), 1000).await;
    let cut = Instant::now();
    hc.coordinator_hosts[0].cut_from(hc.redis_host.addr);
    follow_leader(&mut hc, 1).await;
    let (after, r) = submit(&hc.cluster, "after", load(10), 100).await;
    refused += r;
    let recovered = completed(&hc.cluster, &after, cut).await;
    ids.extend(after);
    hc.coordinator_hosts[0].heal_from(hc.redis_host.addr);
    let ledger = check(&hc.cluster, &ids).await;
    report("leader-cut-from-redis", &ledger, 1, refused, recovered);
    assert_clean(&ledger, &hc.cluster);
    assert_eq!(hc.leader().await, Some(1), "{}", hc.cluster.logs());
}

/// The leading coordinator loses every NATS node (Redis still answers it, so its lease does
/// not run out by itself): it must give way, and the standby finishes the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_cut_off_from_nats_gives_way_to_the_standby() {
    let mut hc = HostCluster::start(HostOptions {
        coordinator_hosts: true,
        ..HostOptions::default()
    })
    .await;
    let (mut ids, mut refused) = submit(&hc.cluster, "before", load(10), 1000).await;
    let cut = Instant::now();
    for node in &hc.nodes {
        hc.coordinator_hosts[0].cut_from(node.addr);
    }
    follow_leader(&mut hc, 1).await;
    let (after, r) = submit(&hc.cluster, "after", load(10), 100).await;
    refused += r;
    let recovered = completed(&hc.cluster, &after, cut).await;
    ids.extend(after);
    for node in &hc.nodes {
        hc.coordinator_hosts[0].heal_from(node.addr);
    }
    let ledger = check(&hc.cluster, &ids).await;
    report("leader-cut-from-nats", &ledger, 1, refused, recovered);
    assert_clean(&ledger, &hc.cluster);
    assert_eq!(hc.leader().await, Some(1), "{}", hc.cluster.logs());
}

/// A whole machine is lost at once — the NATS node every service was given, a worker and the
/// leading coordinator: it drops off the network and its processes die. The other machines
/// carry on: the standby leads, the R3 streams elect new leaders, every task completes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_machine_lost_with_its_nats_node_worker_and_leader() {
    let mut hc = HostCluster::start(HostOptions::default()).await;
    let (mut ids, mut refused) = submit(&hc.cluster, "before", load(10), 1000).await;
    let lost = Instant::now();
    hc.nodes[0].cut();
    for name in ["nats-n0", "worker-0", "coordinator-n0"] {
        hc.server(name).signal(libc::SIGKILL);
    }
    follow_leader(&mut hc, 1).await;
    let (after, r) = submit(&hc.cluster, "after", load(10), 100).await;
    refused += r;
    let recovered = completed(&hc.cluster, &after, lost).await;
    ids.extend(after);
    let ledger = check(&hc.cluster, &ids).await;
    report("whole-machine-lost", &ledger, 3, refused, recovered);
    assert_clean(&ledger, &hc.cluster);
}

/// Three NATS nodes, every stream R3, clients given node 0's URL alone. Under load, the node
/// leading the work stream is SIGKILLed (and started again), then node 0: the services move
/// to the surviving nodes, and every task completes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_streams_survive_sigkills_of_the_stream_leader_and_of_the_seed_node() {
    let mut hc = HostCluster::start(HostOptions::default()).await;
    let seed = hc.cluster.nats_url.clone();
    // The leader of the work stream is moved off node 0, so that the two kills hit two nodes.
    let client = async_nats::connect(&seed).await.unwrap();
    let stepdown = format!(
        "$JS.API.STREAM.LEADER.STEPDOWN.{}",
        orch_shared::subject::JOBS_STREAM
    );
    let leader = eventually(Duration::from_secs(60), || async {
        let leader = jobs_stream_leader(&seed).await?;
        if leader != "n0" {
            return Ok(leader);
        }
        let _ = client.request(stepdown.clone(), "".into()).await;
        Err(format!("the work stream is led by {leader}"))
    })
    .await;
    drop(client);

    let (mut ids, mut refused) = submit(&hc.cluster, "before", load(20), 300).await;
    let killed = Instant::now();
    hc.server(&format!("nats-{leader}")).signal(libc::SIGKILL);
    let (after, r) = submit(&hc.cluster, "after-leader", load(10), 100).await;
    refused += r;
    let recovered_leader = completed(&hc.cluster, &after, killed).await;
    ids.extend(after);
    // Back with its store; then the node every service was given is killed.
    hc.restart_nats(node_index(&leader));
    let monitor: Vec<String> = hc
        .nodes
        .iter()
        .map(|n| format!("http://{}:8222/healthz", n.addr))
        .collect();
    let plain = http();
    hc.cluster
        .eventually(Duration::from_secs(60), || async {
            for url in &monitor {
                let r = plain.get(url).send().await.map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("{url}: {}", r.text().await.unwrap_or_default()));
                }
            }
            Ok(())
        })
        .await;
    let (during, r) = submit(&hc.cluster, "before-seed", load(10), 300).await;
    refused += r;
    ids.extend(during);
    let killed_seed = Instant::now();
    hc.server("nats-n0").signal(libc::SIGKILL);
    let (after, r) = submit(&hc.cluster, "after-seed", load(10), 100).await;
    refused += r;
    let recovered_seed = completed(&hc.cluster, &after, killed_seed).await;
    ids.extend(after);

    let ledger = check(&hc.cluster, &ids).await;
    report("nats-r3-leader-kill", &ledger, 1, refused, recovered_leader);
    report("nats-r3-seed-kill", &ledger, 1, refused, recovered_seed);
    assert_clean(&ledger, &hc.cluster);
    assert!(
        hc.server("coordinator-n0").is_running(),
        "the coordinator stopped when its NATS node died\n{}",
        hc.cluster.logs()
    );
}

/// The NATS server (by its name, `n<i>`) leading the work stream's Raft group.
async fn jobs_stream_leader(nats_url: &str) -> Result<String, String> {
    let client = async_nats::connect(nats_url)
        .await
        .map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(orch_shared::subject::JOBS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let info = stream.info().await.map_err(|e| e.to_string())?;
    info.cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .ok_or_else(|| format!("the work stream has no leader: {:?}", info.cluster))
}

/// The index of NATS node `n<i>`.
fn node_index(name: &str) -> usize {
    name.trim_start_matches('n').parse().unwrap()
}
