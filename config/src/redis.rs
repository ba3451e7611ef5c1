//! How the coordinator and the workers reach Redis beyond a plain URL: an ACL user and password,
//! and Redis Sentinel (a `redis+sentinel://` URL, or the master's name and the sentinels'
//! addresses as flags). Both services flatten [`RedisArgs`] into their command line and keep
//! [`RedisSettings`] under the `redis` key of their settings (`[redis]` in the TOML file);
//! [`RedisSettings::check`] gives the checked [`Redis`].
//!
//! Behind the `redis` feature, [`Redis::connect`] opens the one multiplexed [`Connection`] a
//! service uses. It lives here, as `nats::Nats::connect_options` does, because both services
//! need it and the wire crate must stay free of the redis crate. Through Sentinel, the
//! connection asks the sentinels for the current primary whenever a command fails the way a
//! lost or demoted primary makes it fail, and moves to the new primary once they name one.

use crate::Error;
use crate::nats::Secret;
use serde::Deserialize;

/// The Redis connection flags, the same in both services (`#[command(flatten)]`). Each id is
/// the setting's key under `redis`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct RedisArgs {
    /// Redis ACL user (with --redis-password; overrides a user in --redis-url).
    #[arg(
        long = "redis-username",
        id = "redis.username",
        value_name = "USER",
        env = "ORCH_REDIS_USERNAME"
    )]
    pub username: Option<String>,
    /// Redis password (of --redis-username, or of the default user; overrides a password in
    /// --redis-url).
    #[arg(
        long = "redis-password",
        id = "redis.password",
        value_name = "PASSWORD",
        env = "ORCH_REDIS_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// Name of the master the Redis sentinels watch (with --redis-sentinels; instead of a
    /// `redis+sentinel://` URL).
    #[arg(
        long = "redis-sentinel-master",
        id = "redis.sentinel_master",
        value_name = "NAME",
        env = "ORCH_REDIS_SENTINEL_MASTER"
    )]
    pub sentinel_master: Option<String>,
    /// Redis sentinels, comma separated `host:port` (with --redis-sentinel-master).
    #[arg(
        long = "redis-sentinels",
        id = "redis.sentinels",
        value_name = "HOST:PORT,...",
        env = "ORCH_REDIS_SENTINELS"
    )]
    pub sentinels: Option<String>,
}

/// The `redis` settings as the file spells them (`[redis]`), before [`RedisSettings::check`].
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    username: Option<String>,
    password: Option<String>,
    sentinel_master: Option<String>,
    sentinels: Option<String>,
}

// Written by hand so that no secret reaches a log through `{:?}`.
impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("username", &self.username)
            .field("sentinel_master", &self.sentinel_master)
            .field("sentinels", &self.sentinels)
            .finish_non_exhaustive()
    }
}

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One server (`redis://` or `rediss://`).
    Url(String),
    /// The primary the sentinels name for `master`.
    Sentinel {
        master: String,
        /// `(host, port)` of each sentinel.
        sentinels: Vec<(String, u16)>,
        /// TLS to the sentinels and the servers (`rediss+sentinel://`).
        tls: bool,
        db: i64,
    },
}

/// The checked Redis connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redis {
    pub target: Target,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

impl Redis {
    /// The settings of a URL alone (no `[redis]` settings): for tests and tools.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        RedisSettings::default().check(url)
    }
}

const SENTINEL: &str = "redis+sentinel://";
const SENTINEL_TLS: &str = "rediss+sentinel://";

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// `host:port` of one sentinel; `key` is the setting it came from.
fn sentinel_addr(key: &str, item: &str) -> Result<(String, u16), Error> {
    let bad = || {
        Error::invalid(
            key,
            format!("expected sentinels as host:port, comma separated, got {item:?}"),
        )
    };
    let (host, port) = item.trim().rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

fn sentinel_list(key: &str, list: &str) -> Result<Vec<(String, u16)>, Error> {
    let all: Vec<_> = list
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| sentinel_addr(key, s))
        .collect::<Result<_, _>>()?;
    if all.is_empty() {
        return Err(Error::invalid(key, "names no sentinel"));
    }
    Ok(all)
}

/// A user's and password's percent-decoded text (`%40` is `@`).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `redis+sentinel://[user[:password]@]host:port[,host:port...]/master[/db]` URL: the
/// target and the credentials it carries.
type SentinelUrl = (Target, Option<String>, Option<String>);

