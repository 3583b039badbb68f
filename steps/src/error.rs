//! Step failures are data: they are journaled, replayed and shown to users.

use serde::{Deserialize, Serialize};

/// A failed attempt. `retryable` decides whether the retry policy applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct StepError {
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub retryable: bool,
}

impl StepError {
    /// An error that retrying cannot fix (bad config, 4xx, explicit `fail`).
    pub fn fatal(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code: code.into(), message: message.into(), retryable: false }
    }

    /// A transient error (connection refused, 429, 5xx, timeout).
    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code: code.into(), message: message.into(), retryable: true }
    }
}

/// Why a step returned without an output.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// The attempt failed.
    Error(StepError),
    /// The step waits durably until this wall-clock time (unix milliseconds).
    /// The engine releases the task and calls the step again when it is due;
    /// journaled sub-operations are replayed on that call.
    Suspend { until_ms: i64 },
    /// The step waits durably for signal `signal` (see
    /// [`crate::StepContext::wait_signal`]), or, with no name, for the engine
    /// to wake it (a child run it drives was signalled); at most until
    /// `until_ms`. The run holds no task meanwhile: nothing is due but a
    /// signal, so it parks with no timer, and the step is called again when
    /// the signal is committed or the deadline comes.
    Wait { signal: Option<String>, until_ms: Option<i64> },
}

impl From<StepError> for Stop {
    fn from(e: StepError) -> Self {
        Stop::Error(e)
    }
}

pub type StepResult<T = serde_json::Value> = Result<T, Stop>;

/// A problem in a step's `with` block found at compile time. `path` is relative
/// to `with` (empty for the block itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub path: String,
    pub message: String,
}

impl ConfigIssue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}
