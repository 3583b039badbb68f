//! The engine: accepts runs, drives them durably, parks and wakes them, and
//! lets them be cancelled, resumed or re-run from a step.
//!
//! Built from [`EngineOptions`] by [`Engine::start`] and reached through the
//! cheap, cloneable [`Engine`] handle. Background tasks: the group-commit
//! writer, the timer that wakes parked runs, lease renewal, and a slow poll
//! (cancel requests from other processes; in worker mode, runs to pick up).
//! None of them is on the hot path: a step's completion starts its dependents
//! directly.

mod child;
mod driver;
mod journal_handle;
mod rerun;
mod telemetry;
mod writer;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use switchyard_steps::{Clock, Registry, StepError};
use tokio::sync::{Notify, Semaphore, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::compile::{self, CompileErrors};
use crate::journal::{Encoded, Event, RunStatus};
use crate::store::{self, Claim, Fence, JournalEntry, NewRun, RunRecord, RunUpdate, Signalled, Store, Write};
use crate::workflow::Definition;
use driver::{DriveError, Driver, Outcome, RunRef};
pub use writer::CommitError;

/// The trace id (hex) of the root run `root_id` whose journal starts with
/// `first`: the caller's when it gave a `traceparent`, else the run id.
pub fn trace_id(root_id: &str, first: Option<&Event>) -> String {
    let caller = match first {
        Some(Event::RunStarted { trace: Some(t), .. }) => switchyard_observability::SpanContext::parse(t).ok(),
        _ => None,
    };
    switchyard_observability::hex(&caller.map(|c| c.trace_id).unwrap_or_else(|| telemetry::root_trace_id(root_id)))
}
use writer::Writer;

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Root runs executing at once; more queue (FIFO).
    pub max_concurrent_runs: usize,
    /// How long a claim on a run lasts without renewal.
    pub lease: Duration,
    /// How often to look for cancel requests and (worker) runs to pick up.
    pub poll_interval: Duration,
    /// A run whose next timer is further away than this parks: no task, no
    /// lease. Shorter waits stay in memory.
    pub park_after: Duration,
    /// Pick up unfinished runs from the store (the `worker` command).
    pub worker: bool,
    /// Where spans and metrics go (default: nowhere).
    pub telemetry: switchyard_observability::Telemetry,
    /// Model prices, for the cost metric.
    pub prices: Arc<crate::report::Prices>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_concurrent_runs: 256,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            park_after: Duration::from_secs(5),
            worker: false,
            telemetry: switchyard_observability::Telemetry::disabled(),
            prices: Arc::default(),
        }
    }
}

/// The end of a root run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    pub id: String,
    pub status: RunStatus,
    pub output: Option<Value>,
    pub error: Option<StepError>,
    /// A parked run (`waiting`): when it wakes (`None`: on a signal).
    pub wake_at: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error("invalid input:\n{}", .0.join("\n"))]
    InvalidInput(Vec<String>),
    #[error("no run {0:?}")]
    NotFound(String),
    #[error("stored definition no longer compiles:\n{0}")]
    Definition(CompileErrors),
    #[error("{0}")]
    Conflict(String),
    #[error("run {0}: {1}")]
    Interrupted(String, String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A run started (or found) by [`Engine::submit_once`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub id: String,
    /// False when a run with the same idempotency key already existed.
    pub created: bool,
}

/// What `cancel` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// The run was stopped here.
    Done,
    /// Another process holds the run's lease (until `lease_until`): if it
    /// is alive it stops the run at its next poll; if it died, whoever takes
    /// the run over when that lease has expired ends it `cancelled`.
    Requested {
        lease_until: Option<i64>,
    },
    AlreadyFinished(RunStatus),
}

type Waiter = oneshot::Sender<Result<RunOutcome, String>>;

/// Compiled definitions kept in memory; beyond this the oldest is dropped
/// (runs using it keep their own reference; it is recompiled when needed).
const DEFINITIONS_CACHED: usize = 256;

/// A definition cache with first-in, first-out eviction.
#[derive(Default)]
struct Definitions {
    by_hash: HashMap<String, Arc<Definition>>,
    order: std::collections::VecDeque<String>,
}

impl Definitions {
    fn get(&self, hash: &str) -> Option<Arc<Definition>> {
        self.by_hash.get(hash).cloned()
    }

    fn insert(&mut self, def: Arc<Definition>) {
        if self.by_hash.insert(def.hash.clone(), def.clone()).is_none() {
            self.order.push_back(def.hash.clone());
        }
        while self.order.len() > DEFINITIONS_CACHED {
            if let Some(old) = self.order.pop_front() {
                self.by_hash.remove(&old);
            }
        }
    }
}

/// Wake-up times of parked runs, soonest first; one per run.
#[derive(Default)]
struct Timers {
    by_time: BTreeSet<(i64, String)>,
    by_run: HashMap<String, i64>,
}

impl Timers {
    fn first(&self) -> Option<(i64, String)> {
        self.by_time.first().cloned()
    }

    /// False if the run already has a timer (the earlier one stays).
    fn insert(&mut self, at: i64, id: String) -> bool {
        if self.by_run.contains_key(&id) {
            return false;
        }
        self.by_run.insert(id.clone(), at);
        self.by_time.insert((at, id))
    }

