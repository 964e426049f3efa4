//! Operator commands that work on the database: migrate, keys, usage, instances.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::access::keys;
use crate::access::ratelimit::Limits;
use crate::cli::{KeysAction, UsageBy};
use crate::config::Config;
use crate::storage::database::usage_rows::GroupBy;
use crate::storage::database::{Store, StoreError, now_ms};

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Database trouble.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bad argument; the message names it.
    #[error("{0}")]
    Usage(String),
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `--expires`: a duration from now or an RFC 3339 UTC time, as Unix ms in the future.
pub fn parse_expiry(text: &str, now: i64) -> Result<i64, AdminError> {
    let at = if let Ok(d) = humantime::parse_duration(text) {
        now.saturating_add(millis(d))
    } else {
        let t = humantime::parse_rfc3339_weak(text).map_err(|_| {
            AdminError::Usage(format!(
                "--expires {text:?}: use a duration (30d, 12h) or a UTC time (2027-01-31T00:00:00Z)"
            ))
        })?;
        millis(t.duration_since(UNIX_EPOCH).unwrap_or_default())
    };
    if at <= now {
        return Err(AdminError::Usage(format!(
            "--expires {text:?} is not in the future"
        )));
    }
    // 9999-12-31T23:59:59Z: RFC 3339 (and `keys list`) cannot show later times.
    if at > 253_402_300_799_000 {
        return Err(AdminError::Usage(format!(
            "--expires {text:?} is after the year 9999"
        )));
    }
    Ok(at)
}

fn time(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn opt<T: ToString>(v: Option<T>, none: &str) -> String {
    v.map_or_else(|| none.to_owned(), |v| v.to_string())
}

/// Renders rows as left-aligned columns under a header.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `migrate`: applies migrations; returns what to print.
pub async fn migrate(config: &Config) -> Result<String, AdminError> {
    let store = Store::open(config).await?;
    store.close().await;
    Ok(format!("{}: migrated", store.engine()))
}

/// Creates a key for `llm-gateway demo` (60 requests per minute) and returns its secret.
pub async fn demo_key(config: &Config) -> Result<String, AdminError> {
    let store = Store::open(config).await?;
    let key = keys::generate(
        "demo",
        None,
        Limits {
            rpm: Some(60),
            tpm: None,
        },
        None,
    );
    store.insert_key(&key.row).await?;
    store.close().await;
    Ok(key.secret)
}

/// `keys ...`: returns what to print.
pub async fn keys(config: &Config, action: KeysAction) -> Result<String, AdminError> {
    let store = Store::open(config).await?;
    let out = match action {
        KeysAction::Create {
            name,
            models,
            rpm,
            tpm,
            expires,
        } => {
            if name.trim().is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
                return Err(AdminError::Usage(
                    "--name must be 1-200 printable characters".to_owned(),
                ));
            }
            for m in &models {
                if !config.models.iter().any(|c| &c.name == m) {
                    return Err(AdminError::Usage(format!(
                        "--models: {m:?} is not a model in the configuration"
                    )));
                }
            }
            if rpm == Some(0) || tpm == Some(0) {
                return Err(AdminError::Usage(
                    "--rpm and --tpm must be >= 1 (leave them out for no limit)".to_owned(),
                ));
            }
            let expires_at_ms = expires
                .as_deref()
                .map(|e| parse_expiry(e, now_ms()))
                .transpose()?;
            let key = keys::generate(
                &name,
                (!models.is_empty()).then_some(models),
                Limits { rpm, tpm },
                expires_at_ms,
            );
            store.insert_key(&key.row).await?;
            format!(
                "{}\n\nKey {} ({}) created. The line above is its secret: it is shown only \
                 now and cannot be recovered.\n",
                key.secret, key.row.id, key.row.name
            )
        }
        KeysAction::List => {
            let now = now_ms();
            let rows: Vec<Vec<String>> = store
                .list_keys()
                .await?
                .into_iter()
                .map(|k| {
                    let status = if k.revoked_at_ms.is_some() {
                        "revoked"
                    } else if k.expires_at_ms.is_some_and(|t| t <= now) {
                        "expired"
                    } else {
                        "active"
                    };
                    vec![
                        k.id,
                        k.name,
                        status.to_owned(),
                        opt(k.models.map(|m| m.join(",")), "*"),
                        opt(k.rpm, "-"),
                        opt(k.tpm, "-"),
                        time(k.created_at_ms),
                        opt(k.expires_at_ms.map(time), "-"),
                    ]
                })
                .collect();
            table(
                &[
                    "ID", "NAME", "STATUS", "MODELS", "RPM", "TPM", "CREATED", "EXPIRES",
                ],
                &rows,
            )
        }
        KeysAction::Revoke { id } => {
            if store.revoke_key(&id).await? {
                format!(
                    "Key {id} revoked; running gateways refuse it within {}.\n",
                    humantime::format_duration(config.auth.refresh_interval)
                )
            } else {
                return Err(AdminError::Usage(format!(
                    "no active key with id {id:?} (see `keys list`)"
                )));
            }
        }
    };
    store.close().await;
    Ok(out)
}

