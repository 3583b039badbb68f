//! Child runs: a `workflow` step runs one, a `map` step one per item. A child
//! is a run of its own (own journal, id `{parent}/{step}` or
//! `{parent}/{step}/{index}`), driven inside its parent's step attempt and
//! fenced by the root's lease. Ids are deterministic, so a parent step that
//! runs again after a crash finds its children and continues them.

use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use switchyard_steps::{StepContext, StepError, StepResult, Stop};

use super::Inner;
use super::driver::{DriveError, Driver, ItemInputs, Outcome, RunRef};
use super::writer::CommitError;
use crate::journal::{Encoded, Event, RunStatus};
use crate::store::{Fence, JournalEntry, NewRun, Write};
use crate::workflow::Workflow;

#[derive(Debug, Clone)]
pub(crate) struct Parent {
    pub run: String,
    pub definition: Arc<str>,
    pub fence: Fence,
}

fn engine_error(e: impl std::fmt::Display) -> Stop {
    Stop::Error(StepError::retryable("engine", e.to_string()))
}

fn child_failed(id: &str, error: Option<StepError>) -> Stop {
    let message = error.map(|e| format!("{}: {}", e.code, e.message)).unwrap_or_default();
    Stop::Error(StepError::fatal("child_failed", format!("child run {id} failed: {message}")))
}

fn cancelled(id: &str) -> Stop {
    Stop::Error(StepError::fatal("cancelled", format!("child run {id} was cancelled")))
}

/// Runs (or continues) child run `id` to its end and returns its result.
pub(crate) async fn run_child(
    inner: &Arc<Inner>,
    parent: &Parent,
    id: String,
    wf: Arc<Workflow>,
    input: Value,
    ctx: &StepContext,
) -> StepResult {
    if let Err(errors) = wf.check_input(&input) {
        return Err(StepError::fatal("invalid_input", errors.join("; ")).into());
    }
    loop {
        // A child created just now is driven from the journal it was created
        // with; an existing one is loaded.
        let mut created = None;
        match inner.store.run(&id).await.map_err(engine_error)? {
            None => {
                let run = NewRun {
                    id: id.clone(),
                    root_id: parent.fence.root.clone(),
                    parent_id: Some(parent.run.clone()),
                    workflow: wf.name().to_owned(),
                    version: wf.version(),
                    definition: parent.definition.to_string(),
                    status: RunStatus::Running,
                    input: input.clone(),
                    owner: None,
                    epoch: 0,
                    lease_until: None,
                    idempotency_key: None,
                };
                let started =
                    Event::RunStarted { workflow: wf.name().to_owned(), version: wf.version(), input: input.clone() };
                let now = inner.clock.now_ms();
                created = Some(vec![JournalEntry { seq: 0, at: now, event: started.clone() }]);
                let write =
                    Write::Create { fence: Some(parent.fence.clone()), run, events: vec![Encoded::new(now, &started)] };
                inner.writer.commit(write).await.map_err(engine_error)?;
            }
            Some(r) if r.status == RunStatus::Succeeded => return Ok(r.output.unwrap_or(Value::Null)),
            Some(r) if r.status == RunStatus::Failed => return Err(child_failed(&id, r.error)),
            Some(r) if r.status == RunStatus::Cancelled => return Err(cancelled(&id)),
            Some(_) => {}
        }
        let run = RunRef {
            id: id.clone(),
            is_root: false,
            definition: parent.definition.clone(),
            fence: parent.fence.clone(),
            cancelled_by: Arc::default(),
        };
        let driver = match created {
            Some(entries) => Driver::from_journal(inner.clone(), run, wf.clone(), ctx.cancel_token(), &entries),
            None => Driver::load(inner.clone(), run, wf.clone(), ctx.cancel_token()).await,
        }
        .map_err(engine_error)?;
        match driver.drive().await {
            Ok(Outcome::Finished { status: RunStatus::Succeeded, output, .. }) => {
                return Ok(output.unwrap_or(Value::Null));
            }
            Ok(Outcome::Finished { status: RunStatus::Cancelled, .. }) => return Err(cancelled(&id)),
            Ok(Outcome::Finished { error, .. }) => return Err(child_failed(&id, error)),
            Ok(Outcome::Parked { wake_at }) => {
                // The child waits for a timer; so does this attempt.
                tokio::select! {
                    _ = inner.clock.sleep_until(wake_at) => {}
                    _ = ctx.cancelled() => {}
                }
            }
            Err(DriveError::Commit(CommitError::Fenced(root))) => {
                return Err(Stop::Error(StepError::fatal("fenced", format!("lease of run {root} lost"))));
            }
            Err(e) => return Err(engine_error(e)),
        }
    }
}

/// Runs one child per input with at most `concurrency` at once; outputs in
/// input order. Stops at the first failed child (the others keep their
/// journals and continue when the step runs again).
pub(crate) async fn run_map(
    inner: &Arc<Inner>,
    parent: &Parent,
    wf: Arc<Workflow>,
    items: Vec<Value>,
    inputs: &ItemInputs,
    concurrency: usize,
    ctx: &StepContext,
) -> StepResult {
    let step = ctx.step_id().to_owned();
    let outputs: Vec<Value> = futures::stream::iter(items.into_iter().enumerate())
        .map(|(index, item)| {
            let id = format!("{}/{step}/{index}", parent.run);
            let wf = wf.clone();
            async move {
                let input = inputs.render(index, item)?;
                run_child(inner, parent, id, wf, input, ctx).await
            }
        })
        .buffered(concurrency)
        .try_collect()
        .await?;
    Ok(Value::Array(outputs))
}