    fn remove(&mut self, id: &str) {
        if let Some(at) = self.by_run.remove(id) {
            self.by_time.remove(&(at, id.to_owned()));
        }
    }
}

/// A root run being driven in this process.
struct Active {
    /// Cancels the run (it ends `cancelled`).
    cancel: CancellationToken,
    /// Who cancelled it; set before `cancel` fires.
    cancelled_by: Arc<Mutex<Option<String>>>,
    /// Stops the driver without ending the run (shutdown).
    abort: Option<tokio::task::AbortHandle>,
    /// Tells the run's drivers (root and children) that a signal may have
    /// arrived in its tree.
    nudge: watch::Sender<u64>,
}

pub(crate) struct Inner {
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    pub clock: Arc<dyn Clock>,
    pub node: String,
    pub options: EngineOptions,
    pub writer: Writer,
    definitions: Mutex<Definitions>,
    global: Arc<Semaphore>,
    /// Per workflow name: its limit and the slots.
    per_workflow: Mutex<HashMap<String, (u32, Arc<Semaphore>)>>,
    waiters: Mutex<HashMap<String, Vec<Waiter>>>,
    /// Told when the run parks here, too (see [`Engine::wait_settled`]).
    settle_waiters: Mutex<HashMap<String, Vec<Waiter>>>,
    active: Mutex<HashMap<String, Active>>,
    timers: Mutex<Timers>,
    timer_changed: Notify,
    shutdown: CancellationToken,
}

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    pub fn start(store: Arc<dyn Store>, registry: Registry, clock: Arc<dyn Clock>, options: EngineOptions) -> Self {
        let node = format!("{}-{}", std::process::id(), uuid::Uuid::now_v7().simple());
        let writer = Writer::start(store.clone(), node.clone(), clock.clone(), options.telemetry.metrics().cloned());
        let inner = Arc::new(Inner {
            global: Arc::new(Semaphore::new(options.max_concurrent_runs.max(1))),
            store,
            registry,
            clock,
            node,
            options,
            writer,
            definitions: Mutex::default(),
            per_workflow: Mutex::default(),
            waiters: Mutex::default(),
            settle_waiters: Mutex::default(),
            active: Mutex::default(),
            timers: Mutex::default(),
            timer_changed: Notify::new(),
            shutdown: CancellationToken::new(),
        });
        tokio::spawn(timer_loop(inner.clone()));
        tokio::spawn(lease_loop(inner.clone()));
        tokio::spawn(poll_loop(inner.clone()));
        Self { inner }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Starts a run and returns its id once the start is durable.
    pub async fn submit(&self, def: &Definition, input: Value) -> Result<String> {
        Ok(self.create_run(def, input, None, Vec::new(), None).await?.id)
    }

    /// Starts a run (once per `key`, if given; see [`Engine::submit_once`])
    /// whose trace hangs under the caller's span `traceparent` (W3C).
    pub async fn submit_traced(
        &self,
        def: &Definition,
        input: Value,
        key: Option<&str>,
        traceparent: Option<&switchyard_observability::SpanContext>,
    ) -> Result<Submitted> {
        if let Some(key) = key
            && let Some(existing) = self.existing(def, key).await?
        {
            return Ok(existing);
        }
        let trace = traceparent.map(|t| t.traceparent());
        self.create_run(def, input, key.map(str::to_owned), Vec::new(), trace).await
    }

    /// Starts a run unless one was already started with `key` (a retried
    /// trigger, a cron job run twice): then returns that run instead.
    pub async fn submit_once(&self, def: &Definition, input: Value, key: &str) -> Result<Submitted> {
        if let Some(existing) = self.existing(def, key).await? {
            return Ok(existing);
        }
        self.create_run(def, input, Some(key.to_owned()), Vec::new(), None).await
    }

    async fn existing(&self, def: &Definition, key: &str) -> Result<Option<Submitted>> {
        let Some(run) = self.inner.store.run_by_key(key).await? else { return Ok(None) };
        if run.workflow != def.workflow.name() {
            return Err(Error::Conflict(format!(
                "idempotency key {key:?} belongs to run {} of workflow {:?}",
                run.id, run.workflow
            )));
        }
        Ok(Some(Submitted { id: run.id, created: false }))
    }

    /// Creates a root run and dispatches it. `reused` (a re-run's
    /// `step_reused` events) is written right after `run_started`, in the
    /// same commit.
    async fn create_run(
        &self,
        def: &Definition,
        input: Value,
        key: Option<String>,
        reused: Vec<Event>,
        trace: Option<String>,
    ) -> Result<Submitted> {
        def.workflow.check_input(&input).map_err(Error::InvalidInput)?;
        crate::limits::check(&input).map_err(|why| Error::InvalidInput(vec![format!("input: {why}")]))?;
        let inner = &self.inner;
        let def = inner.remember(def).await?;
        let id = uuid::Uuid::now_v7().to_string();
        let now = inner.clock.now_ms();
        let wf = &def.workflow;
        let run = NewRun {
            id: id.clone(),
            root_id: id.clone(),
            parent_id: None,
            workflow: wf.name().to_owned(),
            version: wf.version(),
            definition: def.hash.clone(),
            status: RunStatus::Queued,
            input: input.clone(),
            owner: Some(inner.node.clone()),
            epoch: 1,
            lease: Some(inner.options.lease),
            idempotency_key: key.clone(),
        };
        let started = Event::RunStarted { workflow: wf.name().to_owned(), version: wf.version(), input, trace };
        let events: Vec<Event> = std::iter::once(started).chain(reused).collect();
        let encoded = Encoded::all(now, &events);
        let journal: Vec<JournalEntry> =
            events.into_iter().zip(0..).map(|(event, seq)| JournalEntry { seq, at: now, event }).collect();
        inner.writer.commit(Write::Create { fence: None, run, events: encoded }).await?;
        if let Some(key) = &key
            && let Some(winner) = inner.store.run_by_key(key).await?
            && winner.id != id
        {
            // Two submits with one key raced; the store kept the other one.
            return Ok(Submitted { id: winner.id, created: false });
        }
        if let Some(m) = inner.options.telemetry.metrics() {
            m.run_started(wf.name());
        }
        dispatch(
            inner,
            id.clone(),
            Claim { epoch: 1, cancel_requested: false, cancel_actor: None },
            def,
            Some(journal),
        );
        Ok(Submitted { id, created: true })
    }

    /// Waits for a root run to finish.
    pub async fn wait(&self, id: &str) -> Result<RunOutcome> {
        let (tx, rx) = oneshot::channel();
        self.inner.waiters.lock().expect("waiters").entry(id.to_owned()).or_default().push(tx);
        match self.inner.store.run(id).await? {
            Some(r) if !r.status.is_finished() => {}
            found => {
                // No need to wait: take this waiter out again.
                drop(rx);
                forget_closed(&self.inner.waiters, id);
                return found.map(|r| outcome(&r)).ok_or_else(|| Error::NotFound(id.to_owned()));
            }
        }
        waited(id, rx).await
    }

    /// Waits until a root run has finished or parked (waits for a timer far
    /// off or a signal, holding nothing): returns its outcome, with status
    /// `waiting` if it parked. A run already parked in the store returns at
    /// once.
    pub async fn wait_settled(&self, id: &str) -> Result<RunOutcome> {
        let (tx, rx) = oneshot::channel();
        self.inner.settle_waiters.lock().expect("waiters").entry(id.to_owned()).or_default().push(tx);
        let record = self.inner.store.run(id).await?;
        let driven_here = self.inner.active.lock().expect("active").contains_key(id);
        let settled = match &record {
            None => Some(Err(Error::NotFound(id.to_owned()))),
            Some(r) if r.status.is_finished() => Some(Ok(outcome(r))),
            Some(r) if r.status == RunStatus::Waiting && r.owner.is_none() && !driven_here => Some(Ok(outcome(r))),
            Some(_) => None,
        };
        if let Some(settled) = settled {
            drop(rx);
            forget_closed(&self.inner.settle_waiters, id);
            return settled;
        }
        waited(id, rx).await
    }

    /// Submits and waits.
    pub async fn run(&self, def: &Definition, input: Value) -> Result<RunOutcome> {
        let id = self.submit(def, input).await?;
        self.wait(&id).await
    }

    /// Cancels a run: stops its running steps and ends it `cancelled`.
    pub async fn cancel(&self, id: &str) -> Result<Cancelled> {
        self.cancel_as(id, None).await
    }

    /// [`Engine::cancel`], recording `actor` (who asked) in the journal.
    pub async fn cancel_as(&self, id: &str, actor: Option<&str>) -> Result<Cancelled> {
        let inner = &self.inner;
        let record = inner.store.run(id).await?.ok_or_else(|| Error::NotFound(id.to_owned()))?;
        if record.parent_id.is_some() {
            return Err(Error::Conflict(format!("{id} is a child run; cancel its root run {}", record.root_id)));
        }
        if record.status.is_finished() {
            return Ok(Cancelled::AlreadyFinished(record.status));
        }
        let here = inner.active.lock().expect("active").get(id).map(|a| (a.cancel.clone(), a.cancelled_by.clone()));
        if let Some((cancel, by)) = here {
            by.lock().expect("cancelled_by").get_or_insert_with(|| actor.unwrap_or_default().to_owned());
            cancel.cancel();
            return match self.wait(id).await {
                Ok(_) => Ok(Cancelled::Done),
                Err(Error::Interrupted(..)) => Ok(Cancelled::Requested { lease_until: None }),
                Err(e) => Err(e),
            };
        }
        let now = inner.clock.now_ms();
        inner.store.request_cancel(id, actor, now).await?;
        let Some(claim) = inner.store.claim(id, &inner.node, record.epoch, inner.options.lease, false).await? else {
            let lease_until = inner.store.run(id).await?.and_then(|r| r.lease_until);
            return Ok(Cancelled::Requested { lease_until });
        };
        // Nobody drives it (parked, queued elsewhere, or its node died):
        // drive it here with the cancel already requested, so it ends the
        // way a run cancelled in its own process does (attempts that were in
        // flight journaled as cancelled, unfinished child runs ended too).
        inner.timers.lock().expect("timers").remove(id);
        let def = match inner.definition(&record.definition).await {
            Ok(def) => def,
            Err(e) => {
                let _ = inner.store.release(&inner.node, &Fence { root: id.to_owned(), epoch: claim.epoch }).await;
                return Err(e);
            }
        };
        let cancel_actor = actor.map(str::to_owned).or(claim.cancel_actor);
        dispatch(inner, id.to_owned(), Claim { cancel_requested: true, cancel_actor, ..claim }, def, None);
        match self.wait(id).await {
            Ok(_) => Ok(Cancelled::Done),
            Err(Error::Interrupted(..)) => Ok(Cancelled::Requested { lease_until: None }),
            Err(e) => Err(e),
        }
    }

    /// Continues a failed run from its failed steps (completed steps keep
    /// their outputs), or takes over an unfinished run nobody drives.
    pub async fn resume(&self, id: &str) -> Result<()> {
        self.resume_as(id, None).await
    }

    /// [`Engine::resume`], recording `actor` (who asked) in the journal.
    pub async fn resume_as(&self, id: &str, actor: Option<&str>) -> Result<()> {
        let inner = &self.inner;
        let record = inner.store.run(id).await?.ok_or_else(|| Error::NotFound(id.to_owned()))?;
        if record.parent_id.is_some() {
            return Err(Error::Conflict(format!("{id} is a child run; resume its root run {}", record.root_id)));
        }
        if matches!(record.status, RunStatus::Succeeded | RunStatus::Cancelled) {
            return Err(Error::Conflict(format!(
                "run {id} is {}; only failed or unfinished runs can be resumed",
                record.status
            )));
        }
        if inner.active.lock().expect("active").contains_key(id) {
            return Err(Error::Conflict(format!("run {id} is already running here")));
        }
        let Some(claim) = inner.store.claim(id, &inner.node, record.epoch, inner.options.lease, true).await? else {
            return Err(Error::Conflict(format!("run {id} is being run by another process (its lease is live)")));
        };
        let fence = Fence { root: id.to_owned(), epoch: claim.epoch };
        let prepared = async {
            let def = inner.definition(&record.definition).await?;
            if record.status == RunStatus::Failed {
                let mut failed = inner.failed_tree(&record).await?;
                // Children first, so a parent never sees a half-resumed child.
                failed.reverse();
                for run in failed {
                    let update = RunUpdate { status: Some(RunStatus::Running), ..Default::default() };
                    let event = Event::RunResumed { actor: actor.map(str::to_owned) };
                    inner.append(&fence, &run.id, vec![event], update).await?;
                }
            }
            Ok::<_, Error>(def)
        }
        .await;
        let def = match prepared {
            Ok(def) => def,
            Err(e) => {
                // Nothing is driving it: give the lease back so it stays resumable.
                let _ = inner.store.release(&inner.node, &fence).await;
                return Err(e);
            }
        };
        inner.timers.lock().expect("timers").remove(id);
        dispatch(inner, id.to_owned(), claim, def, None);
        Ok(())
    }

    /// Drives an unfinished run that nobody drives here, waiting until the
    /// lease of the process that held it expires (it crashed, or still runs
    /// it: then that process finishes it and this waits for the end).
    /// `waiting` is told the time the lease runs out each time this waits.
    /// Returns once the run is driven here or has finished.
    pub async fn take_over(&self, id: &str, mut waiting: impl FnMut(i64)) -> Result<()> {
        let inner = &self.inner;
        loop {
            if inner.active.lock().expect("active").contains_key(id) {
                return Ok(());
            }
            let record = inner.store.run(id).await?.ok_or_else(|| Error::NotFound(id.to_owned()))?;
            if record.parent_id.is_some() {
                return Err(Error::Conflict(format!("{id} is a child run; take over its root run {}", record.root_id)));
            }
            if record.status.is_finished() {
                return Ok(());
            }
            let now = inner.clock.now_ms();
            if record.owner.is_none() && record.status == RunStatus::Waiting && record.wake_at.is_none_or(|at| at > now)
            {
                // Parked: it wakes here when due (a timer, or a signal the
                // poll sees).
                if let Some(at) = record.wake_at {
                    inner.add_timer(at, id.to_owned());
                }
                return Ok(());
            }
            // The store decides whether the holder's lease has expired (by
            // its clock, not this process's): just try.
            if pick_up(inner, &record).await? {
                return Ok(());
            }
            let fresh = inner.store.run(id).await?;
            if let Some(until) = fresh.as_ref().filter(|r| r.owner.is_some()).and_then(|r| r.lease_until) {
                waiting(until);
            }
            // Look again every poll interval (the lease may expire, the run
            // may finish).
            tokio::select! {
                _ = tokio::time::sleep(inner.options.poll_interval) => {}
                _ = inner.shutdown.cancelled() => return Err(Error::Interrupted(id.to_owned(), "the engine stopped".into())),
            }
        }
    }

    /// Sends signal `name` with `payload` to run `run` (a root or a child
    /// run): the step waiting for it (`kind: wait`, later approvals) gets it.
    /// Durable once this returns; the run is driven on by the process that
    /// holds it, a process waiting for it, or a worker. A signal sent before
    /// a step waits for it is kept until one does; a second signal of the
    /// same name is refused.
    pub async fn signal(&self, run: &str, name: &str, payload: Value, actor: Option<&str>) -> Result<Signalled> {
        if let Some(problem) = switchyard_steps::context::signal_name_problem(name) {
            return Err(Error::InvalidInput(vec![format!("signal: {problem}")]));
        }
        crate::limits::check(&payload).map_err(|why| Error::InvalidInput(vec![format!("payload: {why}")]))?;
        let inner = &self.inner;
        let outcome = match inner.store.signal(run, name, &payload, actor, inner.clock.now_ms(), false).await {
            Err(store::Error::NotFound(_)) => return Err(Error::NotFound(run.to_owned())),
            other => other?,
        };
        if let Signalled::Delivered { root, .. } = &outcome {
            inner.nudge(root);
        }
        Ok(outcome)
    }

    /// Root runs this process is driving (or queueing) right now.
    pub fn active_runs(&self) -> usize {
        self.inner.active.lock().expect("active").len()
    }

    /// Child runs parked in the store (for measurements).
    pub async fn parked_children(&self) -> Result<usize> {
        let runs = self.inner.store.runs(Some(RunStatus::Waiting), true, i64::MAX).await?;
        Ok(runs.iter().filter(|r| r.parent_id.is_some()).count())
    }

    /// True when nothing runs here and no unfinished run is left in the store.
    pub async fn is_idle(&self) -> Result<bool> {
        if !self.inner.active.lock().expect("active").is_empty() {
            return Ok(false);
        }
        Ok(self.inner.store.runs(Some(RunStatus::Running), false, 1).await?.is_empty()
            && self.inner.store.runs(Some(RunStatus::Queued), false, 1).await?.is_empty()
            && self.inner.store.runs(Some(RunStatus::Waiting), false, 1).await?.is_empty())
    }

    /// Stops background work and the runs driven here, without ending them,
    /// and gives up leases so another process can continue them at once
    /// (attempts in flight run again there).
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let active: Vec<Active> = self.inner.active.lock().expect("active").drain().map(|(_, a)| a).collect();
        for a in active {
            if let Some(abort) = a.abort {
                abort.abort();
            }
        }
        let mut waiters: Vec<_> = self.inner.waiters.lock().expect("waiters").drain().collect();
        waiters.extend(self.inner.settle_waiters.lock().expect("waiters").drain());
        for (_, list) in waiters {
            for w in list {
                let _ = w.send(Err("the engine stopped; the run continues in the next process".into()));
            }
        }
        if let Err(e) = self.inner.store.release_all(&self.inner.node).await {
            tracing::warn!(error = %e, "releasing leases on shutdown");
        }
    }
}

