//! Drives one run: folds its journal into step states, starts ready steps,
//! journals their results and finishes, parks or hands back the run.
//!
//! A driver lives only while the run has work; a run whose only pending work
//! is a timer further away than the park threshold is parked (no task, no
//! lease) and driven again by the engine's timer when due.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use minijinja::Value as MjValue;
use serde_json::{Value, json};
use switchyard_steps::{RecordedOp, Signal, Signals, StepContext, StepError, StepResult, Stop, TokenMeter};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Inner;
use super::child;
use super::journal_handle::{RunJournal, StepOps};
use super::telemetry::{RunTelemetry, TraceParent};
use super::writer::CommitError;
use crate::expr::ValueTemplate;
use crate::journal::{Event, RunStatus};
use crate::spec::{Join, OnError};
use crate::store::{self, Fence, JournalEntry, RunUpdate, WaitChange};
use crate::workflow::{StepKind, Workflow};
use crate::{expr, limits};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pending,
    /// Must be (re)started: in flight at a crash, or resumed.
    Ready,
    Running,
    /// Waiting for `due` (a sleep).
    Suspended,
    /// Waiting for `due` (retry backoff).
    Backoff,
    /// Waiting for a signal (`signal`), or for a child run it drives to be
    /// woken; at most until `due`.
    Waiting,
    Succeeded,
    /// Failed with `on_error: continue`: completed, output is the error.
    Continued,
    Failed,
    Skipped,
}

impl Status {
    fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Continued | Status::Failed | Status::Skipped)
    }
    fn name(self) -> &'static str {
        match self {
            Status::Pending | Status::Ready => "pending",
            Status::Running => "running",
            Status::Suspended | Status::Backoff | Status::Waiting => "waiting",
            Status::Succeeded => "succeeded",
            Status::Continued | Status::Failed => "failed",
            Status::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone)]
struct StepState {
    status: Status,
    attempt: u32,
    /// Attempts made before the run was last resumed; the retry budget counts
    /// from here.
    budget_start: u32,
    output: Option<Value>,
    /// Sub-operations journaled by the current attempt (replayed when it is
    /// called again); shared with the attempt's op sink.
    ops: Arc<Mutex<Vec<RecordedOp>>>,
    /// Operations of the attempt in flight not yet sent: written with its
    /// result (see `StepOps`).
    unsent: Arc<Mutex<Vec<Event>>>,
    due: Option<i64>,
    /// `{output, status}` for templates, built once when the step completes.
    view: Option<MjValue>,
    /// Its last attempt was started by a driver that stopped before it ended
    /// (a crash): that attempt has no end in the journal yet.
    interrupted: bool,
    /// `Waiting`: the signal it waits for (`None`: its child runs).
    signal: Option<String>,
    /// `Waiting`: call it again now (its signal came, or its children may
    /// have been woken).
    woken: bool,
    /// The wait last journaled for the current attempt, so calling the step
    /// again without anything new does not journal it twice.
    journaled_wait: Option<(Option<String>, Option<i64>)>,
}

impl StepState {
    fn new() -> Self {
        Self {
            status: Status::Pending,
            attempt: 0,
            budget_start: 0,
            output: None,
            ops: Arc::default(),
            unsent: Arc::default(),
            due: None,
            view: None,
            interrupted: false,
            signal: None,
            woken: false,
            journaled_wait: None,
        }
    }
    fn complete(&mut self, status: Status, output: Option<Value>) {
        self.status = status;
        self.view =
            Some(expr::from_json(&json!({ "output": output.clone().unwrap_or(Value::Null), "status": status.name() })));
        self.output = output;
        self.due = None;
        self.signal = None;
        self.woken = false;
        self.journaled_wait = None;
    }
}

/// How a drive ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Finished {
        status: RunStatus,
        output: Option<Value>,
        error: Option<StepError>,
    },
    /// `wake_at: None`: nothing is due but a signal.
    Parked {
        wake_at: Option<i64>,
    },
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum DriveError {
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("run {0}: {1}")]
    Invalid(String, String),
}

type Done = (usize, u32, StepResult);
type Launch = std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>>;

/// Which run a driver drives and the claim it writes under.
pub(crate) struct RunRef {
    pub id: String,
    pub is_root: bool,
    /// Hash of the root definition (child runs share it).
    pub definition: Arc<str>,
    pub fence: Fence,
    /// Who asked to cancel the run, once someone did (journaled with the end).
    pub cancelled_by: Arc<Mutex<Option<String>>>,
    /// Changes when a signal may have arrived for the run's tree.
    pub nudge: watch::Receiver<u64>,
    /// Where its spans hang.
    pub trace: TraceParent,
}

