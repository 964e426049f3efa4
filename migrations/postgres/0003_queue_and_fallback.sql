-- How long the request waited in its model's queue for a backend (µs; NULL: it did not
-- wait), and the fallback model that answered when the requested one could not (NULL: the
-- requested model answered).
ALTER TABLE usage_records ADD COLUMN queue_us BIGINT;
ALTER TABLE usage_records ADD COLUMN fallback TEXT;
