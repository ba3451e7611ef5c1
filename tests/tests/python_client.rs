//! The Python client (`clients/python`), installed with pip from the checkout, runs its pytest
//! suite against a real local cluster (pytest is installed by `scripts/deps.sh`).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_tests::{Cluster, Options, TOKEN};
use std::path::Path;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_passes_its_tests_against_a_real_cluster() {
    let cluster = Cluster::start(Options::default()).await;
    cluster.wait_workers(2).await;
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python");
    // Installed as a user would (`pip install ./clients/python`), into the test's own
    // directory, from a copy: pip builds in the source tree, and the checkout stays clean.
    let source = cluster.dir.path().join("client-source");
    copy_tree(&client, &source);
    let site = cluster.dir.path().join("site-packages");
    let pip = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-deps", "--target"])
        .arg(&site)
        .arg(&source)
        .output()
        .expect("python3 runs");
    assert!(
        pip.status.success(),
        "pip install ./clients/python failed:\n{}",
        String::from_utf8_lossy(&pip.stderr)
    );
    let url = cluster.url.clone();
    // pytest blocks for a while: off the runtime's threads.
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
            .current_dir(&client)
            .env("PYTHONPATH", &site)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("ORCH_TEST_URL", url)
            .env("ORCH_TEST_TOKEN", TOKEN)
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the Python client's tests failed:\n{}{}\n--- cluster logs ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if ["build", "__pycache__", ".pytest_cache"].contains(&name.to_str().unwrap_or_default()) {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(&name));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}