pub(crate) struct Driver {
    inner: Arc<Inner>,
    run_id: String,
    is_root: bool,
    definition: Arc<str>,
    wf: Arc<Workflow>,
    input_view: MjValue,
    run_view: MjValue,
    steps: Vec<StepState>,
    journal: Arc<RunJournal>,
    cancel: CancellationToken,
    running: JoinSet<Done>,
    /// Attempts decided but not started: they start only after the events
    /// that decided them (their `step_started` included) are committed.
    launches: Vec<Launch>,
    /// Events decided but not yet committed.
    pending: Vec<Event>,
    /// The run's row says `running` after the first commit of this drive.
    mark_running: bool,
    /// Set once a step failed for good: nothing new starts.
    failure: Option<StepError>,
    finished: Option<RunStatus>,
    cancelled_by: Arc<Mutex<Option<String>>>,
    /// Signals received (journaled), by name.
    signals: Signals,
    /// Model tokens the run has used, against `limits.llm_tokens`.
    tokens: Arc<TokenMeter>,
    /// Wait changes decided but not yet committed (with `pending`).
    waits: Vec<WaitChange>,
    /// A step started waiting for a signal: look for one sent before.
    look_for_signals: bool,
    nudge: watch::Receiver<u64>,
}

impl Driver {
    /// Loads a run from its journal.
    pub async fn load(
        inner: Arc<Inner>,
        run: RunRef,
        wf: Arc<Workflow>,
        cancel: CancellationToken,
    ) -> Result<Self, DriveError> {
        let entries = inner.store.journal(&run.id).await?;
        let mut driver = Self::from_journal(inner, run, wf, cancel, &entries)?;
        // Signals sent while nobody drove the run.
        driver.receive_signals().await?;
        Ok(driver)
    }

    /// Builds the driver from a journal already in hand (a run just created).
    pub fn from_journal(
        inner: Arc<Inner>,
        run: RunRef,
        wf: Arc<Workflow>,
        cancel: CancellationToken,
        entries: &[JournalEntry],
    ) -> Result<Self, DriveError> {
        let RunRef { id: run_id, is_root, definition, fence, cancelled_by, nudge, trace } = run;
        let run_id = run_id.as_str();
        let mut input = Value::Null;
        // One state each: `vec![x; n]` would clone one `ops` Arc into all.
        let mut steps: Vec<StepState> = (0..wf.steps.len()).map(|_| StepState::new()).collect();
        let mut failure = None;
        let mut finished = None;
        let mut signals = BTreeMap::new();
        // Every model call journaled counts, including those of attempts
        // that failed later: they were paid for.
        let mut tokens_used = 0u64;
        let index = |id: &str| {
            wf.step_index(id)
                .ok_or_else(|| DriveError::Invalid(run_id.to_owned(), format!("journal names unknown step {id:?}")))
        };
        for entry in entries {
            match &entry.event {
                Event::RunStarted { input: i, .. } => input = i.clone(),
                Event::StepStarted { step, attempt } => {
                    let s = &mut steps[index(step)?];
                    s.status = Status::Running;
                    s.attempt = *attempt;
                }
                Event::StepOp { step, index: op, name, value, .. } => {
                    tokens_used = tokens_used.saturating_add(switchyard_steps::llm::tokens_of_op(name, value));
                    steps[index(step)?].ops.lock().expect("ops").push(RecordedOp {
                        index: *op,
                        name: name.clone(),
                        value: value.clone(),
                    })
                }
                Event::StepSucceeded { step, output, .. } => {
                    steps[index(step)?].complete(Status::Succeeded, Some(output.clone()))
                }
                Event::StepFailed { step, error, retry_at, continued, .. } => {
                    let s = &mut steps[index(step)?];
                    s.ops.lock().expect("ops").clear();
                    if let Some(at) = retry_at {
                        s.status = Status::Backoff;
                        s.due = Some(*at);
                    } else if *continued {
                        s.complete(Status::Continued, Some(json!({ "error": error })));
                    } else {
                        s.complete(Status::Failed, None);
                        failure = Some(step_error(step, error));
                    }
                }
                Event::StepSuspended { step, until, .. } => {
                    let s = &mut steps[index(step)?];
                    s.status = Status::Suspended;
                    s.due = Some(*until);
                }
                Event::StepWaiting { step, signal, until, .. } => {
                    let s = &mut steps[index(step)?];
                    s.status = Status::Waiting;
                    s.due = *until;
                    s.signal = signal.clone();
                    s.journaled_wait = Some((signal.clone(), *until));
                }
                Event::SignalReceived { name, payload, actor, sent_at } => {
                    let signal =
                        Signal { name: name.clone(), payload: payload.clone(), actor: actor.clone(), at: *sent_at };
                    signals.insert(name.clone(), signal);
                }
                Event::StepSkipped { step, .. } => steps[index(step)?].complete(Status::Skipped, None),
                // Copied from an earlier run (`runs rerun`): a success, whose
                // model calls this run did not pay for (not counted).
                Event::StepReused { step, output, .. } => {
                    steps[index(step)?].complete(Status::Succeeded, Some(output.clone()))
                }
                Event::RunParked { .. } => {}
                Event::CancelRequested { .. } => {}
                Event::RunResumed { .. } => {
                    failure = None;
                    finished = None;
                    for s in steps.iter_mut().filter(|s| s.status == Status::Failed) {
                        s.status = Status::Ready;
                        s.budget_start = s.attempt;
                        s.view = None;
                    }
                }
                Event::RunFinished { status, .. } => finished = Some(*status),
            }
        }
        // Steps that were in flight when the previous driver stopped run again
        // as a new attempt (their journaled ops carry over).
        for s in steps.iter_mut().filter(|s| s.status == Status::Running) {
            s.status = Status::Ready;
            s.interrupted = true;
        }
        // A step waiting for its child runs looks at them again (they may be
        // why this run was woken); one whose signal was journaled before the
        // driver stopped takes it now.
        for s in steps.iter_mut().filter(|s| s.status == Status::Waiting) {
            s.woken = s.signal.as_ref().is_none_or(|name| signals.contains_key(name));
        }
        let tokens = Arc::new(TokenMeter::new(wf.llm_tokens(), tokens_used));
        let next_seq = entries.last().map(|e| e.seq + 1).unwrap_or(0);
        let telemetry =
            RunTelemetry::fold(&inner.options.telemetry, &inner.options.prices, &wf, run_id, trace, entries);
        let journal =
            RunJournal::new(run_id.to_owned(), fence, next_seq, inner.writer.clone(), inner.clock.clone(), telemetry);
        Ok(Self {
            input_view: expr::from_json(&input),
            run_view: expr::from_json(&json!({ "id": run_id })),
            inner,
            run_id: run_id.to_owned(),
            is_root,
            definition,
            wf,
            steps,
            journal,
            cancel,
            running: JoinSet::new(),
            launches: Vec::new(),
            pending: Vec::new(),
            mark_running: true,
            failure,
            finished,
            cancelled_by,
            signals: Arc::new(signals),
            tokens,
            waits: Vec::new(),
            look_for_signals: false,
            nudge,
        })
    }

