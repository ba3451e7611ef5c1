//! Workers die and drain: a SIGKILLed worker's job completes elsewhere; SIGTERM finishes or
//! hands back in-flight jobs and exits 0; nothing is lost.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_tests::{Cluster, Options, assert_completed};
use serde_json::json;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_of_a_sigkilled_worker_completes_on_another_worker() {
    let cluster = Cluster::start(Options {
        workers: 2,
        ack_wait: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({"prompt": "build it", "roles": ["builder"], "sim": {"latency_ms": 3000}}))
        .await;
    let id = task.id.to_string();
    let victim = cluster.running_on(&id, 0).await;
    cluster.workers[victim].signal(libc::SIGKILL);
    let task = cluster.wait_task(&id, WAIT).await;
    assert_completed(&cluster, &task);
    let survivor = task.jobs[0].worker_id.clone().unwrap();
    assert_ne!(
        survivor.0,
        format!("worker-{victim}"),
        "the job finished on the dead worker?"
    );
    let survivor_log = &cluster.workers[1 - victim].log;
    assert!(
        orch_tests::log_contains(survivor_log, "job"),
        "survivor ran nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_jobs_finish_and_exits_zero() {
    let mut cluster = Cluster::start(Options {
        workers: 2,
        slots: 2,
        drain_grace: Duration::from_secs(20),
        ..Options::default()
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let t = cluster
            .submit(json!({"prompt": format!("job {i}"), "roles": ["builder"], "sim": {"latency_ms": 1500}}))
            .await;
        ids.push(t.id.to_string());
    }
    let victim = cluster.running_on(&ids[0], 0).await;
    let started = Instant::now();
    cluster.workers[victim].signal(libc::SIGTERM);
    let code = cluster.workers[victim].wait_exit(Duration::from_secs(30));
    assert_eq!(
        code,
        Some(Some(0)),
        "worker did not exit 0\n{}",
        cluster.logs()
    );
    // It waited for its jobs (1.5 s each) instead of dropping them.
    assert!(started.elapsed() >= Duration::from_millis(500));
    for task in cluster.wait_all(&ids, WAIT).await {
        assert_completed(&cluster, &task);
    }
    assert!(orch_tests::log_contains(
        &cluster.workers[victim].log,
        "worker stopped"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_back_a_job_that_outlives_the_grace_period() {
    let mut cluster = Cluster::start(Options {
        workers: 2,
        drain_grace: Duration::from_millis(300),
        ack_wait: Duration::from_secs(30),
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({"prompt": "long job", "roles": ["builder"], "sim": {"latency_ms": 4000}}))
        .await;
    let id = task.id.to_string();
    let victim = cluster.running_on(&id, 0).await;
    cluster.workers[victim].signal(libc::SIGTERM);
    assert_eq!(
        cluster.workers[victim].wait_exit(Duration::from_secs(15)),
        Some(Some(0))
    );
    // Handed back with a NAK, the job is redelivered at once — well before the 30 s ack wait.
    let task = cluster.wait_task(&id, Duration::from_secs(20)).await;
    assert_completed(&cluster, &task);
    assert_eq!(
        task.jobs[0].worker_id.as_ref().unwrap().0,
        format!("worker-{}", 1 - victim),
        "the job did not finish on the other worker\n{}",
        cluster.logs()
    );
    assert!(orch_tests::log_contains(
        &cluster.workers[victim].log,
        "handing the job back"
    ));
}

async fn readiness(http: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let r = http.get(format!("{url}/readyz")).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_coordinator_takes_over_when_the_leader_dies() {
    let mut cluster = Cluster::start(Options {
        workers: 2,
        ..Options::default()
    })
    .await;
    let (mut standby, standby_url) = cluster.start_standby();
    let http = reqwest::Client::new();
    // The standby is ready (it serves reads and forwards writes) but does not lead.
    let v = cluster
        .eventually(Duration::from_secs(20), || async {
            match readiness(&http, &standby_url).await {
                (200, v) => Ok(v),
                (_, v) => Err(format!("standby never came up: {v}")),
            }
        })
        .await;
    assert_eq!(v["leader"], false, "{v}");
    let (status, v) = readiness(&http, &cluster.url).await;
    assert_eq!(
        (status, v["leader"].clone()),
        (200, serde_json::json!(true))
    );
    let mut ids = Vec::new();
    for i in 0..10 {
        let t = cluster
            .submit(json!({"prompt": format!("t{i}"), "roles": ["builder", "tester"], "sim": {"latency_ms": 600}}))
            .await;
        ids.push(t.id.to_string());
    }
    let read = http
        .get(format!("{standby_url}/v1/tasks/{}", ids[0]))
        .bearer_auth(orch_tests::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200, "reads work on the standby");
    // A write sent to the standby is carried out by the leader.
    let write = http
        .post(format!("{standby_url}/v1/tasks"))
        .bearer_auth(orch_tests::TOKEN)
        .json(&json!({"prompt": "via the standby", "roles": ["builder"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        write.status(),
        201,
        "a standby forwards writes to the leader"
    );
    let forwarded: serde_json::Value = write.json().await.unwrap();
    ids.push(forwarded["id"].as_str().unwrap().to_string());
    let bad = http
        .post(format!("{standby_url}/v1/tasks"))
        .bearer_auth(orch_tests::TOKEN)
        .json(&json!({"prompt": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        bad.status(),
        400,
        "the leader's validation errors come back unchanged"
    );

    // The leader dies mid-run; the standby takes over and finishes every task.
    cluster.coordinator.signal(libc::SIGKILL);
    let killed = Instant::now();
    let took_over = orch_tests::poll_until(Duration::from_secs(15), || async {
        match readiness(&http, &standby_url).await {
            (_, v) if v["leader"] == true => Ok(()),
            (_, v) => Err(v),
        }
    })
    .await;
    if let Err(v) = took_over {
        panic!("no takeover: {v}\n{}", standby.tail(40));
    }
    let takeover = killed.elapsed();
    eprintln!("standby took over {takeover:?} after the leader was killed");
    assert!(
        takeover < Duration::from_secs(8),
        "takeover took {takeover:?}"
    );
    cluster.url = standby_url.clone();
    for task in cluster.wait_all(&ids, WAIT).await {
        assert_completed(&cluster, &task);
    }
    // And it takes writes now.
    let t = cluster
        .submit(json!({"prompt": "after", "roles": ["builder"]}))
        .await;
    assert_completed(&cluster, &cluster.wait_task(&t.id.to_string(), WAIT).await);
    assert!(standby.is_running());
}

/// Waits until the standby at `url` is ready (serving reads, forwarding writes) and not leading.
async fn wait_standby(http: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = readiness(http, url).await;
        if status == 200 {
            assert_eq!(v["leader"], false, "{v}");
            return;
        }
        assert!(Instant::now() < deadline, "standby never came up: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many requests a coordinator answered with `status` itself (its error counter).
async fn errors_answered(http: &reqwest::Client, url: &str, status: u16) -> u64 {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("orch_http_errors_total{{code=\"{status}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A submit near the request size limit (a 700 KB body) goes through a standby to the
/// leader (forwards are protocol bytes, not JSON arrays of numbers four times the size), and a
/// request without a valid token is refused by the standby itself, never forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_submit_through_a_standby_is_created_and_a_bad_token_stops_there() {
    let cluster = Cluster::start(Options {
        workers: 1,
        ..Options::default()
    })
    .await;
    let (_standby, standby_url) = cluster.start_standby();
    let http = reqwest::Client::new();
    wait_standby(&http, &standby_url).await;

    // A 400 KB prompt (100,000 four-byte characters; the task's record holds it twice, in
    // the task and in its job, and must fit one NATS message), in a 700 KB body: what the
    // standby forwards is the body.
    let prompt = "𝄞".repeat(100_000);
    let mut body = serde_json::to_vec(&json!({"prompt": prompt, "roles": ["builder"]})).unwrap();
    body.resize(700 * 1024, b' ');
    let write = http
        .post(format!("{standby_url}/v1/tasks"))
        .bearer_auth(orch_tests::TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = write.status().as_u16();
    let body: serde_json::Value = write.json().await.unwrap_or_default();
    assert_eq!(status, 201, "{}", body["message"]);
    let id = body["id"].as_str().unwrap().to_string();
    let task = cluster.wait_task(&id, WAIT).await;
    assert_completed(&cluster, &task);
    assert_eq!(task.prompt.chars().count(), 100_000);

    let refused = http
        .post(format!("{standby_url}/v1/tasks"))
        .bearer_auth("not-a-token")
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(errors_answered(&http, &standby_url, 401).await, 1);
    assert_eq!(
        errors_answered(&http, &cluster.url, 401).await,
        0,
        "the leader never saw the unauthenticated write"
    );
}

/// A forward delivered twice (the same id) runs once: the leader answers the repeat with the
/// first answer, so a retried forward can never create a second task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_delivered_twice_creates_one_task() {
    use orch_coordinator::transport::{Forwarded, ForwardedReply, LEADER_HTTP};
    use orch_shared::codec;
    let cluster = Cluster::start(Options {
        workers: 0,
        ..Options::default()
    })
    .await;
    let nats = async_nats::connect(&cluster.nats_url).await.unwrap();
    let forward = Forwarded {
        id: "5f1d7c2a-3b4e-4f60-8a71-9c0d1e2f3a4b".into(),
        method: "POST".into(),
        path: "/v1/tasks".into(),
        headers: vec![
            (
                "authorization".into(),
                format!("Bearer {}", orch_tests::TOKEN),
            ),
            ("content-type".into(), "application/json".into()),
        ],
        body: br#"{"prompt": "only once", "roles": ["builder"]}"#.to_vec(),
    };
    let mut answers = Vec::new();
    for _ in 0..2 {
        // The leader subscribes once it leads: ask until somebody answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        let reply = loop {
            match nats
                .request(LEADER_HTTP, codec::encode(&forward).into())
                .await
            {
                Ok(reply) => break reply,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no leader answered: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let reply: ForwardedReply = codec::decode(&reply.payload).unwrap();
        assert_eq!(
            reply.status,
            201,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let task: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        answers.push(task["id"].as_str().unwrap().to_string());
    }
    assert_eq!(answers[0], answers[1], "the repeat got the first answer");
    let (status, list) = cluster.get("/v1/tasks").await;
    assert_eq!(status, 200);
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1, "{list}");
}
