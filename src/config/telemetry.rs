//! `[tracing]`: OpenTelemetry trace export over OTLP/HTTP (off unless an endpoint is set).

use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// `[tracing]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Base URL of an OTLP/HTTP collector (e.g. `http://127.0.0.1:4318`); spans are posted
    /// to `<otlp_endpoint>/v1/traces` as protobuf. None: no export, no `traceparent`.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// How long one export may take, and how long shutdown waits for the last one.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "llm-gateway".to_owned(),
            export_timeout: Duration::from_secs(5),
        }
    }
}

impl TracingConfig {
    /// The URL spans are posted to, if export is on.
    pub fn traces_url(&self) -> Option<String> {
        self.otlp_endpoint.as_ref().map(|base| {
            let base = base.trim_end_matches('/');
            if base.ends_with("/v1/traces") {
                base.to_owned()
            } else {
                format!("{base}/v1/traces")
            }
        })
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.otlp_endpoint {
            let parsed = url.parse::<axum::http::Uri>().map_err(|e| {
                ConfigError::invalid("tracing.otlp_endpoint", format!("{url:?}: {e}"))
            })?;
            if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
                return Err(ConfigError::invalid(
                    "tracing.otlp_endpoint",
                    format!("{url:?}: an http:// or https:// URL with a host"),
                ));
            }
        }
        if self.service_name.is_empty() {
            return Err(ConfigError::invalid(
                "tracing.service_name",
                "must not be empty",
            ));
        }
        if self.export_timeout.is_zero() {
            return Err(ConfigError::invalid(
                "tracing.export_timeout",
                "must be more than 0",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::TracingConfig;

    #[test]
    fn the_endpoint_must_be_an_http_url_and_gets_the_traces_path() {
        let with = |url: &str| TracingConfig {
            otlp_endpoint: Some(url.to_owned()),
            ..TracingConfig::default()
        };
        for bad in ["collector:4318", "ftp://c:21", "not a url"] {
            let e = with(bad).validate().unwrap_err().to_string();
            assert!(e.contains("tracing.otlp_endpoint"), "{bad}: {e}");
        }
        assert_eq!(
            with("http://c:4318/").traces_url().as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            with("https://c/v1/traces").traces_url().as_deref(),
            Some("https://c/v1/traces")
        );
        assert_eq!(TracingConfig::default().traces_url(), None);
    }
}
