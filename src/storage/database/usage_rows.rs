//! Usage rows: idempotent batch inserts, summaries, and retention by small deletes.

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{Store, StoreError, with_pool};

/// One request's usage, as spooled and as stored. `S` is the type of its text fields:
/// owned (`String`, the default) wherever records are kept; borrowed (`&str`) where one is
/// written into the spool straight from the request's own state, so the request path
/// allocates no text for it (both encode to the same bytes; `storage/ledger/record.rs`
/// tests that); `Cow` where the shipper reads a batch (binary records borrowed from the
/// spool's bytes, JSON ones of earlier versions owned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord<S = String> {
    /// The ledger's own id (UUID): re-shipping the same record inserts nothing.
    pub id: S,
    /// The request id the client saw (`x-request-id`).
    pub request_id: S,
    /// When the request finished (Unix ms).
    pub ts_ms: i64,
    /// The API key's id; `None` in open mode.
    pub key_id: Option<S>,
    /// Public model name, when the request named a known one.
    pub model: Option<S>,
    /// Backend of the last attempt.
    pub backend: Option<S>,
    /// `chat_completions`, `completions` or `embeddings`.
    pub endpoint: S,
    /// HTTP status sent (499: the client left first).
    pub status: u16,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// At least one token figure is the gateway's estimate.
    pub estimated: bool,
    /// Time from request to end of response (µs).
    pub latency_us: u64,
    /// Time to first byte of a streamed answer (µs).
    pub ttft_us: Option<u64>,
    /// The client went away before the end.
    pub client_disconnected: bool,
    /// Instance that served it.
    pub instance_id: S,
    /// How the response ended (records spooled by older versions have none: complete).
    #[serde(default)]
    pub outcome: Outcome,
    /// Time it waited in the model's queue for a backend (µs), if it waited.
    #[serde(default)]
    pub queue_us: Option<u64>,
    /// The fallback model that answered, when the requested `model` could not.
    #[serde(default = "none")]
    pub fallback: Option<S>,
}

fn none<S>() -> Option<S> {
    None
}

impl<S> UsageRecord<S> {
    /// The same record with each text field passed through `f` (borrowed with
    /// `String::as_str`, owned with `str::to_owned`).
    pub fn map<'a, T>(&'a self, f: impl Fn(&'a S) -> T) -> UsageRecord<T> {
        UsageRecord {
            id: f(&self.id),
            request_id: f(&self.request_id),
            ts_ms: self.ts_ms,
            key_id: self.key_id.as_ref().map(&f),
            model: self.model.as_ref().map(&f),
            backend: self.backend.as_ref().map(&f),
            endpoint: f(&self.endpoint),
            status: self.status,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            estimated: self.estimated,
            latency_us: self.latency_us,
            ttft_us: self.ttft_us,
            client_disconnected: self.client_disconnected,
            instance_id: f(&self.instance_id),
            outcome: self.outcome,
            queue_us: self.queue_us,
            fallback: self.fallback.as_ref().map(&f),
        }
    }
}

/// How a response ended, as the ledger keeps it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Sent in full, whatever its status (a stream ended with `[DONE]`).
    #[default]
    Complete,
    /// The backend closed the stream cleanly but without `[DONE]`.
    StreamIncomplete,
    /// The backend's connection broke mid-stream.
    StreamBroken,
    /// The backend stayed silent past `stream_idle_timeout`.
    StreamIdleTimeout,
    /// The client went away before the end.
    ClientDisconnected,
    /// A stream's provisional record: still open, or the gateway died while it was. The
    /// final record (same id) replaces it.
    Interrupted,
}

impl Outcome {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::StreamIncomplete => "stream_incomplete",
            Self::StreamBroken => "stream_broken",
            Self::StreamIdleTimeout => "stream_idle_timeout",
            Self::ClientDisconnected => "client_disconnected",
            Self::Interrupted => "interrupted",
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        serde_json::from_value(serde_json::Value::String(text.to_owned()))
            .map_err(|_| StoreError::Corrupt(format!("usage_records.outcome: {text:?}")))
    }
}

/// How `usage` groups its summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// Per API key.
    Key,
    /// Per model.
    Model,
}