fn parse_sentinel_url(url: &str) -> Result<Option<SentinelUrl>, Error> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix(SENTINEL) {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix(SENTINEL_TLS) {
        (rest, true)
    } else {
        return Ok(None);
    };
    let key = "redis-url";
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo.map(|u| u.split_once(':').unwrap_or((u, ""))) {
        Some((u, p)) => (non_empty(Some(decode(u))), non_empty(Some(decode(p)))),
        None => (None, None),
    };
    let mut parts = path.split('/').filter(|s| !s.is_empty());
    let master = parts.next().ok_or_else(|| {
        Error::invalid(
            key,
            "a redis+sentinel:// URL names the master after the sentinels: \
             redis+sentinel://host:26379,host:26379/mymaster",
        )
    })?;
    let db = match parts.next() {
        None => 0,
        Some(db) => db
            .parse()
            .map_err(|_| Error::invalid(key, format!("expected a database number, got {db:?}")))?,
    };
    let target = Target::Sentinel {
        master: decode(master),
        sentinels: sentinel_list(key, hosts)?,
        tls,
        db,
    };
    Ok(Some((target, user, password)))
}

impl RedisSettings {
    /// The checks, with `url` (the service's `redis-url`): sentinels either in the URL or in
    /// the flags, a master with its sentinels, addresses that parse.
    pub fn check(self, url: &str) -> Result<Redis, Error> {
        let from_url = parse_sentinel_url(url.trim())?;
        let (master, sentinels) = (non_empty(self.sentinel_master), non_empty(self.sentinels));
        let (target, url_user, url_password) = match (from_url, master, sentinels) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(Error::invalid(
                    "redis-sentinels, redis-sentinel-master",
                    "sentinels are given in redis-url already (redis+sentinel://); set one or \
                     the other",
                ));
            }
            (Some(parsed), None, None) => parsed,
            (None, Some(master), Some(list)) => (
                Target::Sentinel {
                    master,
                    sentinels: sentinel_list("redis-sentinels", &list)?,
                    tls: url.trim().starts_with("rediss://"),
                    db: 0,
                },
                None,
                None,
            ),
            (None, Some(_), None) => {
                return Err(Error::invalid(
                    "redis-sentinel-master",
                    "needs redis-sentinels too",
                ));
            }
            (None, None, Some(_)) => {
                return Err(Error::invalid(
                    "redis-sentinels",
                    "needs redis-sentinel-master too",
                ));
            }
            (None, None, None) => (Target::Url(url.trim().to_string()), None, None),
        };
        let username = non_empty(self.username).or(url_user);
        let password = non_empty(self.password).or(url_password);
        if username.is_some() && password.is_none() && matches!(target, Target::Sentinel { .. }) {
            return Err(Error::invalid("redis-username", "needs redis-password too"));
        }
        Ok(Redis {
            target,
            username,
            password: password.map(Secret::new),
        })
    }
}

#[cfg(feature = "redis")]
pub use connection::{ConnectError, Connection};

