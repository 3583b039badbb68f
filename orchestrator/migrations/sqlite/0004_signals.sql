-- Signals: what a run's steps wait for (an approval, a callback) and what
-- was sent to them. A row is made by whichever comes first: the step's wait
-- (`waiting_since`) or the signal (`signalled_at`, kept until a step waits).
-- `done_at`: the wait ended (received, timed out, or the run finished).
CREATE TABLE waits (
    run_id        TEXT NOT NULL REFERENCES runs(id),
    name          TEXT NOT NULL,
    root_id       TEXT NOT NULL,
    step          TEXT,
    deadline      INTEGER,
    waiting_since INTEGER,
    payload       TEXT,
    actor         TEXT,
    signalled_at  INTEGER,
    done_at       INTEGER,
    PRIMARY KEY (run_id, name)
) WITHOUT ROWID;
-- Signals sent but not yet received, by run tree (the engine's wake-ups).
CREATE INDEX waits_pending ON waits (root_id, run_id) WHERE signalled_at IS NOT NULL AND done_at IS NULL;
