//! NATS reached over TLS with credentials: the coordinator and the workers trust the server's
//! test CA (`--nats-ca-file`), authenticate (user and password, token) and, when the server
//! asks, present a client certificate; a wrong password is a logged error, never a panic.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_tests::{
    Cluster, NatsTestAuth, NatsTls, Options, Server, assert_completed, log_contains, nats_tls,
    redis, workspace_bin,
};
use serde_json::json;
use std::process::Command;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Runs a two-role task on a cluster whose NATS is secured as `tls` says.
async fn runs_a_task(tls: NatsTls) -> Cluster {
    let cluster = Cluster::start(Options {
        nats_tls: Some(tls),
        ..Options::default()
    })
    .await;
    let task = cluster
        .submit(json!({"prompt": "x", "roles": ["builder", "tester"]}))
        .await;
    let task = cluster.wait_task(&task.id.to_string(), WAIT).await;
    assert_completed(&cluster, &task);
    let (_, workers) = cluster.get("/v1/workers").await;
    assert_eq!(
        workers["workers"].as_array().map(Vec::len),
        Some(2),
        "{workers}"
    );
    cluster
}

/// A client with neither TLS nor credentials is refused, so the services did use both.
async fn plain_client_is_refused(cluster: &Cluster) {
    let plain = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(cluster.nats_url.as_str())
        .await;
    assert!(
        plain.is_err(),
        "a plain client connected to {}",
        cluster.nats_url
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_on_nats_over_tls_with_a_user_and_password() {
    let cluster = runs_a_task(NatsTls {
        auth: NatsTestAuth::UserPassword("orch".into(), "s3cret-pw".into()),
        verify_clients: false,
    })
    .await;
    plain_client_is_refused(&cluster).await;
    // The password is never logged.
    assert!(!log_contains(&cluster.coordinator.log, "s3cret-pw"));
    for worker in &cluster.workers {
        assert!(!log_contains(&worker.log, "s3cret-pw"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_on_nats_with_a_token_and_mutual_tls() {
    let cluster = runs_a_task(NatsTls {
        auth: NatsTestAuth::Token("t0ken-for-nats".into()),
        verify_clients: true,
    })
    .await;
    plain_client_is_refused(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_on_nats_over_tls_with_an_nkey() {
    let cluster = runs_a_task(NatsTls {
        auth: NatsTestAuth::new_nkey(),
        verify_clients: false,
    })
    .await;
    plain_client_is_refused(&cluster).await;
}

/// A wrong password: each service logs NATS's authorization violation, stays up without
/// JetStream as it does when the server is unreachable, and stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_nats_password_is_a_logged_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let tls = NatsTls {
        auth: NatsTestAuth::UserPassword("orch".into(), "right-password".into()),
        verify_clients: false,
    };
    let (_nats, nats_url, certs) = nats_tls(dir.path(), &tls);
    let (_redis, redis_url) = redis(dir.path());
    let wrong = NatsTls {
        auth: NatsTestAuth::UserPassword("orch".into(), "wrong-password".into()),
        ..tls
    };
    let flags = wrong.service_flags(&certs);
    let mut coordinator = Command::new(workspace_bin("orch-coordinator"));
    coordinator
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-auth",
            "--nats-url",
            &nats_url,
        ])
        .args(["--redis-url", &redis_url])
        .args(&flags)
        .env("ORCH_LOG", "info");
    let mut worker = Command::new(workspace_bin("orch-worker"));
    worker
        .args(["--nats-url", &nats_url, "--redis-url", &redis_url])
        .args(["--id", "wrong-pw", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(&flags)
        .env("ORCH_LOG", "info");
    let mut services = [
        Server::spawn("coordinator", &mut coordinator, dir.path()),
        Server::spawn("worker", &mut worker, dir.path()),
    ];
    for service in &mut services {
        let log = service.log.clone();
        orch_tests::eventually(Duration::from_secs(30), || {
            let found = log_contains(&log, "NATS refused this service's credentials");
            let tail = service.tail(30);
            async move {
                if found {
                    Ok(())
                } else {
                    Err(format!("the refused credentials were not logged\n{tail}"))
                }
            }
        })
        .await;
        assert!(!log_contains(&log, "panicked"), "{}", service.tail(60));
        assert!(
            !log_contains(&log, "wrong-password"),
            "{}",
            service.tail(60)
        );
        service.signal(libc::SIGTERM);
        let code = service.wait_exit(Duration::from_secs(20));
        assert!(
            matches!(code, Some(Some(c)) if c != 101),
            "{} did not stop cleanly on SIGTERM: {code:?}\n{}",
            service.name,
            service.tail(60)
        );
    }
}
