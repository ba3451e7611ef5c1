//! `prompts`: what a finished task with a long, real prompt costs in Redis, and the word
//! index's share of it. Tasks are submitted through the API (each build's coordinator writes
//! its own records and index), their prompts `words` consecutive words of this repository's
//! own documentation (English technical prose, as a real prompt is), each task's starting at
//! another place.

use crate::cluster::{Cluster, Spec, redis_used};
use crate::scenarios::submit;
use crate::watch::{Keep, Watch};
use anyhow::{Context, bail};
use futures::StreamExt;
use redis::AsyncCommands;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

pub struct Params {
    /// Tasks submitted.
    pub tasks: usize,
    /// Words per prompt.
    pub words: usize,
}

/// The words of the repository's README, ARCHITECTURE and docs, in order.
pub fn corpus(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut files = vec![root.join("README.md"), root.join("ARCHITECTURE.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .context("read docs/ (run from the repository's root)")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut words = vec![];
    for f in files {
        let text = std::fs::read_to_string(&f).with_context(|| f.display().to_string())?;
        // Not the word `ready`: builds before the word index's marker moved could not save a
        // prompt holding it (its index key was the marker's).
        words.extend(
            text.split_whitespace()
                .filter(|w| {
                    !w.split(|c: char| !c.is_alphanumeric())
                        .any(|r| r.eq_ignore_ascii_case("ready"))
                })
                .map(str::to_string),
        );
    }
    Ok(words)
}

/// Task `n`'s prompt: `len` words of the corpus from a place of its own.
pub fn prompt(corpus: &[String], n: usize, len: usize) -> String {
    let span = corpus.len().saturating_sub(len).max(1);
    let start = n.wrapping_mul(7919) % span;
    corpus[start..(start + len).min(corpus.len())].join(" ")
}

/// Bytes Redis takes for the keys matching `pattern` (`MEMORY USAGE`, every element counted),
/// and how many keys and entries they are.
async fn keys_usage(url: &str, pattern: &str) -> anyhow::Result<(u64, u64, u64)> {
    let client = redis::Client::open(url)?;
    let mut scan = client.get_multiplexed_async_connection().await?;
    let mut conn = scan.clone();
    let mut keys = vec![];
    let mut iter: redis::AsyncIter<'_, String> = scan.scan_match(pattern).await?;
    while let Some(key) = iter.next_item().await {
        keys.push(key?);
    }
    drop(iter);
    let (mut bytes, mut entries) = (0u64, 0u64);
    for key in &keys {
        let b: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut conn)
            .await?;
        bytes += b.unwrap_or(0);
        // The index's marker (where earlier builds kept it) is no word.
        if key.starts_with("orch:words:") && key.as_str() != "orch:words:ready" {
            entries += conn.zcard::<_, u64>(key).await?;
        }
    }
    Ok((bytes, keys.len() as u64, entries))
}

pub async fn run(spec: &Spec, p: &Params) -> anyhow::Result<Value> {
    let corpus = corpus(Path::new("."))?;
    if corpus.len() < p.words * 2 {
        bail!("the documentation has only {} words", corpus.len());
    }
    let cluster = Cluster::start(Spec {
        workers: 1,
        slots: 16,
        ..spec.clone()
    })
    .await?;
    let idle = redis_used(&cluster.redis_url).await?;
    let watch = Watch::start(&cluster.nats_url, &["task_finished"], Keep::Times).await?;
    let http = cluster.client();
    let failures: Vec<anyhow::Error> = futures::stream::iter(0..p.tasks)
        .map(|n| {
            let (http, url) = (http.clone(), cluster.url.clone());
            let text = prompt(&corpus, n, p.words);
            async move { submit(&http, &url, text, &["builder"], 0).await }
        })
        .buffer_unordered(16)
        .filter_map(|r| async move { r.err() })
        .collect()
        .await;
    if let Some(e) = failures.into_iter().next() {
        return Err(e);
    }
    if !watch
        .wait_count("task_finished", p.tasks as u64, Duration::from_secs(300))
        .await
    {
        bail!(
            "only {} of {} tasks finished\n{}",
            watch.count("task_finished"),
            p.tasks,
            cluster.logs()
        );
    }
    let used = redis_used(&cluster.redis_url).await?.saturating_sub(idle);
    let (words_bytes, word_keys, entries) = keys_usage(&cluster.redis_url, "orch:words:*").await?;
    let (record_bytes, records, _) = keys_usage(&cluster.redis_url, "orch:task:*").await?;
    let n = p.tasks.max(1) as f64;
    let distinct: f64 = (0..p.tasks)
        .map(|i| {
            let text = prompt(&corpus, i, p.words).to_lowercase();
            let words: std::collections::BTreeSet<&str> = text
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .collect();
            words.len() as f64
        })
        .sum::<f64>()
        / n;
    Ok(json!({
        "tasks": p.tasks,
        "prompt_words": p.words,
        "distinct_words_per_prompt": distinct,
        "redis_bytes_per_task": used as f64 / n,
        "word_index_bytes_per_task": words_bytes as f64 / n,
        "word_index_entries_per_task": entries as f64 / n,
        "word_index_keys": word_keys,
        "record_bytes_per_task": record_bytes as f64 / records.max(1) as f64,
    }))
}