/// `usage`: a summary table.
pub async fn usage(config: &Config, since: Duration, by: UsageBy) -> Result<String, AdminError> {
    let store = Store::open(config).await?;
    let since_ms = now_ms().saturating_sub(millis(since));
    let group = match by {
        UsageBy::Key => GroupBy::Key,
        UsageBy::Model => GroupBy::Model,
    };
    let lines = store.usage_summary(since_ms, group).await?;
    store.close().await;
    let rows: Vec<Vec<String>> = lines
        .into_iter()
        .map(|l| {
            vec![
                l.group,
                l.requests.to_string(),
                l.errors.to_string(),
                l.prompt_tokens.to_string(),
                l.completion_tokens.to_string(),
                l.estimated.to_string(),
            ]
        })
        .collect();
    let first = match by {
        UsageBy::Key => "KEY",
        UsageBy::Model => "MODEL",
    };
    Ok(format!(
        "since {}\n{}",
        time(since_ms),
        table(
            &[
                first,
                "REQUESTS",
                "ERRORS",
                "PROMPT_TOKENS",
                "COMPLETION_TOKENS",
                "ESTIMATED"
            ],
            &rows
        )
    ))
}

/// `instances`: the registry, with each instance's state.
pub async fn instances(config: &Config) -> Result<String, AdminError> {
    let store = Store::open(config).await?;
    let rows = store.list_instances().await?;
    store.close().await;
    let now = now_ms();
    let stale_after = millis(config.storage.heartbeat_interval * 3);
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|i| {
            let state = if i.stopped_at_ms.is_some() {
                "stopped"
            } else if now - i.heartbeat_at_ms <= stale_after {
                "live"
            } else {
                "silent"
            };
            vec![
                i.id,
                state.to_owned(),
                i.host,
                i.pid.to_string(),
                i.version,
                i.config_hash,
                time(i.started_at_ms),
                format!("{}s ago", (now - i.heartbeat_at_ms).max(0) / 1000),
            ]
        })
        .collect();
    Ok(table(
        &[
            "ID",
            "STATE",
            "HOST",
            "PID",
            "VERSION",
            "CONFIG",
            "STARTED",
            "HEARTBEAT",
        ],
        &rows,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_accepts_durations_and_times_and_refuses_the_past() {
        let now = 1_000_000;
        assert_eq!(parse_expiry("1h", now).unwrap(), now + 3_600_000);
        assert_eq!(
            parse_expiry("2030-01-01T00:00:00Z", now).unwrap(),
            1_893_456_000_000
        );
        assert!(parse_expiry("1970-01-01T00:00:01Z", now).is_err());
        assert!(parse_expiry("soon", now).is_err());
        assert!(parse_expiry("9000y", now).is_err());
    }
}
