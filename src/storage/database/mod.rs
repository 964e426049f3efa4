//! Database access: one `Store` over SQLite (embedded default) or PostgreSQL, with embedded
//! migrations. Queries are written once, PostgreSQL-style (`$1`), and adapted for SQLite.

pub(crate) mod error;
pub(crate) mod instances;
pub(crate) mod keys;
pub(crate) mod usage_rows;

pub use error::StoreError;

use std::borrow::Cow;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::pool::PoolOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use crate::config::{Config, StorageConfig};

/// The database, whichever engine it is.
#[derive(Debug, Clone)]
pub enum Store {
    /// Embedded SQLite file (WAL mode).
    Sqlite(SqlitePool),
    /// PostgreSQL server.
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the engine's pool; the body is compiled per engine.
macro_rules! with_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::storage::database::Store::Sqlite($pool) => $body,
            $crate::storage::database::Store::Postgres($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

impl Store {
    /// Connects to the configured database (creating a SQLite file and the state directory
    /// when needed) without migrating; `open` serialises this for SQLite.
    async fn connect(config: &Config) -> Result<Self, StoreError> {
        let url = config.database_url();
        let st = &config.storage;
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(&url)
                .map_err(|e| StoreError::Url(e.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5));
            create_parent(options.get_filename())?;
            Ok(Self::Sqlite(pool(st, options, &url).await?))
        } else {
            let mut options =
                PgConnectOptions::from_str(&url).map_err(|e| StoreError::Url(e.to_string()))?;
            if let Some(password) = &st.database_password {
                let secret = password
                    .resolve()
                    .map_err(|e| StoreError::Url(format!("storage.database_password: {e}")))?;
                options = options.password(secret.expose());
            }
            // A statement that runs longer than a background step may wait is ended by the
            // server too, so it does not hold locks after the gateway gave up on it.
            let statement_timeout = format!("{}ms", st.query_timeout.as_millis());
            options = options
                .application_name("llm-gateway")
                .options([("statement_timeout", statement_timeout.as_str())]);
            Ok(Self::Postgres(pool(st, options, &url).await?))
        }
    }

    /// Connects and applies the embedded migrations.
    pub async fn open(config: &Config) -> Result<Self, StoreError> {
        let url = config.database_url();
        // Two processes opening one fresh SQLite file at once (the service and `keys
        // create`) race twice: their first connections both try to switch the new file to
        // WAL, which SQLite refuses at once to all but one ("database is locked", no busy
        // wait), and SQLite has no migration lock, so both would create the tables. A file
        // lock held from the first connection to the last migration serialises them.
        let _lock = if url.starts_with("sqlite:") {
            let path = SqliteConnectOptions::from_str(&url)
                .map_err(|e| StoreError::Url(e.to_string()))?
                .get_filename()
                .with_extension("migrate-lock");
            create_parent(&path)?;
            Some(lock_file(path).await?)
        } else {
            None
        };
        let store = Self::connect(config).await?;
        store.migrate(&url).await?;
        Ok(store)
    }

    /// Applies the embedded migrations that are not applied yet (idempotent; safe with
    /// several instances starting at once on PostgreSQL, which takes an advisory lock).
    pub async fn migrate(&self, url: &str) -> Result<(), StoreError> {
        let result = match self {
            Self::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await,
            Self::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await,
        };
        result.map_err(|source| StoreError::Migrate {
            url: url.to_owned(),
            source,
        })
    }

    /// `sqlite` or `postgres`, for logs and `/health`.
    pub fn engine(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// The query text for this engine: SQLite numbers parameters `?1` where PostgreSQL
    /// writes `$1`.
    pub(crate) fn sql<'a>(&self, query: &'a str) -> Cow<'a, str> {
        match self {
            Self::Sqlite(_) => Cow::Owned(query.replace('$', "?")),
            Self::Postgres(_) => Cow::Borrowed(query),
        }
    }

    /// A cheap round trip, for `/health`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(drop))?;
        Ok(())
    }

    /// Closes all connections.
    pub async fn close(&self) {
        with_pool!(self, pool => pool.close().await);
    }
}

/// A pool of either engine, sized and timed by `[storage]`.
async fn pool<DB: sqlx::Database>(
    st: &StorageConfig,
    options: <DB::Connection as sqlx::Connection>::Options,
    url: &str,
) -> Result<sqlx::Pool<DB>, StoreError> {
    PoolOptions::<DB>::new()
        .max_connections(st.max_connections)
        .acquire_timeout(st.connect_timeout)
        .connect_with(options)
        .await
        .map_err(|source| StoreError::Open {
            url: url.to_owned(),
            source,
        })
}

/// Creates the directory `path` is in (the state directory), if it is missing.
fn create_parent(path: &std::path::Path) -> Result<(), StoreError> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => {
            std::fs::create_dir_all(parent).map_err(|source| StoreError::StateDir {
                path: parent.display().to_string(),
                source,
            })
        }
        _ => Ok(()),
    }
}

/// Opens `path` and waits for an exclusive lock on it; released when the file is dropped.
async fn lock_file(path: std::path::PathBuf) -> Result<std::fs::File, StoreError> {
    let shown = path.display().to_string();
    let locked = tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        file.lock()?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    locked.map_err(|source| StoreError::StateDir {
        path: shown,
        source,
    })
}

/// Now as Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