/// Drops the waiters of run `id` that nobody listens to any more.
fn forget_closed(waiters: &Mutex<HashMap<String, Vec<Waiter>>>, id: &str) {
    let mut waiters = waiters.lock().expect("waiters");
    if let Some(list) = waiters.get_mut(id) {
        list.retain(|w| !w.is_closed());
        if list.is_empty() {
            waiters.remove(id);
        }
    }
}

/// What a waiter of run `id` was told.
async fn waited(id: &str, rx: oneshot::Receiver<Result<RunOutcome, String>>) -> Result<RunOutcome> {
    match rx.await {
        Ok(Ok(outcome)) => Ok(outcome),
        Ok(Err(reason)) => Err(Error::Interrupted(id.to_owned(), reason)),
        Err(_) => Err(Error::Interrupted(id.to_owned(), "the engine stopped".into())),
    }
}

fn outcome(r: &RunRecord) -> RunOutcome {
    let wake_at = r.wake_at.filter(|_| r.status == RunStatus::Waiting);
    RunOutcome { id: r.id.clone(), status: r.status, output: r.output.clone(), error: r.error.clone(), wake_at }
}

impl Inner {
    /// Stores a definition (once) and caches it compiled.
    async fn remember(&self, def: &Definition) -> Result<Arc<Definition>> {
        if let Some(known) = self.definitions.lock().expect("definitions").get(&def.hash) {
            return Ok(known);
        }
        let wf = &def.workflow;
        self.store.put_definition(&def.hash, wf.name(), wf.version(), &def.bundle, self.clock.now_ms()).await?;
        let def = Arc::new(def.clone());
        self.definitions.lock().expect("definitions").insert(def.clone());
        Ok(def)
    }

