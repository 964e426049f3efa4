//! Client authentication: the API key format, its hash, and the in-memory key table the
//! request path reads (reloaded from the database in the background, never per request).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arc_swap::ArcSwap;
use axum::http::HeaderValue;
use rand::RngExt as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::access::ratelimit::{Limiter, Limits};
use crate::storage::database::keys::KeyRow;
use crate::storage::database::now_ms;

/// Every key starts with this, so secret scanners and people recognise it.
pub const KEY_PREFIX: &str = "sk-lgw-";
/// Length of the public id part (hex).
const ID_LEN: usize = 16;

/// A freshly generated key: the full secret (shown once) and the row to store.
#[derive(Debug)]
pub struct NewKey {
    /// `sk-lgw-<id>-<secret>`: give it to the client; it is not stored anywhere.
    pub secret: String,
    /// What the database keeps (the SHA-256 of `secret`).
    pub row: KeyRow,
}

/// Makes a key with 256 random bits. A fast hash is right for a secret of this entropy:
/// nobody can guess it, so slowing down the guesses buys nothing.
pub fn generate(
    name: &str,
    models: Option<Vec<String>>,
    limits: Limits,
    expires_at_ms: Option<i64>,
) -> NewKey {
    let mut rng = rand::rng();
    let id: [u8; ID_LEN / 2] = rng.random();
    let secret: [u8; 32] = rng.random();
    let id = hex::encode(id);
    let secret = format!("{KEY_PREFIX}{id}-{}", hex::encode(secret));
    let row = KeyRow {
        id,
        name: name.to_owned(),
        secret_sha256: hex::encode(Sha256::digest(secret.as_bytes())),
        models,
        rpm: limits.rpm,
        tpm: limits.tpm,
        created_at_ms: now_ms(),
        expires_at_ms,
        revoked_at_ms: None,
    };
    NewKey { secret, row }
}

/// The id inside a presented key, if it has the right shape.
fn key_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(KEY_PREFIX)?;
    let (id, _) = rest.split_at_checked(ID_LEN)?;
    rest.as_bytes().get(ID_LEN).filter(|&&c| c == b'-')?;
    Some(id)
}

/// One key as the request path sees it.
#[derive(Debug)]
pub struct KeyEntry {
    /// Public id (recorded in the ledger).
    pub id: Arc<str>,
    /// Human name.
    pub name: String,
    hash: [u8; 32],
    models: Option<HashSet<String>>,
    expires_at_ms: Option<i64>,
    revoked: bool,
    /// Rate limiter, when the key has limits.
    pub limiter: Option<Arc<Limiter>>,
}

impl KeyEntry {
    /// May this key use `model`?
    pub fn allows(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(model))
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Unknown key or wrong secret.
    Invalid,
    /// The key was revoked.
    Revoked,
    /// The key has expired.
    Expired,
    /// More than one `Authorization` header: which one counts would be a guess.
    Multiple,
}

impl AuthFailure {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Invalid => "invalid",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::Multiple => "multiple",
        }
    }
}

/// The key table: swapped whole on each reload, read lock-free by requests.
#[derive(Debug)]
pub struct KeyTable {
    view: ArcSwap<HashMap<String, Arc<KeyEntry>>>,
    loaded_at_ms: AtomicI64,
}

impl Default for KeyTable {
    fn default() -> Self {
        Self {
            view: ArcSwap::from_pointee(HashMap::new()),
            loaded_at_ms: AtomicI64::new(0),
        }
    }
}

