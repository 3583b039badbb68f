//! Child runs: a `workflow` step runs one, a `map` step one per item. A child
//! is a run of its own (own journal, id `{parent}/{step}` or
//! `{parent}/{step}/{index}`), driven inside its parent's step attempt and
//! fenced by the root's lease. Ids are deterministic, so a parent step that
//! runs again after a crash finds its children and continues them.

use std::sync::Arc;

use serde_json::Value;
use switchyard_steps::{StepContext, StepError, StepResult, Stop};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Inner;
use super::driver::{DriveError, Driver, ItemInputs, Outcome, RunRef, nudged};
use super::writer::CommitError;
use crate::journal::{Encoded, Event, RunStatus};
use crate::store::{Fence, JournalEntry, NewRun, Write};
use crate::workflow::Workflow;
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub(crate) struct Parent {
    pub run: String,
    pub definition: Arc<str>,
    pub fence: Fence,
    /// Changes when a signal may have arrived in the root's tree.
    pub nudge: watch::Receiver<u64>,
    /// The span of the parent's attempt (child runs' spans hang under it).
    pub span: Option<switchyard_observability::SpanContext>,
    /// No content of the child goes on spans.
    pub confidential: bool,
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

/// Where one drive of a child run left it.
enum ChildEnd {
    Done(Value),
    /// Parked until `Some(time)`, or until a signal.
    Parked(Option<i64>),
}

/// Runs (or continues) child run `id` until it finishes or parks. `input`
/// is asked for only if the child does not exist yet.
async fn drive_child(
    inner: &Arc<Inner>,
    parent: &Parent,
    id: String,
    wf: &Arc<Workflow>,
    input: impl FnOnce() -> Result<Value, Stop>,
    cancel: CancellationToken,
) -> Result<ChildEnd, Stop> {
    // A child created just now is driven from the journal it was created
    // with; an existing one is loaded.
    let mut created = None;
    match inner.store.run(&id).await.map_err(engine_error)? {
        None => {
            let input = input()?;
            if let Err(errors) = wf.check_input(&input) {
                return Err(StepError::fatal("invalid_input", errors.join("; ")).into());
            }
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
                lease: None,
                idempotency_key: None,
            };
            let started =
                Event::RunStarted { workflow: wf.name().to_owned(), version: wf.version(), input, trace: None };
            let now = inner.clock.now_ms();
            let write =
                Write::Create { fence: Some(parent.fence.clone()), run, events: vec![Encoded::new(now, &started)] };
            created = Some(vec![JournalEntry { seq: 0, at: now, event: started }]);
            inner.writer.commit(write).await.map_err(engine_error)?;
        }
        Some(r) if r.status == RunStatus::Succeeded => return Ok(ChildEnd::Done(r.output.unwrap_or(Value::Null))),
        Some(r) if r.status == RunStatus::Failed => return Err(child_failed(&id, r.error)),
        Some(r) if r.status == RunStatus::Cancelled => return Err(cancelled(&id)),
        // Parked and not due: nothing to do until it is woken.
        Some(r) if r.status == RunStatus::Waiting && r.wake_at.is_none_or(|at| at > inner.clock.now_ms()) => {
            return Ok(ChildEnd::Parked(r.wake_at));
        }
        Some(_) => {}
    }
    let run = RunRef {
        id: id.clone(),
        is_root: false,
        definition: parent.definition.clone(),
        fence: parent.fence.clone(),
        cancelled_by: Arc::default(),
        nudge: parent.nudge.clone(),
        trace: super::telemetry::TraceParent::Child { span: parent.span, confidential: parent.confidential },
    };
    let driver = match created {
        Some(entries) => Driver::from_journal(inner.clone(), run, wf.clone(), cancel, &entries),
        None => Driver::load(inner.clone(), run, wf.clone(), cancel).await,
    }
    .map_err(engine_error)?;
    match driver.drive().await {
        Ok(Outcome::Finished { status: RunStatus::Succeeded, output, .. }) => {
            Ok(ChildEnd::Done(output.unwrap_or(Value::Null)))
        }
        Ok(Outcome::Finished { status: RunStatus::Cancelled, .. }) => Err(cancelled(&id)),
        Ok(Outcome::Finished { error, .. }) => Err(child_failed(&id, error)),
        Ok(Outcome::Parked { wake_at }) => Ok(ChildEnd::Parked(wake_at)),
        Err(DriveError::Commit(CommitError::Fenced(root))) => {
            Err(Stop::Error(StepError::fatal("fenced", format!("lease of run {root} lost"))))
        }
        Err(e) => Err(engine_error(e)),
    }
}

