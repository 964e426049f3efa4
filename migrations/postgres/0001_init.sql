-- API keys: only a SHA-256 of the secret is stored; the id is the public part of the key.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    models        TEXT,             -- JSON array of allowed model names; NULL = all
    rpm           BIGINT,
    tpm           BIGINT,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    revoked_at_ms BIGINT
);

-- One row per request. `id` is the ledger's own id (idempotent re-shipping); request_id is
-- what the client saw and may repeat. Times are Unix milliseconds, durations microseconds.
-- The id is a time-ordered UUID (v7) and the grouped text columns compare bytewise
-- (COLLATE "C"): the indexes cost less per inserted row.
CREATE TABLE usage_records (
    id                  UUID PRIMARY KEY,
    request_id          TEXT NOT NULL,
    ts_ms               BIGINT NOT NULL,
    key_id              TEXT COLLATE "C",
    model               TEXT COLLATE "C",
    backend             TEXT,
    endpoint            TEXT NOT NULL,
    status              INTEGER NOT NULL,
    prompt_tokens       BIGINT NOT NULL,
    completion_tokens   BIGINT NOT NULL,
    estimated           BOOLEAN NOT NULL,
    latency_us          BIGINT NOT NULL,
    ttft_us             BIGINT,
    client_disconnected BOOLEAN NOT NULL,
    instance_id         TEXT NOT NULL
);
-- `usage --since --by key|model` and retention read a time range and aggregate it: rows
-- arrive in time order, so a BRIN index on the time serves that range at almost no cost
-- per insert. (key_id, ts_ms) serves one key's history (audits, billing per key).
CREATE INDEX usage_records_ts ON usage_records USING brin (ts_ms);
CREATE INDEX usage_records_key_ts ON usage_records (key_id, ts_ms);

CREATE TABLE instances (
    id              TEXT PRIMARY KEY,
    host            TEXT NOT NULL,
    pid             BIGINT NOT NULL,
    version         TEXT NOT NULL,
    config_hash     TEXT NOT NULL,
    started_at_ms   BIGINT NOT NULL,
    heartbeat_at_ms BIGINT NOT NULL,
    stopped_at_ms   BIGINT
);
