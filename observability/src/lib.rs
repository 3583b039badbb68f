//! Switchyard observability: logs, spans and metrics.
//!
//! [`init`] installs a `tracing` subscriber that writes logs to stderr,
//! filtered by `SWITCHYARD_LOG` (same syntax as `RUST_LOG`, default `warn`):
//! key=value text, or JSON lines with `SWITCHYARD_LOG_FORMAT=json`. Text is
//! coloured only when stderr is a terminal and `NO_COLOR` is unset or empty.
//! A line that cannot be written (stderr closed or full) is dropped.
//!
//! [`Telemetry`] exports spans (built by the engine from its journal) and
//! metrics over OTLP, configured by the standard `OTEL_*` variables.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub mod metrics;
pub mod semconv;
mod spans;

pub use metrics::{Metrics, ModelCall};
pub use spans::{Attr, CAPTURE_CONTENT_ENV, Kind, Span, SpanContext, SpanIds, Telemetry, derived_span_id, hex};

/// The environment variable holding the log filter.
pub const LOG_ENV: &str = "SWITCHYARD_LOG";
/// `text` (default) or `json`.
pub const LOG_FORMAT_ENV: &str = "SWITCHYARD_LOG_FORMAT";

/// A telemetry setting that cannot be used; names the variable, never its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {problem}")]
pub struct ConfigError {
    pub name: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(name: impl Into<String>, problem: impl Into<String>) -> Self {
        Self { name: name.into(), problem: problem.into() }
    }
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    HttpProtobuf,
    #[cfg(feature = "grpc")]
    Grpc,
}

/// The endpoint of a signal (`TRACES`, `METRICS`): its own variable as
/// given, or `OTEL_EXPORTER_OTLP_ENDPOINT` with the signal's path (for
/// http/protobuf; gRPC takes the base as it is).
/// An endpoint that is not an `http` or `https` URL with a host is refused
/// (naming the variable, never its value: it may hold credentials).
pub(crate) fn endpoint(
    env: &dyn Fn(&str) -> Option<String>,
    signal: &str,
    path: &str,
) -> Result<Option<String>, ConfigError> {
    let own = format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT");
    let (name, value) = match env(&own) {
        Some(v) => (own.as_str(), v),
        None => match env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Some(v) => ("OTEL_EXPORTER_OTLP_ENDPOINT", v),
            None => return Ok(None),
        },
    };
    let valid = reqwest::Url::parse(value.trim())
        .ok()
        .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty()));
    if !valid {
        return Err(ConfigError::new(name, "must be an http or https URL"));
    }
    if name == own {
        return Ok(Some(value.trim().to_owned()));
    }
    let grpc = protocol(env, &format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"))
        .ok()
        .is_some_and(|p| p != Protocol::HttpProtobuf);
    let base = value.trim().trim_end_matches('/');
    Ok(Some(if grpc { base.to_owned() } else { format!("{base}/{path}") }))
}

/// An exporter that cannot be built, without the library's message (it can
/// quote an endpoint, credentials and all).
pub(crate) fn unusable(_: opentelemetry_otlp::ExporterBuildError) -> ConfigError {
    ConfigError::new(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "the OTLP exporter cannot be set up with these OTEL_EXPORTER_OTLP_* settings",
    )
}

/// For an `http://` endpoint: a blocking HTTP client with the export
/// timeout (`OTEL_EXPORTER_OTLP_<SIGNAL>_TIMEOUT` or `..._TIMEOUT`, ms,
/// default 10 s) and no root certificates (loading them costs a process
/// about 10 ms and is useless without TLS). `None` for `https://`: the
/// exporter builds its own client, with the system's roots.
pub(crate) fn plain_http_client(
    env: &dyn Fn(&str) -> Option<String>,
    signal: &str,
    endpoint: &str,
) -> Result<Option<reqwest::blocking::Client>, ConfigError> {
    if !endpoint.trim().to_ascii_lowercase().starts_with("http://") {
        return Ok(None);
    }
    let own = format!("OTEL_EXPORTER_OTLP_{signal}_TIMEOUT");
    let (name, value) = match env(&own) {
        Some(v) => (own.as_str(), Some(v)),
        None => ("OTEL_EXPORTER_OTLP_TIMEOUT", env("OTEL_EXPORTER_OTLP_TIMEOUT")),
    };
    let timeout = match value {
        None => std::time::Duration::from_secs(10),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => std::time::Duration::from_millis(ms),
            _ => return Err(ConfigError::new(name, "must be a whole number of milliseconds, at least 1")),
        },
    };
    // The blocking client must be built outside an async runtime.
    let built = std::thread::spawn(move || {
        reqwest::blocking::Client::builder().tls_certs_only(Vec::<reqwest::Certificate>::new()).timeout(timeout).build()
    })
    .join();
    match built {
        Ok(Ok(client)) => Ok(Some(client)),
        Ok(Err(e)) => Err(ConfigError::new("OTEL_EXPORTER_OTLP_ENDPOINT", format!("building the HTTP client: {e}"))),
        Err(_) => Err(ConfigError::new("OTEL_EXPORTER_OTLP_ENDPOINT", "building the HTTP client failed")),
    }
}

/// The protocol from `signal_var` or `OTEL_EXPORTER_OTLP_PROTOCOL`
/// (default `http/protobuf`).
pub(crate) fn protocol(env: &dyn Fn(&str) -> Option<String>, signal_var: &str) -> Result<Protocol, ConfigError> {
    let (name, value) = match env(signal_var).filter(|v| !v.trim().is_empty()) {
        Some(v) => (signal_var, v),
        None => match env("OTEL_EXPORTER_OTLP_PROTOCOL").filter(|v| !v.trim().is_empty()) {
            Some(v) => ("OTEL_EXPORTER_OTLP_PROTOCOL", v),
            None => return Ok(Protocol::HttpProtobuf),
        },
    };
    match value.trim() {
        "http/protobuf" => Ok(Protocol::HttpProtobuf),
        #[cfg(feature = "grpc")]
        "grpc" => Ok(Protocol::Grpc),
        #[cfg(not(feature = "grpc"))]
        "grpc" => Err(ConfigError::new(
            name,
            "this build has no gRPC export (build with `--features grpc`); use http/protobuf",
        )),
        _ => Err(ConfigError::new(name, "must be http/protobuf or grpc")),
    }
}

/// Installs the global subscriber. Safe to call more than once (later calls
/// do nothing). An unknown `SWITCHYARD_LOG_FORMAT` is an error.
pub fn init() -> Result<(), ConfigError> {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("warn"));
    let json = match std::env::var(LOG_FORMAT_ENV).ok().as_deref().map(str::trim) {
        None | Some("") | Some("text") => false,
        Some("json") => true,
        Some(_) => return Err(ConfigError::new(LOG_FORMAT_ENV, "must be text or json")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Its fallback for a failed write is `eprintln!`, which panics when
        // stderr is closed or full: a log line that cannot be written is lost.
        .log_internal_errors(false);
    if json {
        // Span fields (a run's `run_id`, `trace_id`, `span_id`) go on each line.
        let _ = builder.json().with_current_span(true).with_span_list(true).try_init();
    } else {
        let ansi = colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
        let _ = builder.with_ansi(ansi).try_init();
    }
    Ok(())
}

/// Colour on a terminal, unless `NO_COLOR` is set to a non-empty value
/// (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
