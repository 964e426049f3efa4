//! Database errors, and the one place that decides what a failed write means: the database
//! is unavailable for now (keep the records and retry), or it refuses a record for its content
//! (set that record aside).

/// Why the database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL or connection options are unusable.
    #[error("storage.database_url: {0}")]
    Url(String),
    /// The state directory could not be created.
    #[error("storage.state_dir {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    /// Connecting or migrating failed.
    #[error("cannot open the database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    /// Applying the embedded migrations failed.
    #[error("cannot migrate the database {url}: {source}")]
    Migrate {
        url: String,
        source: sqlx::migrate::MigrateError,
    },
    /// A query failed.
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    /// The database did not answer within `storage.query_timeout`.
    #[error("the database did not answer within storage.query_timeout")]
    TimedOut,
    /// A stored value is not what this version expects.
    #[error("database holds an invalid value: {0}")]
    Corrupt(String),
    /// A record to write is not one this version can store (a spooled record of another
    /// shape, a count beyond the column's range): refused before the database sees it.
    #[error("not a storable usage record: {0}")]
    Unstorable(String),
}

/// What a failed write says about the data written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The database could not take the write now (down, full, read-only, locked, timed out,
    /// permission revoked, ...): the same write may succeed later, so keep it and retry.
    Transient,
    /// The database refused the data itself (a data exception or an integrity violation):
    /// writing it again will fail again.
    BadRecord,
}

/// SQLite primary result codes that blame the statement's data (sqlite3.h).
const SQLITE_TOOBIG: i64 = 18;
const SQLITE_CONSTRAINT: i64 = 19;
const SQLITE_MISMATCH: i64 = 20;

impl StoreError {
    /// Classifies the error: only a refusal of the data itself is `BadRecord`. PostgreSQL:
    /// SQLSTATE class 22 (data exception) and 23 (integrity constraint violation). SQLite:
    /// CONSTRAINT, MISMATCH and TOOBIG. Ours: `Unstorable`. Everything else (class 53 insufficient resources,
    /// 57 operator intervention, 25 read-only transaction, 42 insufficient privilege, 55 lock
    /// not available, SQLite BUSY/LOCKED/FULL/IOERR/READONLY, connection errors, pool
    /// timeouts) is `Transient`: when in doubt, a record is kept, never thrown away.
    pub fn kind(&self) -> FailureKind {
        if let Self::Unstorable(_) = self {
            return FailureKind::BadRecord;
        }
        let Self::Query(sqlx::Error::Database(db)) = self else {
            return FailureKind::Transient;
        };
        let Some(code) = db.code() else {
            return FailureKind::Transient;
        };
        let bad = if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
            // The extended result code; its low byte is the primary code.
            code.parse::<i64>().is_ok_and(|c| {
                matches!(
                    c & 0xff,
                    SQLITE_TOOBIG | SQLITE_CONSTRAINT | SQLITE_MISMATCH
                )
            })
        } else {
            code.starts_with("22") || code.starts_with("23")
        };
        if bad {
            FailureKind::BadRecord
        } else {
            FailureKind::Transient
        }
    }
}
