//! The Claude Code CLI's session transcripts, moved between workers.
//!
//! The CLI keeps a session as `<config dir>/projects/<project>/<session id>.jsonl`, where the
//! config dir is `$CLAUDE_CONFIG_DIR` or `$HOME/.claude` (the worker gives the CLI its own
//! HOME), and `<project>` is the working directory with every character that is not an ASCII
//! letter or digit replaced by `-` (cut at 200 characters plus a hash of the path when longer,
//! as the CLI does). `--resume ID` only finds a session in the project of the directory it
//! runs in.
//!
//! After a turn, [`collect`] reads the new transcript for the cluster's session store and
//! removes it (and, for a scratch workspace, the whole project directory): the cluster owns
//! sessions, a worker keeps none. Before a further turn, [`restore`] writes the stored
//! transcript into the project of the new working directory, with the old directory's path
//! rewritten to the new one and the session renamed to a fresh id, so that concurrent turns
//! from one session on one worker never share a file; the CLI then runs with
//! `--resume <that id> --fork-session` and writes the continued conversation under a new id
//! of its own.

use crate::session::Snapshot;
use orch_shared::subject::MAX_SESSION_BYTES;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Longer project names are cut and get a hash of the path (the CLI's rule).
const MAX_PROJECT_NAME: usize = 200;

/// The CLI's config directory for the environment it runs with.
pub fn config_dir(env: &BTreeMap<String, String>) -> PathBuf {
    match env.get("CLAUDE_CONFIG_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env.get("HOME").map_or("", String::as_str)).join(".claude"),
    }
}

/// The JavaScript `(h << 5) - h + code | 0` string hash over UTF-16 code units, as the CLI
/// computes it.
fn js_hash(s: &str) -> i32 {
    s.encode_utf16().fold(0i32, |h, c| {
        h.wrapping_shl(5).wrapping_sub(h).wrapping_add(i32::from(c))
    })
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![];
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// The name of the CLI's project directory for working directory `cwd`.
pub fn project_name(cwd: &str) -> String {
    // JavaScript replaces per UTF-16 code unit: a character outside the BMP becomes two `-`.
    let name: String = cwd
        .chars()
        .flat_map(|c| {
            let n = if c.is_ascii_alphanumeric() {
                0
            } else {
                c.len_utf16()
            };
            std::iter::repeat_n('-', n).chain((n == 0).then_some(c))
        })
        .collect();
    if name.len() <= MAX_PROJECT_NAME {
        return name;
    }
    let hash = i64::from(js_hash(cwd)).unsigned_abs();
    format!("{}-{}", &name[..MAX_PROJECT_NAME], base36(hash))
}

/// A random UUID (version 4), the form the CLI's session ids have.
fn random_session_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `s` as it appears inside a JSON string.
fn json_escaped(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_default();
    quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or(&quoted)
        .to_string()
}

/// A stored transcript written back for one turn; the file is removed when this is dropped.
#[derive(Debug)]
pub struct Restored {
    /// The session id to `--resume`.
    pub id: String,
    path: PathBuf,
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `snapshot`'s transcript so that the CLI, run in `cwd`, resumes it as the session
/// [`Restored::id`].
pub async fn restore(
    config_dir: &Path,
    snapshot: &Snapshot,
    cwd: &Path,
) -> Result<Restored, String> {
    let Some(old_id) = snapshot.session_id.as_deref().filter(|s| !s.is_empty()) else {
        return Err("the stored session has no Claude Code session id".into());
    };
    let cwd = tokio::fs::canonicalize(cwd)
        .await
        .unwrap_or_else(|_| cwd.to_path_buf());
    let cwd = cwd.to_string_lossy().into_owned();
    let mut text = String::from_utf8(snapshot.bytes.clone())
        .map_err(|_| "the stored transcript is not UTF-8".to_string())?;
    if !snapshot.workspace.is_empty() && snapshot.workspace != cwd {
        text = text.replace(&json_escaped(&snapshot.workspace), &json_escaped(&cwd));
    }
    let id = random_session_id();
    text = text.replace(old_id, &id);
    let dir = config_dir.join("projects").join(project_name(&cwd));
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| format!("failed to create {}: {e}", dir.display()))?;
    let path = dir.join(format!("{id}.jsonl"));
    let restored = Restored { id, path };
    let partial = dir.join(format!(".{}.jsonl.partial", restored.id));
    tokio::fs::write(&partial, text)
        .await
        .map_err(|e| format!("failed to write {}: {e}", partial.display()))?;
    tokio::fs::rename(&partial, &restored.path)
        .await
        .map_err(|e| format!("failed to write {}: {e}", restored.path.display()))?;
    Ok(restored)
}

/// Where the CLI writes session `session_id` run in `cwd`.
pub fn path(config_dir: &Path, cwd: &str, session_id: &str) -> PathBuf {
    config_dir
        .join("projects")
        .join(project_name(cwd))
        .join(format!("{session_id}.jsonl"))
}

/// Where the CLI put session `session_id` that ran in `cwd` (looked for in every project
/// when not where expected).
async fn find(config_dir: &Path, cwd: &str, session_id: &str) -> Option<PathBuf> {
    let file = format!("{session_id}.jsonl");
    let projects = config_dir.join("projects");
    let expected = projects.join(project_name(cwd)).join(&file);
    if tokio::fs::metadata(&expected).await.is_ok() {
        return Some(expected);
    }
    let mut dirs = tokio::fs::read_dir(&projects).await.ok()?;
    while let Ok(Some(entry)) = dirs.next_entry().await {
        let candidate = entry.path().join(&file);
        if tokio::fs::metadata(&candidate).await.is_ok() {
            return Some(candidate);
        }
    }
    None
}

/// The transcript of the turn that ran in `cwd` as session `session_id`, when `keep` (a
/// successful turn); in every case the CLI's local copy is removed, and with `scratch` the
/// project directory of `cwd` (no other job uses that directory).
pub async fn collect(
    config_dir: &Path,
    cwd: &str,
    session_id: &str,
    keep: bool,
    scratch: bool,
) -> Option<Vec<u8>> {
    let path = find(config_dir, cwd, session_id).await;
    let transcript = match &path {
        Some(path) if keep => read(path).await,
        Some(_) => None,
        None => {
            if keep {
                tracing::warn!(
                    session_id,
                    "the CLI wrote no transcript (is --no-session-persistence among the configured args?): the agent cannot be continued"
                );
            }
            None
        }
    };
    if let Some(path) = &path {
        let _ = tokio::fs::remove_file(path).await;
    }
    if scratch {
        let _ =
            tokio::fs::remove_dir_all(config_dir.join("projects").join(project_name(cwd))).await;
    }
    transcript
}

async fn read(path: &Path) -> Option<Vec<u8>> {
    let size = match tokio::fs::metadata(path).await {
        Ok(m) => m.len(),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot read the CLI's transcript");
            return None;
        }
    };
    if size > MAX_SESSION_BYTES as u64 {
        tracing::warn!(
            bytes = size,
            max = MAX_SESSION_BYTES,
            "the session is too large to store: the agent cannot be continued"
        );
        return None;
    }
    match tokio::fs::read(path).await {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "cannot read the CLI's transcript");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_follow_the_cli() {
        assert_eq!(project_name("/tmp/ccexp/a"), "-tmp-ccexp-a");
        assert_eq!(
            project_name("/data/scratch/0199-ab_c.d"),
            "-data-scratch-0199-ab-c-d"
        );
        // A character outside the BMP is two UTF-16 code units, so two dashes.
        assert_eq!(project_name("/a/é😀"), "-a----");
        let long = format!("/{}", "x".repeat(250));
        let name = project_name(&long);
        assert!(name.starts_with(&format!("-{}", "x".repeat(199))), "{name}");
        assert_eq!(
            &name[200..],
            format!("-{}", base36(i64::from(js_hash(&long)).unsigned_abs()))
        );
        // The JavaScript hash of "abc": ((97*31)+98)*31+99.
        assert_eq!(js_hash("abc"), 96354);
        assert_eq!(base36(96354), "22ci");
    }

    #[test]
    fn session_ids_look_like_the_clis() {
        let id = random_session_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(id, random_session_id());
    }

    #[tokio::test]
    async fn a_restored_transcript_names_the_new_directory_and_a_fresh_session() {
        let root = tempfile::tempdir().unwrap();
        let config = root.path().join("home/.claude");
        let cwd = root.path().join("ws \"new\"");
        std::fs::create_dir_all(&cwd).unwrap();
        let old = "/old/ws \"old\"";
        let line =
            serde_json::json!({"cwd": old, "sessionId": "s-1", "text": format!("file {old}/a.rs")});
        let snapshot = Snapshot {
            backend: crate::agent::claude_code::NAME.into(),
            session_id: Some("s-1".into()),
            workspace: old.into(),
            turn: 1,
            bytes: format!("{line}\n").into_bytes(),
        };
        let restored = restore(&config, &snapshot, &cwd).await.unwrap();
        let canon = std::fs::canonicalize(&cwd).unwrap().display().to_string();
        let path = config
            .join("projects")
            .join(project_name(&canon))
            .join(format!("{}.jsonl", restored.id));
        let v: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        assert_eq!(v["cwd"], canon.as_str());
        assert_eq!(v["sessionId"], restored.id.as_str());
        assert_eq!(v["text"], format!("file {canon}/a.rs"));
        drop(restored);
        assert!(!path.exists(), "the restored file goes with its turn");

        // Collecting reads the new transcript and leaves no local copy.
        std::fs::write(path.with_file_name("new-id.jsonl"), "{}\n").unwrap();
        let bytes = collect(&config, &canon, "new-id", true, true)
            .await
            .unwrap();
        assert_eq!(bytes, b"{}\n");
        assert!(!path.parent().unwrap().exists());
    }
}
