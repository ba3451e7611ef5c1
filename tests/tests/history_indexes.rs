//! What keeps history reads flat as the history grows, checked against a full read of the
//! records on the same data: the hourly cost rollups behind `GET /v1/reports/cost` (through a
//! replay of the same records, a change, a coordinator restart, retention, a backfill of a
//! history without rollups and a rebuild of Redis from the log) and the word index behind
//! `GET /v1/tasks?search=`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failure with its location

use orch_coordinator::state::State;
use orch_coordinator::state::history::Range;
use orch_shared::api::{JobStatus, Task, TaskStatus};
use orch_shared::ids::{JobId, TaskId, WorkerId};
use orch_shared::report::{CleanReport, CostLine, CostReport, model_name};
use orch_tests::{Cluster, Options};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const HOUR: u64 = 3_600_000;
const DIMS: [&str; 5] = ["role", "model", "backend", "worker", "status"];

async fn state_of(cluster: &Cluster) -> State {
    let redis = orch_config::redis::Redis::from_url(&cluster.redis_url).unwrap();
    State::connect(&redis).await.unwrap()
}

/// A few real tasks: one and two agents, a failure, a model asked for.
async fn real_tasks(cluster: &Cluster) -> Vec<Task> {
    let mut ids = vec![];
    for body in [
        json!({"prompt": "alpha: map the PARSER", "roles": ["analyst"]}),
        json!({"prompt": "beta: add a cache", "roles": ["builder", "tester"], "model": "m-big"}),
        json!({"prompt": "gamma: break it", "roles": ["builder"],
               "sim": {"fail_rate": 1.0}, "max_attempts": 1}),
    ] {
        ids.push(cluster.submit(body).await.id.to_string());
    }
    let done = cluster.wait_all(&ids, Duration::from_secs(30)).await;
    assert!(done.iter().all(|t| t.status.is_terminal()), "{done:#?}");
    done
}

/// `template` as a new task created at `at_ms`, its agents on `worker`.
fn dated(template: &Task, at_ms: u64, worker: &str, n: usize) -> Task {
    let mut t = template.clone();
    let fresh = TaskId::new().as_u128() & ((1u128 << 80) - 1);
    t.id = TaskId::from_u128(fresh | (u128::from(at_ms) << 80));
    t.created_at_ms = at_ms;
    t.finished_at_ms = Some(at_ms + 1000);
    t.idempotency_key = None;
    t.prompt = format!("{} (copy {n})", template.prompt);
    for (i, j) in t.jobs.iter_mut().enumerate() {
        j.id = JobId::new();
        j.worker_id = Some(WorkerId(worker.to_string()));
        j.cost_usd += (n * 7 + i) as f64 * 0.001_3;
        j.usage.input_tokens += (n * 11) as u64;
    }
    t
}

/// Every record of `range`, read one page at a time (the full scan the rollups replace).
async fn records(state: &State, range: Range) -> Vec<Task> {
    let mut out = vec![];
    let mut before = None;
    loop {
        let ids = state.task_ids_desc(range, before, 200).await.unwrap();
        let Some(last) = ids.last().copied() else {
            return out;
        };
        before = Some(last);
        out.extend(state.load_tasks(&ids).await.unwrap());
    }
}

type Groups = BTreeMap<String, BTreeMap<String, (u64, [u64; 4], f64)>>;

fn add(into: &mut (u64, [u64; 4], f64), line: &CostLine) {
    let u = &line.usage;
    into.0 += line.agents;
    for (sum, v) in into.1.iter_mut().zip([
        u.input_tokens,
        u.output_tokens,
        u.cache_creation_tokens,
        u.cache_read_tokens,
    ]) {
        *sum += v;
    }
    into.2 += line.cost_usd;
}

/// The report the records of `range` make: (tasks, total, groups per dimension).
async fn expected(state: &State, range: Range) -> (u64, (u64, [u64; 4], f64), Groups) {
    let tasks = records(state, range).await;
    let mut total = Default::default();
    let mut groups = Groups::new();
    for t in &tasks {
        for j in t.jobs.iter().filter(|j| j.attempt > 0) {
            let mut line = CostLine::default();
            line.add(&j.usage, j.cost_usd);
            add(&mut total, &line);
            let values = [
                j.role.as_str().to_string(),
                model_name(j.model.as_deref().or(t.model_of(j.role))).to_string(),
                t.backend_of(j.role).as_str().to_string(),
                j.worker_id
                    .as_ref()
                    .map_or_else(|| "-".to_string(), ToString::to_string),
                j.status.as_str().to_string(),
            ];
            for (dim, value) in DIMS.iter().zip(values) {
                add(
                    groups
                        .entry(dim.to_string())
                        .or_default()
                        .entry(value)
                        .or_default(),
                    &line,
                );
            }
        }
    }
    (tasks.len() as u64, total, groups)
}

