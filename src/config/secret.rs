//! Secrets: references to API keys in config, and a value type that never prints itself.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

/// Where a secret is read from; the config holds only this reference.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretRef {
    /// A systemd credential: the file `$CREDENTIALS_DIRECTORY/<name>` (`LoadCredential=`).
    Credential(String),
    /// A file holding the secret.
    File(PathBuf),
    /// An environment variable holding the secret.
    Env(String),
}

impl SecretRef {
    /// Reads the secret; the error says where it looked and why that failed.
    pub fn resolve(&self) -> Result<Secret, String> {
        let (value, origin) = match self {
            Self::Credential(name) => {
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(format!("credential name {name:?} is not a file name"));
                }
                let dir = crate::config::credentials_directory().ok_or_else(|| {
                    format!("credential {name:?}: $CREDENTIALS_DIRECTORY is not set")
                })?;
                let path = dir.join(name);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("credential {name:?} ({}): {e}", path.display()))?;
                (text, format!("credential {name:?}"))
            }
            Self::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("file {}: {e}", path.display()))?;
                (text, format!("file {}", path.display()))
            }
            Self::Env(var) => {
                let text =
                    std::env::var(var).map_err(|e| format!("environment variable {var}: {e}"))?;
                (text, format!("environment variable {var}"))
            }
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("{origin} is empty"));
        }
        if value.chars().any(|c| c.is_control()) {
            return Err(format!("{origin} contains control characters"));
        }
        Ok(Secret(value.to_owned()))
    }
}

/// A secret value: shown as `[redacted]` by `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_value() {
        let s = Secret("sk-very-secret".to_owned());
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
    }

    #[test]
    fn file_secret_is_trimmed_and_empty_rejected() {
        let dir = std::env::temp_dir().join(format!("llmgw-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("k");
        std::fs::write(&f, "abc\n").unwrap();
        assert_eq!(
            SecretRef::File(f.clone()).resolve().unwrap().expose(),
            "abc"
        );
        std::fs::write(&f, "\n").unwrap();
        let err = SecretRef::File(f).resolve().unwrap_err();
        assert!(err.contains("is empty"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn credential_name_cannot_escape_directory() {
        let err = SecretRef::Credential("../etc/passwd".into())
            .resolve()
            .unwrap_err();
        assert!(err.contains("not a file name"), "{err}");
    }
}
