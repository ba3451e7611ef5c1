//! The orchestrator wire protocol, shared by the coordinator, the workers and `orchctl`.
//!
//! Everything that crosses a process boundary is defined here and nowhere else:
//!
//! - [`ids`]: `TaskId`, `JobId` (an agent's id is its job's id) and `WorkerId`.
//! - [`role`]: the agent roles, in pipeline order.
//! - [`job`]: what the coordinator asks a worker to run ([`job::JobSpec`]) and what comes back
//!   ([`job::JobResult`], [`job::Usage`], [`job::Outcome`]).
//! - [`event`]: the per-task event log (coordinator and worker events) carried on JetStream and
//!   replayed to clients as server-sent events.
//! - [`codec`]: the MessagePack encoding of all of the above, with a version byte.
//! - [`subject`]: NATS stream, subject and message-id names.
//! - [`api`]: the JSON bodies of the coordinator's HTTP API.
//! - [`plan`]: the plan format (LLM planner output, `--plan FILE`) and its validation.
//! - [`keys`]: Redis key names shared by more than one service.
//! - [`error`]: error codes that cross the wire (HTTP `{code, message}`).
//!
//! This crate has no async dependencies: it is plain data, so any client can link it.

pub mod api;
pub mod codec;
pub mod error;
pub mod event;
pub mod ids;
pub mod job;
pub mod keys;
pub mod plan;
pub mod report;
pub mod role;
pub mod signature;
pub mod subject;

/// Milliseconds since the Unix epoch: the only clock value the protocol carries.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The servers of a NATS URL setting: one URL, or several separated by commas
/// (`nats://a:4222,nats://b:4222`, the usual way to give a client a cluster's seed list).
pub fn nats_servers(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// A URL (or a comma-separated list of them) fit for logs and error messages: any
/// `user:password@` part is replaced by `***@`.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return nats_servers(url)
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{nats_servers, redact_url};

    #[test]
    fn a_nats_url_may_list_several_servers() {
        assert_eq!(nats_servers("nats://n1:4222"), ["nats://n1:4222"]);
        assert_eq!(
            nats_servers("nats://a:4222, nats://b:4222,"),
            ["nats://a:4222", "nats://b:4222"]
        );
        assert_eq!(
            redact_url("nats://u:p@a:4222,nats://b:4222"),
            "nats://***@a:4222,nats://b:4222"
        );
    }

    #[test]
    fn credentials_never_reach_messages() {
        assert_eq!(
            redact_url("redis://:s3cret@redis:6379/0"),
            "redis://***@redis:6379/0"
        );
        assert_eq!(redact_url("nats://user:pw@n1:4222"), "nats://***@n1:4222");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("http://h/path@x"), "http://h/path@x");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