    /// Journals the signals sent to this run that it has not received yet,
    /// and wakes the steps waiting for them.
    async fn receive_signals(&mut self) -> Result<(), DriveError> {
        for signal in self.inner.store.signals(&self.run_id).await? {
            if self.signals.contains_key(&signal.name) {
                continue;
            }
            for st in self.steps.iter_mut().filter(|s| s.status == Status::Waiting) {
                if st.signal.as_deref() == Some(signal.name.as_str()) {
                    st.woken = true;
                }
            }
            self.pending.push(Event::SignalReceived {
                name: signal.name.clone(),
                payload: signal.payload.clone(),
                actor: signal.actor.clone(),
                sent_at: signal.at,
            });
            self.waits.push(WaitChange::Done { name: signal.name.clone() });
            Arc::make_mut(&mut self.signals).insert(signal.name.clone(), signal);
        }
        Ok(())
    }

    /// Something may have been signalled in the run's tree: receive what is
    /// for this run, and wake the steps whose child runs were signalled.
    async fn on_nudge(&mut self) -> Result<(), DriveError> {
        self.receive_signals().await?;
        let waiting_on_children: Vec<usize> = (0..self.steps.len())
            .filter(|&i| self.steps[i].status == Status::Waiting && self.steps[i].signal.is_none())
            .collect();
        if waiting_on_children.is_empty() {
            return Ok(());
        }
        let signalled = self.inner.store.signalled(&self.journal.fence().root).await?;
        for i in waiting_on_children {
            let prefix = format!("{}/{}", self.run_id, self.wf.steps[i].id);
            if signalled.iter().any(|id| is_under(id, &prefix)) {
                self.steps[i].woken = true;
            }
        }
        Ok(())
    }

    /// The template context of step `of` (`None`: the run's output, which
    /// sees every step): only its upstream steps, so what a template can
    /// read never depends on what else happened to have finished.
    fn context(&self, of: Option<usize>, extra: &[(&str, MjValue)]) -> MjValue {
        let mut ctx: BTreeMap<&str, MjValue> = BTreeMap::new();
        ctx.insert("input", self.input_view.clone());
        ctx.insert("steps", self.steps_view(of));
        ctx.insert("run", self.run_view.clone());
        ctx.extend(extra.iter().cloned());
        MjValue::from(ctx)
    }

    fn steps_view(&self, of: Option<usize>) -> MjValue {
        let upstream = of.map(|i| &self.wf.steps[i].upstream);
        let steps: BTreeMap<&str, MjValue> = self
            .wf
            .steps
            .iter()
            .zip(&self.steps)
            .enumerate()
            .filter(|(j, _)| upstream.is_none_or(|up| up.contains(*j)))
            .filter_map(|(_, (spec, st))| st.view.clone().map(|v| (spec.id.as_str(), v)))
            .collect();
        MjValue::from(steps)
    }

    /// Runs until the run finishes or parks. Log lines of the drive carry
    /// the run id and, when the run is traced, its trace and span ids.
    pub async fn drive(self) -> Result<Outcome, DriveError> {
        use tracing::Instrument;
        if !self.is_root {
            // A child run is driven inside its parent's attempt: its lines
            // belong to the root's span.
            return self.drive_logged().await;
        }
        let span = match self.journal.telemetry().map(|t| t.run_context()) {
            Some(c) => tracing::error_span!(
                "run",
                run_id = %self.run_id,
                trace_id = %switchyard_observability::hex(&c.trace_id),
                span_id = %switchyard_observability::hex(&c.span_id),
            ),
            None => tracing::error_span!("run", run_id = %self.run_id),
        };
        self.drive_logged().instrument(span).await
    }

