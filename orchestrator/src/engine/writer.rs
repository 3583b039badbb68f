//! Group commit: every journal write of every run goes through one task that
//! drains what has queued up while the previous transaction committed and
//! commits it as one transaction. Durability then costs one commit per batch,
//! not one per step.

use std::sync::Arc;

use switchyard_steps::Clock;
use tokio::sync::{mpsc, oneshot};

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

struct Request {
    write: Write,
    ack: oneshot::Sender<Result<(), CommitError>>,
}

#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::UnboundedSender<Request>,
}

impl Writer {
    pub fn start(store: Arc<dyn Store>, node: String, clock: Arc<dyn Clock>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(store, node, clock, rx));
        Self { tx }
    }

    /// Queues a write; the returned ack resolves once it is committed.
    pub fn submit(&self, write: Write) -> Ack {
        let (ack, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(req)) = self.tx.send(Request { write, ack }) {
            let _ = req.ack.send(Err(CommitError::Failed("the journal writer has stopped".into())));
        }
        rx
    }

    /// Queues a write and waits for its commit.
    pub async fn commit(&self, write: Write) -> Result<(), CommitError> {
        wait(self.submit(write)).await
    }
}

pub(crate) async fn wait(ack: Ack) -> Result<(), CommitError> {
    ack.await.unwrap_or_else(|_| Err(CommitError::Failed("the journal writer has stopped".into())))
}

async fn run(store: Arc<dyn Store>, node: String, clock: Arc<dyn Clock>, mut rx: mpsc::UnboundedReceiver<Request>) {
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
        let result = store.commit(&node, clock.now_ms(), &writes).await;
        tracing::trace!(writes = writes.len(), micros = started.elapsed().as_micros() as u64, "group commit");
        match result {
            Ok(results) => {
                for (ack, result) in acks.into_iter().zip(results) {
                    let _ = ack.send(result.map_err(|e| match e {
                        store::Error::Fenced(run) => CommitError::Fenced(run),
                        other => CommitError::Failed(other.to_string()),
                    }));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = acks.len(), "journal commit failed");
                let e = CommitError::Failed(e.to_string());
                for ack in acks {
                    let _ = ack.send(Err(e.clone()));
                }
            }
        }
    }
}