#[cfg(feature = "redis")]
mod connection {
    use super::{Redis, Target};
    use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
    use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
    use redis::{
        Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, ServerErrorKind,
        TlsMode, Value,
    };
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, RwLock};
    use std::time::{Duration, Instant};

    /// Why a service could not open its Redis connection.
    #[derive(Debug, thiserror::Error)]
    pub enum ConnectError {
        /// Redis answered and refused the credentials: retrying cannot help.
        #[error(
            "Redis at {at} refused the credentials (check redis-username and redis-password, \
             or the user and password in redis-url): {source}"
        )]
        Refused { at: String, source: RedisError },
        #[error("failed to connect to Redis at {at}: {source}")]
        Failed { at: String, source: RedisError },
    }

    impl ConnectError {
        /// Whether trying again may help (not when the credentials are refused).
        pub fn is_transient(&self) -> bool {
            matches!(self, Self::Failed { .. })
        }
    }

    /// One multiplexed connection shared by every clone; through Sentinel it follows the
    /// primary. A command that fails on a dropped connection returns its error (callers retry
    /// idempotently, as with `ConnectionManager`) and makes the next commands go to the
    /// primary the sentinels name; one that surely did not run (refused connection, a
    /// demoted primary's `READONLY`) is sent once more when the connection moved meanwhile.
    #[derive(Clone)]
    pub struct Connection {
        shared: Arc<Shared>,
        db: i64,
    }

    struct Shared {
        current: RwLock<ConnectionManager>,
        /// How many times the connection moved to another primary.
        moves: AtomicU64,
        sentinel: Option<tokio::sync::Mutex<Follower>>,
    }

    /// What asks the sentinels where the primary is, and where it was last.
    struct Follower {
        sentinel: Sentinel,
        master: String,
        node: SentinelNodeConnectionInfo,
        address: String,
        asked: Option<Instant>,
    }

    /// Requests are small and answered at once: without TCP_NODELAY a request written while
    /// another is unanswered on the shared connection waits for Nagle's timer.
    fn tcp() -> redis::io::tcp::TcpSettings {
        redis::io::tcp::TcpSettings::default().set_nodelay(true)
    }

    fn manager_config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(3)
    }

    /// Whether `e` is a server refusing who we are.
    fn refused(e: &RedisError) -> bool {
        e.kind() == ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    }

    /// Whether `e` is what a lost primary (gone, or now a replica) makes a command fail with.
    fn primary_lost(e: &RedisError) -> bool {
        e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || matches!(e.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly))
            || matches!(e.code(), Some("MASTERDOWN" | "LOADING"))
    }

    /// Whether `e` says the command was not executed: the server refused the connection, or
    /// refused the command as a replica or while it had no primary or was loading. Such a
    /// command is safe to send again, once, to the primary the connection moved to.
    fn never_ran(e: &RedisError) -> bool {
        e.is_connection_refusal()
            || matches!(e.kind(), ErrorKind::Server(ServerErrorKind::ReadOnly))
            || matches!(e.code(), Some("MASTERDOWN" | "LOADING"))
    }

    /// Opens a manager on `client` and checks with a PING that Redis accepts us.
    async fn open(client: redis::Client, at: &str) -> Result<ConnectionManager, ConnectError> {
        let classify = |source: RedisError| {
            let at = at.to_string();
            if refused(&source) {
                ConnectError::Refused { at, source }
            } else {
                ConnectError::Failed { at, source }
            }
        };
        let mut conn = ConnectionManager::new_with_config(client, manager_config())
            .await
            .map_err(classify)?;
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(classify)?;
        Ok(conn)
    }

    impl Follower {
        /// The primary the sentinels name now, checked to be one, as a client.
        async fn primary(&mut self) -> Result<redis::Client, RedisError> {
            let ask = self
                .sentinel
                .async_master_for(&self.master, Some(&self.node));
            tokio::time::timeout(Duration::from_secs(5), ask)
                .await
                .map_err(|_| RedisError::from((ErrorKind::Io, "no sentinel answered within 5s")))?
        }
    }

    impl Redis {
        /// What to show of where Redis is: the URL without its credentials, or the master's
        /// name and sentinels.
        pub fn describe(&self) -> String {
            match &self.target {
                Target::Url(url) => redact(url),
                Target::Sentinel {
                    master, sentinels, ..
                } => {
                    let list: Vec<String> =
                        sentinels.iter().map(|(h, p)| format!("{h}:{p}")).collect();
                    format!("master {master} of sentinels {}", list.join(","))
                }
            }
        }

        /// Opens the connection: to the URL's server, or to the primary the sentinels name.
        pub async fn connect(&self) -> Result<Connection, ConnectError> {
            let at = self.describe();
            let failed = |source| ConnectError::Failed {
                at: at.clone(),
                source,
            };
            match &self.target {
                Target::Url(url) => {
                    let mut info = url.as_str().into_connection_info().map_err(failed)?;
                    let mut settings = info.redis_settings().clone();
                    if let Some(user) = &self.username {
                        settings = settings.set_username(user);
                    }
                    if let Some(password) = &self.password {
                        settings = settings.set_password(password.expose());
                    }
                    info = info.set_redis_settings(settings).set_tcp_settings(tcp());
                    let db = info.redis_settings().db();
                    let client = redis::Client::open(info).map_err(failed)?;
                    let conn = open(client, &at).await?;
                    Ok(Connection::new(conn, None, db))
                }
                Target::Sentinel {
                    master,
                    sentinels,
                    tls,
                    db,
                } => {
                    let scheme = if *tls { "rediss" } else { "redis" };
                    let urls: Vec<String> = sentinels
                        .iter()
                        .map(|(h, p)| format!("{scheme}://{h}:{p}"))
                        .collect();
                    let sentinel = Sentinel::build(urls).map_err(failed)?;
                    let mut settings = redis::RedisConnectionInfo::default().set_db(*db);
                    if let Some(user) = &self.username {
                        settings = settings.set_username(user);
                    }
                    if let Some(password) = &self.password {
                        settings = settings.set_password(password.expose());
                    }
                    let mut node = SentinelNodeConnectionInfo::default()
                        .set_redis_connection_info(settings)
                        .set_tcp_settings(tcp());
                    if *tls {
                        node = node.set_tls_mode(TlsMode::Secure);
                    }
                    let mut follower = Follower {
                        sentinel,
                        master: master.clone(),
                        node,
                        address: String::new(),
                        asked: Some(Instant::now()),
                    };
                    let client = follower.primary().await.map_err(failed)?;
                    follower.address = client.get_connection_info().addr().to_string();
                    let conn = open(client, &at).await?;
                    tracing::info!(primary = %follower.address, %master, "connected to the Redis primary");
                    Ok(Connection::new(conn, Some(follower), *db))
                }
            }
        }
    }

    /// The URL without its user and password.
    fn redact(url: &str) -> String {
        let Some((scheme, rest)) = url.split_once("://") else {
            return url.to_string();
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        match rest[..end].rfind('@') {
            Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
            None => url.to_string(),
        }
    }

    impl Connection {
        fn new(conn: ConnectionManager, follower: Option<Follower>, db: i64) -> Self {
            Self {
                shared: Arc::new(Shared {
                    current: RwLock::new(conn),
                    moves: AtomicU64::new(0),
                    sentinel: follower.map(tokio::sync::Mutex::new),
                }),
                db,
            }
        }

        fn current(&self) -> ConnectionManager {
            match self.shared.current.read() {
                Ok(conn) => conn.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            }
        }

        /// Whether a command that failed with `e`, sent when the connection had moved `moves`
        /// times, did not run and the connection has moved since: it is sent once more, to
        /// the new primary (a lease renewal that failed as the old primary died succeeds
        /// there, rather than running out while the sentinels promote a replica).
        fn moved_since(&self, moves: u64, e: &RedisError) -> bool {
            never_ran(e) && self.shared.moves.load(Ordering::SeqCst) != moves
        }

        /// After `e`, asks the sentinels (at most every 250 ms) where the primary is and moves
        /// there when it moved.
        async fn follow(&self, e: &RedisError) {
            let Some(follower) = &self.shared.sentinel else {
                return;
            };
            if !primary_lost(e) {
                return;
            }
            let mut follower = follower.lock().await;
            if follower
                .asked
                .is_some_and(|at| at.elapsed() < Duration::from_millis(250))
            {
                return;
            }
            follower.asked = Some(Instant::now());
            let client = match follower.primary().await {
                Ok(client) => client,
                Err(error) => {
                    tracing::warn!(%error, "the Redis sentinels name no primary yet");
                    return;
                }
            };
            let address = client.get_connection_info().addr().to_string();
            if address == follower.address {
                return;
            }
            let opened = tokio::time::timeout(Duration::from_secs(5), open(client, &address)).await;
            match opened {
                Ok(Ok(conn)) => {
                    tracing::warn!(from = %follower.address, to = %address, "Redis primary moved; following it");
                    follower.address = address;
                    match self.shared.current.write() {
                        Ok(mut current) => *current = conn,
                        Err(poisoned) => *poisoned.into_inner() = conn,
                    }
                    self.shared.moves.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, primary = %address, "cannot reach the new Redis primary yet")
                }
                Err(_) => {
                    tracing::warn!(primary = %address, "cannot reach the new Redis primary yet")
                }
            }
        }
    }

    impl ConnectionLike for Connection {
        fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
            Box::pin(async move {
                let moves = self.shared.moves.load(Ordering::SeqCst);
                let mut conn = self.current();
                let result = conn.req_packed_command(cmd).await;
                if let Err(e) = &result {
                    self.follow(e).await;
                    if self.moved_since(moves, e) {
                        return self.current().req_packed_command(cmd).await;
                    }
                }
                result
            })
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            pipeline: &'a Pipeline,
            offset: usize,
            count: usize,
        ) -> RedisFuture<'a, Vec<Value>> {
            Box::pin(async move {
                let moves = self.shared.moves.load(Ordering::SeqCst);
                let mut conn = self.current();
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                if let Err(e) = &result {
                    self.follow(e).await;
                    if self.moved_since(moves, e) {
                        let mut conn = self.current();
                        return conn.req_packed_commands(pipeline, offset, count).await;
                    }
                }
                result
            })
        }

        fn get_db(&self) -> i64 {
            self.db
        }
    }

    #[cfg(test)]
    mod tests {
        use super::redact;

        #[test]
        fn credentials_never_show() {
            assert_eq!(redact("redis://u:p@h:1/0"), "redis://***@h:1/0");
            assert_eq!(redact("redis://h:1"), "redis://h:1");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> RedisSettings {
        toml::from_str(toml).unwrap()
    }

    fn sentinel(master: &str, sentinels: &[(&str, u16)], tls: bool, db: i64) -> Target {
        Target::Sentinel {
            master: master.into(),
            sentinels: sentinels.iter().map(|(h, p)| (h.to_string(), *p)).collect(),
            tls,
            db,
        }
    }

    #[test]
    fn a_sentinel_url_names_the_sentinels_the_master_and_the_credentials() {
        let redis = settings("")
            .check("redis+sentinel://orch:p%40ss@s1:26379,s2:26380/mymaster/2")
            .unwrap();
        assert_eq!(
            redis.target,
            sentinel("mymaster", &[("s1", 26379), ("s2", 26380)], false, 2)
        );
        assert_eq!(redis.username.as_deref(), Some("orch"));
        assert_eq!(redis.password.unwrap().expose(), "p@ss");
        let tls = settings("").check("rediss+sentinel://s1:26379/m").unwrap();
        assert_eq!(tls.target, sentinel("m", &[("s1", 26379)], true, 0));
    }

    #[test]
    fn flags_give_the_sentinels_and_credentials_override_the_url() {
        let redis = settings(
            "sentinel_master = \"m\"\nsentinels = \"a:1, b:2\"\nusername = \"u\"\npassword = \"p\"",
        )
        .check("redis://127.0.0.1:6379")
        .unwrap();
        assert_eq!(redis.target, sentinel("m", &[("a", 1), ("b", 2)], false, 0));
        let plain = settings("password = \"new\"")
            .check("redis://old:old@h:6379")
            .unwrap();
        assert_eq!(plain.target, Target::Url("redis://old:old@h:6379".into()));
        assert_eq!(plain.password.unwrap().expose(), "new");
    }

    #[test]
    fn bad_sentinel_settings_are_refused_naming_the_key() {
        let err = |toml: &str, url: &str| settings(toml).check(url).unwrap_err().to_string();
        assert_eq!(
            err("sentinel_master = \"m\"", "redis://h:1"),
            "invalid configuration: redis-sentinel-master: needs redis-sentinels too"
        );
        assert_eq!(
            err("sentinels = \"a:1\"", "redis://h:1"),
            "invalid configuration: redis-sentinels: needs redis-sentinel-master too"
        );
        assert_eq!(
            err("sentinel_master = \"m\"\nsentinels = \"a\"", "redis://h:1"),
            "invalid configuration: redis-sentinels: expected sentinels as host:port, comma \
             separated, got \"a\""
        );
        assert_eq!(
            err("", "redis+sentinel://a:1"),
            "invalid configuration: redis-url: a redis+sentinel:// URL names the master after \
             the sentinels: redis+sentinel://host:26379,host:26379/mymaster"
        );
        assert!(
            err("sentinels = \"a:1\"", "redis+sentinel://a:1/m").starts_with(
                "invalid configuration: redis-sentinels, redis-sentinel-master: sentinels are \
                 given in redis-url already"
            )
        );
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let raw = settings("password = \"hunter2\"");
        assert!(!format!("{raw:?}").contains("hunter2"));
        let redis = raw.check("redis://h:1").unwrap();
        assert!(!format!("{redis:?}").contains("hunter2"), "{redis:?}");
    }
}
