//! The limit broker's and the parked jobs' Redis state: per credential a hash of what the
//! provider said ([`keys::limit`]), and parked job attempts in a sorted set scored by when they
//! go back to the queue ([`keys::PARKED`]) with their specs beside it ([`keys::parked_job`]).

use super::{Error, Lease, State, redis_err};
use crate::agent::http::Learned;
use orch_shared::keys::{self, limit_field, parked_field};

/// Parks an attempt in one round trip: its record (with the park count, from a counter that
/// outlives the record, so each re-publish has a message id JetStream's dedup window has not
/// seen) and its place in the sorted set. KEYS: record, parked set, park counter. ARGV:
/// member, wake at ms, then field and value pairs. Returns the park count.
const PARK: &str = r#"
local n = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], 604800)
redis.call('HSET', KEYS[1], 'parks', n)
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return n
"#;

/// Drops a lease this worker holds (a parked attempt runs again under a new lease).
/// KEYS: lease. ARGV: value.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// How many times an attempt was parked (kept a week, like the fence counter).
fn park_count(member: &str) -> String {
    format!("orch:parks:{member}")
}

static PARK_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(PARK));
static PARK_FOR_APPROVAL_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(keys::PARK_FOR_APPROVAL));
static DUE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(keys::TAKE_DUE_PARKED));
static UNPARK_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(keys::UNPARK));
static RELEASE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RELEASE));

/// A parked attempt to write.
pub struct ToPark<'a> {
    /// `<job>:<attempt>`.
    pub member: String,
    pub spec: Vec<u8>,
    pub subject: &'a str,
    pub backend: &'a str,
    pub credential: &'a str,
    /// Higher goes back first among attempts due together.
    pub priority: u8,
    pub wake_at_ms: u64,
    /// The job's `traceparent` header, if it had one.
    pub traceparent: Option<&'a str>,
    /// The approval request it waits for (parked for a person, not a credential).
    pub approval: Option<&'a str>,
}

/// A parked attempt that is due, taken for re-publishing.
pub use orch_shared::keys::DueParked as Due;

impl State {
    /// Adds `backend/name` credentials to the listed ones.
    pub async fn register_credentials(&self, backend: &str, names: &[&str]) -> Result<(), Error> {
        if names.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let members: Vec<String> = names.iter().map(|n| format!("{backend}/{n}")).collect();
        redis::cmd("SADD")
            .arg(keys::CREDENTIALS)
            .arg(members)
            .exec_async(&mut conn)
            .await
            .map_err(redis_err("register credentials"))
    }

    /// Until when (ms) each of `names` is exhausted (0: never was).
    pub async fn limits_until(&self, backend: &str, names: &[&str]) -> Result<Vec<u64>, Error> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for n in names {
            pipe.hget(keys::limit(backend, n), limit_field::UNTIL_MS);
        }
        let until: Vec<Option<u64>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(redis_err("read credential limits"))?;
        Ok(until.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Records what the provider said about `backend/name`; an exhaustion only ever moves
    /// the credential's `until` later (two workers learning different resets keep the later).
    pub async fn record_limit(
        &self,
        backend: &str,
        name: &str,
        learned: &Learned,
    ) -> Result<(), Error> {
        let key = keys::limit(backend, name);
        let mut fields: Vec<(&str, String)> =
            vec![(limit_field::UPDATED_MS, orch_shared::now_ms().to_string())];
        let figures = [
            (limit_field::REQUESTS_LIMIT, learned.requests_limit),
            (limit_field::REQUESTS_REMAINING, learned.requests_remaining),
            (limit_field::TOKENS_LIMIT, learned.tokens_limit),
            (limit_field::TOKENS_REMAINING, learned.tokens_remaining),
            (limit_field::RESET_MS, learned.reset_ms),
        ];
        fields.extend(
            figures
                .into_iter()
                .filter_map(|(f, v)| v.map(|v| (f, v.to_string()))),
        );
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic().hset_multiple(&key, &fields);
        if let Some(until) = learned.exhausted_until_ms {
            pipe.hset(&key, limit_field::REASON, &learned.reason).hincr(
                &key,
                limit_field::EXHAUSTED_TOTAL,
                1,
            );
            // Only later: a max in Lua would be one more script for one comparison.
            let current: Option<u64> = redis::cmd("HGET")
                .arg(&key)
                .arg(limit_field::UNTIL_MS)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("read credential limit"))?;
            if current.is_none_or(|c| c < until) {
                pipe.hset(&key, limit_field::UNTIL_MS, until);
            }
        }
        pipe.sadd(keys::CREDENTIALS, format!("{backend}/{name}"));
        pipe.exec_async(&mut conn)
            .await
            .map_err(redis_err("record credential limit"))
    }

