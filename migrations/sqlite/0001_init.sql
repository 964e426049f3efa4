-- API keys: only a SHA-256 of the secret is stored; the id is the public part of the key.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    models        TEXT,             -- JSON array of allowed model names; NULL = all
    rpm           INTEGER,
    tpm           INTEGER,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    revoked_at_ms INTEGER
);

-- One row per request. `id` is the ledger's own id (idempotent re-shipping); request_id is
-- what the client saw and may repeat. Times are Unix milliseconds, durations microseconds.
CREATE TABLE usage_records (
    id                  TEXT PRIMARY KEY,
    request_id          TEXT NOT NULL,
    ts_ms               INTEGER NOT NULL,
    key_id              TEXT,
    model               TEXT,
    backend             TEXT,
    endpoint            TEXT NOT NULL,
    status              INTEGER NOT NULL,
    prompt_tokens       INTEGER NOT NULL,
    completion_tokens   INTEGER NOT NULL,
    estimated           BOOLEAN NOT NULL,
    latency_us          INTEGER NOT NULL,
    ttft_us             INTEGER,
    client_disconnected BOOLEAN NOT NULL,
    instance_id         TEXT NOT NULL
);
-- `usage --since --by key|model` and retention read a time range and aggregate it;
-- (key_id, ts_ms) serves one key's history (audits, billing per key).
CREATE INDEX usage_records_ts ON usage_records (ts_ms);
CREATE INDEX usage_records_key_ts ON usage_records (key_id, ts_ms);

CREATE TABLE instances (
    id              TEXT PRIMARY KEY,
    host            TEXT NOT NULL,
    pid             INTEGER NOT NULL,
    version         TEXT NOT NULL,
    config_hash     TEXT NOT NULL,
    started_at_ms   INTEGER NOT NULL,
    heartbeat_at_ms INTEGER NOT NULL,
    stopped_at_ms   INTEGER
);
