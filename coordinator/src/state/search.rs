//! The word index behind `GET /v1/tasks?search=`: which tasks' descriptions hold a word.
//!
//! Keys:
//! - `orch:words:<word>`: sorted set of the ids of the tasks whose prompt holds `<word>` (see
//!   [`words`]), all scored 0 like `orch:tasks`, so a page of it in creation order is one
//!   `ZREVRANGEBYLEX` and a time window is an id range.
//! - `orch:words:ready`: present once every task record is indexed (a new cluster at once, an
//!   upgraded one after [`State::backfill_indexes`]); until then a search reads the records.
//!
//! A task's prompt does not change: its words are added when it is created or restored from
//! the log, and removed when it is deleted or its creation is taken back.

use super::history::Range;
use super::{Error, State, TASKS, redis_err};
use orch_shared::ids::TaskId;
use orch_shared::report::id_bound;
use std::collections::BTreeSet;

pub(super) const READY: &str = "orch:words:ready";
/// Longest word indexed, in characters (longer runs are not words anyone searches for).
pub const MAX_WORD: usize = 64;
/// Most distinct words indexed per task (the first ones of its prompt).
pub const MAX_WORDS: usize = 1000;

pub(super) fn word_key(word: &str) -> String {
    format!("orch:words:{word}")
}

/// The words of a text as the index and the search see them: runs of letters and digits,
/// lower-cased, at most [`MAX_WORD`] characters, the first [`MAX_WORDS`] distinct ones.
pub fn words(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for w in text.split(|c: char| !c.is_alphanumeric()) {
        if w.is_empty() || w.chars().count() > MAX_WORD {
            continue;
        }
        out.insert(w.to_lowercase());
        if out.len() == MAX_WORDS {
            break;
        }
    }
    out
}

/// The index keys of a prompt's words.
pub(super) fn word_keys(prompt: &str) -> Vec<String> {
    words(prompt).iter().map(|w| word_key(w)).collect()
}

/// Where a listing takes its candidate ids from, newest or oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Every task (`orch:tasks`).
    All,
    /// The tasks whose prompt holds this word.
    Word(String),
    /// The tasks whose id starts with this (lower-case) text.
    IdPrefix(String),
}

impl Source {
    fn key(&self) -> String {
        match self {
            Self::Word(w) => word_key(w),
            Self::All | Self::IdPrefix(_) => TASKS.to_string(),
        }
    }

    /// The lex bounds of `range` after `start` (exclusive) in this source, as
    /// (lowest, highest) inclusive/exclusive `ZRANGEBYLEX` arguments; None when empty.
    fn bounds(
        &self,
        range: Range,
        start: Option<TaskId>,
        ascending: bool,
    ) -> Option<(String, String)> {
        // (value, inclusive)
        let mut lo: Option<(String, bool)> = range.since_ms.map(|s| (id_bound(s), true));
        let mut hi: Option<(String, bool)> = range.until_ms.map(|u| (id_bound(u), false));
        let tighter_lo = |cur: &mut Option<(String, bool)>, v: String, inc: bool| {
            if cur.as_ref().is_none_or(|(c, _)| v > *c) {
                *cur = Some((v, inc));
            }
        };
        let tighter_hi = |cur: &mut Option<(String, bool)>, v: String, inc: bool| {
            if cur.as_ref().is_none_or(|(c, _)| v < *c) {
                *cur = Some((v, inc));
            }
        };
        if let Self::IdPrefix(p) = self {
            tighter_lo(&mut lo, p.clone(), true);
            // Ids are hex digits and dashes: `~` sorts after all of them.
            tighter_hi(&mut hi, format!("{p}~"), false);
        }
        if let Some(s) = start {
            if ascending {
                tighter_lo(&mut lo, s.to_string(), false);
            } else {
                tighter_hi(&mut hi, s.to_string(), false);
            }
        }
        if let (Some((l, _)), Some((h, _))) = (&lo, &hi)
            && l > h
        {
            return None;
        }
        let arg = |b: Option<(String, bool)>, open: &str| {
            b.map_or_else(
                || open.to_string(),
                |(v, inc)| format!("{}{v}", if inc { '[' } else { '(' }),
            )
        };
        Some((arg(lo, "-"), arg(hi, "+")))
    }
}

/// Whether a search may be the start of a task id (hex digits and dashes).
pub fn is_id_prefix(search: &str) -> bool {
    !search.is_empty() && search.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

impl State {
    /// How many tasks hold each word (to read the rarest).
    pub async fn word_counts(&self, words: &[String]) -> Result<Vec<u64>, Error> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for w in words {
            pipe.zcard(word_key(w));
        }
        pipe.query_async(&mut conn)
            .await
            .map_err(redis_err("count word index entries"))
    }

    /// Whether every task record is in the word index.
    pub async fn words_ready(&self) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        redis::cmd("EXISTS")
            .arg(READY)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("read the word index's state"))
    }

    /// One page of candidate ids of `range` from the union of `sources`, newest first (or
    /// oldest with `ascending`), strictly past `start`; and whether the sources are exhausted
    /// past the page. Every id of the union past `start` and up to the page's last id is in
    /// the page.
    pub async fn ids_page(
        &self,
        sources: &[Source],
        range: Range,
        start: Option<TaskId>,
        limit: usize,
        ascending: bool,
    ) -> Result<(Vec<TaskId>, bool), Error> {
        let mut conn = self.conn.clone();
        let mut pages: Vec<Vec<TaskId>> = vec![];
        let mut full: Vec<TaskId> = vec![];
        for source in sources {
            let Some((lo, hi)) = source.bounds(range, start, ascending) else {
                continue;
            };
            let mut cmd = if ascending {
                let mut c = redis::cmd("ZRANGEBYLEX");
                c.arg(source.key()).arg(lo).arg(hi);
                c
            } else {
                let mut c = redis::cmd("ZREVRANGEBYLEX");
                c.arg(source.key()).arg(hi).arg(lo);
                c
            };
            let ids: Vec<String> = cmd
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("list task ids"))?;
            let ids: Vec<TaskId> = ids.iter().filter_map(|s| s.parse().ok()).collect();
            if ids.len() == limit
                && let Some(last) = ids.last()
            {
                full.push(*last);
            }
            pages.push(ids);
        }
        if pages.len() == 1 {
            let ids = pages.remove(0);
            let exhausted = full.is_empty();
            return Ok((ids, exhausted));
        }
        // The union is complete up to the least advanced full page's last id.
        let cutoff = if ascending {
            full.iter().min().copied()
        } else {
            full.iter().max().copied()
        };
        let mut ids: Vec<TaskId> = pages
            .into_iter()
            .flatten()
            .filter(|id| cutoff.is_none_or(|c| if ascending { *id <= c } else { *id >= c }))
            .collect();
        ids.sort();
        ids.dedup();
        if !ascending {
            ids.reverse();
        }
        Ok((ids, cutoff.is_none()))
    }
}
