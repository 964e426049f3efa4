//! Instance registry: each running gateway records itself and keeps a heartbeat.

use sqlx::Row;

use super::{Store, StoreError, now_ms, with_pool};

/// One gateway instance as registered (a row of `instances`, columns named as the fields).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InstanceRow {
    /// Random id chosen at start.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: i64,
    /// Gateway version.
    pub version: String,
    /// Hash of the configuration it runs.
    pub config_hash: String,
    /// Start time (Unix ms).
    pub started_at_ms: i64,
    /// Last heartbeat (Unix ms).
    pub heartbeat_at_ms: i64,
    /// Clean stop time (Unix ms); `None` while running or after a crash.
    pub stopped_at_ms: Option<i64>,
    /// State directory (absolute), which only one live process on the host can hold.
    pub state_dir: Option<String>,
}

/// Registry rows of instances stopped (or silent) longer than this are removed.
const FORGET_AFTER_MS: i64 = 7 * 24 * 3600 * 1000;

impl Store {
    /// Records this instance as started. Rows of earlier processes on the same host and
    /// state directory that never marked themselves stopped (killed, crashed) are marked
    /// stopped now: the caller holds that directory's spool lock, so none of them runs.
    pub async fn register_instance(&self, row: &InstanceRow) -> Result<(), StoreError> {
        let sql = self.sql(
            "INSERT INTO instances (id, host, pid, version, config_hash, started_at_ms, \
             heartbeat_at_ms, stopped_at_ms, state_dir) VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8)",
        );
        let forget = self.sql("DELETE FROM instances WHERE heartbeat_at_ms < $1");
        let retire = self.sql(
            "UPDATE instances SET stopped_at_ms = $1 \
             WHERE stopped_at_ms IS NULL AND host = $2 AND state_dir = $3",
        );
        with_pool!(self, pool => {
            sqlx::query(&forget).bind(now_ms() - FORGET_AFTER_MS).execute(pool).await?;
            sqlx::query(&retire)
                .bind(now_ms())
                .bind(&row.host)
                .bind(&row.state_dir)
                .execute(pool)
                .await?;
            sqlx::query(&sql)
                .bind(&row.id)
                .bind(&row.host)
                .bind(row.pid)
                .bind(&row.version)
                .bind(&row.config_hash)
                .bind(row.started_at_ms)
                .bind(row.heartbeat_at_ms)
                .bind(&row.state_dir)
                .execute(pool)
                .await
                .map(drop)
        })?;
        Ok(())
    }

    /// Refreshes this instance's heartbeat (and config hash, which a reload may change).
    pub async fn heartbeat(&self, id: &str, config_hash: &str) -> Result<(), StoreError> {
        let sql =
            self.sql("UPDATE instances SET heartbeat_at_ms = $1, config_hash = $2 WHERE id = $3");
        with_pool!(self, pool => {
            sqlx::query(&sql).bind(now_ms()).bind(config_hash).bind(id).execute(pool).await.map(drop)
        })?;
        Ok(())
    }

    /// Marks this instance as cleanly stopped.
    pub async fn mark_stopped(&self, id: &str) -> Result<(), StoreError> {
        let sql = self.sql("UPDATE instances SET stopped_at_ms = $1 WHERE id = $2");
        with_pool!(self, pool => sqlx::query(&sql).bind(now_ms()).bind(id).execute(pool).await.map(drop))?;
        Ok(())
    }

    /// Every registered instance, newest first.
    pub async fn list_instances(&self) -> Result<Vec<InstanceRow>, StoreError> {
        let sql = "SELECT id, host, pid, version, config_hash, started_at_ms, heartbeat_at_ms, \
                   stopped_at_ms, state_dir FROM instances ORDER BY started_at_ms DESC, id";
        with_pool!(self, pool => Ok(sqlx::query_as(sql).fetch_all(pool).await?))
    }

    /// Instances running now: not stopped, with a heartbeat newer than `fresh_after_ms`.
    pub async fn live_instances(&self, fresh_after_ms: i64) -> Result<i64, StoreError> {
        let sql = self.sql(
            "SELECT COUNT(*) AS n FROM instances WHERE stopped_at_ms IS NULL AND heartbeat_at_ms >= $1",
        );
        with_pool!(self, pool => {
            let row = sqlx::query(&sql).bind(fresh_after_ms).fetch_one(pool).await?;
            Ok(row.try_get("n")?)
        })
    }
}
