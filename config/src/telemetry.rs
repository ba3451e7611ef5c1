//! Logging and traces for both services. [`TelemetryArgs`] and [`TelemetrySettings`] (the
//! `[telemetry]` table, `--otlp-endpoint`, `ORCH_OTLP_ENDPOINT`, else the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) say where spans go; [`init`] installs the log subscriber and,
//! with an endpoint, a `tracing-opentelemetry` layer whose spans are batched and sent over
//! OTLP/HTTP (protobuf) on the batch processor's own thread. Without an endpoint no OpenTelemetry
//! layer is installed at all: spans are the plain `tracing` ones, nothing is exported and
//! [`traceparent`] is `None`.
//!
//! Trace context crosses process boundaries as a W3C `traceparent` string: in the `traceparent`
//! header of each job's NATS message, in a task's record (so a job dispatched after a restart,
//! or by another coordinator, still joins the task's trace), and in the `TRACEPARENT`
//! environment of an agent process.
//!
//! Behind the crate's `telemetry` feature (the services' only; `orchctl` does not log this way).

use crate::Error;
use serde::Deserialize;

/// The telemetry flags, the same in both services (`#[command(flatten)]`). Each id is the
/// setting's key under `telemetry`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct TelemetryArgs {
    /// Base URL of an OTLP/HTTP collector (`http://collector:4318`; spans go to
    /// `<url>/v1/traces`). Unset: no traces are exported (the standard
    /// OTEL_EXPORTER_OTLP_ENDPOINT is used when this is not set).
    #[arg(
        long = "otlp-endpoint",
        id = "telemetry.otlp_endpoint",
        value_name = "URL",
        env = "ORCH_OTLP_ENDPOINT"
    )]
    pub otlp_endpoint: Option<String>,
}

/// The `telemetry` settings as the file spells them (`[telemetry]`).
#[derive(Deserialize, Default, Debug)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    otlp_endpoint: Option<String>,
}

/// The checked telemetry settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Telemetry {
    /// Where spans are sent (`<base>/v1/traces`), or `None` to export nothing.
    pub otlp_endpoint: Option<String>,
}

impl TelemetrySettings {
    /// Checks the endpoint; without one, takes `OTEL_EXPORTER_OTLP_ENDPOINT` from `env`.
    pub fn check(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Telemetry, Error> {
        let (key, value) = match self.otlp_endpoint {
            Some(v) => ("otlp-endpoint", Some(v)),
            None => (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                env("OTEL_EXPORTER_OTLP_ENDPOINT"),
            ),
        };
        let otlp_endpoint = match value.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                let base = url.trim_end_matches('/');
                if base.len() <= "https://".len() {
                    return Err(Error::invalid(key, format!("no host in `{url}`")));
                }
                Some(format!("{base}/v1/traces"))
            }
            Some(url) => {
                return Err(Error::invalid(
                    key,
                    format!("expected an http:// or https:// URL, got `{url}`"),
                ));
            }
        };
        Ok(Telemetry { otlp_endpoint })
    }
}

/// `error` and its sources, outermost first, joined with `: ` (a source whose text the previous
/// one already shows, as a transparent wrapper's does, is not repeated): what a service logs
/// when it stops on an error.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut last = text.clone();
    let mut source = error.source();
    while let Some(e) = source {
        let here = e.to_string();
        if !last.contains(&here) {
            text.push_str(": ");
            text.push_str(&here);
        }
        last = here;
        source = e.source();
    }
    text
}

#[cfg(feature = "telemetry")]
pub use active::*;

#[cfg(feature = "telemetry")]
mod active {
    use super::Telemetry;
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use std::collections::HashMap;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    /// The W3C header name (and, upper-cased, the environment variable agents get).
    pub const TRACEPARENT_HEADER: &str = "traceparent";

    /// Set once [`init`] installed the OpenTelemetry layer.
    static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Where [`init`] sends spans (`.../v1/traces`).
    static ENDPOINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

    /// Whether spans are exported: callers skip making spans that exist only for the trace.
    pub fn enabled() -> bool {
        ENABLED.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The OTLP/HTTP traces URL spans are exported to, when they are (for an agent process
    /// that exports its own spans into the same trace).
    pub fn traces_endpoint() -> Option<&'static str> {
        enabled().then(|| ENDPOINT.get().map(String::as_str))?
    }

    /// Keeps the exporter alive; dropping it sends the spans still batched (at most a few
    /// seconds, then they are dropped).
    pub struct Guard {
        provider: Option<SdkTracerProvider>,
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            if let Some(p) = self.provider.take()
                && let Err(e) = p.shutdown_with_timeout(std::time::Duration::from_secs(5))
            {
                eprintln!("traces: flushing the last spans failed: {e}");
            }
        }
    }