    async fn drive_logged(mut self) -> Result<Outcome, DriveError> {
        if let Some(status) = self.finished {
            return Err(DriveError::Invalid(self.run_id.clone(), format!("already {status}")));
        }
        loop {
            if self.cancel.is_cancelled() {
                return self.finish_cancelled().await;
            }
            self.schedule();
            if self.launches.is_empty()
                && self.running.is_empty()
                && (self.failure.is_some() || self.steps.iter().all(|s| s.status.is_terminal()))
            {
                // The last results are committed with the run's end.
                return self.finish().await;
            }
            // One commit for everything decided since the last one: results
            // of finished attempts, skips, switch choices and the starts of
            // the attempts they unblock. Only then do those attempts run.
            let events = std::mem::take(&mut self.pending);
            let update = std::mem::take(&mut self.mark_running)
                .then(|| RunUpdate { status: Some(RunStatus::Running), ..Default::default() });
            let update = self.with_waits(update);
            if !events.is_empty() || update.is_some() {
                self.journal.commit(events, update).await?;
            }
            if std::mem::take(&mut self.look_for_signals) {
                // Registered first, then looked for: a signal sent before the
                // wait was committed is found here, one sent after wakes us.
                self.receive_signals().await?;
                if self.steps.iter().any(|s| s.woken) || !self.pending.is_empty() {
                    continue;
                }
            }
            // Each attempt is polled once here: one that finishes at once (a
            // transform, a suspension, a render error) needs no task.
            let mut finished_now = Vec::new();
            for mut launch in std::mem::take(&mut self.launches) {
                match futures::poll!(&mut launch) {
                    std::task::Poll::Ready(done) => finished_now.push(Ok(done)),
                    std::task::Poll::Pending => {
                        self.running.spawn(launch);
                    }
                }
            }
            if !finished_now.is_empty() {
                self.complete(finished_now)?;
                continue;
            }
            if self.running.is_empty() {
                if self.failure.is_some() || self.steps.iter().all(|s| s.status.is_terminal()) {
                    return self.finish().await;
                }
                let waits_for_signal = self.steps.iter().any(|s| s.status == Status::Waiting);
                let next = self.next_due();
                let now = self.inner.clock.now_ms();
                match next {
                    None if !waits_for_signal => {
                        let stuck = StepError::fatal("stuck", "no step can run; this is a bug");
                        self.failure = Some(stuck);
                        return self.finish().await;
                    }
                    None => return self.park(None).await,
                    Some(next) if next - now > self.inner.options.park_after.as_millis() as i64 => {
                        return self.park(Some(next)).await;
                    }
                    Some(_) => {}
                }
            }
            let sleep = self.next_due().map(|at| self.inner.clock.sleep_until(at));
            let mut nudge = self.nudge.clone();
            tokio::select! {
                Some(done) = self.running.join_next(), if !self.running.is_empty() => {
                    let mut batch = vec![done];
                    while let Some(more) = self.running.try_join_next() {
                        batch.push(more);
                    }
                    self.complete(batch)?;
                }
                _ = async { match sleep { Some(s) => s.await, None => std::future::pending().await } } => {}
                _ = nudged(&mut nudge) => {
                    self.nudge = nudge;
                    self.on_nudge().await?;
                }
                _ = self.cancel.cancelled() => {}
            }
        }
    }

    fn next_due(&self) -> Option<i64> {
        self.steps
            .iter()
            .filter(|s| matches!(s.status, Status::Suspended | Status::Backoff | Status::Waiting))
            .filter_map(|s| s.due)
            .min()
    }

    /// `update` with the wait changes decided since the last commit.
    fn with_waits(&mut self, update: Option<RunUpdate>) -> Option<RunUpdate> {
        if self.waits.is_empty() {
            return update;
        }
        let mut update = update.unwrap_or_default();
        update.waits = std::mem::take(&mut self.waits);
        // An update writes the status column: keep it `running`.
        update.status.get_or_insert(RunStatus::Running);
        Some(update)
    }

    /// Decides every step that can be decided now: skips, switches, starts.
    /// One pass in topological order suffices: a decision is visible to the
    /// steps after it.
    fn schedule(&mut self) {
        let now = self.inner.clock.now_ms();
        for pos in 0..self.wf.order.len() {
            let i = self.wf.order[pos];
            if self.failure.is_some() {
                return;
            }
            match self.steps[i].status {
                Status::Suspended | Status::Backoff if self.steps[i].due.is_some_and(|d| d <= now) => self.start(i),
                Status::Waiting if self.steps[i].woken || self.steps[i].due.is_some_and(|d| d <= now) => self.start(i),
                // A switch that failed on its expression and was resumed is
                // decided again, like the first time.
                Status::Ready if matches!(self.wf.steps[i].kind, StepKind::Switch { .. }) => self.switch(i),
                Status::Ready => self.start(i),
                Status::Pending => match self.readiness(i) {
                    Readiness::Wait => {}
                    Readiness::Skip(reason) => self.skip(i, reason),
                    Readiness::Go => {
                        if let Some(reason) = self.when_false(i) {
                            self.skip(i, reason);
                        } else if self.steps[i].status.is_terminal() {
                            // `when` could not be evaluated: already failed.
                        } else if let StepKind::Switch { .. } = self.wf.steps[i].kind {
                            self.switch(i);
                        } else {
                            self.start(i);
                        }
                    }
                },
                _ => {}
            }
        }
    }

    fn skip(&mut self, i: usize, reason: String) {
        self.steps[i].complete(Status::Skipped, None);
        self.pending.push(Event::StepSkipped { step: self.wf.steps[i].id.clone(), reason });
    }