/// Asserts the cost report of `range` is what its records make.
async fn assert_report(cluster: &Cluster, state: &State, range: Range, when: &str) {
    let mut q = vec![format!("by={}", DIMS.join(","))];
    if let Some(s) = range.since_ms {
        q.push(format!("since={s}"));
    }
    if let Some(u) = range.until_ms {
        q.push(format!("until={u}"));
    }
    let (code, body) = cluster
        .get(&format!("/v1/reports/cost?{}", q.join("&")))
        .await;
    assert!(code.is_success(), "{when}: {code} {body}");
    let report: CostReport = serde_json::from_value(body).unwrap();
    let (tasks, total, groups) = expected(state, range).await;
    let ctx = format!("{when}, window {range:?}");
    assert!(!report.truncated, "{ctx}");
    assert_eq!(report.tasks, tasks, "{ctx}");
    let mut got_total = Default::default();
    add(&mut got_total, &report.total);
    let close = |a: &(u64, [u64; 4], f64), b: &(u64, [u64; 4], f64)| {
        a.0 == b.0 && a.1 == b.1 && (a.2 - b.2).abs() < 1e-6
    };
    assert!(
        close(&got_total, &total),
        "{ctx}: total {got_total:?} vs {total:?}"
    );
    let mut got = Groups::new();
    for b in &report.breakdowns {
        let dim = got.entry(b.by.clone()).or_default();
        for g in &b.groups {
            add(dim.entry(g.key.clone()).or_default(), &g.totals);
        }
    }
    for dim in DIMS {
        let (a, b) = (
            got.remove(dim).unwrap_or_default(),
            groups.get(dim).cloned(),
        );
        let b = b.unwrap_or_default();
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{ctx}: {dim} groups"
        );
        for (k, v) in &a {
            assert!(close(v, &b[k]), "{ctx}: {dim} {k}: {v:?} vs {:?}", b[k]);
        }
    }
}

/// The windows a report is checked on: everything, whole days, windows cutting hours at
/// both ends, one inside a single hour, the last 30 days.
fn windows(now: u64) -> Vec<Range> {
    let r = |since: Option<u64>, until: Option<u64>| Range {
        since_ms: since,
        until_ms: until,
    };
    vec![
        r(None, None),
        r(Some(now - 30 * 24 * HOUR), None),
        r(
            Some(now - 50 * HOUR - 17 * 60_000),
            Some(now - 3 * HOUR - 41_000),
        ),
        r(None, Some(now - 26 * HOUR + 5 * 60_000)),
        r(
            Some(now - 70 * HOUR + 60_000),
            Some(now - 70 * HOUR + 20 * 60_000),
        ),
        r(
            Some((now / HOUR - 40) * HOUR),
            Some((now / HOUR - 2) * HOUR),
        ),
    ]
}