    /// A stored definition, compiled (cached).
    async fn definition(&self, hash: &str) -> Result<Arc<Definition>> {
        if let Some(known) = self.definitions.lock().expect("definitions").get(hash) {
            return Ok(known);
        }
        let bundle = self.store.definition(hash).await?;
        let def = Arc::new(compile::compile_bundle(&bundle, &self.registry).map_err(Error::Definition)?);
        self.definitions.lock().expect("definitions").insert(def.clone());
        Ok(def)
    }

    async fn append(&self, fence: &Fence, run: &str, events: Vec<Event>, update: RunUpdate) -> Result<()> {
        let first_seq = self.store.next_seq(run).await?;
        let now = self.clock.now_ms();
        let write = Write::Append {
            fence: fence.clone(),
            run: run.to_owned(),
            first_seq,
            events: Encoded::all(now, &events),
            update: Some(update),
        };
        Ok(self.writer.commit(write).await?)
    }

    /// Ends every unfinished descendant of run `id` `cancelled`, under the
    /// root's fence.
    pub(crate) async fn cancel_descendants(&self, fence: &Fence, id: &str, error: &StepError) -> Result<()> {
        let mut queue = self.store.children(id).await?;
        while let Some(run) = queue.pop() {
            queue.extend(self.store.children(&run.id).await?);
            if !run.status.is_finished() {
                let update =
                    RunUpdate { status: Some(RunStatus::Cancelled), error: Some(error.clone()), ..Default::default() };
                let event =
                    Event::RunFinished { status: RunStatus::Cancelled, output: None, error: Some(error.clone()) };
                self.append(fence, &run.id, vec![event], update).await?;
            }
        }
        Ok(())
    }

