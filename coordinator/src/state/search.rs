//! The word index behind `GET /v1/tasks?search=`: which tasks' descriptions hold a word.
//!
//! Keys:
//! - `orch:words:<word>`: sorted set of the ids of the tasks whose prompt holds `<word>` among
//!   its first [`MAX_WORDS`] distinct words of [`MIN_WORD`] characters or more that are not
//!   [`STOP_WORDS`] (see [`index_words`]), all scored 0 like `orch:tasks`, so a page of it in creation order is one
//!   `ZREVRANGEBYLEX` and a time window is an id range.
//! - `orch:wordindex:ready`: present once every task record is indexed (a new cluster at once,
//!   an upgraded one after [`State::backfill_indexes`], which first drops an index an earlier
//!   build kept); until then a search reads the records. (Earlier builds kept it at
//!   `orch:words:ready`, the key of the word `ready`: a prompt holding it could not be saved.)
//!
//! A task's prompt does not change: its words are added when it is created or restored from
//! the log, and removed when it is deleted or its creation is taken back.

use super::history::Range;
use super::{Error, State, TASKS, redis_err};
use orch_shared::ids::TaskId;
use orch_shared::report::id_bound;
use std::collections::BTreeSet;

pub(super) const READY: &str = "orch:wordindex:ready";
/// Longest word indexed, in characters (longer runs are not words anyone searches for).
pub const MAX_WORD: usize = 64;
/// Shortest word indexed, in characters: shorter ones are in most prompts and narrow nothing.
pub const MIN_WORD: usize = 3;
/// Most distinct words indexed per task (the first ones of its prompt): a long prompt's
/// entries would outweigh its record.
pub const MAX_WORDS: usize = 50;
/// Most distinct words of a prompt a search compares (the record check of short and common
/// words).
const MAX_COMPARED: usize = 1000;
/// Common English words left out of the index (sorted: binary search), as the short ones:
/// in nearly every prompt, they would be its largest sets and find nothing specific.
const STOP_WORDS: [&str; 96] = [
    "about", "after", "again", "all", "also", "and", "any", "are", "because", "been", "before",
    "being", "between", "both", "but", "can", "could", "did", "does", "doing", "done", "each",
    "few", "for", "from", "further", "had", "has", "have", "having", "her", "here", "hers", "him",
    "his", "how", "into", "its", "itself", "just", "let", "like", "may", "might", "more", "most",
    "much", "must", "not", "now", "off", "once", "only", "other", "our", "ours", "out", "over",
    "own", "same", "she", "should", "some", "such", "than", "that", "the", "their", "them", "then",
    "there", "these", "they", "this", "those", "through", "too", "under", "until", "very", "was",
    "were", "what", "when", "where", "which", "while", "who", "whom", "why", "will", "with",
    "would", "you", "your", "yours",
];

pub(super) fn word_key(word: &str) -> String {
    format!("orch:words:{word}")
}

/// The runs of letters and digits of a text, lower-cased, at most [`MAX_WORD`] characters.
fn runs(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && w.chars().count() <= MAX_WORD)
        .map(str::to_lowercase)
}

/// Whether a word (lower-case) goes in the index: [`MIN_WORD`] characters or more and not one
/// of the [`STOP_WORDS`].
pub fn indexed(word: &str) -> bool {
    word.chars().count() >= MIN_WORD && STOP_WORDS.binary_search(&word).is_err()
}

/// The words of a text a search compares: its runs (see [`runs`]), the first
/// [`MAX_COMPARED`] distinct ones.
pub fn words(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for w in runs(text) {
        out.insert(w);
        if out.len() == MAX_COMPARED {
            break;
        }
    }
    out
}

/// The words of a text in the index: the first [`MAX_WORDS`] distinct [`indexed`] ones.
pub fn index_words(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for w in runs(text).filter(|w| indexed(w)) {
        out.insert(w);
        if out.len() == MAX_WORDS {
            break;
        }
    }
    out
}

/// The index keys of a prompt's words.
pub(super) fn word_keys(prompt: &str) -> Vec<String> {
    index_words(prompt).iter().map(|w| word_key(w)).collect()
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
    /// Deletes the whole word index (every `orch:words:*` key): an index an earlier build
    /// kept, with other words, before [`State::backfill_indexes`] writes it again.
    pub(super) async fn drop_word_index(&self) -> Result<u64, Error> {
        let mut scan = self.conn.clone();
        let mut conn = self.conn.clone();
        let mut keys: Vec<String> = vec![];
        let mut iter: redis::AsyncIter<'_, String> =
            redis::AsyncCommands::scan_match(&mut scan, word_key("*"))
                .await
                .map_err(redis_err("list the word index"))?;
        while let Some(key) = iter.next_item().await {
            keys.push(key.map_err(redis_err("list the word index"))?);
        }
        drop(iter);
        for chunk in keys.chunks(1000) {
            let _: u64 = redis::cmd("UNLINK")
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("drop the word index"))?;
        }
        Ok(keys.len() as u64)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_words_are_sorted_lower_case_and_long_enough_to_matter() {
        assert!(STOP_WORDS.windows(2).all(|w| w[0] < w[1]));
        assert!(
            STOP_WORDS
                .iter()
                .all(|w| w.len() >= MIN_WORD && w.chars().all(|c| c.is_ascii_lowercase()))
        );
    }

    #[test]
    fn the_index_keeps_the_first_long_uncommon_words() {
        let got = index_words("Fix the PARSER: it is 2x slower than v1.2 in the parser's loop");
        let want = ["fix", "loop", "parser", "slower"];
        assert_eq!(got, want.iter().map(|w| w.to_string()).collect());
        let long: Vec<String> = (0..MAX_WORDS + 50).map(|i| format!("word{i}")).collect();
        let got = index_words(&long.join(" the "));
        assert_eq!(got.len(), MAX_WORDS);
        assert!(got.contains("word0") && !got.contains(&format!("word{MAX_WORDS}")));
        // A search compares every word, short and common ones too.
        assert!(words("is it the parser").contains("is"));
    }
}
