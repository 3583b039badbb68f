//! The journal: what happened in a run, one event per state change. This
//! enum is the single vocabulary that the store persists and that telemetry
//! and the audit trail will mirror. Tags are a durable contract.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_steps::StepError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        workflow: String,
        version: u32,
        input: Value,
        /// The caller's W3C `traceparent`, when the trigger gave one: the
        /// run's trace hangs under it, in every process that drives it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<String>,
    },
    StepStarted {
        step: String,
        attempt: u32,
    },
    /// A sub-operation inside an attempt (see `StepContext::journaled`).
    StepOp {
        step: String,
        attempt: u32,
        index: u32,
        name: String,
        value: Value,
        /// When the operation ended (unix ms); journals before it had none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<i64>,
    },
    StepSucceeded {
        step: String,
        attempt: u32,
        output: Value,
    },
    StepFailed {
        step: String,
        attempt: u32,
        error: StepError,
        /// When the next attempt is due, if the policy retries.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at: Option<i64>,
        /// `on_error: continue`: the run goes on with the error as output.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        continued: bool,
    },
    /// The step waits durably until `until` (unix ms).
    StepSuspended {
        step: String,
        attempt: u32,
        until: i64,
    },
    /// The step waits durably for signal `signal` (with no name: for a child
    /// run it drives to be woken), at most until `until` (unix ms).
    StepWaiting {
        step: String,
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<i64>,
    },
    /// A signal sent to this run was received (it is then part of the
    /// journal: a replay sees the same payload).
    SignalReceived {
        name: String,
        payload: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        actor: Option<String>,
        /// When it was sent (committed).
        sent_at: i64,
    },
    StepSkipped {
        step: String,
        reason: String,
    },
    /// The step was not run: `runs rerun` copied its result from run
    /// `from_run`, where it succeeded with the same definition and the same
    /// upstream results. Folded like `step_succeeded`; `ops` are the model
    /// calls and other sub-operations that result came from, kept for the
    /// record (they are not counted against this run's token budget).
    StepReused {
        step: String,
        from_run: String,
        output: Value,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ops: Vec<ReusedOp>,
    },
    /// Nothing can run before `wake_at` (with none: before a signal); the run
    /// released its task and lease.
    RunParked {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wake_at: Option<i64>,
    },
    /// A failed run was resumed; `actor` is who asked (`cli:alice`).
    RunResumed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        actor: Option<String>,
    },
    /// Someone asked to cancel the run; written just before its
    /// `run_finished {cancelled}`.
    CancelRequested {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        actor: Option<String>,
    },
    RunFinished {
        status: RunStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<StepError>,
    },
}

impl Event {
    /// The persisted tag, also stored in its own column.
    pub fn tag(&self) -> &'static str {
        match self {
            Event::RunStarted { .. } => "run_started",
            Event::StepStarted { .. } => "step_started",
            Event::StepOp { .. } => "step_op",
            Event::StepSucceeded { .. } => "step_succeeded",
            Event::StepFailed { .. } => "step_failed",
            Event::StepSuspended { .. } => "step_suspended",
            Event::StepWaiting { .. } => "step_waiting",
            Event::SignalReceived { .. } => "signal_received",
            Event::StepSkipped { .. } => "step_skipped",
            Event::StepReused { .. } => "step_reused",
            Event::RunParked { .. } => "run_parked",
            Event::RunResumed { .. } => "run_resumed",
            Event::CancelRequested { .. } => "cancel_requested",
            Event::RunFinished { .. } => "run_finished",
        }
    }
}

/// A sub-operation of the original run's attempt, carried by `step_reused`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReusedOp {
    pub index: u32,
    pub name: String,
    pub value: Value,
}

/// An event as stored: when, its tag, and its payload (JSON text).
///
/// [`Encoded::new`] and [`decode`] are the one codec of the journal: the
/// engine encodes before a write reaches any store backend, and backends
/// decode through [`decode`], so sealing (encryption at rest) and the audit
/// hash chain each have a single choke point.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub at: i64,
    pub kind: &'static str,
    pub payload: String,
}

impl Encoded {
    pub fn new(at: i64, event: &Event) -> Self {
        // An `Event` holds JSON values and strings only: it always serializes.
        let payload = serde_json::to_string(event).unwrap_or_else(|e| format!("{{\"type\":\"invalid\",\"e\":{e:?}}}"));
        Self { at, kind: event.tag(), payload }
    }

    /// Events that happened at one time.
    pub fn all(at: i64, events: &[Event]) -> Vec<Self> {
        events.iter().map(|e| Self::new(at, e)).collect()
    }
}

/// Decodes a stored payload.
pub fn decode(payload: &str) -> Result<Event, String> {
    serde_json::from_str(payload).map_err(|e| e.to_string())
}

/// Status of a run, stored in `runs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Accepted, waiting for a concurrency slot.
    Queued,
    Running,
    /// Parked until a timer (a sleep or a long retry backoff) or a signal.
    Waiting,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Waiting => "waiting",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => RunStatus::Queued,
            "running" => RunStatus::Running,
            "waiting" => RunStatus::Waiting,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            _ => return None,
        })
    }

    /// Finished runs are never driven again (a failed one can be resumed).
    pub fn is_finished(self) -> bool {
        matches!(self, RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tags_match_the_serialized_form() {
        let events = [
            Event::RunStarted { workflow: "w".into(), version: 1, input: json!({}), trace: None },
            Event::RunStarted {
                workflow: "w".into(),
                version: 1,
                input: json!({}),
                trace: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            },
            Event::StepFailed {
                step: "s".into(),
                attempt: 1,
                error: StepError::retryable("x", "y"),
                retry_at: Some(5),
                continued: false,
            },
            Event::RunResumed { actor: Some("cli:alice".into()) },
            Event::CancelRequested { actor: None },
            Event::StepWaiting { step: "s".into(), attempt: 1, signal: Some("go".into()), until: None },
            Event::SignalReceived { name: "go".into(), payload: json!({"a": 1}), actor: None, sent_at: 3 },
            Event::RunParked { wake_at: None },
            Event::StepReused { step: "s".into(), from_run: "r1".into(), output: json!({"text": "hi"}), ops: vec![] },
            Event::StepReused {
                step: "s".into(),
                from_run: "r1".into(),
                output: json!(1),
                ops: vec![ReusedOp { index: 0, name: "llm_call".into(), value: json!({"outcome": "answered"}) }],
            },
            Event::RunFinished { status: RunStatus::Succeeded, output: Some(json!(1)), error: None },
        ];
        for e in events {
            let v = serde_json::to_value(&e).unwrap();
            assert_eq!(v["type"], e.tag());
            assert_eq!(serde_json::from_value::<Event>(v).unwrap(), e);
            let encoded = Encoded::new(5, &e);
            assert_eq!((encoded.kind, decode(&encoded.payload).unwrap()), (e.tag(), e));
        }
        // Journals written before `actor` existed still read.
        assert_eq!(decode(r#"{"type":"run_resumed"}"#).unwrap(), Event::RunResumed { actor: None });
        assert_eq!(decode(r#"{"type":"run_parked","wake_at":5}"#).unwrap(), Event::RunParked { wake_at: Some(5) });
        // A reuse without sub-operations leaves `ops` out.
        let reused = Event::StepReused { step: "s".into(), from_run: "r".into(), output: json!(2), ops: vec![] };
        assert_eq!(Encoded::new(0, &reused).payload, r#"{"type":"step_reused","step":"s","from_run":"r","output":2}"#);
    }
}
