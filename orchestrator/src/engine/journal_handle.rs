//! A run's side of the journal: assigns sequence numbers and hands writes to
//! the group-commit writer in order.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::Value;
use switchyard_steps::{Clock, OpSink, StepError};

use super::writer::{Ack, CommitError, Writer, wait};
use crate::journal::Event;
use crate::store::{Fence, RunUpdate, Write};

pub(crate) struct RunJournal {
    run: String,
    fence: Fence,
    writer: Writer,
    clock: Arc<dyn Clock>,
    state: Mutex<JournalState>,
}

struct JournalState {
    next_seq: i64,
    /// Acks of writes nobody waited for; checked at the next awaited write so
    /// a lost write is never silently skipped.
    unconfirmed: Vec<Ack>,
}

impl RunJournal {
    pub fn new(run: String, fence: Fence, next_seq: i64, writer: Writer, clock: Arc<dyn Clock>) -> Arc<Self> {
        Arc::new(Self { run, fence, writer, clock, state: Mutex::new(JournalState { next_seq, unconfirmed: Vec::new() }) })
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    fn send(&self, events: Vec<Event>, update: Option<RunUpdate>) -> Ack {
        let now = self.clock.now_ms();
        let mut st = self.state.lock().expect("journal lock");
        let first_seq = st.next_seq;
        st.next_seq += events.len() as i64;
        self.writer.submit(Write::Append {
            fence: self.fence.clone(),
            run: self.run.clone(),
            first_seq,
            events: events.into_iter().map(|e| (now, e)).collect(),
            update,
        })
    }

    /// Appends without waiting (the write still lands before any later one).
    pub fn record(&self, events: Vec<Event>, update: Option<RunUpdate>) {
        if events.is_empty() && update.is_none() {
            return;
        }
        let ack = self.send(events, update);
        self.state.lock().expect("journal lock").unconfirmed.push(ack);
    }

    /// Appends and waits until committed, together with everything recorded
    /// before.
    pub async fn commit(&self, events: Vec<Event>, update: Option<RunUpdate>) -> Result<(), CommitError> {
        let ack = self.send(events, update);
        let earlier = std::mem::take(&mut self.state.lock().expect("journal lock").unconfirmed);
        wait(ack).await?;
        for ack in earlier {
            wait(ack).await?;
        }
        Ok(())
    }
}

/// Journals a step's sub-operations (see `StepContext::journaled`).
pub(crate) struct StepOps {
    pub journal: Arc<RunJournal>,
    pub step: String,
    pub attempt: u32,
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
        };
        self.journal
            .commit(vec![event], None)
            .await
            .map_err(|e| StepError::retryable("journal", e.to_string()))
    }
}
