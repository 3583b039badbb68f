//! The workflow file as written: parsed with serde, not yet checked.
//! [`crate::compile`] turns a [`Spec`] into a [`crate::Workflow`].

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: String,
    #[serde(default = "one")]
    pub version: u32,
    #[serde(default)]
    pub description: String,
    /// JSON Schema for the run input, checked when a run starts.
    #[serde(default)]
    pub input: Option<Value>,
    /// At most this many runs of this workflow execute at once; others queue.
    #[serde(default)]
    pub concurrency: Option<u32>,
    pub steps: Vec<StepSpec>,
    /// The run's result: a value template (see README).
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub limits: LimitsSpec,
    /// Content (inputs, outputs, prompts, answers) never goes on spans, not
    /// even with `SWITCHYARD_OTEL_CAPTURE_CONTENT=true`; its child
    /// workflows are confidential too.
    #[serde(default)]
    pub confidential: bool,
}

/// What one run may use.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Model tokens (input and output) the run may use; a model call that
    /// would start beyond it fails with `budget_exceeded`.
    #[serde(default)]
    pub llm_tokens: Option<u64>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    pub id: String,
    pub kind: String,
    #[serde(default, rename = "with")]
    pub with: Option<Value>,
    #[serde(default)]
    pub needs: Vec<String>,
    #[serde(default)]
    pub join: Join,
    /// A boolean expression; false skips the step.
    #[serde(default)]
    pub when: Option<String>,
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub on_error: OnError,
}

/// How a step treats its needs: `all` (default) runs only when every need
/// completed on the path it names; `any` runs when at least one did, which is
/// how branches join again after a `switch`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Join {
    #[default]
    All,
    Any,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    #[default]
    Fail,
    Continue,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_initial")]
    pub initial_delay: String,
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    #[serde(default = "default_max_delay")]
    pub max_delay: String,
    /// Fraction of the delay added or removed at random, 0 to 1.
    #[serde(default)]
    pub jitter: f64,
}

fn default_attempts() -> u32 {
    3
}
fn default_initial() -> String {
    "1s".into()
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_max_delay() -> String {
    "5m".into()
}

/// Parses YAML or JSON (JSON is YAML, but a `.json` file gets JSON's errors).
///
/// YAML is parsed under a budget (nesting depth, node count, aliases), so a
/// hostile file is rejected in time linear in its size; a key repeated in one
/// mapping is an error. Only `true` and `false` are booleans (YAML 1.2), so
/// `n:` or `country: no` stay strings. Messages carry line and column, and no
/// source snippet.
pub fn parse(source: &str, is_json: bool) -> Result<Spec, String> {
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    if is_json {
        serde_json::from_str(source).map_err(|e| e.to_string())
    } else {
        // Both are non-exhaustive: start from the defaults and set fields.
        let mut budget = serde_saphyr::Budget::default();
        budget.max_depth = MAX_DEPTH;
        budget.max_documents = 1;
        budget.max_nodes = 1_000_000;
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(budget);
        options.duplicate_keys = serde_saphyr::options::DuplicateKeyPolicy::Error;
        options.with_snippet = false;
        // YAML 1.2 booleans only: `n`, `no`, `on`, `y` stay strings.
        options.strict_booleans = true;
        // The library suggests changing its options; that is not the
        // user's to do.
        serde_saphyr::from_str_with_options(source, options)
            .map_err(|e| e.to_string().replace(", set DuplicateKeyPolicy in Options if acceptable", ""))
    }
}

/// Deepest nesting of mappings and lists in a workflow file.
pub const MAX_DEPTH: usize = 64;