/// One line of a usage summary (a row of the summary query, columns named as the fields).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageLine {
    /// Key id or model name (`-` when absent).
    #[sqlx(rename = "grp")]
    pub group: String,
    /// Requests.
    pub requests: i64,
    /// Requests with a status >= 400.
    pub errors: i64,
    /// Prompt tokens.
    pub prompt_tokens: i64,
    /// Completion tokens.
    pub completion_tokens: i64,
    /// Requests whose counts were estimated.
    pub estimated: i64,
}

/// The columns of `usage_records` a record fills, in `UsageRecord`'s order.
const COLUMNS: &str = "id, request_id, ts_ms, key_id, model, backend, endpoint, status, \
     prompt_tokens, completion_tokens, estimated, latency_us, ttft_us, \
     client_disconnected, instance_id, outcome, queue_us, fallback";

/// Leaves a present row alone unless a final record replaces a provisional one.
fn upsert_clause() -> String {
    let updates = COLUMNS
        .split(", ")
        .skip(1)
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "ON CONFLICT (id) DO UPDATE SET {updates} \
         WHERE usage_records.outcome = 'interrupted' AND excluded.outcome <> 'interrupted'"
    )
}

/// Final records among the rows written (provisional ones are not counted).
fn count_new(outcomes: &[String]) -> u64 {
    outcomes.iter().filter(|o| *o != "interrupted").count() as u64
}

/// Rows per multi-row `INSERT` on SQLite, largest first: a batch is sent as chunks of
/// these sizes, so there are three statement texts (each prepared once per connection),
/// whatever the batch size.
const SQLITE_CHUNKS: [usize; 3] = [64, 8, 1];

/// The `INSERT` of each of `SQLITE_CHUNKS`' sizes, built once.
static SQLITE_INSERTS: LazyLock<[String; 3]> = LazyLock::new(|| {
    let width = COLUMNS.split(", ").count();
    let row = format!("({})", vec!["?"; width].join(", "));
    let upsert = upsert_clause();
    SQLITE_CHUNKS.map(|n| {
        format!(
            "INSERT INTO usage_records ({COLUMNS}) VALUES {} {upsert}",
            vec![row.as_str(); n].join(", ")
        )
    })
});

/// SQLite: the records are bound as columns of multi-row `INSERT`s in one transaction.
/// (SQLite's JSON functions unpacking a JSON array cost about 40 % of the gateway's
/// instructions per request in callgrind, docs/benchmarks.md.) Provisional records go
/// first, so that a final record replaces its provisional one whatever their order in
/// `rows`; then the finals' count of changed rows is the number of new final records
/// (without `RETURNING`, which made each row about a fifth dearer). Returns that number.
async fn insert_sqlite<S: AsRef<str>>(
    pool: &sqlx::SqlitePool,
    rows: &[UsageRecord<S>],
) -> Result<u64, StoreError> {
    let (provisional, finals): (Vec<&UsageRecord<S>>, Vec<&UsageRecord<S>>) =
        rows.iter().partition(|r| r.outcome == Outcome::Interrupted);
    let mut tx = pool.begin().await?;
    insert_sqlite_rows(&mut tx, &provisional).await?;
    let new = insert_sqlite_rows(&mut tx, &finals).await?;
    tx.commit().await?;
    Ok(new)
}

/// Inserts `rows` in chunks of `SQLITE_CHUNKS`' sizes; returns the rows changed.
async fn insert_sqlite_rows<S: AsRef<str>>(
    tx: &mut sqlx::SqliteConnection,
    rows: &[&UsageRecord<S>],
) -> Result<u64, StoreError> {
    let mut changed = 0;
    let mut rest = rows;
    while !rest.is_empty() {
        let (n, sql) = SQLITE_CHUNKS
            .iter()
            .zip(SQLITE_INSERTS.iter())
            .find(|(n, _)| **n <= rest.len())
            .map(|(n, sql)| (*n, sql.as_str()))
            .unwrap_or((1, SQLITE_INSERTS[2].as_str()));
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let mut query = sqlx::query(sql);
        for r in chunk {
            let int = |v: u64, what: &str| {
                i64::try_from(v).map_err(|_| StoreError::Unstorable(format!("{what} {v}")))
            };
            query = query
                .bind(r.id.as_ref())
                .bind(r.request_id.as_ref())
                .bind(r.ts_ms)
                .bind(r.key_id.as_ref().map(AsRef::as_ref))
                .bind(r.model.as_ref().map(AsRef::as_ref))
                .bind(r.backend.as_ref().map(AsRef::as_ref))
                .bind(r.endpoint.as_ref())
                .bind(i64::from(r.status))
                .bind(int(r.prompt_tokens, "prompt_tokens")?)
                .bind(int(r.completion_tokens, "completion_tokens")?)
                .bind(r.estimated)
                .bind(int(r.latency_us, "latency_us")?)
                .bind(r.ttft_us.map(|t| int(t, "ttft_us")).transpose()?)
                .bind(r.client_disconnected)
                .bind(r.instance_id.as_ref())
                .bind(r.outcome.as_str())
                .bind(r.queue_us.map(|t| int(t, "queue_us")).transpose()?)
                .bind(r.fallback.as_ref().map(AsRef::as_ref));
        }
        changed += query.execute(&mut *tx).await?.rows_affected();
    }
    Ok(changed)
}

