//! A compiled workflow: every invariant holds (ids unique, needs resolved,
//! acyclic, expressions parsed, configs checked). Built only by
//! [`crate::compile`]; nothing downstream validates again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fixedbitset::FixedBitSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_steps::DynStep;

use crate::expr::{Expr, Templates, ValueTemplate};
pub use crate::spec::{Join, OnError};

#[derive(Debug)]
pub struct Workflow {
    pub(crate) name: String,
    /// The name, shared (it goes on every span of a run).
    pub(crate) shared_name: Arc<str>,
    pub(crate) version: u32,
    pub(crate) description: String,
    pub(crate) input_schema: Option<Arc<jsonschema::Validator>>,
    /// The `input` schema as written (an agent's workflow tool offers it).
    pub(crate) input_json: Option<serde_json::Value>,
    pub(crate) concurrency: Option<u32>,
    /// `confidential: true` (see [`crate::spec::Spec::confidential`]).
    pub(crate) confidential: bool,
    pub(crate) steps: Vec<Step>,
    /// Step ids to indexes.
    pub(crate) index: HashMap<String, usize>,
    /// Step indexes in an order where every step comes after its needs.
    pub(crate) order: Vec<usize>,
    pub(crate) output: Option<ValueTemplate>,
    pub(crate) templates: Templates,
    /// `limits.llm_tokens`.
    pub(crate) llm_tokens: Option<u64>,
    /// Hex SHA-256 of what a caller depends on (see [`Step::fingerprint`]):
    /// its steps' fingerprints, input schema, output and limits.
    pub(crate) fingerprint: String,
}

impl Workflow {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn description(&self) -> &str {
        &self.description
    }
    pub fn concurrency(&self) -> Option<u32> {
        self.concurrency
    }

    pub fn confidential(&self) -> bool {
        self.confidential
    }
    /// The run's model-token budget (`limits.llm_tokens`).
    pub fn llm_tokens(&self) -> Option<u64> {
        self.llm_tokens
    }
    pub fn step_ids(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(|s| s.id.as_str())
    }
    pub(crate) fn step_index(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }
    /// The fingerprint of step `id` (see [`Step::fingerprint`]).
    pub fn step_fingerprint(&self, id: &str) -> Option<&str> {
        self.step_index(id).map(|i| self.steps[i].fingerprint.as_str())
    }

    /// Checks a run input against the workflow's input schema.
    pub fn check_input(&self, input: &serde_json::Value) -> Result<(), Vec<String>> {
        let Some(schema) = &self.input_schema else { return Ok(()) };
        let errors: Vec<String> = schema
            .iter_errors(input)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() { format!("input: {e}") } else { format!("input{at}: {e}") }
            })
            .collect();
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

pub struct Step {
    pub(crate) id: String,
    /// The id, shared (it goes on the step's spans).
    pub(crate) shared_id: Arc<str>,
    pub(crate) kind: StepKind,
    pub(crate) needs: Vec<Need>,
    /// Every step this one depends on, directly or not: the only steps its
    /// templates can see.
    pub(crate) upstream: FixedBitSet,
    /// For a step that chooses a path: the paths it may choose.
    pub(crate) paths: Option<BTreeSet<String>>,
    pub(crate) dependents: Vec<usize>,
    pub(crate) join: Join,
    pub(crate) when: Option<Expr>,
    pub(crate) retry: RetryPolicy,
    pub(crate) timeout: Option<Duration>,
    pub(crate) on_error: OnError,
    /// Hex SHA-256 of the step as written (id, kind, with, needs, join,
    /// when, retry, timeout, on_error) and, for a `map` or `workflow` step,
    /// of the workflow it calls: equal fingerprints mean the same step, so
    /// `runs rerun` may reuse its result. Computed at compile, never stored.
    pub(crate) fingerprint: String,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step").field("id", &self.id).field("kind", &self.kind.name()).finish()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Need {
    pub step: usize,
    /// For a need on a `switch`: the path that must have been picked.
    pub path: Option<String>,
}

/// The child workflows of an agent's workflow tools, by tool name.
pub(crate) type ToolWorkflows = std::collections::BTreeMap<String, Arc<Workflow>>;

pub(crate) enum StepKind {
    /// `tools`: the workflows an `agent` may run, by tool name.
    Action {
        step: Arc<dyn DynStep>,
        with: ValueTemplate,
        tools: Option<Arc<ToolWorkflows>>,
    },
    Switch {
        cases: Vec<(Expr, String)>,
        default: Option<String>,
    },
    Map {
        items: ValueTemplate,
        concurrency: usize,
        input: Option<ValueTemplate>,
        child: Arc<Workflow>,
    },
    Call {
        child: Arc<Workflow>,
        input: ValueTemplate,
    },
}

impl StepKind {
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Action { step, .. } => step.kind(),
            StepKind::Switch { .. } => "switch",
            StepKind::Map { .. } => "map",
            StepKind::Call { .. } => "workflow",
        }
    }
}

/// Retry policy of a step. Only errors marked retryable are retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub multiplier: f64,
    pub max_delay: Duration,
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            jitter: 0.0,
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `failed_attempt + 1`, without jitter:
    /// `initial * multiplier^(failed_attempt-1)`, clamped to `max_delay`. The
    /// arithmetic is in f64 and clamped, so huge attempt counts cannot overflow.
    pub fn base_delay(&self, failed_attempt: u32) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(1_000) as i32;
        let ms = self.initial_delay.as_millis() as f64 * self.multiplier.powi(exp);
        let max = self.max_delay.as_millis() as f64;
        let ms = if ms.is_finite() { ms.min(max) } else { max };
        Duration::from_millis(ms.max(0.0) as u64)
    }

    /// The delay with jitter applied; `unit` is a random number in [0, 1).
    pub fn delay(&self, failed_attempt: u32, unit: f64) -> Duration {
        let base = self.base_delay(failed_attempt).as_millis() as f64;
        let spread = base * self.jitter * (2.0 * unit - 1.0);
        let ms = (base + spread).clamp(0.0, self.max_delay.as_millis() as f64);
        Duration::from_millis(ms as u64)
    }
}

/// Every file a definition was compiled from, so a run can be resumed even
/// when the files on disk changed. Keys are paths relative to the root file's
/// folder.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    pub root: String,
    pub files: BTreeMap<String, String>,
}

/// A compiled root workflow with the sources it came from.
#[derive(Debug, Clone)]
pub struct Definition {
    pub workflow: Arc<Workflow>,
    pub bundle: Arc<Bundle>,
    /// SHA-256 of the bundle, hex: identifies the definition in the store.
    pub hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_clamps_without_overflow() {
        let p = RetryPolicy {
            max_attempts: u32::MAX,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_secs(10),
            jitter: 0.0,
        };
        assert_eq!(p.base_delay(1), Duration::from_millis(100));
        assert_eq!(p.base_delay(2), Duration::from_millis(200));
        assert_eq!(p.base_delay(4), Duration::from_millis(800));
        assert_eq!(p.base_delay(u32::MAX), Duration::from_secs(10));
        let jittered = RetryPolicy { jitter: 0.5, ..p };
        assert_eq!(jittered.delay(2, 0.0), Duration::from_millis(100));
        assert_eq!(jittered.delay(2, 0.5), Duration::from_millis(200));
        assert_eq!(jittered.delay(u32::MAX, 0.99), Duration::from_secs(10));
    }
}
