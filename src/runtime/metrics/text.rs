//! The two exposition formats of `/metrics`: which one a scraper asked for (`Accept`), and
//! the Prometheus text format 0.0.4 written from the OpenMetrics text prometheus-client
//! encodes.

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text (what Prometheus asks for first).
    OpenMetrics,
    /// Prometheus text 0.0.4 (for `Accept: text/plain`, none, or anything else).
    Text004,
}

impl Format {
    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Text004 => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format an `Accept` header prefers: OpenMetrics when it is listed with a weight
    /// at least that of `text/plain`, as the Prometheus client libraries decide.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Self::Text004;
        };
        let mut open_metrics: Option<f32> = None;
        let mut text: Option<f32> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let slot = match media.as_str() {
                "application/openmetrics-text" => &mut open_metrics,
                "text/plain" => &mut text,
                _ => continue,
            };
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
        match (open_metrics, text) {
            (Some(om), t) if om > 0.0 && om >= t.unwrap_or(0.0) => Self::OpenMetrics,
            _ => Self::Text004,
        }
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: a counter's `HELP` and `TYPE` name
/// its `_total` sample, `unknown` is `untyped` and `info` a gauge of its `_info` sample,
/// and what 0.0.4 lacks goes (`# UNIT`, `# EOF`, `_created` samples, exemplars). Help texts
/// hold no character the two formats escape differently (a unit test keeps it so).
pub fn to_text_004(open_metrics: &str) -> String {
    let mut out = String::with_capacity(open_metrics.len());
    let mut help: Option<&str> = None;
    let mut counter: Option<&str> = None;
    for line in open_metrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gauge" | "histogram" | "summary" => ("", kind),
                _ => ("", "untyped"),
            };
            counter = (kind == "counter").then_some(name);
            if let Some((help_name, text)) = help.take().and_then(|h| h.split_once(' '))
                && help_name == name
            {
                push_line(&mut out, &["# HELP ", name, suffix, " ", text]);
            }
            push_line(&mut out, &["# TYPE ", name, suffix, " ", kind]);
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            // # UNIT, # EOF: not in 0.0.4.
            continue;
        }
        if let Some(family) = counter {
            let sample = line.split(['{', ' ']).next().unwrap_or("");
            if sample.strip_prefix(family) == Some("_created") {
                continue;
            }
        }
        let sample = line.split_once(" # {").map_or(line, |(sample, _)| sample);
        push_line(&mut out, &[sample]);
    }
    out
}

fn push_line(out: &mut String, parts: &[&str]) {
    for part in parts {
        out.push_str(part);
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::{Format, to_text_004};

    /// What Prometheus 2.42 sends (scrape/scrape.go, `scrapeAcceptHeader`).
    const PROMETHEUS_2_42: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn the_format_follows_the_accept_header() {
        assert_eq!(
            Format::negotiate(Some(PROMETHEUS_2_42)),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; version=1.0.0")),
            Format::OpenMetrics
        );
        for accept in [
            None,
            Some("text/plain;version=0.0.4"),
            Some("*/*"),
            Some("text/plain;version=0.0.4,application/openmetrics-text;q=0.5"),
            Some("application/openmetrics-text;q=0"),
            Some("application/json"),
        ] {
            assert_eq!(Format::negotiate(accept), Format::Text004, "{accept:?}");
        }
    }

    #[test]
    fn open_metrics_text_is_rewritten_as_text_0_0_4() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\n\
                  x_requests_total{a=\"1\"} 3 # {trace_id=\"t\"} 1.0\nx_requests_created{a=\"1\"} 17.5\n\
                  # HELP x_lag_seconds Lag.\n# TYPE x_lag_seconds gauge\n# UNIT x_lag_seconds seconds\n\
                  x_lag_seconds 0.25\n# HELP x_build Build.\n# TYPE x_build info\n\
                  x_build_info{version=\"1\"} 1\n# TYPE x_odd unknown\nx_odd 1\n# EOF\n";
        assert_eq!(
            to_text_004(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\n\
             x_requests_total{a=\"1\"} 3\n\
             # HELP x_lag_seconds Lag.\n# TYPE x_lag_seconds gauge\nx_lag_seconds 0.25\n\
             # HELP x_build_info Build.\n# TYPE x_build_info gauge\nx_build_info{version=\"1\"} 1\n\
             # TYPE x_odd untyped\nx_odd 1\n"
        );
    }
}