    fn readiness(&self, i: usize) -> Readiness {
        let step = &self.wf.steps[i];
        let mut live = 0;
        let mut dead = Vec::new();
        for need in &step.needs {
            let st = &self.steps[need.step];
            if !st.status.is_terminal() {
                return Readiness::Wait;
            }
            let need_id = &self.wf.steps[need.step].id;
            let ok = match st.status {
                Status::Succeeded | Status::Continued => match &need.path {
                    None => true,
                    Some(p) => st.output.as_ref().and_then(|o| o.get("path")).and_then(Value::as_str) == Some(p),
                },
                _ => false,
            };
            if ok {
                live += 1;
            } else {
                dead.push(match &need.path {
                    Some(p) if st.status == Status::Succeeded => format!("{need_id} did not take path {p}"),
                    _ => format!("{need_id} was {}", st.status.name()),
                });
            }
        }
        match step.join {
            Join::All if dead.is_empty() => Readiness::Go,
            Join::Any if live > 0 || step.needs.is_empty() => Readiness::Go,
            _ => Readiness::Skip(dead.join("; ")),
        }
    }

    fn when_false(&mut self, i: usize) -> Option<String> {
        let when = self.wf.steps[i].when.clone()?;
        match self.wf.templates.test(&when, &self.context(Some(i), &[])) {
            Ok(true) => None,
            Ok(false) => Some("`when` is false".into()),
            Err(e) => {
                // An expression that cannot be evaluated fails the step.
                let error = StepError::fatal("expression", format!("when: {e}"));
                self.fail_now(i, error);
                None
            }
        }
    }

    /// Marks a step failed before it started (bad expression at run time).
    fn fail_now(&mut self, i: usize, error: StepError) {
        let id = self.wf.steps[i].id.clone();
        let attempt = self.steps[i].attempt + 1;
        self.steps[i].attempt = attempt;
        let continued = self.wf.steps[i].on_error == OnError::Continue;
        self.pending.push(Event::StepStarted { step: id.clone(), attempt });
        self.pending.push(Event::StepFailed {
            step: id.clone(),
            attempt,
            error: error.clone(),
            retry_at: None,
            continued,
        });
        if continued {
            self.steps[i].complete(Status::Continued, Some(json!({ "error": error })));
        } else {
            self.steps[i].complete(Status::Failed, None);
            self.failure = Some(step_error(&id, &error));
        }
    }

    fn switch(&mut self, i: usize) {
        let StepKind::Switch { cases, default } = &self.wf.steps[i].kind else { return };
        let ctx = self.context(Some(i), &[]);
        let mut chosen = None;
        for (when, path) in cases {
            match self.wf.templates.test(when, &ctx) {
                Ok(true) => {
                    chosen = Some(path.clone());
                    break;
                }
                Ok(false) => {}
                Err(e) => {
                    let error = StepError::fatal("expression", format!("switch case `{path}`: {e}"));
                    self.fail_now(i, error);
                    return;
                }
            }
        }
        let chosen = chosen.or_else(|| default.clone());
        let id = self.wf.steps[i].id.clone();
        let attempt = self.steps[i].attempt + 1;
        self.steps[i].attempt = attempt;
        let output = json!({ "path": chosen });
        self.pending.push(Event::StepStarted { step: id.clone(), attempt });
        self.pending.push(Event::StepSucceeded { step: id, attempt, output: output.clone() });
        self.steps[i].complete(Status::Succeeded, Some(output));
    }

