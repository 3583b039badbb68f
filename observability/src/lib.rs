//! Switchyard observability: one place that sets up telemetry.
//!
//! [`init`] installs a `tracing` subscriber that writes key=value logs to
//! stderr, filtered by `SWITCHYARD_LOG` (same syntax as `RUST_LOG`, default
//! `warn`). OpenTelemetry export plugs in here.

use tracing_subscriber::EnvFilter;

/// The environment variable holding the log filter.
pub const LOG_ENV: &str = "SWITCHYARD_LOG";

/// Installs the global subscriber. Safe to call more than once (later calls
/// do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}
