//! Switchyard observability: one place that sets up telemetry.
//!
//! [`init`] installs a `tracing` subscriber that writes key=value logs to
//! stderr, filtered by `SWITCHYARD_LOG` (same syntax as `RUST_LOG`, default
//! `warn`). Lines are coloured only when stderr is a terminal and
//! `NO_COLOR` is unset or empty. A line that cannot be written (stderr
//! closed or full) is dropped. OpenTelemetry export plugs in here.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The environment variable holding the log filter.
pub const LOG_ENV: &str = "SWITCHYARD_LOG";

/// Installs the global subscriber. Safe to call more than once (later calls
/// do nothing).
pub fn init() {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("warn"));
    let ansi = colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        // Its fallback for a failed write is `eprintln!`, which panics when
        // stderr is closed or full: a log line that cannot be written is lost.
        .log_internal_errors(false)
        .try_init();
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
