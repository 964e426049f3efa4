-- No query of the gateway reads `usage_records_key_ts`, and on SQLite (the single-host
-- default) every index is maintained on the gateway's own CPU: this one cost about a
-- fifth of SQLite's work per inserted row (callgrind: sqlite3_step 9.4 k -> 7.4 k
-- instructions per record). One key's history is still served by the time index
-- (`usage_records_ts`) plus a filter on key_id. PostgreSQL keeps its (key_id, ts_ms) index.
DROP INDEX IF EXISTS usage_records_key_ts;
