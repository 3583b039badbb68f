//! The step trait: typed for authors, erased once for the engine.

use std::future::Future;
use std::pin::Pin;

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::context::StepContext;
use crate::error::{ConfigIssue, StepError, StepResult};

/// A kind of step. `KIND` is persisted in workflow files and journals: treat it
/// as a durable contract.
pub trait Step: Send + Sync + 'static {
    const KIND: &'static str;
    /// Parsed from the step's `with` block (`deny_unknown_fields` is advised).
    type Config: DeserializeOwned + Send + 'static;
    type Output: Serialize + Send;

    /// Extra checks beyond parsing, run at compile time.
    fn check(_config: &Self::Config) -> Vec<ConfigIssue> {
        Vec::new()
    }

    /// The paths a step of this kind may choose, if it chooses one (like a
    /// `switch`): its output then has `path` set to one of them, and later
    /// steps can need `step.path`. `None` for kinds that choose no path.
    fn paths(_config: &Self::Config) -> Option<Vec<String>> {
        None
    }

    fn run(&self, config: Self::Config, ctx: &mut StepContext)
    -> impl Future<Output = StepResult<Self::Output>> + Send;
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe form of [`Step`] that the engine stores and calls.
pub trait DynStep: Send + Sync {
    fn kind(&self) -> &'static str;
    /// Parses and checks a `with` block whose strings are still templates.
    fn check(&self, with: &Value) -> Vec<ConfigIssue>;
    /// The paths this step may choose (see [`Step::paths`]), from its
    /// unrendered `with` block; `None` if it chooses none or does not parse.
    fn paths(&self, with: &Value) -> Option<Vec<String>>;
    /// Runs the step on a rendered `with` block.
    fn run<'a>(&'a self, with: Value, ctx: &'a mut StepContext) -> BoxFuture<'a, StepResult>;
}

/// Parses a config, naming the field at fault (`timeout`, `headers.x`).
fn parse<C: DeserializeOwned>(with: Value) -> Result<C, ConfigIssue> {
    serde_path_to_error::deserialize(with).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ConfigIssue::new(path, e.into_inner().to_string())
    })
}

impl<S: Step> DynStep for S {
    fn kind(&self) -> &'static str {
        S::KIND
    }

    fn check(&self, with: &Value) -> Vec<ConfigIssue> {
        match parse::<S::Config>(with.clone()) {
            Ok(config) => S::check(&config),
            Err(issue) => vec![issue],
        }
    }

    fn paths(&self, with: &Value) -> Option<Vec<String>> {
        parse::<S::Config>(with.clone()).ok().and_then(|config| S::paths(&config))
    }

    fn run<'a>(&'a self, with: Value, ctx: &'a mut StepContext) -> BoxFuture<'a, StepResult> {
        Box::pin(async move {
            let config = parse::<S::Config>(with).map_err(|i| {
                let at = if i.path.is_empty() { "with".to_owned() } else { format!("with.{}", i.path) };
                StepError::fatal("config", format!("{at}: {}", i.message))
            })?;
            let output = Step::run(self, config, ctx).await?;
            serde_json::to_value(output).map_err(|e| StepError::fatal("encode", format!("output: {e}")).into())
        })
    }
}