/// Rows deleted per retention statement: small enough to keep locks and WAL short.
const RETENTION_BATCH: i64 = 5_000;

impl Store {
    /// Inserts `records`; rows already present (same `id`) are skipped, except that a final
    /// record replaces a stream's provisional one. Returns how many final records were new.
    /// SQLite binds them as columns; PostgreSQL gets them as one JSON array.
    pub async fn insert_usage<S: AsRef<str> + Serialize + Sync>(
        &self,
        records: &[UsageRecord<S>],
    ) -> Result<u64, StoreError> {
        match self {
            Self::Sqlite(pool) => insert_sqlite(pool, records).await,
            Self::Postgres(_) => {
                let json = serde_json::to_string(records)
                    .map_err(|e| StoreError::Corrupt(format!("usage record: {e}")))?;
                self.insert_usage_json(&json).await
            }
        }
    }

    /// Inserts a JSON array of usage records (as `UsageRecord` serialises) in one statement
    /// with one parameter, whatever the number of rows: the database unpacks the array, so
    /// there is one prepared statement, not one per batch size, and the spooled records are
    /// shipped without being decoded. A row already present (same `id`) is left alone,
    /// except that a final record replaces a stream's provisional one (`interrupted`), so
    /// re-shipping changes nothing. Returns how many final records were new (provisional
    /// rows are not counted). On SQLite the array is decoded here (`insert_usage`).
    pub async fn insert_usage_json(&self, records: &str) -> Result<u64, StoreError> {
        let upsert = upsert_clause();
        match self {
            Self::Postgres(pool) => {
                // One row per id in a statement (PostgreSQL refuses to update a row twice):
                // a final record wins over the provisional one in the same batch.
                let sql = format!(
                    "INSERT INTO usage_records ({COLUMNS}) SELECT DISTINCT ON (id) {COLUMNS} FROM \
                     (SELECT id, request_id, ts_ms, key_id, model, backend, endpoint, status, \
                     prompt_tokens, completion_tokens, estimated, latency_us, ttft_us, \
                     client_disconnected, instance_id, COALESCE(outcome, 'complete') AS outcome, \
                     queue_us, fallback \
                     FROM json_to_recordset($1::json) AS r(id uuid, request_id text, ts_ms bigint, \
                     key_id text, model text, backend text, endpoint text, status integer, \
                     prompt_tokens bigint, completion_tokens bigint, estimated boolean, \
                     latency_us bigint, ttft_us bigint, client_disconnected boolean, \
                     instance_id text, outcome text, queue_us bigint, fallback text)) AS r \
                     ORDER BY id, outcome = 'interrupted' {upsert} RETURNING outcome"
                );
                let outcomes: Vec<String> = sqlx::query_scalar(&sql)
                    .bind(records)
                    .fetch_all(pool)
                    .await?;
                Ok(count_new(&outcomes))
            }
            Self::Sqlite(pool) => {
                let rows: Vec<UsageRecord> = serde_json::from_str(records)
                    .map_err(|e| StoreError::Unstorable(e.to_string()))?;
                insert_sqlite(pool, &rows).await
            }
        }
    }