/// Runs (or continues) the child run of a `workflow` step. A child that
/// parks (a long sleep, a signal) suspends the step too: the parent parks
/// and holds nothing while the child waits.
pub(crate) async fn run_child(
    inner: &Arc<Inner>,
    parent: &Parent,
    id: String,
    wf: Arc<Workflow>,
    input: Value,
    ctx: &StepContext,
) -> StepResult {
    match drive_child(inner, parent, id, &wf, || Ok(input), ctx.cancel_token()).await? {
        ChildEnd::Done(output) => Ok(output),
        ChildEnd::Parked(until_ms) => Err(Stop::Wait { signal: None, until_ms }),
    }
}

/// The workflow tools of an `agent` step: each call is a child run whose
/// id is the call's key (`{run}/{step}/tool/{n}`), so a step called again
/// after a crash finds it and continues it instead of starting another.
pub(crate) struct ToolRuns {
    pub inner: Arc<Inner>,
    pub parent: Parent,
    pub tools: Arc<crate::workflow::ToolWorkflows>,
}

#[async_trait::async_trait]
impl switchyard_steps::Workflows for ToolRuns {
    async fn run(&self, name: &str, key: &str, input: Value, cancel: CancellationToken) -> StepResult<Value> {
        let Some(wf) = self.tools.get(name) else {
            return Err(StepError::fatal("engine", format!("no workflow for tool {name:?}")).into());
        };
        if !key.starts_with(&format!("{}/", self.parent.run)) {
            return Err(StepError::fatal("engine", format!("tool run {key:?} is not under its run")).into());
        }
        match drive_child(&self.inner, &self.parent, key.to_owned(), wf, || Ok(input), cancel).await? {
            ChildEnd::Done(output) => Ok(output),
            ChildEnd::Parked(until_ms) => Err(Stop::Wait { signal: None, until_ms }),
        }
    }
}

/// The map stops early (a child failed, or the run is cancelled): when
/// cancelled, the other children end `cancelled` on their own and are
/// waited for, so none is left half-written; otherwise they are stopped
/// where they are (their journals let them continue when the step runs
/// again).
async fn stop_children(running: &mut JoinSet<(usize, Result<ChildEnd, Stop>)>, ctx: &StepContext) {
    if ctx.is_cancelled() {
        while running.join_next().await.is_some() {}
    } else {
        running.shutdown().await;
    }
}

/// How long a map whose children all wait lingers for another signal before
/// it (and its run) parks.
const LINGER: std::time::Duration = std::time::Duration::from_millis(200);

/// A map's parked children: how many, and the wake-up times of those that
/// have one (one timer for the map: the soonest).
#[derive(Default)]
struct ParkedSet {
    count: usize,
    timers: std::collections::BTreeSet<(i64, usize)>,
}

impl ParkedSet {
    fn add(&mut self, child: usize, at: Option<i64>) {
        self.count += 1;
        if let Some(at) = at {
            self.timers.insert((at, child));
        }
    }

    fn remove(&mut self, child: usize, at: Option<i64>) {
        self.count -= 1;
        if let Some(at) = at {
            self.timers.remove(&(at, child));
        }
    }

    fn soonest(&self) -> Option<i64> {
        self.timers.first().map(|&(at, _)| at)
    }

    /// The children whose time has come; their timers are done (they stay
    /// counted as parked until they start).
    fn take_due(&mut self, now: i64) -> Vec<usize> {
        let later = self.timers.split_off(&(now.saturating_add(1), 0));
        std::mem::replace(&mut self.timers, later).into_iter().map(|(_, child)| child).collect()
    }
}

/// A map child as the map step tracks it: a few bytes each, so a map of
/// many parked children holds little.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Child {
    /// Not created yet, or to be driven (unfinished, due).
    ToRun,
    Running,
    /// Parked until this time, or a signal.
    Parked(Option<i64>),
    Done,
}