    /// The run and its descendants that failed, parents first.
    async fn failed_tree(&self, root: &RunRecord) -> Result<Vec<RunRecord>> {
        self.tree(root, |r| r.status == RunStatus::Failed).await
    }

    async fn tree(&self, root: &RunRecord, keep: impl Fn(&RunRecord) -> bool) -> Result<Vec<RunRecord>> {
        let mut out = Vec::new();
        let mut queue = vec![root.clone()];
        while let Some(run) = queue.pop() {
            queue.extend(self.store.children(&run.id).await?);
            if keep(&run) {
                out.push(run);
            }
        }
        Ok(out)
    }

    fn notify(&self, id: &str, result: Result<RunOutcome, String>) {
        let mut waiters = self.waiters.lock().expect("waiters").remove(id).unwrap_or_default();
        waiters.extend(self.settle_waiters.lock().expect("waiters").remove(id).unwrap_or_default());
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }

    /// The run parked: tell those waiting for it to settle.
    fn notify_parked(&self, id: &str, wake_at: Option<i64>) {
        let waiters = self.settle_waiters.lock().expect("waiters").remove(id).unwrap_or_default();
        let parked = RunOutcome { id: id.to_owned(), status: RunStatus::Waiting, output: None, error: None, wake_at };
        for w in waiters {
            let _ = w.send(Ok(parked.clone()));
        }
    }

