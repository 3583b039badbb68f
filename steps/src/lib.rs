//! Switchyard steps: what a step is and the step kinds that do work.
//!
//! - [`Step`] is the typed trait a step author implements (`KIND`, `Config`,
//!   `run`); [`DynStep`] is the object-safe form the engine calls, produced by a
//!   blanket impl. A step's `Config` is parsed from the workflow file's `with`
//!   block at compile time (to report bad configs early) and again from the
//!   rendered `with` at run time.
//! - [`Registry`] is the readable list of kinds the engine knows.
//! - [`StepContext`] is what a running step sees: its run, attempt, idempotency
//!   key, clock, cancellation, and [`StepContext::journaled`] for sub-operations
//!   that are recorded once and replayed on resume.
//! - Ports a step needs ([`http::HttpClient`], [`Clock`]) live here; adapters live
//!   in `switchyard-integrations`. Steps never see a credential.
//!
//! Control-flow kinds (`switch`, `map`, `workflow`) belong to the orchestrator,
//! because they steer the run itself.

pub mod clock;
pub mod context;
pub mod duration;
pub mod error;
pub mod http;
pub mod kinds;
pub mod llm;
pub mod registry;
pub mod step;

pub use clock::{Clock, ManualClock, SystemClock};
pub use context::{OpSink, RecordedOp, Signal, Signals, StepContext, TokenMeter, Workflows};
pub use error::{ConfigIssue, StepError, StepResult, Stop};
pub use registry::Registry;
pub use step::{DynStep, Step};