async fn redis_conn(cluster: &Cluster) -> redis::aio::MultiplexedConnection {
    redis::Client::open(cluster.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_reports_from_hourly_rollups_match_the_records_through_replays_retention_and_rebuilds()
{
    let mut cluster = Cluster::start(Options {
        workers: 1,
        ..Options::default()
    })
    .await;
    let state = state_of(&cluster).await;
    let templates = real_tasks(&cluster).await;
    let now = orch_shared::now_ms();
    // Three days of history at odd minutes, on four workers, written as a rebuild writes it.
    let mut seeded = vec![];
    for n in 0..60 {
        let at = now - 3 * HOUR - (n as u64) * 71 * 60_000 - (n as u64 % 7) * 13_000;
        let t = dated(
            &templates[n % templates.len()],
            at,
            &format!("w-{}", n % 4),
            n,
        );
        state.restore_task(&t).await.unwrap();
        seeded.push(t);
    }
    for w in windows(now) {
        assert_report(&cluster, &state, w, "seeded").await;
    }
    let mut conn = redis_conn(&cluster).await;
    let hours: u64 = redis::cmd("ZCARD")
        .arg("orch:costs:hours")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(hours >= 40, "the seeded hours are rolled up ({hours})");

    // The same records applied again (a catch-up replay, a rebuild) count once.
    for t in &seeded {
        state.restore_task(t).await.unwrap();
        state.restore_task(t).await.unwrap();
    }
    // A record that changes (a retry on another worker that failed and cost more) counts
    // as it is now.
    let mut changed = seeded[5].clone();
    changed.jobs[0].attempt += 1;
    changed.jobs[0].status = JobStatus::Failed;
    changed.jobs[0].worker_id = Some(WorkerId("w-retry".into()));
    changed.jobs[0].cost_usd += 0.25;
    changed.status = TaskStatus::Failed;
    state.restore_task(&changed).await.unwrap();
    for w in windows(now) {
        assert_report(&cluster, &state, w, "replayed and changed").await;
    }

    // A restart replays the log past what Redis holds.
    cluster.restart_coordinator().await;
    for w in windows(now) {
        assert_report(&cluster, &state, w, "after a restart").await;
    }

    // Retention takes the old tasks out of the rollups.
    let (code, body) = cluster
        .post("/v1/clean", &json!({"older_than_ms": 30 * HOUR}))
        .await;
    assert!(code.is_success(), "{body}");
    let cleaned: CleanReport = serde_json::from_value(body).unwrap();
    assert!(cleaned.tasks >= 20, "{cleaned:?}");
    for w in windows(now) {
        assert_report(&cluster, &state, w, "after retention").await;
    }
    let oldest: Vec<u64> = redis::cmd("ZRANGE")
        .arg("orch:costs:hours")
        .arg(0)
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        oldest[0] * HOUR + HOUR > now - 30 * HOUR,
        "no rollup is left for the deleted hours: {oldest:?}"
    );

    // A history from before the rollups: the leader rolls it up once.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("orch:costs:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    for w in windows(now) {
        assert_report(
            &cluster,
            &state,
            w,
            "without rollups (read from the records)",
        )
        .await;
    }
    cluster.restart_coordinator().await;
    cluster
        .eventually(Duration::from_secs(30), || {
            let mut conn = conn.clone();
            async move {
                let ready: bool = redis::cmd("EXISTS")
                    .arg("orch:costs:ready")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                ready
                    .then_some(())
                    .ok_or_else(|| "not rolled up yet".to_string())
            }
        })
        .await;
    for w in windows(now) {
        assert_report(&cluster, &state, w, "after the backfill").await;
    }

    // Redis lost: the rebuild from the log rolls up what it restores.
    cluster.rebuild_redis_from_the_log().await;
    let state = state_of(&cluster).await;
    let all = records(&state, Range::default()).await;
    assert_eq!(all.len(), templates.len(), "the log holds the real tasks");
    for w in windows(now) {
        assert_report(&cluster, &state, w, "after a rebuild from the log").await;
    }
}

