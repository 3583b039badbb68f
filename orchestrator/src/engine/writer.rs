//! Group commit: every journal write of every run goes through one task that
//! drains what has queued up while the previous transaction committed and
//! commits it as one transaction. Durability then costs one commit per batch,
//! not one per step.

use std::sync::Arc;
use std::time::Duration;

use switchyard_steps::Clock;
use tokio::sync::{mpsc, oneshot};

use switchyard_observability::Metrics;

use crate::store::{self, Store, Write};

/// Most writes in one transaction.
const MAX_BATCH: usize = 2048;

/// Why a write did not land.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitError {
    #[error("run {0} is owned by another node (lease lost)")]
    Fenced(String),
    #[error("journal write failed: {0}")]
    Failed(String),
}

pub(crate) type Ack = oneshot::Receiver<Result<(), CommitError>>;

/// Writes waiting for the writer at most; senders wait for room (back-pressure).
const QUEUE: usize = 8192;

/// Tries of a batch whose commit failed with a transient error (busy,
/// locked, I/O), with doubling pauses from [`RETRY_PAUSE`].
const TRANSIENT_TRIES: u32 = 6;
const RETRY_PAUSE: Duration = Duration::from_millis(20);

struct Request {
    write: Write,
    ack: oneshot::Sender<Result<(), CommitError>>,
}

#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Request>,
}

/// Room for one write in the writer's queue, reserved ahead so that a
/// caller can number its events and send them without waiting in between.
pub(crate) struct Slot<'a> {
    permit: Option<mpsc::Permit<'a, Request>>,
}

impl Slot<'_> {
    /// Queues a write; the returned ack resolves once it is committed.
    pub fn send(self, write: Write) -> Ack {
        let (ack, rx) = oneshot::channel();
        match self.permit {
            Some(permit) => permit.send(Request { write, ack }),
            None => {
                let _ = ack.send(Err(stopped()));
            }
        }
        rx
    }
}

fn stopped() -> CommitError {
    CommitError::Failed("the journal writer has stopped".into())
}

impl Writer {
    pub fn start(store: Arc<dyn Store>, node: String, clock: Arc<dyn Clock>, metrics: Option<Arc<Metrics>>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, node, clock, metrics, rx));
        Self { tx }
    }

    /// Waits for room in the queue.
    pub async fn reserve(&self) -> Slot<'_> {
        Slot { permit: self.tx.reserve().await.ok() }
    }

    /// Queues a write and waits for its commit.
    pub async fn commit(&self, write: Write) -> Result<(), CommitError> {
        wait(self.reserve().await.send(write)).await
    }
}

pub(crate) async fn wait(ack: Ack) -> Result<(), CommitError> {
    ack.await.unwrap_or_else(|_| Err(stopped()))
}

async fn run(
    store: Arc<dyn Store>,
    node: String,
    clock: Arc<dyn Clock>,
    metrics: Option<Arc<Metrics>>,
    mut rx: mpsc::Receiver<Request>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        let (writes, acks): (Vec<Write>, Vec<_>) = batch.drain(..).map(|r| (r.write, r.ack)).unzip();
        let started = std::time::Instant::now();
        let results = commit_batch(store.as_ref(), &node, clock.as_ref(), &writes).await;
        if let Some(m) = &metrics {
            m.committed(writes.len(), started.elapsed().as_secs_f64());
        }
        for (ack, result) in acks.into_iter().zip(results) {
            let _ = ack.send(result);
        }
    }
}

/// Commits a batch, retrying transient failures. If the batch still fails,
/// each write is committed on its own, so one bad write fails only itself.
async fn commit_batch(
    store: &dyn Store,
    node: &str,
    clock: &dyn Clock,
    writes: &[Write],
) -> Vec<Result<(), CommitError>> {
    match commit_retrying(store, node, clock, writes).await {
        Ok(results) => results.into_iter().map(|r| r.map_err(commit_error)).collect(),
        Err(e) if writes.len() == 1 => vec![Err(commit_error(e))],
        Err(e) => {
            tracing::warn!(error = %e, writes = writes.len(), "group commit failed; committing its writes one by one");
            let mut out = Vec::with_capacity(writes.len());
            for write in writes {
                let result = match commit_retrying(store, node, clock, std::slice::from_ref(write)).await {
                    Ok(mut results) => results.pop().unwrap_or(Ok(())).map_err(commit_error),
                    Err(e) => Err(commit_error(e)),
                };
                out.push(result);
            }
            out
        }
    }
}

async fn commit_retrying(
    store: &dyn Store,
    node: &str,
    clock: &dyn Clock,
    writes: &[Write],
) -> store::Result<Vec<store::Result<()>>> {
    let mut pause = RETRY_PAUSE;
    let mut tries = 1;
    loop {
        let started = std::time::Instant::now();
        match store.commit(node, clock.now_ms(), writes).await {
            Ok(results) => {
                tracing::trace!(writes = writes.len(), micros = started.elapsed().as_micros() as u64, "group commit");
                return Ok(results);
            }
            Err(e) if e.is_transient() && tries < TRANSIENT_TRIES => {
                tracing::warn!(error = %e, writes = writes.len(), "journal commit failed; trying again");
                // Real time: this waits for the disk or another process, not for the run's clock.
                tokio::time::sleep(pause).await;
                pause *= 2;
                tries += 1;
            }
            Err(e) => {
                tracing::error!(error = %e, writes = writes.len(), "journal commit failed");
                return Err(e);
            }
        }
    }
}

fn commit_error(e: store::Error) -> CommitError {
    match e {
        store::Error::Fenced(run) => CommitError::Fenced(run),
        other => CommitError::Failed(other.to_string()),
    }
}
