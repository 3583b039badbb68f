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
use switchyard_steps::{Signal, StepError};

use crate::journal::{Encoded, Event, RunStatus};
use crate::workflow::Bundle;

pub use sqlite::{SqliteOptions, SqliteStore};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The driver's message already says what went wrong; it is not exposed
    /// as a source too, so error chains print it once.
    #[error("database: {0}")]
    Db(sqlx::Error),
    #[error("run {0} is owned by another node (lease lost)")]
    Fenced(String),
    #[error("no run {0:?}")]
    NotFound(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database schema: {0}")]
    Schema(String),
    /// Busy, locked or unreachable for now: worth trying again.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Db(e)
    }
}

impl Error {
    /// Worth trying again: the database was busy or locked by another
    /// process, or an I/O error that may pass (a full disk being cleared).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Db(sqlx::Error::Database(e)) => {
                // SQLite primary result codes: BUSY 5, LOCKED 6, IOERR 10, FULL 13
                // (extended codes carry the primary one in their low byte).
                let code = e.code().and_then(|c| c.parse::<i64>().ok()).map(|c| c & 0xff);
                matches!(code, Some(5 | 6 | 10 | 13))
            }
            Error::Db(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) | Error::Unavailable(_) => true,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A claim taken by [`Store::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The new epoch: every write under this claim carries it.
    pub epoch: i64,
    /// Someone asked to cancel the run: the new owner ends it `cancelled`.
    pub cancel_requested: bool,
    /// Who asked, if they said.
    pub cancel_actor: Option<String>,
}

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
    /// How long the owner's lease lasts from the store's now.
    pub lease: Option<std::time::Duration>,
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
    /// Signals the run starts or stops waiting for.
    pub waits: Vec<WaitChange>,
}

/// A change to what a run waits for, written with its events.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitChange {
    /// Step `step` waits for signal `name`, at most until `deadline`.
    Wait { name: String, step: String, deadline: Option<i64> },
    /// The wait for `name` ended: its signal was received (journaled with
    /// this write) or its deadline passed.
    Done { name: String },
}

/// What [`Store::signal`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signalled {
    /// Recorded; the run (and its parents, if parked) are due now.
    /// `waiting`: a step was already waiting for it (else it is kept until
    /// one does).
    Delivered { root: String, waiting: bool },
    /// This run already received a signal of that name.
    Duplicate,
    /// The step that waited for it stopped waiting (its deadline passed),
    /// or `require_waiting` was set and no step waits for it.
    NotWaiting,
    /// The run is finished.
    Finished(RunStatus),
}

/// A child run as its parent step sees it when it starts or wakes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildState {
    pub id: String,
    pub status: RunStatus,
    pub wake_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub enum Write {
    /// Creates a run (ignored if the id exists) with its first events.
    Create { fence: Option<Fence>, run: NewRun, events: Vec<Encoded> },
    /// Appends events from `first_seq` on and applies `update`.
    Append { fence: Fence, run: String, first_seq: i64, events: Vec<Encoded>, update: Option<RunUpdate> },
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
    /// The sequence number the next event of run `id` gets (0 for none).
    async fn next_seq(&self, id: &str) -> Result<i64>;

    /// Takes the lease of a root run for `lease`, as a compare-and-set on
    /// the epoch the caller last saw (`seen_epoch`): of two claims that saw
    /// the same epoch, at most one succeeds, even from one node. The run must
    /// be unowned, owned by `node`, or its lease expired. `None` if the claim
    /// lost, or the run is finished (unless `allow_finished`, used by resume).
    ///
    /// Lease times are the store's own (its clock; the database server's
    /// with PostgreSQL), never a caller's: nodes whose clocks differ still
    /// agree on when a lease has expired.
    async fn claim(
        &self,
        id: &str,
        node: &str,
        seen_epoch: i64,
        lease: std::time::Duration,
        allow_finished: bool,
    ) -> Result<Option<Claim>>;
    /// Root runs a worker should pick up now, most overdue first: parked runs
    /// whose `wake_at` has come by `now` (the engine's clock, which timers
    /// use), and unfinished runs nobody holds (unowned, or their owner's lease
    /// expired by the store's clock). Parked runs not yet due are not
    /// returned.
    async fn claimable(&self, now: i64, limit: i64) -> Result<Vec<RunRecord>>;
    /// Claims up to `limit` of the runs [`Store::claimable`] would return, in
    /// one statement, most overdue first, each for `lease`: a worker's
    /// pick-up without a read-then-claim race per run. Returns each run as
    /// claimed.
    async fn claim_due(
        &self,
        node: &str,
        now: i64,
        lease: std::time::Duration,
        limit: i64,
    ) -> Result<Vec<(RunRecord, Claim)>>;
    /// Parked root runs nobody holds that are due after `now`, soonest
    /// first, as `(id, wake_at)`: a worker sets its timers from them.
    async fn next_wakes(&self, now: i64, limit: i64) -> Result<Vec<(String, i64)>>;
    /// Runs (root and child) parked: `waiting` with no owner.
    async fn parked_count(&self) -> Result<u64>;
    /// Extends the leases of the runs `ids` that this node owns to `lease`
    /// from the store's now.
    async fn renew(&self, node: &str, ids: &[String], lease: std::time::Duration) -> Result<u64>;
    /// Gives up one run's lease, if still held under `fence`.
    async fn release(&self, node: &str, fence: &Fence) -> Result<()>;
    /// Releases every lease of this node (clean shutdown).
    async fn release_all(&self, node: &str) -> Result<()>;
    /// Runs owned by `node` whose cancellation was requested, with who asked.
    async fn cancel_requests(&self, node: &str) -> Result<Vec<(String, Option<String>)>>;
    async fn request_cancel(&self, id: &str, actor: Option<&str>, now: i64) -> Result<()>;

    /// Sends signal `name` to run `run` (root or child) in one transaction:
    /// records it, and makes the run and each parked run above it due now,
    /// so the tree is driven again. With `require_waiting`, only a run whose
    /// step already waits for it takes it.
    async fn signal(
        &self,
        run: &str,
        name: &str,
        payload: &Value,
        actor: Option<&str>,
        now: i64,
        require_waiting: bool,
    ) -> Result<Signalled>;
    /// Signals sent to run `run` and not yet received.
    async fn signals(&self, run: &str) -> Result<Vec<Signal>>;
    /// Runs of root `root`'s tree with signals sent and not yet received.
    async fn signalled(&self, root: &str) -> Result<Vec<String>>;
    /// Root runs whose tree has signals sent and not yet received.
    async fn signalled_roots(&self) -> Result<Vec<String>>;
    /// The children of run `parent`: id, status and wake-up time only.
    async fn child_states(&self, parent: &str) -> Result<Vec<ChildState>>;

    /// Resolves when something a worker acts on may have changed (a lease was
    /// given back, a cancel was requested), or after `within` at the latest:
    /// the engine's poll waits on it. A store that cannot be told by other
    /// processes waits `within`; PostgreSQL will use `LISTEN/NOTIFY`.
    async fn changed(&self, within: std::time::Duration) {
        tokio::time::sleep(within).await
    }
}

#[cfg(test)]
mod tests;
