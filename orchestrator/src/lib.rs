//! Switchyard orchestrator: from workflow file to durable run.
//!
//! - [`spec`]: the file as written ([`spec::Spec`], serde).
//! - [`compile`]: `Spec` -> [`Workflow`], reporting every error with its place.
//! - [`expr`]: sandboxed minijinja expressions and value templates.
//! - [`journal`]: the event vocabulary of a run ([`journal::Event`]).
//! - [`store`]: the durable state behind the [`store::Store`] trait (SQLite now).
//! - [`engine`]: [`Engine`] drives runs: group-committed journal, leases and
//!   fencing, durable timers, child runs, cancellation and resume.
//! - [`cli`]: the `switchyard` command; [`bench`]: the benchmark workloads.

pub mod bench;
pub mod cli;
pub mod compile;
pub mod engine;
pub mod expr;
pub mod files;
pub mod journal;
pub mod limits;
pub mod report;
pub mod spec;
pub mod store;
pub mod vault;
pub mod workflow;

use std::sync::Arc;

use switchyard_steps::Registry;
use switchyard_steps::http::HttpClient;
use switchyard_steps::kinds::{Agent, Decide, Fail, Http, Llm, Sleep, Transform, Wait};
use switchyard_steps::llm::LanguageModel;

pub use engine::{Engine, EngineOptions, RunOutcome};
pub use workflow::{Definition, Workflow};

/// The step kinds this build knows, on the ports they use.
pub fn registry(http: Arc<dyn HttpClient>, models: Arc<dyn LanguageModel>) -> Registry {
    Registry::new()
        .with(Transform)
        .with(Http::new(Arc::clone(&http)))
        .with(Sleep)
        .with(Wait)
        .with(Fail)
        .with(Llm::new(Arc::clone(&models)))
        .with(Decide::new(Arc::clone(&models)))
        .with(Agent::new(models, http))
}

/// The step kinds on ports that reach nothing (no network, no model): for
/// checking files and for benchmarks of the engine alone.
pub fn offline_registry() -> Registry {
    registry(Arc::new(switchyard_steps::http::Offline), Arc::new(switchyard_steps::llm::NoModels))
}