    /// Starts an attempt of step `i` (or wakes a suspended one).
    fn start(&mut self, i: usize) {
        let step = &self.wf.steps[i];
        let id = step.id.clone();
        let st = &mut self.steps[i];
        let waking = matches!(st.status, Status::Suspended | Status::Waiting);
        if !waking {
            st.attempt += 1;
            st.journaled_wait = None;
            self.pending.push(Event::StepStarted { step: id.clone(), attempt: st.attempt });
        }
        if st.status == Status::Waiting
            && let Some(name) = &st.signal
            && !self.signals.contains_key(name)
        {
            // Its deadline passed: the step stops waiting for the signal.
            self.waits.push(WaitChange::Done { name: name.clone() });
        }
        st.status = Status::Running;
        st.due = None;
        st.signal = None;
        st.woken = false;
        st.interrupted = false;
        let attempt = st.attempt;
        let span = self.journal.telemetry().and_then(|mut t| t.attempt_context(&id, attempt));
        let replay = st.ops.lock().expect("ops").clone();
        let recorded = st.ops.clone();
        let st_unsent = st.unsent.clone();
        let ctx_value = self.context(Some(i), &[]);
        let ctx = StepContext::new(
            self.run_id.clone(),
            id.clone(),
            attempt,
            format!("{}/{}", self.run_id, id),
            self.inner.clock.clone(),
            self.cancel.child_token(),
            replay,
            Arc::new(StepOps { journal: self.journal.clone(), step: id.clone(), attempt, recorded, unsent: st_unsent }),
        )
        .with_signals(self.signals.clone())
        .with_tokens(self.tokens.clone())
        .with_trace(span.map(|s| (s.trace_id, s.span_id)));
        let work = match self.prepare(i, &ctx_value, span) {
            Ok(work) => {
                if !waking && let (Some(mut t), Work::Action { with, .. }) = (self.journal.telemetry(), &work) {
                    t.started(&id, attempt, with);
                }
                work
            }
            Err(error) => {
                // Rendering failed: the attempt fails without running.
                self.launches.push(Box::pin(async move { (i, attempt, Err(Stop::Error(error))) }));
                return;
            }
        };
        let timeout = step.timeout;
        let clock = self.inner.clock.clone();
        let inner = self.inner.clone();
        let attempt_future = async move {
            let started = clock.now_ms();
            match timeout {
                None => work.run(inner, ctx).await,
                Some(limit) => {
                    let deadline = started.saturating_add(limit.as_millis() as i64);
                    tokio::select! {
                        r = work.run(inner, ctx) => r,
                        _ = clock.sleep_until(deadline) => Err(Stop::Error(StepError::retryable(
                            "timeout",
                            format!("attempt did not finish within {}", humantime::format_duration(limit)),
                        ))),
                    }
                }
            }
        };
        // A step that panics fails its attempt; the driver (and the process)
        // goes on. The first poll runs on the driver, the rest in a task:
        // both are inside this guard.
        // Its log lines belong to the run's (see `drive`).
        let attempt_future = tracing::Instrument::in_current_span(attempt_future);
        self.launches.push(Box::pin(async move {
            let result = match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(attempt_future)).await {
                Ok(result) => result,
                Err(panic) => Err(Stop::Error(StepError::fatal(
                    "panic",
                    format!("the step panicked: {}", super::panic_message(panic.as_ref())),
                ))),
            };
            (i, attempt, result)
        }));
    }

    fn prepare(
        &self,
        i: usize,
        ctx: &MjValue,
        span: Option<switchyard_observability::SpanContext>,
    ) -> Result<Work, StepError> {
        let render_err = |e: expr::EvalError| StepError::fatal("expression", e.0);
        let wf = &self.wf;
        Ok(match &wf.steps[i].kind {
            StepKind::Action { step, with, tools } => Work::Action {
                step: step.clone(),
                with: wf.templates.render(with, ctx).map_err(render_err)?,
                tools: tools.clone().map(|tools| (tools, self.child_parent(span))),
            },
            StepKind::Call { child, input } => Work::Call {
                child: child.clone(),
                input: wf.templates.render(input, ctx).map_err(render_err)?,
                parent: self.child_parent(span),
            },
            StepKind::Map { items, concurrency, input, child } => {
                let items = match wf.templates.render(items, ctx).map_err(render_err)? {
                    Value::Array(items) if items.len() > MAX_MAP_ITEMS => {
                        return Err(StepError::fatal(
                            "map_items",
                            format!("`items` has {} entries; a map takes at most {MAX_MAP_ITEMS}", items.len()),
                        ));
                    }
                    Value::Array(items) => items,
                    other => {
                        return Err(StepError::fatal(
                            "map_items",
                            format!("`items` must be a list, got {}", type_name(&other)),
                        ));
                    }
                };
                // Each child's input is rendered when that child starts, not
                // all up front.
                let inputs = Arc::new(ItemInputs {
                    wf: wf.clone(),
                    template: input.clone(),
                    input: self.input_view.clone(),
                    steps: self.steps_view(Some(i)),
                    run: self.run_view.clone(),
                });
                Work::Map {
                    child: child.clone(),
                    items,
                    inputs,
                    concurrency: *concurrency,
                    parent: self.child_parent(span),
                }
            }
            StepKind::Switch { .. } => {
                return Err(StepError::fatal("engine", "a switch is decided by the driver, not started"));
            }
        })
    }

    fn child_parent(&self, span: Option<switchyard_observability::SpanContext>) -> child::Parent {
        child::Parent {
            run: self.run_id.clone(),
            definition: self.definition.clone(),
            fence: self.journal.fence().clone(),
            nudge: self.nudge.clone(),
            span,
            confidential: self.journal.telemetry().is_none_or(|t| !t.captures_content()),
        }
    }

    /// Folds finished attempts into the state; their events are committed
    /// with the next decisions, before any dependent starts.
    fn complete(&mut self, batch: Vec<Result<Done, tokio::task::JoinError>>) -> Result<(), DriveError> {
        let now = self.inner.clock.now_ms();
        let mut events = std::mem::take(&mut self.pending);
        let mut changes = Vec::with_capacity(batch.len());
        for done in batch {
            let (i, attempt, result) = match done {
                Ok(done) => done,
                Err(e) if e.is_cancelled() => continue,
                Err(e) => {
                    // Attempts catch their own panics, so this is the engine's.
                    tracing::error!(run = %self.run_id, error = %e, "a step task panicked");
                    return Err(DriveError::Invalid(self.run_id.clone(), format!("a step task panicked: {e}")));
                }
            };
            let result = self.checked(i, result);
            match &result {
                Ok(_) => tracing::debug!(step = %self.wf.steps[i].id, attempt, "attempt succeeded"),
                Err(Stop::Error(e)) => {
                    tracing::debug!(step = %self.wf.steps[i].id, attempt, code = %e.code, "attempt failed")
                }
                Err(_) => tracing::debug!(step = %self.wf.steps[i].id, attempt, "attempt waits"),
            }
            // Its operations not yet sent go first, in the same commit.
            events.append(&mut self.steps[i].unsent.lock().expect("unsent ops"));
            let step = &self.wf.steps[i];
            let id = step.id.clone();
            match result {
                Ok(output) => {
                    events.push(Event::StepSucceeded { step: id, attempt, output: output.clone() });
                    changes.push((i, Status::Succeeded, Some(output), None));
                }
                Err(Stop::Suspend { until_ms }) => {
                    events.push(Event::StepSuspended { step: id, attempt, until: until_ms });
                    changes.push((i, Status::Suspended, None, Some(until_ms)));
                }
                Err(Stop::Wait { signal, until_ms }) => {
                    let wait = (signal.clone(), until_ms);
                    let st = &mut self.steps[i];
                    // Called again with nothing new (its children still
                    // wait): the journaled wait still holds.
                    if st.journaled_wait.as_ref() != Some(&wait) {
                        events.push(Event::StepWaiting {
                            step: id.clone(),
                            attempt,
                            signal: signal.clone(),
                            until: until_ms,
                        });
                        if let Some(name) = &signal {
                            self.waits.push(WaitChange::Wait { name: name.clone(), step: id, deadline: until_ms });
                            self.look_for_signals = true;
                        }
                        st.journaled_wait = Some(wait);
                    }
                    st.signal = signal;
                    changes.push((i, Status::Waiting, None, until_ms));
                }
                Err(Stop::Error(error)) => {
                    let used = attempt.saturating_sub(self.steps[i].budget_start);
                    if error.retryable && used < step.retry.max_attempts && !self.cancel.is_cancelled() {
                        let delay = step.retry.delay(used, rand::random::<f64>());
                        let at = now.saturating_add(delay.as_millis() as i64);
                        events.push(Event::StepFailed {
                            step: id,
                            attempt,
                            error,
                            retry_at: Some(at),
                            continued: false,
                        });
                        changes.push((i, Status::Backoff, None, Some(at)));
                    } else if step.on_error == OnError::Continue {
                        let output = json!({ "error": error });
                        events.push(Event::StepFailed { step: id, attempt, error, retry_at: None, continued: true });
                        changes.push((i, Status::Continued, Some(output), None));
                    } else {
                        if self.failure.is_none() {
                            self.failure = Some(step_error(&id, &error));
                        }
                        events.push(Event::StepFailed { step: id, attempt, error, retry_at: None, continued: false });
                        changes.push((i, Status::Failed, None, None));
                    }
                }
            }
        }
        self.pending = events;
        for (i, status, output, due) in changes {
            let st = &mut self.steps[i];
            match status {
                Status::Suspended | Status::Backoff | Status::Waiting => {
                    st.status = status;
                    st.due = due;
                    if status == Status::Backoff {
                        st.ops.lock().expect("ops").clear();
                    }
                }
                _ => st.complete(status, output),
            }
        }
        Ok(())
    }

    /// An output that cannot be journaled and read back (too deep, too
    /// large), or a path the step did not declare, fails the attempt.
    fn checked(&self, i: usize, result: StepResult) -> StepResult {
        let output = result?;
        if let Err(why) = limits::check(&output) {
            return Err(
                StepError::fatal("output_too_large", format!("the step's output cannot be stored: {why}")).into()
            );
        }
        if let Some(paths) = &self.wf.steps[i].paths {
            let chosen = output.get("path").and_then(Value::as_str);
            if !chosen.is_some_and(|p| paths.contains(p)) {
                let known = paths.iter().cloned().collect::<Vec<_>>().join(", ");
                return Err(StepError::fatal(
                    "invalid_path",
                    format!("the step chose path {chosen:?}, which is not one of its paths ({known})"),
                )
                .into());
            }
        }
        Ok(output)
    }

    async fn park(mut self, wake_at: Option<i64>) -> Result<Outcome, DriveError> {
        let update = RunUpdate {
            status: Some(RunStatus::Waiting),
            wake_at,
            release: self.is_root,
            waits: std::mem::take(&mut self.waits),
            ..Default::default()
        };
        let mut events = self.pending;
        events.push(Event::RunParked { wake_at });
        self.journal.commit(events, Some(update)).await?;
        Ok(Outcome::Parked { wake_at })
    }

    async fn finish(mut self) -> Result<Outcome, DriveError> {
        let (status, output, error) = match self.failure.take() {
            Some(error) => (RunStatus::Failed, None, Some(error)),
            None => {
                let ctx = self.context(None, &[]);
                let output = match &self.wf.output {
                    Some(tpl) => self.wf.templates.render(tpl, &ctx),
                    None => Ok(self.default_output()),
                };
                match output {
                    Ok(v) => (RunStatus::Succeeded, Some(v), None),
                    Err(e) => (RunStatus::Failed, None, Some(StepError::fatal("output", format!("output: {}", e.0)))),
                }
            }
        };
        self.finish_with(status, output, error).await
    }

    async fn finish_cancelled(mut self) -> Result<Outcome, DriveError> {
        // Running attempts see the cancellation (actions stop at once, child
        // runs end `cancelled` first); their ends are journaled with the run's.
        let mut batch = Vec::new();
        while let Some(done) = self.running.join_next().await {
            batch.push(done);
        }
        self.complete(batch)?;
        let error = StepError::fatal("cancelled", "the run was cancelled");
        // An attempt whose process died before it ended (the run was taken
        // over with a cancel request) ends like one stopped here.
        for i in 0..self.steps.len() {
            let st = &mut self.steps[i];
            if st.interrupted && st.status == Status::Ready {
                st.interrupted = false;
                st.complete(Status::Failed, None);
                let (step, attempt) = (self.wf.steps[i].id.clone(), st.attempt);
                self.pending.push(Event::StepFailed {
                    step,
                    attempt,
                    error: error.clone(),
                    retry_at: None,
                    continued: false,
                });
            }
        }
        if self.is_root {
            // Child runs nobody drives any more (their parent's attempt died
            // with its process) end too; those driven here already have.
            let fence = self.journal.fence().clone();
            self.inner
                .cancel_descendants(&fence, &self.run_id, &error)
                .await
                .map_err(|e| DriveError::Invalid(self.run_id.clone(), e.to_string()))?;
            let actor = self.cancelled_by.lock().expect("cancelled_by").clone();
            self.pending.push(Event::CancelRequested { actor });
        }
        self.finish_with(RunStatus::Cancelled, None, Some(error)).await
    }

    async fn finish_with(
        mut self,
        status: RunStatus,
        output: Option<Value>,
        error: Option<StepError>,
    ) -> Result<Outcome, DriveError> {
        let update = RunUpdate {
            status: Some(status),
            output: output.clone(),
            error: error.clone(),
            wake_at: None,
            release: self.is_root,
            waits: std::mem::take(&mut self.waits),
        };
        let mut events = self.pending;
        events.push(Event::RunFinished { status, output: output.clone(), error: error.clone() });
        self.journal.commit(events, Some(update)).await?;
        Ok(Outcome::Finished { status, output, error })
    }

    /// Without `output`, a run's result is the outputs of the steps nothing
    /// depends on, by id.
    fn default_output(&self) -> Value {
        let leaves: serde_json::Map<String, Value> = self
            .wf
            .steps
            .iter()
            .zip(&self.steps)
            .filter(|(spec, st)| spec.dependents.is_empty() && st.status == Status::Succeeded)
            .map(|(spec, st)| (spec.id.clone(), st.output.clone().unwrap_or(Value::Null)))
            .collect();
        Value::Object(leaves)
    }
}