    /// A signal arrived in root `root`'s tree: its drivers here look, or,
    /// if it is parked and this process would drive it, it wakes now.
    fn nudge(&self, root: &str) {
        if let Some(active) = self.active.lock().expect("active").get(root) {
            active.nudge.send_modify(|n| *n = n.wrapping_add(1));
            return;
        }
        let waited_for = self.waiters.lock().expect("waiters").contains_key(root);
        if self.options.worker || waited_for {
            self.add_timer(self.clock.now_ms(), root.to_owned());
        }
    }

    /// Sets a metrics gauge, if metrics are on.
    fn gauge(&self, which: fn(&switchyard_observability::metrics::Gauges) -> &std::sync::atomic::AtomicU64, v: u64) {
        if let Some(m) = self.options.telemetry.metrics() {
            which(m.gauges()).store(v, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn gauge_add(
        &self,
        which: fn(&switchyard_observability::metrics::Gauges) -> &std::sync::atomic::AtomicU64,
        d: i64,
    ) {
        if let Some(m) = self.options.telemetry.metrics() {
            let g = which(m.gauges());
            if d >= 0 {
                g.fetch_add(d as u64, std::sync::atomic::Ordering::Relaxed);
            } else {
                let _ =
                    g.fetch_update(std::sync::atomic::Ordering::Relaxed, std::sync::atomic::Ordering::Relaxed, |v| {
                        Some(v.saturating_sub(d.unsigned_abs()))
                    });
            }
        }
    }

    fn add_timer(&self, at: i64, id: String) {
        if self.timers.lock().expect("timers").insert(at, id) {
            self.timer_changed.notify_one();
        }
    }

    /// The slots of a workflow with a `concurrency` limit. A definition with
    /// a different limit replaces them (runs holding old slots finish on them).
    fn workflow_permits(&self, def: &Definition) -> Option<Arc<Semaphore>> {
        let limit = def.workflow.concurrency()?;
        let mut map = self.per_workflow.lock().expect("per_workflow");
        let entry = map
            .entry(def.workflow.name().to_owned())
            .or_insert_with(|| (limit, Arc::new(Semaphore::new(limit as usize))));
        if entry.0 != limit {
            *entry = (limit, Arc::new(Semaphore::new(limit as usize)));
        }
        Some(entry.1.clone())
    }
}

/// Starts driving a claimed root run (after its concurrency slots are free).
/// `journal` is the run's journal when the caller has just written all of it.
///
/// Every way the drive can end (finished, parked, fenced, an engine error,
/// a panic) takes the run out of the active set, tells its waiters, and
/// leaves the run resumable: unless another node took it over, the lease is
/// given back so a worker or `runs resume` can continue at once.
fn dispatch(inner: &Arc<Inner>, id: String, claim: Claim, def: Arc<Definition>, journal: Option<Vec<JournalEntry>>) {
    let token = CancellationToken::new();
    let cancelled_by = Arc::new(Mutex::new(claim.cancel_actor.clone()));
    let (nudge_tx, nudge) = watch::channel(0u64);
    if claim.cancel_requested {
        // A cancel requested while nobody drove the run wins over the takeover.
        token.cancel();
    }
    {
        let mut active = inner.active.lock().expect("active");
        if active.contains_key(&id) {
            // Already driven here (the paths that claim check first, so this
            // is a bug): give the new claim back rather than leave the run
            // owned with nobody driving it under that epoch.
            tracing::error!(run = %id, "claimed a run already driven here; releasing the claim");
            let (inner, fence) = (inner.clone(), Fence { root: id.clone(), epoch: claim.epoch });
            tokio::spawn(async move {
                let _ = inner.store.release(&inner.node, &fence).await;
            });
            return;
        }
        active.insert(
            id.clone(),
            Active { cancel: token.clone(), cancelled_by: cancelled_by.clone(), abort: None, nudge: nudge_tx },
        );
        inner.gauge(|g| &g.active, active.len() as u64);
    }
    let task_inner = inner.clone();
    let task_id = id.clone();
    let task = tokio::spawn(async move {
        let (inner, id) = (task_inner, task_id);
        let fence = Fence { root: id.clone(), epoch: claim.epoch };
        // A run that must wait for a slot does not keep its journal meanwhile:
        // it is read back when the run starts.
        let journal = journal.filter(|_| inner.global.available_permits() > 0);
        // Queued until a slot is free; a cancelled run does not wait for one.
        let permits = async {
            let global = inner.global.clone().acquire_owned().await;
            let per_workflow = match inner.workflow_permits(&def) {
                Some(s) => Some(s.acquire_owned().await),
                None => None,
            };
            (global, per_workflow)
        };
        inner.gauge_add(|g| &g.queued, 1);
        let (global, per_workflow) = tokio::select! {
            p = permits => (Some(p.0), p.1),
            _ = token.cancelled() => (None, None),
        };
        inner.gauge_add(|g| &g.queued, -1);
        let run = RunRef {
            id: id.clone(),
            is_root: true,
            definition: def.hash.as_str().into(),
            fence: fence.clone(),
            cancelled_by,
            nudge,
            trace: telemetry::TraceParent::Root,
        };
        let drive = async {
            let driver = match journal {
                Some(entries) => {
                    Driver::from_journal(inner.clone(), run, def.workflow.clone(), token.clone(), &entries)?
                }
                None => Driver::load(inner.clone(), run, def.workflow.clone(), token.clone()).await?,
            };
            driver.drive().await
        };
        // A panic in the driver is a bug, but it must not strand the run.
        let result = match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(drive)).await {
            Ok(result) => result,
            Err(panic) => {
                Err(DriveError::Invalid(id.clone(), format!("the driver panicked: {}", panic_message(&panic))))
            }
        };
        drop((global, per_workflow));
        {
            let mut active = inner.active.lock().expect("active");
            active.remove(&id);
            inner.gauge(|g| &g.active, active.len() as u64);
        }
        match result {
            Ok(Outcome::Finished { status, output, error }) => {
                inner.notify(&id, Ok(RunOutcome { id: id.clone(), status, output, error, wake_at: None }));
            }
            Ok(Outcome::Parked { wake_at: Some(at) }) => {
                inner.notify_parked(&id, Some(at));
                inner.add_timer(at, id);
            }
            Ok(Outcome::Parked { wake_at: None }) => {
                inner.notify_parked(&id, None);
                // Waits for a signal. One sent while the run was parking made
                // it due at once (the store saw it): pick it up again.
                match inner.store.signalled(&id).await {
                    Ok(pending) if !pending.is_empty() => inner.add_timer(inner.clock.now_ms(), id),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(run = %id, error = %e, "looking for signals; the poll finds them"),
                }
            }
            Err(DriveError::Commit(CommitError::Fenced(_))) => {
                tracing::warn!(run = %id, "lease lost; another node continues the run");
                inner.notify(&id, Err("its lease was lost; another process continues it".into()));
            }
            Err(e) => {
                tracing::error!(run = %id, error = %e, "run stopped by an engine error; it can be resumed");
                if let Err(release) = inner.store.release(&inner.node, &fence).await {
                    tracing::warn!(run = %id, error = %release, "releasing the lease; it expires by itself");
                }
                inner.notify(&id, Err(e.to_string()));
            }
        }
    });
    if let Some(active) = inner.active.lock().expect("active").get_mut(&id) {
        active.abort = Some(task.abort_handle());
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Claims a run found in the store (as `record` shows it) and drives it.
/// False if the claim lost: another process, or another path here, took it.
async fn pick_up(inner: &Arc<Inner>, record: &RunRecord) -> Result<bool> {
    let id = record.id.as_str();
    if inner.active.lock().expect("active").contains_key(id) {
        return Ok(false);
    }
    let Some(claim) = inner.store.claim(id, &inner.node, record.epoch, inner.options.lease, false).await? else {
        // Finished or taken meanwhile: waiters here learn of the end from the poll.
        return Ok(false);
    };
    let def = match inner.definition(&record.definition).await {
        Ok(def) => def,
        Err(e) => {
            let _ = inner.store.release(&inner.node, &Fence { root: id.to_owned(), epoch: claim.epoch }).await;
            return Err(e);
        }
    };
    tracing::info!(run = %id, workflow = %record.workflow, "picking up run");
    dispatch(inner, id.to_owned(), claim, def, None);
    Ok(true)
}

/// Wakes a parked run whose timer fired here.
async fn wake(inner: &Arc<Inner>, id: &str) -> Result<()> {
    let Some(record) = inner.store.run(id).await? else { return Ok(()) };
    if record.status.is_finished() {
        return Ok(());
    }
    pick_up(inner, &record).await.map(|_| ())
}

async fn timer_loop(inner: Arc<Inner>) {
    loop {
        let next = inner.timers.lock().expect("timers").first();
        let changed = inner.timer_changed.notified();
        match next {
            Some((at, id)) if at <= inner.clock.now_ms() => {
                inner.timers.lock().expect("timers").remove(&id);
                if let Err(e) = wake(&inner, &id).await {
                    tracing::error!(run = %id, error = %e, "waking run");
                }
                continue;
            }
            Some((at, _)) => {
                tokio::select! {
                    _ = inner.clock.sleep_until(at) => {}
                    _ = changed => {}
                    _ = inner.shutdown.cancelled() => return,
                }
            }
            None => {
                tokio::select! {
                    _ = changed => {}
                    _ = inner.shutdown.cancelled() => return,
                }
            }
        }
    }
}

async fn lease_loop(inner: Arc<Inner>) {
    // Real time, like the poll: renewal is housekeeping, and keeping it off
    // the engine clock lets tests move that clock only when a run waits.
    let every = (inner.options.lease / 3).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = inner.shutdown.cancelled() => return,
        }
        // Only the runs driven here: a run whose driver ended keeps no lease.
        let ids: Vec<String> = inner.active.lock().expect("active").keys().cloned().collect();
        if let Err(e) = inner.store.renew(&inner.node, &ids, inner.options.lease).await {
            tracing::warn!(error = %e, "renewing leases");
        }
    }
}

async fn poll_loop(inner: Arc<Inner>) {
    loop {
        if let Err(e) = poll_once(&inner).await {
            tracing::warn!(error = %e, "polling the store");
        }
        // Real time, not the engine clock: this is housekeeping cadence. A
        // change the store can report (a lease given back, a cancel asked
        // for) ends the wait early.
        tokio::select! {
            _ = inner.store.changed(inner.options.poll_interval) => {}
            _ = inner.shutdown.cancelled() => return,
        }
    }
}

async fn poll_once(inner: &Arc<Inner>) -> Result<()> {
    // Waiters for runs not driven here (another process took them over or
    // finished them): tell them once the run has ended.
    let orphans: Vec<String> = {
        let waiters = inner.waiters.lock().expect("waiters");
        let active = inner.active.lock().expect("active");
        waiters.keys().filter(|id| !active.contains_key(*id)).cloned().collect()
    };
    let now = inner.clock.now_ms();
    for id in orphans {
        match inner.store.run(&id).await? {
            Some(record) if record.status.is_finished() => inner.notify(&id, Ok(outcome(&record))),
            // Parked and now due (a signal came from another process): the
            // process waiting for it drives it, worker or not.
            Some(record)
                if record.status == RunStatus::Waiting
                    && record.owner.is_none()
                    && record.wake_at.is_some_and(|at| at <= now) =>
            {
                inner.timers.lock().expect("timers").remove(&id);
                if let Err(e) = pick_up(inner, &record).await {
                    tracing::warn!(run = %id, error = %e, "picking up a woken run");
                }
            }
            _ => {}
        }
    }
    // Signals sent from other processes to runs driven here.
    if !inner.active.lock().expect("active").is_empty() {
        for root in inner.store.signalled_roots().await? {
            if let Some(active) = inner.active.lock().expect("active").get(&root) {
                active.nudge.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }
    for (id, actor) in inner.store.cancel_requests(&inner.node).await? {
        if let Some(active) = inner.active.lock().expect("active").get(&id) {
            active.cancelled_by.lock().expect("cancelled_by").get_or_insert(actor.unwrap_or_default());
            active.cancel.cancel();
        }
    }
    if !inner.options.worker {
        return Ok(());
    }
    if inner.options.telemetry.metrics().is_some() {
        inner.gauge(|g| &g.parked, inner.store.parked_count().await?);
    }
    // Runs parked by any process wake here on time; the soonest first, so
    // many far-off ones cannot hide a near one.
    for (id, at) in inner.store.next_wakes(now, 256).await? {
        inner.add_timer(at, id);
    }
    // Claim only what this process has room to start, in one statement;
    // the rest stays for other workers.
    let room = inner.global.available_permits().min(256) as i64;
    if room == 0 {
        return Ok(());
    }
    for (run, claim) in inner.store.claim_due(&inner.node, now, inner.options.lease, room).await? {
        let fence = Fence { root: run.id.clone(), epoch: claim.epoch };
        if inner.active.lock().expect("active").contains_key(&run.id) {
            // Its driver here let the lease lapse and is now fenced; the run
            // goes back to the store for the next poll.
            let _ = inner.store.release(&inner.node, &fence).await;
            continue;
        }
        // One run that cannot be started (its definition no longer
        // compiles) does not stop the others, and is not kept.
        match inner.definition(&run.definition).await {
            Ok(def) => {
                tracing::info!(run = %run.id, workflow = %run.workflow, "picking up run");
                inner.timers.lock().expect("timers").remove(&run.id);
                dispatch(inner, run.id.clone(), claim, def, None);
            }
            Err(e) => {
                tracing::warn!(run = %run.id, error = %e, "picking up run");
                let _ = inner.store.release(&inner.node, &fence).await;
            }
        }
    }
    Ok(())
}
