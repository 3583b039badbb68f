//! Durable state: definitions, runs and their journals.
//!
//! [`Store`] is the contract; [`SqliteStore`] implements it on embedded SQLite
//! (WAL). A PostgreSQL implementation follows the same contract. All journal
//! writes go through [`Store::commit`], which takes a batch (group commit) and
//! checks each write's fence: a write is applied only if its root run is still
//! owned by this node at the epoch the node claimed it with.

mod sqlite;

use async_trait::async_trait;
use serde_json::Value;
use switchyard_steps::StepError;

use crate::journal::{Event, RunStatus};
use crate::workflow::Bundle;

pub use sqlite::{SqliteOptions, SqliteStore};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("run {0} is owned by another node (lease lost)")]
    Fenced(String),
    #[error("no run {0:?}")]
    NotFound(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database schema: {0}")]
    Schema(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The claim a write relies on: root run and epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub root: String,
    pub epoch: i64,
}

#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: String,
    pub root_id: String,
    pub parent_id: Option<String>,
    pub workflow: String,
    pub version: u32,
    pub definition: String,
    pub status: RunStatus,
    pub input: Value,
    /// Roots are created owned by the node that starts them.
    pub owner: Option<String>,
    pub epoch: i64,
    pub lease_until: Option<i64>,
    pub idempotency_key: Option<String>,
}

/// A change to a run's row, written with its events.
#[derive(Debug, Clone, Default)]
pub struct RunUpdate {
    pub status: Option<RunStatus>,
    pub output: Option<Value>,
    pub error: Option<StepError>,
    pub wake_at: Option<i64>,
    /// Give up the lease (parked or finished).
    pub release: bool,
}

#[derive(Debug, Clone)]
pub enum Write {
    /// Creates a run (ignored if the id exists) with its first events.
    Create { fence: Option<Fence>, run: NewRun, events: Vec<(i64, Event)> },
    /// Appends events from `first_seq` on and applies `update`.
    Append { fence: Fence, run: String, first_seq: i64, events: Vec<(i64, Event)>, update: Option<RunUpdate> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: String,
    pub root_id: String,
    pub parent_id: Option<String>,
    pub workflow: String,
    pub version: u32,
    pub definition: String,
    pub status: RunStatus,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<StepError>,
    pub owner: Option<String>,
    pub epoch: i64,
    pub lease_until: Option<i64>,
    pub wake_at: Option<i64>,
    pub cancel_requested: bool,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JournalEntry {
    pub seq: i64,
    pub at: i64,
    pub event: Event,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn put_definition(&self, hash: &str, name: &str, version: u32, bundle: &Bundle, now: i64) -> Result<()>;
    async fn definition(&self, hash: &str) -> Result<Bundle>;

    /// Applies a batch in one transaction; one result per write. A write whose
    /// fence does not hold is rejected with [`Error::Fenced`] without
    /// affecting the others.
    async fn commit(&self, node: &str, now: i64, writes: &[Write]) -> Result<Vec<Result<()>>>;

    async fn run(&self, id: &str) -> Result<Option<RunRecord>>;
    async fn run_by_key(&self, idempotency_key: &str) -> Result<Option<RunRecord>>;
    /// Newest first; child runs are left out unless `include_children`.
    async fn runs(&self, status: Option<RunStatus>, include_children: bool, limit: i64) -> Result<Vec<RunRecord>>;
    async fn children(&self, parent: &str) -> Result<Vec<RunRecord>>;
    async fn journal(&self, id: &str) -> Result<Vec<JournalEntry>>;

    /// Takes the lease of a root run that is unowned or whose lease expired,
    /// returning the new epoch. `None` if another node holds it or the run is
    /// finished (unless `allow_finished`, used by resume).
    async fn claim(
        &self,
        id: &str,
        node: &str,
        now: i64,
        lease_until: i64,
        allow_finished: bool,
    ) -> Result<Option<i64>>;
    /// Root runs a worker should pick up: unfinished, not leased (or lease
    /// expired). Waiting runs are included with their `wake_at`.
    async fn claimable(&self, now: i64, limit: i64) -> Result<Vec<RunRecord>>;
    /// Extends the leases of every run this node owns.
    async fn renew(&self, node: &str, lease_until: i64) -> Result<u64>;
    /// Releases every lease of this node (clean shutdown).
    async fn release_all(&self, node: &str) -> Result<()>;
    /// Runs owned by `node` whose cancellation was requested.
    async fn cancel_requests(&self, node: &str) -> Result<Vec<String>>;
    async fn request_cancel(&self, id: &str, now: i64) -> Result<()>;
}

#[cfg(test)]
mod tests;
