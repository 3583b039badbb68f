-- Indexes for the queries the engine and a dashboard run: due parked runs
-- and orphaned runs (claimable), a parent's children in order, a whole tree.
CREATE INDEX runs_due ON runs (status, wake_at) WHERE parent_id IS NULL;
CREATE INDEX runs_by_parent_created ON runs (parent_id, created_at);
CREATE INDEX runs_by_root ON runs (root_id);
DROP INDEX runs_by_parent;
