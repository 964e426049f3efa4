-- How each response ended: `complete` (sent in full, whatever its status), `stream_incomplete`
-- (the backend closed the stream without [DONE]), `stream_broken`, `stream_idle_timeout`,
-- `client_disconnected`, or `interrupted` (a stream's provisional row: the stream is still
-- open, or the gateway died while it was; the final record replaces it).
ALTER TABLE usage_records ADD COLUMN outcome TEXT NOT NULL DEFAULT 'complete';

-- The state directory an instance runs in: a new instance on the same host and directory
-- (whose spool lock it holds) retires a predecessor that died without marking itself stopped.
ALTER TABLE instances ADD COLUMN state_dir TEXT;
