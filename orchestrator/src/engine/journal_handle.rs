//! A run's side of the journal: assigns sequence numbers and hands writes to
//! the group-commit writer in order.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::Value;
use switchyard_steps::{Clock, OpSink, RecordedOp, StepError};

use super::telemetry::RunTelemetry;
use super::writer::{Ack, CommitError, Writer, wait};
use crate::journal::{Encoded, Event};
use crate::store::{Fence, RunUpdate, Write};

pub(crate) struct RunJournal {
    run: String,
    fence: Fence,
    writer: Writer,
    clock: Arc<dyn Clock>,
    /// Next sequence number; the lock also keeps sends in order.
    next_seq: Mutex<i64>,
    /// Spans and metrics, fed with what is committed (`None`: nothing is
    /// reported for this run).
    telemetry: Option<Mutex<Box<RunTelemetry>>>,
}

impl RunJournal {
    pub fn new(
        run: String,
        fence: Fence,
        next_seq: i64,
        writer: Writer,
        clock: Arc<dyn Clock>,
        telemetry: Option<Box<RunTelemetry>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            run,
            fence,
            writer,
            clock,
            next_seq: Mutex::new(next_seq),
            telemetry: telemetry.map(Mutex::new),
        })
    }

    /// The run's telemetry, if anything is reported for it.
    pub fn telemetry(&self) -> Option<std::sync::MutexGuard<'_, Box<RunTelemetry>>> {
        // A panic while it was held left a half-applied batch: spans may be
        // off, the run is not.
        self.telemetry.as_ref().map(|t| t.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The clock journal times come from.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    async fn send(&self, events: &[Event], update: Option<RunUpdate>) -> (Ack, i64) {
        // Room first (the queue is bounded), then number and send without an
        // await in between, so sequence numbers reach the writer in order.
        let slot = self.writer.reserve().await;
        let now = self.clock.now_ms();
        let mut next_seq = self.next_seq.lock().expect("journal lock");
        let first_seq = *next_seq;
        *next_seq += events.len() as i64;
        let ack = slot.send(Write::Append {
            fence: self.fence.clone(),
            run: self.run.clone(),
            first_seq,
            events: Encoded::all(now, events),
            update,
        });
        (ack, now)
    }

    /// Appends and waits until committed; then the run's telemetry sees
    /// the events (what did not commit is not reported).
    pub async fn commit(&self, events: Vec<Event>, update: Option<RunUpdate>) -> Result<(), CommitError> {
        let (ack, at) = self.send(&events, update).await;
        wait(ack).await?;
        if let Some(mut t) = self.telemetry() {
            t.committed(at, &events);
        }
        Ok(())
    }
}

/// Journals a step's sub-operations (see `StepContext::journaled`). An
/// operation is held in `unsent` until the step's next operation flushes it,
/// or until the attempt ends: the driver then writes it in the same commit
/// as the attempt's result, ahead of it.
pub(crate) struct StepOps {
    pub journal: Arc<RunJournal>,
    pub step: String,
    pub attempt: u32,
    /// The driver's copy, replayed if the step is called again in this
    /// process (after a suspension).
    pub recorded: Arc<Mutex<Vec<RecordedOp>>>,
    /// Recorded, not yet sent to the writer.
    pub unsent: Arc<Mutex<Vec<Event>>>,
}

#[async_trait]
impl OpSink for StepOps {
    async fn record(&self, index: u32, name: &str, value: &Value) -> Result<(), StepError> {
        let event = Event::StepOp {
            step: self.step.clone(),
            attempt: self.attempt,
            index,
            name: name.to_owned(),
            value: value.clone(),
            at: Some(self.journal.now_ms()),
        };
        self.unsent.lock().expect("unsent ops").push(event);
        self.recorded.lock().expect("ops").push(RecordedOp { index, name: name.to_owned(), value: value.clone() });
        Ok(())
    }

    async fn flush(&self) -> Result<(), StepError> {
        let events = std::mem::take(&mut *self.unsent.lock().expect("unsent ops"));
        if events.is_empty() {
            return Ok(());
        }
        self.journal.commit(events, None).await.map_err(|e| StepError::retryable("journal", e.to_string()))
    }
}