/// The words of a text, as a reader would split them: letters and digits, any case.
fn words_of(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Every id `GET /v1/tasks` lists for `query`, page after page.
async fn listed(cluster: &Cluster, query: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cursor: Option<String> = None;
    for _ in 0..200 {
        let mut url = format!("/v1/tasks?limit=7&{query}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let (code, body) = cluster.get(&url).await;
        assert!(code.is_success(), "{url}: {code} {body}");
        let page: orch_shared::api::TaskList = serde_json::from_value(body).unwrap();
        out.extend(page.tasks.iter().map(|t| t.id.to_string()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
    panic!("{query}: more than 200 pages");
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Asserts every search of `searches` lists, page by page and in both orders, what reading
/// every record finds: all the words of the search in the prompt, or the id starting with it.
async fn assert_searches(cluster: &Cluster, state: &State, searches: &[String], when: &str) {
    let all = records(state, Range::default()).await;
    for search in searches {
        let s = search.trim().to_lowercase();
        let want_words = words_of(&s);
        let id_like = s.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
        let mut want: Vec<String> = all
            .iter()
            .filter(|t| {
                let have = words_of(&t.prompt);
                (id_like && t.id.to_string().starts_with(&s))
                    || want_words.iter().all(|w| have.contains(w))
            })
            .map(|t| t.id.to_string())
            .collect();
        let got = listed(cluster, &format!("search={}", encode(search))).await;
        assert_eq!(got, want, "{when}: search {search:?}");
        want.reverse();
        let got = listed(cluster, &format!("search={}&order=asc", encode(search))).await;
        assert_eq!(got, want, "{when}: search {search:?}, oldest first");
    }
}

async fn zcard(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("ZCARD")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_search_reads_the_word_index_and_lists_what_reading_every_record_lists() {
    let mut cluster = Cluster::start(Options {
        workers: 1,
        ..Options::default()
    })
    .await;
    let state = state_of(&cluster).await;
    let templates = real_tasks(&cluster).await;
    let now = orch_shared::now_ms();
    let vocab = [
        "Parser",
        "cache,",
        "LOGIN",
        "billing",
        "über",
        "retry-loop",
        "fix",
        "the",
    ];
    let mut seeded = vec![];
    for n in 0..150usize {
        let at = now - HOUR - (n as u64) * 37 * 60_000;
        let mut t = dated(&templates[n % templates.len()], at, "w-0", n);
        let picked: Vec<&str> = (0..3)
            .map(|k| vocab[(n * (k + 3) + k) % vocab.len()])
            .collect();
        t.prompt = format!("{} #{n}", picked.join(" "));
        if n % 50 == 7 {
            t.prompt.push_str(" zanzibar");
        }
        if n >= 120 {
            t.prompt.push_str(" ancient");
        }
        state.restore_task(&t).await.unwrap();
        seeded.push(t);
    }
    let prefix = seeded[3].id.to_string()[..13].to_string();
    let searches: Vec<String> = [
        "parser",
        "Parser cache",
        "cache parser fix",
        "zanzibar",
        "ÜBER",
        "retry",
        "retry-loop",
        "pars",
        "no-such-word",
        "ancient",
        "map the parser",
        prefix.as_str(),
        "42",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_searches(&cluster, &state, &searches, "seeded").await;
    let mut conn = redis_conn(&cluster).await;
    assert_eq!(zcard(&mut conn, "orch:words:zanzibar").await, 3);

    // A long prompt: the index keeps its first MAX_WORDS long, uncommon words; a search finds
    // the task by those (common words beside them checked in the record), not by later ones.
    let max = orch_coordinator::state::search::MAX_WORDS;
    let mut long = dated(&templates[0], now - HOUR / 2, "w-0", 999);
    let lexemes: Vec<String> = (0..max + 20).map(|i| format!("lexeme{i}")).collect();
    long.prompt = format!("Is it {}", lexemes.join(" and the "));
    state.restore_task(&long).await.unwrap();
    let id = vec![long.id.to_string()];
    assert_eq!(listed(&cluster, "search=lexeme0").await, id);
    let last = &lexemes[max - 1];
    assert_eq!(
        listed(&cluster, &format!("search=the%20{last}%20is")).await,
        id
    );
    let past = &lexemes[max];
    assert_eq!(
        listed(&cluster, &format!("search={past}")).await,
        Vec::<String>::new()
    );
    assert_eq!(zcard(&mut conn, &format!("orch:words:{last}")).await, 1);
    for unindexed in [past.as_str(), "the", "and", "is"] {
        let key = format!("orch:words:{unindexed}");
        assert_eq!(zcard(&mut conn, &key).await, 0, "{key}");
    }

    // Retention takes the deleted tasks out of the index.
    let (code, body) = cluster
        .post("/v1/clean", &json!({"older_than_ms": 72 * HOUR}))
        .await;
    assert!(code.is_success(), "{body}");
    assert_eq!(zcard(&mut conn, "orch:words:ancient").await, 0);
    assert_searches(&cluster, &state, &searches, "after retention").await;

    // A history from before the index: searches read the records, then the leader indexes it.
    // As an earlier build left it: its marker was the key of the word `ready`, and it kept
    // common words.
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("orch:words:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.push("orch:wordindex:ready".into());
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_searches(&cluster, &state, &searches, "without the index").await;
    let _: () = redis::pipe()
        .set("orch:words:ready", 1)
        .zadd("orch:words:the", seeded[0].id.to_string(), 0)
        .query_async(&mut conn)
        .await
        .unwrap();
    cluster.restart_coordinator().await;
    cluster
        .eventually(Duration::from_secs(30), || {
            let mut conn = conn.clone();
            async move {
                let ready: bool = redis::cmd("EXISTS")
                    .arg("orch:wordindex:ready")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                ready
                    .then_some(())
                    .ok_or_else(|| "not indexed yet".to_string())
            }
        })
        .await;
    assert_eq!(zcard(&mut conn, "orch:words:zanzibar").await, 3);
    assert_eq!(zcard(&mut conn, "orch:words:the").await, 0);
    // The word `ready` is a word like any other now.
    let ready = cluster
        .submit(json!({"prompt": "get READY to ship", "roles": ["builder"]}))
        .await;
    cluster
        .wait_task(&ready.id.to_string(), Duration::from_secs(30))
        .await;
    assert_eq!(
        listed(&cluster, "search=ready").await,
        vec![ready.id.to_string()]
    );
    assert_searches(&cluster, &state, &searches, "after the backfill").await;

    // Redis lost: the rebuild from the log indexes what it restores.
    cluster.rebuild_redis_from_the_log().await;
    let state = state_of(&cluster).await;
    let mut conn = redis_conn(&cluster).await;
    assert_eq!(zcard(&mut conn, "orch:words:beta").await, 1);
    assert_searches(&cluster, &state, &searches, "after a rebuild from the log").await;
}

/// `GET /v1/status`'s count of unfinished tasks and the task ids of its agents, in order.
async fn status_of(cluster: &Cluster) -> (u64, Vec<String>) {
    let (code, v) = cluster.get("/v1/status").await;
    assert!(code.is_success(), "{code} {v}");
    let s: orch_shared::report::ClusterStatus = serde_json::from_value(v).unwrap();
    let tasks = s.active_agents.iter().map(|a| a.task_id.to_string());
    (s.active_tasks, tasks.collect())
}

/// Every agent `GET /v1/agents?status=queued,running` lists, page after page: their task ids.
async fn unfinished_agents(cluster: &Cluster) -> Vec<String> {
    let (mut out, mut cursor) = (vec![], None::<String>);
    loop {
        let mut path = "/v1/agents?status=queued,running&limit=70".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (code, v) = cluster.get(&path).await;
        assert!(code.is_success(), "{code} {v}");
        for a in v["agents"].as_array().unwrap() {
            out.push(a["task_id"].as_str().unwrap().to_string());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
}

/// Waits until the status and the unfinished agents list exactly `want` (task ids, newest
/// first).
async fn assert_unfinished(cluster: &Cluster, want: &[String], when: &str) {
    cluster
        .eventually(Duration::from_secs(30), || async {
            let (count, agents) = status_of(cluster).await;
            if count != want.len() as u64 || agents != want {
                return Err(format!(
                    "{when}: status counts {count} unfinished tasks and lists {} agents, \
                     want {}: {agents:?}",
                    agents.len(),
                    want.len()
                ));
            }
            Ok(())
        })
        .await;
    assert_eq!(
        unfinished_agents(cluster).await,
        want,
        "{when}: agents list"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_and_lists_the_newest_unfinished_tasks_through_finishes_rebuilds_and_upgrades()
 {
    let mut cluster = Cluster::start(Options {
        workers: 1,
        slots: 2,
        ..Options::default()
    })
    .await;
    // Finished tasks are not counted.
    let quick = real_tasks(&cluster).await;
    // More unfinished tasks than a page of the index (200): two run for ten minutes, the
    // rest wait for a slot.
    let mut ids = vec![];
    for i in 0..205 {
        let body = json!({"prompt": format!("long {i}"), "roles": ["builder"],
                          "sim": {"latency_ms": 600_000}});
        ids.push(cluster.submit(body).await.id.to_string());
    }
    let mut want = ids.clone();
    want.sort_unstable_by(|a, b| b.cmp(a));
    assert_unfinished(&cluster, &want, "while they run").await;

    // Tasks finishing leave the count and the list: the newest, one in the middle, the oldest
    // (running).
    let gone = [
        want[0].clone(),
        want[1].clone(),
        want[100].clone(),
        want[204].clone(),
    ];
    for id in &gone {
        let (code, v) = cluster
            .post(&format!("/v1/tasks/{id}/cancel"), &json!(null))
            .await;
        assert!(code.is_success(), "{code} {v}");
    }
    want.retain(|id| !gone.contains(id));
    assert_unfinished(&cluster, &want, "after four cancels").await;

    // Redis lost: the rebuild from the log finds the same unfinished tasks.
    cluster.rebuild_redis_from_the_log().await;
    assert_unfinished(&cluster, &want, "after a rebuild from the log").await;

    // A Redis an earlier build wrote: a plain set of ids, one of them since finished (an
    // earlier leader finished it after a newer one had moved the set). The leader moves it
    // to the sorted set when it starts and drops the finished one.
    let mut conn = redis_conn(&cluster).await;
    let mut members: Vec<String> = redis::cmd("ZRANGE")
        .arg("orch:tasks:unfinished")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members.len(), want.len());
    members.push(quick[0].id.to_string());
    let _: () = redis::pipe()
        .atomic()
        .del("orch:tasks:unfinished")
        .sadd("orch:tasks:active", &members)
        .query_async(&mut conn)
        .await
        .unwrap();
    cluster.restart_coordinator().await;
    assert_unfinished(&cluster, &want, "after an upgrade").await;
    let legacy: bool = redis::cmd("EXISTS")
        .arg("orch:tasks:active")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!legacy, "the plain set is gone once moved");
}
