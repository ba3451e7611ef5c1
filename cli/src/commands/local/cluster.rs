//! The record of a local cluster, `DIR/cluster.json`: what runs, where it listens, where it logs.
//!
//! `local up` writes it after every process it starts, so that even an interrupted start can be
//! cleaned up by `local down`; `local down` removes it.

use super::process;
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "cluster.json";
/// The Prometheus file-based service discovery file `local up` writes beside it.
pub const PROMETHEUS_TARGETS: &str = "prometheus-targets.json";

/// What a process is, which decides the order `local down` stops it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Nats,
    Redis,
    Coordinator,
    Worker,
}

/// One process of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    /// `nats`, `redis`, `coordinator`, `worker-1`...; also the log file's name.
    pub name: String,
    pub kind: Kind,
    pub pid: u32,
    #[serde(default)]
    pub port: Option<u16>,
    pub binary: PathBuf,
    pub log: PathBuf,
}

impl Proc {
    /// The program name checked against `/proc/<pid>/cmdline`.
    pub fn program(&self) -> String {
        self.binary
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        process::is_running(self.pid, &self.program())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub data_dir: PathBuf,
    pub logs_dir: PathBuf,
    /// The coordinator's URL.
    pub server: String,
    pub nats_url: String,
    pub redis_url: String,
    /// The orchctl config file `local up` wrote the server and token to.
    #[serde(default)]
    pub config: Option<PathBuf>,
    pub started_at_ms: u64,
    /// In start order: nats, redis, the coordinator, the workers.
    pub processes: Vec<Proc>,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

impl Cluster {
    /// Reads `DIR/cluster.json`; `None` when there is none.
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = path(data_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
        };
        let cluster = serde_json::from_str(&text).with_context(|| {
            format!(
                "invalid cluster record {} (remove it if no cluster runs)",
                path.display()
            )
        })?;
        Ok(Some(cluster))
    }

    /// Writes the record atomically (a reader never sees half a file).
    pub fn save(&self) -> anyhow::Result<()> {
        let path = path(&self.data_dir);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&tmp, text + "\n")
            .with_context(|| format!("failed to write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("failed to write {}", path.display()))?;
        Ok(())
    }

    /// Writes the coordinator's and the workers' `/metrics` addresses as a Prometheus
    /// file-based service discovery file (`DIR/prometheus-targets.json`), which
    /// `deploy/prometheus/prometheus.yml` reads.
    pub fn write_prometheus_targets(&self) -> anyhow::Result<()> {
        let group = |kind: Kind, component: &str| {
            let targets: Vec<String> = self
                .of_kind(kind)
                .filter_map(|p| p.port)
                .map(|port| format!("127.0.0.1:{port}"))
                .collect();
            serde_json::json!({"targets": targets, "labels": {"component": component}})
        };
        let groups = [
            group(Kind::Coordinator, "coordinator"),
            group(Kind::Worker, "worker"),
        ];
        let path = self.data_dir.join(PROMETHEUS_TARGETS);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&groups)? + "\n")
            .with_context(|| format!("failed to write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("failed to write {}", path.display()))?;
        Ok(())
    }

    pub fn remove(data_dir: &Path) -> anyhow::Result<()> {
        let _ = std::fs::remove_file(data_dir.join(PROMETHEUS_TARGETS));
        let path = path(data_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("failed to remove {}", path.display())),
        }
    }

    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Proc> {
        self.processes.iter().filter(move |p| p.kind == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_through_json() {
        let c = Cluster {
            data_dir: "/d".into(),
            logs_dir: "/d/logs".into(),
            server: "http://127.0.0.1:1".into(),
            nats_url: "nats://127.0.0.1:2".into(),
            redis_url: "redis://127.0.0.1:3".into(),
            config: Some("/h/config.toml".into()),
            started_at_ms: 5,
            processes: vec![Proc {
                name: "worker-1".into(),
                kind: Kind::Worker,
                pid: 42,
                port: None,
                binary: "/bin/orch-worker".into(),
                log: "/d/logs/worker-1.log".into(),
            }],
        };
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains(r#""kind":"worker""#));
        assert_eq!(serde_json::from_str::<Cluster>(&text).unwrap(), c);
        assert_eq!(c.processes[0].program(), "orch-worker");
        assert_eq!(c.of_kind(Kind::Worker).count(), 1);
        assert_eq!(c.of_kind(Kind::Nats).count(), 0);
    }
}
