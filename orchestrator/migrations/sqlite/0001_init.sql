-- Workflow definitions: every file a run was compiled from, by content hash.
CREATE TABLE definitions (
    hash       TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    version    INTEGER NOT NULL,
    bundle     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

-- One row per run (child runs of `map` and `workflow` steps too). Status and
-- result are derived from the journal and kept here for listing.
CREATE TABLE runs (
    id               TEXT PRIMARY KEY,
    root_id          TEXT NOT NULL,
    parent_id        TEXT,
    workflow         TEXT NOT NULL,
    version          INTEGER NOT NULL,
    definition       TEXT NOT NULL REFERENCES definitions(hash),
    status           TEXT NOT NULL,
    input            TEXT NOT NULL,
    output           TEXT,
    error            TEXT,
    -- Lease: the node driving this root run, and the fencing epoch that every
    -- journal write must match.
    owner            TEXT,
    epoch            INTEGER NOT NULL DEFAULT 0,
    lease_until      INTEGER,
    wake_at          INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    idempotency_key  TEXT UNIQUE,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    finished_at      INTEGER
);
CREATE INDEX runs_by_status ON runs (status, parent_id);
CREATE INDEX runs_by_owner ON runs (owner);
CREATE INDEX runs_by_parent ON runs (parent_id);

-- The journal: every state change of a run, in order.
CREATE TABLE journal (
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    at     INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    event  TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