enum Readiness {
    Wait,
    Go,
    Skip(String),
}

/// Resolves when `nudge` changes; never if its sender is gone.
pub(crate) async fn nudged(nudge: &mut watch::Receiver<u64>) {
    if nudge.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Whether run `id` is `prefix` or below it (`prefix/...`).
pub(crate) fn is_under(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn step_error(step: &str, error: &StepError) -> StepError {
    StepError { code: error.code.clone(), message: format!("step {step}: {}", error.message), retryable: false }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Most items one `map` step takes.
pub(crate) const MAX_MAP_ITEMS: usize = 100_000;

/// What a started attempt does, prepared (rendered) by the driver.
enum Work {
    Action {
        step: Arc<dyn switchyard_steps::DynStep>,
        with: Value,
        tools: Option<(Arc<crate::workflow::ToolWorkflows>, child::Parent)>,
    },
    Call {
        child: Arc<Workflow>,
        input: Value,
        parent: child::Parent,
    },
    Map {
        child: Arc<Workflow>,
        items: Vec<Value>,
        inputs: Arc<ItemInputs>,
        concurrency: usize,
        parent: child::Parent,
    },
}

/// Renders the input of a map's child from its item, with the context the
/// map step had when it started.
pub(crate) struct ItemInputs {
    wf: Arc<Workflow>,
    template: Option<ValueTemplate>,
    input: MjValue,
    steps: MjValue,
    run: MjValue,
}

impl ItemInputs {
    pub fn render(&self, index: usize, item: Value) -> Result<Value, StepError> {
        let Some(template) = &self.template else { return Ok(json!({ "item": item, "index": index })) };
        let ctx = MjValue::from(BTreeMap::from([
            ("input", self.input.clone()),
            ("steps", self.steps.clone()),
            ("run", self.run.clone()),
            ("item", expr::from_json(&item)),
            ("index", MjValue::from(index)),
        ]));
        self.wf.templates.render(template, &ctx).map_err(|e| StepError::fatal("expression", e.0))
    }
}

impl Work {
    async fn run(self, inner: Arc<Inner>, mut ctx: StepContext) -> StepResult {
        match self {
            Work::Action { step, with, tools } => {
                if let Some((tools, parent)) = tools {
                    ctx = ctx.with_workflows(Arc::new(child::ToolRuns { inner: inner.clone(), parent, tools }));
                }
                let cancel = ctx.cancel_token();
                tokio::select! {
                    r = step.run(with, &mut ctx) => r,
                    _ = cancel.cancelled() => Err(Stop::Error(StepError::fatal("cancelled", "the run was cancelled"))),
                }
            }
            Work::Call { child, input, parent } => {
                let id = format!("{}/{}", parent.run, ctx.step_id());
                child::run_child(&inner, &parent, id, child, input, &ctx).await
            }
            Work::Map { child, items, inputs, concurrency, parent } => {
                child::run_map(&inner, &parent, child, items, inputs, concurrency, &ctx).await
            }
        }
    }
}