    /// Totals since `since_ms`, grouped by key or model, largest token use first.
    pub async fn usage_summary(
        &self,
        since_ms: i64,
        by: GroupBy,
    ) -> Result<Vec<UsageLine>, StoreError> {
        let column = match by {
            GroupBy::Key => "key_id",
            GroupBy::Model => "model",
        };
        let sql = self
            .sql(&format!(
                "SELECT COALESCE({column}, '-') AS grp, COUNT(*) AS requests, \
             CAST(SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS BIGINT) AS errors, \
             CAST(SUM(prompt_tokens) AS BIGINT) AS prompt_tokens, \
             CAST(SUM(completion_tokens) AS BIGINT) AS completion_tokens, \
             CAST(SUM(CASE WHEN estimated THEN 1 ELSE 0 END) AS BIGINT) AS estimated \
             FROM usage_records WHERE ts_ms >= $1 GROUP BY {column} \
             ORDER BY CAST(SUM(prompt_tokens + completion_tokens) AS BIGINT) DESC, {column}"
            ))
            .into_owned();
        with_pool!(self, pool => Ok(sqlx::query_as(&sql).bind(since_ms).fetch_all(pool).await?))
    }

    /// Every record since `since_ms`, oldest first (for audits and tests; unbounded).
    pub async fn usage_records(&self, since_ms: i64) -> Result<Vec<UsageRecord>, StoreError> {
        let sql = self.sql(
            "SELECT CAST(id AS TEXT) AS id, request_id, ts_ms, key_id, model, backend, endpoint, status, \
             prompt_tokens, completion_tokens, estimated, latency_us, ttft_us, \
             client_disconnected, instance_id, outcome, queue_us, fallback FROM usage_records \
             WHERE ts_ms >= $1 \
             ORDER BY ts_ms, id",
        );
        let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
        with_pool!(self, pool => {
            let rows = sqlx::query(&sql).bind(since_ms).fetch_all(pool).await?;
            rows.iter()
                .map(|r| {
                    let status: i32 = r.try_get("status")?;
                    let ttft: Option<i64> = r.try_get("ttft_us")?;
                    let outcome: String = r.try_get("outcome")?;
                    let queue_us: Option<i64> = r.try_get("queue_us")?;
                    Ok(UsageRecord {
                        id: r.try_get("id")?,
                        request_id: r.try_get("request_id")?,
                        ts_ms: r.try_get("ts_ms")?,
                        key_id: r.try_get("key_id")?,
                        model: r.try_get("model")?,
                        backend: r.try_get("backend")?,
                        endpoint: r.try_get("endpoint")?,
                        status: u16::try_from(status).unwrap_or(0),
                        prompt_tokens: unsigned(r.try_get("prompt_tokens")?),
                        completion_tokens: unsigned(r.try_get("completion_tokens")?),
                        estimated: r.try_get("estimated")?,
                        latency_us: unsigned(r.try_get("latency_us")?),
                        ttft_us: ttft.map(unsigned),
                        client_disconnected: r.try_get("client_disconnected")?,
                        instance_id: r.try_get("instance_id")?,
                        outcome: Outcome::parse(&outcome)?,
                        queue_us: queue_us.map(unsigned),
                        fallback: r.try_get("fallback")?,
                    })
                })
                .collect()
        })
    }

    /// Number of usage rows.
    pub async fn count_usage(&self) -> Result<i64, StoreError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT COUNT(*) AS n FROM usage_records").fetch_one(pool).await?;
            Ok(row.try_get("n")?)
        })
    }

    /// Deletes rows older than `before_ms`, a few thousand per statement and at most
    /// `max_batches` statements, so retention never holds long locks or builds one huge
    /// transaction; the freed space is reused by new rows (PostgreSQL autovacuum, SQLite
    /// free pages). Returns the rows deleted and whether none older are left.
    pub async fn delete_usage_before(
        &self,
        before_ms: i64,
        max_batches: u32,
    ) -> Result<(u64, bool), StoreError> {
        let sql = self.sql(
            "DELETE FROM usage_records WHERE id IN \
             (SELECT id FROM usage_records WHERE ts_ms < $1 LIMIT $2)",
        );
        let mut total = 0;
        for _ in 0..max_batches {
            let n = with_pool!(self, pool => {
                sqlx::query(&sql)
                    .bind(before_ms)
                    .bind(RETENTION_BATCH)
                    .execute(pool)
                    .await?
                    .rows_affected()
            });
            total += n;
            if n < RETENTION_BATCH.unsigned_abs() {
                return Ok((total, true));
            }
        }
        Ok((total, false))
    }
}
