//! API key rows: create, list, revoke. Only the SHA-256 of a key's secret is stored.

use sqlx::Row;

use super::{Store, StoreError, now_ms, with_pool};

/// One API key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// Public id, also part of the key itself.
    pub id: String,
    /// Who or what the key is for.
    pub name: String,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    /// Models the key may use; `None` means all.
    pub models: Option<Vec<String>>,
    /// Requests per minute; `None` means unlimited.
    pub rpm: Option<u64>,
    /// Tokens per minute; `None` means unlimited.
    pub tpm: Option<u64>,
    /// Creation time (Unix ms).
    pub created_at_ms: i64,
    /// Expiry (Unix ms).
    pub expires_at_ms: Option<i64>,
    /// Revocation time (Unix ms).
    pub revoked_at_ms: Option<i64>,
}

const COLUMNS: &str =
    "id, name, secret_sha256, models, rpm, tpm, created_at_ms, expires_at_ms, revoked_at_ms";

fn to_i64(v: Option<u64>) -> Option<i64> {
    v.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

impl Store {
    /// Stores a new key.
    pub async fn insert_key(&self, key: &KeyRow) -> Result<(), StoreError> {
        let models = key
            .models
            .as_ref()
            .map(|m| serde_json::to_string(m).unwrap_or_default());
        let sql = self.sql(
            "INSERT INTO api_keys (id, name, secret_sha256, models, rpm, tpm, created_at_ms, \
             expires_at_ms, revoked_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        );
        with_pool!(self, pool => {
            sqlx::query(&sql)
                .bind(&key.id)
                .bind(&key.name)
                .bind(&key.secret_sha256)
                .bind(&models)
                .bind(to_i64(key.rpm))
                .bind(to_i64(key.tpm))
                .bind(key.created_at_ms)
                .bind(key.expires_at_ms)
                .bind(key.revoked_at_ms)
                .execute(pool)
                .await
                .map(drop)
        })?;
        Ok(())
    }

    /// Every key, revoked and expired ones included, oldest first.
    pub async fn list_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_at_ms, id");
        with_pool!(self, pool => {
            let rows = sqlx::query(&sql).fetch_all(pool).await?;
            rows.iter()
                .map(|r| {
                    let models: Option<String> = r.try_get("models")?;
                    let models = models
                        .map(|m| serde_json::from_str::<Vec<String>>(&m))
                        .transpose()
                        .map_err(|e| StoreError::Corrupt(format!("api_keys.models: {e}")))?;
                    let rpm: Option<i64> = r.try_get("rpm")?;
                    let tpm: Option<i64> = r.try_get("tpm")?;
                    Ok(KeyRow {
                        id: r.try_get("id")?,
                        name: r.try_get("name")?,
                        secret_sha256: r.try_get("secret_sha256")?,
                        models,
                        rpm: rpm.and_then(|n| u64::try_from(n).ok()),
                        tpm: tpm.and_then(|n| u64::try_from(n).ok()),
                        created_at_ms: r.try_get("created_at_ms")?,
                        expires_at_ms: r.try_get("expires_at_ms")?,
                        revoked_at_ms: r.try_get("revoked_at_ms")?,
                    })
                })
                .collect()
        })
    }

    /// Revokes the key with this id; false when there is no such key not yet revoked.
    pub async fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        let sql = self
            .sql("UPDATE api_keys SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL");
        let done = with_pool!(self, pool => {
            sqlx::query(&sql).bind(now_ms()).bind(id).execute(pool).await?.rows_affected()
        });
        Ok(done > 0)
    }
}