    /// Parks an attempt; returns how many times it was parked.
    /// An attempt parked for an approval request is due at the request's deadline, or at
    /// once when the request is answered (whichever comes first; see
    /// [`keys::PARK_FOR_APPROVAL`]).
    pub async fn park(&self, p: &ToPark<'_>) -> Result<u64, Error> {
        let mut conn = self.conn.clone();
        let mut inv = match p.approval {
            None => {
                let mut inv = PARK_SCRIPT.prepare_invoke();
                inv.key(keys::parked_job(&p.member))
                    .key(keys::PARKED)
                    .key(park_count(&p.member))
                    .arg(&p.member)
                    .arg(p.wake_at_ms)
                    .arg(parked_field::REASON)
                    .arg("limit");
                inv
            }
            Some(id) => {
                let mut inv = PARK_FOR_APPROVAL_SCRIPT.prepare_invoke();
                inv.key(keys::parked_job(&p.member))
                    .key(keys::PARKED)
                    .key(keys::approval(id))
                    .key(park_count(&p.member))
                    .arg(&p.member)
                    .arg(p.wake_at_ms)
                    .arg(orch_shared::now_ms())
                    .arg(parked_field::REASON)
                    .arg("approval")
                    .arg(parked_field::APPROVAL)
                    .arg(id);
                inv
            }
        };
        inv.arg(parked_field::SPEC)
            .arg(&p.spec)
            .arg(parked_field::SUBJECT)
            .arg(p.subject)
            .arg(parked_field::BACKEND)
            .arg(p.backend)
            .arg(parked_field::CREDENTIAL)
            .arg(p.credential)
            .arg(parked_field::PRIORITY)
            .arg(p.priority)
            .arg(parked_field::PARKED_AT_MS)
            .arg(orch_shared::now_ms())
            .arg(parked_field::WAKE_AT_MS)
            .arg(p.wake_at_ms)
            .arg(parked_field::TRACEPARENT)
            .arg(p.traceparent.unwrap_or_default());
        inv.invoke_async(&mut conn)
            .await
            .map_err(redis_err("park job"))
    }

    /// Takes up to `max` parked attempts due now, holding each for `hold` against other
    /// workers while this one re-publishes it. Takes none while a coordinator's admission
    /// wakes parked jobs ([`keys::ADMISSION_RESUMES`]).
    pub async fn take_due(&self, max: usize, hold: std::time::Duration) -> Result<Vec<Due>, Error> {
        let mut conn = self.conn.clone();
        let flat: Vec<Vec<u8>> = DUE_SCRIPT
            .key(keys::PARKED)
            .key(keys::ADMISSION_RESUMES)
            .arg(orch_shared::now_ms())
            .arg(max)
            .arg(hold.as_millis() as u64)
            .arg(keys::parked_job(""))
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("take parked jobs"))?;
        Ok(Due::from_reply(flat))
    }

    /// Forgets a re-published attempt (unless it was parked again meanwhile).
    pub async fn unpark(&self, due: &Due) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let _: i64 = UNPARK_SCRIPT
            .key(keys::parked_job(&due.member))
            .key(keys::PARKED)
            .arg(&due.member)
            .arg(due.parks)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("unpark job"))?;
        Ok(())
    }

    /// Drops `lease` if this worker still holds it.
    pub async fn release(&self, lease: &Lease) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let _: i64 = RELEASE_SCRIPT
            .key(keys::job_lease(lease.job, lease.attempt))
            .arg(&lease.value)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err("release lease"))?;
        Ok(())
    }
}
