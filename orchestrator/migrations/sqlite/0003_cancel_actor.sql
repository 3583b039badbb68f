-- Who asked to cancel a run (a CLI user, an API token), journaled by the
-- process that ends it.
ALTER TABLE runs ADD COLUMN cancel_actor TEXT;