    /// Logs every panic, in any thread, as an error event (thread, message, location) before
    /// the default hook prints it: a panic in a spawned task ends only that task, and the
    /// service's log must say so.
    fn log_panics() {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            tracing::error!(
                thread = thread.name().unwrap_or("unnamed"),
                panic = %info,
                "a thread panicked"
            );
            default(info);
        }));
    }

    /// Installs the global subscriber: logs on stderr (JSON lines or pretty), filtered by
    /// `ORCH_LOG` (default `info`), and, with an OTLP endpoint, the OpenTelemetry layer naming
    /// this process `service`. An exporter that cannot be built is logged and traces stay off.
    pub fn init(service: &'static str, json: bool, telemetry: &Telemetry) -> Guard {
        let filter = || {
            tracing_subscriber::EnvFilter::try_from_env("ORCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        };
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let fmt = if json {
            fmt.json().boxed()
        } else {
            fmt.boxed()
        };
        let (provider, failed) = match telemetry
            .otlp_endpoint
            .as_deref()
            .map(|e| provider(e, service))
        {
            None => (None, None),
            Some(Ok(p)) => (Some(p), None),
            Some(Err(e)) => (None, Some(e)),
        };
        let otel = provider.as_ref().map(|p| {
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer(service))
                .with_filter(filter())
        });
        tracing_subscriber::registry()
            .with(fmt.with_filter(filter()))
            .with(otel)
            .init();
        log_panics();
        if provider.is_some()
            && let Some(endpoint) = &telemetry.otlp_endpoint
        {
            let _ = ENDPOINT.set(endpoint.clone());
            ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, "traces disabled: the OTLP exporter could not be built");
        } else if let Some(endpoint) = &telemetry.otlp_endpoint {
            tracing::info!(%endpoint, "exporting traces over OTLP");
        }
        Guard { provider }
    }

    /// The exporter's provider; its resource is the standard variables' (`OTEL_SERVICE_NAME`,
    /// `OTEL_RESOURCE_ATTRIBUTES`), named `service` unless `OTEL_SERVICE_NAME` says otherwise.
    fn provider(endpoint: &str, service: &'static str) -> Result<SdkTracerProvider, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| e.to_string())?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service);
        }
        let resource = resource.build();
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build())
    }

    /// The `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`), or `None` when traces
    /// are off.
    pub fn traceparent(span: &tracing::Span) -> Option<String> {
        let cx = span.context();
        if !cx.span().span_context().is_valid() {
            return None;
        }
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        carrier.remove(TRACEPARENT_HEADER)
    }

    /// The trace id in a `traceparent` (32 hex digits).
    pub fn trace_id(traceparent: &str) -> Option<&str> {
        traceparent
            .split('-')
            .nth(1)
            .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// Makes the span `traceparent` names the parent of `span` (nothing when it is `None` or
    /// malformed, or traces are off).
    pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
        let Some(tp) = traceparent else { return };
        let carrier = HashMap::from([(TRACEPARENT_HEADER.to_string(), tp.to_string())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        if cx.span().span_context().is_valid() {
            // Fails only for a span that already started its OpenTelemetry side; not ours.
            let _ = span.set_parent(cx);
        }
    }

    /// NATS headers carrying `traceparent` (empty without one).
    pub fn nats_headers(traceparent: Option<&str>) -> Option<async_nats::HeaderMap> {
        let tp = traceparent?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(TRACEPARENT_HEADER, tp);
        Some(headers)
    }

    /// The `traceparent` header of a NATS message.
    pub fn from_nats_headers(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
        headers?
            .get(TRACEPARENT_HEADER)
            .map(|v| v.as_str().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("the results loop failed")]
        Wrapped(#[source] Middle),
        #[error(transparent)]
        Transparent(Middle),
    }

    #[derive(Debug, thiserror::Error)]
    #[error("reading the log")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn an_error_chain_names_every_cause_once() {
        let io = || std::io::Error::other("connection reset");
        assert_eq!(
            error_chain(&Outer::Wrapped(Middle(io()))),
            "the results loop failed: reading the log: connection reset"
        );
        // A transparent wrapper shows its source's text: it is not said twice.
        assert_eq!(
            error_chain(&Outer::Transparent(Middle(io()))),
            "reading the log: connection reset"
        );
    }

    fn check(endpoint: Option<&str>, otel: Option<&str>) -> Result<Telemetry, Error> {
        let settings = TelemetrySettings {
            otlp_endpoint: endpoint.map(Into::into),
        };
        let otel = otel.map(String::from);
        settings.check(&|name| (name == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| otel.clone())?)
    }

    #[test]
    fn the_endpoint_is_a_base_url_from_the_setting_or_the_standard_variable() {
        assert_eq!(check(None, None).unwrap().otlp_endpoint, None);
        assert_eq!(
            check(Some("http://c:4318/"), Some("http://other:4318"))
                .unwrap()
                .otlp_endpoint
                .as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            check(None, Some("https://otel.example:4318"))
                .unwrap()
                .otlp_endpoint
                .as_deref(),
            Some("https://otel.example:4318/v1/traces")
        );
        let e = check(Some("c:4317"), None).unwrap_err().to_string();
        assert!(e.contains("otlp-endpoint") && e.contains("c:4317"), "{e}");
        let e = check(None, Some("grpc://c")).unwrap_err().to_string();
        assert!(e.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{e}");
    }
}