/// Runs one child per item with at most `concurrency` of them running at
/// once; parked children (a sleep, a signal) do not count against it. When
/// every unfinished child is parked, the step waits too (one wake-up time,
/// the soonest), and the run above it can park. Outputs in item order.
/// Stops at the first failed child (the others keep their journals and
/// continue when the step runs again).
pub(crate) async fn run_map(
    inner: &Arc<Inner>,
    parent: &Parent,
    wf: Arc<Workflow>,
    items: Vec<Value>,
    inputs: Arc<ItemInputs>,
    concurrency: usize,
    ctx: &StepContext,
) -> StepResult {
    let prefix = format!("{}/{}/", parent.run, ctx.step_id());
    let index_of = |id: &str| id.strip_prefix(&prefix).and_then(|rest| rest.split('/').next()?.parse::<usize>().ok());
    let n = items.len();
    let mut items: Vec<Option<Value>> = items.into_iter().map(Some).collect();
    let mut children = vec![Child::ToRun; n];
    let mut parked = ParkedSet::default();
    let mut outputs: Vec<Option<Value>> = vec![None; n];
    // What the store knows (children made before a crash or a park).
    let now = inner.clock.now_ms();
    for child in inner.store.child_states(&parent.run).await.map_err(engine_error)? {
        let Some(index) = index_of(&child.id).filter(|&i| i < n) else { continue };
        children[index] = match child.status {
            RunStatus::Succeeded => Child::Done,
            RunStatus::Waiting if child.wake_at.is_none_or(|at| at > now) => {
                parked.add(index, child.wake_at);
                Child::Parked(child.wake_at)
            }
            // Failed and cancelled children fail the step when driven.
            _ => Child::ToRun,
        };
    }
    // Children that are due, in item order; `next` scans for the rest.
    let mut woken: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    let mut next = 0;
    // Each child is driven in a task of its own, so the loop below can wait
    // on the store (after a nudge) while the children go on.
    let mut running: JoinSet<(usize, Result<ChildEnd, Stop>)> = JoinSet::new();
    let mut nudge = parent.nudge.clone();
    // A nudge says some child may have been signalled; which ones is read
    // from the store only when there is room to drive one and none is
    // already known, so a burst of signals costs a few reads, not one each.
    let mut look = false;
    let mut queued = vec![false; n];
    loop {
        if look && woken.is_empty() && running.len() < concurrency {
            look = false;
            for id in inner.store.signalled(&parent.fence.root).await.map_err(engine_error)? {
                if let Some(i) = index_of(&id).filter(|&i| i < n)
                    && matches!(children[i], Child::Parked(_))
                    && !std::mem::replace(&mut queued[i], true)
                {
                    woken.push_back(i);
                }
            }
        }
        while running.len() < concurrency && !ctx.is_cancelled() {
            let index = match woken.pop_front() {
                Some(i) => {
                    queued[i] = false;
                    i
                }
                None => {
                    while next < n && children[next] != Child::ToRun {
                        next += 1;
                    }
                    if next == n {
                        break;
                    }
                    next
                }
            };
            match children[index] {
                Child::ToRun => {}
                Child::Parked(at) => parked.remove(index, at),
                Child::Running | Child::Done => continue,
            }
            children[index] = Child::Running;
            let item = items[index].take();
            let id = format!("{prefix}{index}");
            let (inner, parent, wf, inputs, cancel) =
                (inner.clone(), parent.clone(), wf.clone(), inputs.clone(), ctx.cancel_token());
            running.spawn(async move {
                let input = || inputs.render(index, item.unwrap_or(Value::Null)).map_err(Stop::Error);
                (index, drive_child(&inner, &parent, id, &wf, input, cancel).await)
            });
        }
        if running.is_empty() && look && !ctx.is_cancelled() {
            // Nudged after the last look: look again before waiting.
            continue;
        }
        if running.is_empty() {
            if ctx.is_cancelled() {
                return Err(Stop::Error(StepError::fatal("cancelled", "the run was cancelled")));
            }
            if parked.count > 0 {
                let until_ms = parked.soonest();
                // Signals often come in bursts (a batch approved at once):
                // before the run parks and is loaded again for each one,
                // wait a moment for the next.
                tokio::select! {
                    _ = nudged(&mut nudge) => {
                        look = true;
                        continue;
                    }
                    _ = tokio::time::sleep(LINGER) => {}
                    _ = ctx.cancelled() => continue,
                }
                return Err(Stop::Wait { signal: None, until_ms });
            }
            break;
        }
        let sleep = async {
            match parked.soonest() {
                Some(at) => inner.clock.sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(joined) = running.join_next() => match joined {
                Err(e) => {
                    stop_children(&mut running, ctx).await;
                    return Err(engine_error(format!("a child run's task failed: {e}")));
                }
                Ok((_, Err(stop))) => {
                    stop_children(&mut running, ctx).await;
                    return Err(stop);
                }
                Ok((index, Ok(ChildEnd::Done(output)))) => {
                    children[index] = Child::Done;
                    outputs[index] = Some(output);
                }
                Ok((index, Ok(ChildEnd::Parked(at)))) => {
                    parked.add(index, at);
                    children[index] = Child::Parked(at);
                }
            },
            _ = sleep => {
                for i in parked.take_due(inner.clock.now_ms()) {
                    if !std::mem::replace(&mut queued[i], true) {
                        woken.push_back(i);
                    }
                }
            }
            _ = nudged(&mut nudge) => look = true,
        }
    }
    // Every child succeeded: outputs of those finished before this call
    // come from the store.
    if outputs.iter().any(Option::is_none) {
        for run in inner.store.children(&parent.run).await.map_err(engine_error)? {
            if let Some(i) = index_of(&run.id).filter(|&i| i < n)
                && outputs[i].is_none()
            {
                outputs[i] = Some(run.output.unwrap_or(Value::Null));
            }
        }
    }
    Ok(Value::Array(outputs.into_iter().map(|o| o.unwrap_or(Value::Null)).collect()))
}