impl KeyTable {
    /// Replaces the table with `rows`. A key whose limits did not change keeps its
    /// limiter, so a reload does not refill anyone's buckets.
    pub fn replace(&self, rows: Vec<KeyRow>) {
        let old = self.view.load();
        let mut next = HashMap::with_capacity(rows.len());
        for row in rows {
            let Ok(hash) =
                <[u8; 32]>::try_from(hex::decode(&row.secret_sha256).unwrap_or_default())
            else {
                tracing::warn!(key = %row.id, "stored key hash is malformed; key ignored");
                continue;
            };
            let limits = Limits {
                rpm: row.rpm,
                tpm: row.tpm,
            };
            let limiter = if limits.is_unlimited() {
                None
            } else {
                old.get(&row.id)
                    .and_then(|e| e.limiter.clone())
                    .filter(|l| l.limits() == limits)
                    .or_else(|| Some(Arc::new(Limiter::new(limits))))
            };
            let entry = KeyEntry {
                id: Arc::from(row.id.as_str()),
                name: row.name,
                hash,
                models: row.models.map(|m| m.into_iter().collect()),
                expires_at_ms: row.expires_at_ms,
                revoked: row.revoked_at_ms.is_some(),
                limiter,
            };
            next.insert(row.id, Arc::new(entry));
        }
        self.view.store(Arc::new(next));
        self.loaded_at_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Number of keys known.
    pub fn len(&self) -> usize {
        self.view.load().len()
    }

    /// True before the first load or when the database has no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When the table was last loaded (Unix ms; 0 = never).
    pub fn loaded_at_ms(&self) -> i64 {
        self.loaded_at_ms.load(Ordering::Relaxed)
    }

    /// Checks an `Authorization` header: a hash and a constant-time comparison, no I/O.
    pub fn authenticate(&self, header: Option<&HeaderValue>) -> Result<Arc<KeyEntry>, AuthFailure> {
        let token = header
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(AuthFailure::Missing)?;
        let id = key_id(token).ok_or(AuthFailure::Invalid)?;
        let view = self.view.load();
        let entry = view.get(id).ok_or(AuthFailure::Invalid)?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if !bool::from(presented.ct_eq(&entry.hash)) {
            return Err(AuthFailure::Invalid);
        }
        if entry.revoked {
            return Err(AuthFailure::Revoked);
        }
        if entry.expires_at_ms.is_some_and(|t| t <= now_ms()) {
            return Err(AuthFailure::Expired);
        }
        Ok(Arc::clone(entry))
    }
}

/// Reloads `table` from the database every `auth.refresh_interval` until `stop`, each
/// reload bounded by `storage.query_timeout`. A failed reload keeps the last table (a
/// database blip must not turn into 401s) and is counted.
pub async fn refresh(
    state: Arc<crate::runtime::state::AppState>,
    store: crate::storage::database::Store,
    stop: tokio_util::sync::CancellationToken,
) {
    let task = crate::runtime::periodic::Periodic::new("key refresh", stop);
    // Read each round: a reload may change it.
    while task
        .pause(state.current().config.auth.refresh_interval, None)
        .await
    {
        let timeout = state.current().config.storage.query_timeout;
        let error = match task.step(timeout, store.list_keys()).await {
            Ok(Ok(rows)) => {
                state.keys.replace(rows);
                state.db_up.store(true, Ordering::Relaxed);
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(crate::runtime::periodic::Cut::TimedOut) => "timed out".to_owned(),
            Err(crate::runtime::periodic::Cut::Stopped) => return,
        };
        state.metrics.key_refresh_failures.inc();
        state.db_up.store(false, Ordering::Relaxed);
        tracing::warn!(error = %error, "cannot reload API keys; keeping the last table");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rows: Vec<KeyRow>) -> KeyTable {
        let t = KeyTable::default();
        t.replace(rows);
        t
    }

    fn bearer(s: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {s}")).unwrap()
    }

    #[test]
    fn a_generated_key_authenticates_and_a_changed_one_does_not() {
        let k = generate("a", None, Limits::default(), None);
        assert!(k.secret.starts_with(KEY_PREFIX));
        assert!(!k.row.secret_sha256.contains(&k.secret[KEY_PREFIX.len()..]));
        let t = table(vec![k.row.clone()]);
        let entry = t.authenticate(Some(&bearer(&k.secret))).unwrap();
        assert_eq!(&*entry.id, k.row.id);
        let mut wrong = k.secret.clone();
        wrong.pop();
        wrong.push(if k.secret.ends_with('0') { '1' } else { '0' });
        assert_eq!(
            t.authenticate(Some(&bearer(&wrong))).unwrap_err(),
            AuthFailure::Invalid
        );
        assert_eq!(t.authenticate(None).unwrap_err(), AuthFailure::Missing);
        assert_eq!(
            t.authenticate(Some(&HeaderValue::from_static("Basic abc")))
                .unwrap_err(),
            AuthFailure::Missing
        );
        assert_eq!(
            t.authenticate(Some(&bearer("sk-other"))).unwrap_err(),
            AuthFailure::Invalid
        );
    }

    #[test]
    fn revoked_and_expired_keys_are_refused_by_name() {
        let mut r = generate("r", None, Limits::default(), None);
        r.row.revoked_at_ms = Some(1);
        let e = generate("e", None, Limits::default(), Some(1));
        let t = table(vec![r.row.clone(), e.row.clone()]);
        assert_eq!(
            t.authenticate(Some(&bearer(&r.secret))).unwrap_err(),
            AuthFailure::Revoked
        );
        assert_eq!(
            t.authenticate(Some(&bearer(&e.secret))).unwrap_err(),
            AuthFailure::Expired
        );
    }

    #[test]
    fn reload_keeps_the_limiter_of_an_unchanged_key() {
        let limits = Limits {
            rpm: Some(1),
            tpm: None,
        };
        let k = generate("l", None, limits, None);
        let t = table(vec![k.row.clone()]);
        let first = t.authenticate(Some(&bearer(&k.secret))).unwrap();
        first.limiter.as_ref().unwrap().acquire(0, 1.0).unwrap();
        t.replace(vec![k.row.clone()]);
        let again = t.authenticate(Some(&bearer(&k.secret))).unwrap();
        assert!(again.limiter.as_ref().unwrap().acquire(0, 1.0).is_err());
    }
}
