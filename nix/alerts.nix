# Prometheus recording and alert rules for llm-gateway, as the text of a rules file. Pure
# Nix: nix/dist.nix renders the defaults into dist/prometheus/llm-gateway.rules.yml, and the
# NixOS module renders them with the thresholds of
# services.llm-gateway.prometheus.rules.thresholds. Every string is written as JSON, which
# is a YAML double-quoted scalar. dist/prometheus/llm-gateway.rules.test.yml makes every
# alert fire and keeps it quiet (`promtool test rules`, run by tests/observability.rs).
{
  # The `job` label the gateway's targets are scraped under.
  job ? "llm-gateway",
  thresholds ? { },
}:
let
  t = defaults // thresholds;
  documented = {
    errorRatio = {
      default = 0.05;
      description = "Share of a model's requests answered 5xx over 5 minutes above which LlmGatewayHighErrorRatio fires.";
    };
    latencyP95Seconds = {
      default = 60;
      description = "p95 of a model's request duration (streams: to the last byte) over 5 minutes above which LlmGatewayHighLatency fires.";
    };
    ttftP95Seconds = {
      default = 10;
      description = "p95 of a model's time to first streamed token over 5 minutes above which LlmGatewaySlowFirstToken fires.";
    };
    ledgerLagSeconds = {
      default = 300;
      description = "Age of the oldest usage record not yet in the database above which LlmGatewayLedgerLagging fires.";
    };
    spoolFullRatio = {
      default = 0.8;
      description = "Spool bytes as a share of ledger.spool_max_bytes above which LlmGatewaySpoolNearlyFull fires.";
    };
    restarts = {
      default = 3;
      description = "Process starts within 30 minutes from which LlmGatewayRestarting fires.";
    };
    backendDownFor = {
      default = "5m";
      description = "How long a backend is down or its circuit open before LlmGatewayBackendDown fires.";
    };
  };
  defaults = builtins.mapAttrs (_: v: v.default) documented;
  n = builtins.toJSON;
  sel = ''job="${job}"'';
  by = "job, instance, model";

  record = name: expr: { inherit name expr; };
  alert = name: a: a // { inherit name; };

  recording = [
    (record "job_model:llm_gateway_requests:rate5m" "sum by (${by}) (rate(llm_gateway_requests_total{${sel}}[5m]))")
    (record "job_model:llm_gateway_request_errors:ratio_rate5m" "sum by (${by}) (rate(llm_gateway_requests_total{${sel},status=~\"5..\"}[5m])) / sum by (${by}) (rate(llm_gateway_requests_total{${sel}}[5m]))")
    (record "job_model:llm_gateway_request_duration_seconds:p95_5m" "histogram_quantile(0.95, sum by (${by}, le) (rate(llm_gateway_request_duration_seconds_bucket{${sel}}[5m])))")
    (record "job_model:llm_gateway_time_to_first_token_seconds:p95_5m" "histogram_quantile(0.95, sum by (${by}, le) (rate(llm_gateway_time_to_first_token_seconds_bucket{${sel}}[5m])))")
    (record "job_model_kind:llm_gateway_tokens:rate5m" "sum by (${by}, kind) (rate(llm_gateway_tokens_total{${sel}}[5m]))")
  ];

  alerts = [
    (alert "LlmGatewayDown" {
      expr = "up{${sel}} == 0";
      for = "1m";
      severity = "critical";
      summary = "llm-gateway {{ $labels.instance }} is down";
      description = "Prometheus has not scraped {{ $labels.instance }} for a minute: clients get connection errors. Check `systemctl status llm-gateway` and `journalctl -u llm-gateway` on the host.";
    })
    (alert "LlmGatewayRestarting" {
      expr = "changes(process_start_time_seconds{${sel}}[30m]) >= ${n t.restarts}";
      for = "0m";
      severity = "warning";
      summary = "llm-gateway {{ $labels.instance }} restarted {{ $value }} times in 30 minutes";
      description = "The process keeps starting again (crash, watchdog kill or out of memory). `journalctl -u llm-gateway -b` shows why it ended; streams in flight were cut each time.";
    })
    (alert "LlmGatewayModelUnavailable" {
      expr = "llm_gateway_model_backends_available{${sel}} == 0";
      for = "1m";
      severity = "critical";
      summary = "Model {{ $labels.model }} has no backend that can take traffic";
      description = "Every backend of {{ $labels.model }} is unhealthy or has its circuit open, so its requests fail with 503. Check `backends` in `curl -s http://{{ $labels.instance }}/health` and the inference servers themselves.";
    })
    (alert "LlmGatewayBackendDown" {
      expr = "llm_gateway_backend_up{${sel}} - llm_gateway_backend_circuit_open{${sel}} < 1";
      for = t.backendDownFor;
      severity = "warning";
      summary = "Backend {{ $labels.backend }} is down or its circuit is open";
      description = "The health prober marks {{ $labels.backend }} unhealthy or its circuit breaker keeps traffic away; its models run on their other backends, with less capacity. Check the inference server behind it.";
    })
    (alert "LlmGatewayHighErrorRatio" {
      expr = "sum by (${by}) (rate(llm_gateway_requests_total{${sel},status=~\"5..\"}[5m])) / sum by (${by}) (rate(llm_gateway_requests_total{${sel}}[5m])) > ${n t.errorRatio}";
      for = "5m";
      severity = "warning";
      summary = "{{ $value | humanizePercentage }} of requests for {{ $labels.model }} fail with 5xx";
      description = "The share of 5xx answers for {{ $labels.model }} was above ${n t.errorRatio} over 5 minutes. `llm_gateway_upstream_errors_total` says which backend fails and how; the access log has each request.";
    })
    (alert "LlmGatewayHighLatency" {
      expr = "histogram_quantile(0.95, sum by (${by}, le) (rate(llm_gateway_request_duration_seconds_bucket{${sel}}[5m]))) > ${n t.latencyP95Seconds}";
      for = "10m";
      severity = "warning";
      summary = "p95 latency of {{ $labels.model }} is {{ $value | humanizeDuration }}";
      description = "The 95th percentile of request duration for {{ $labels.model }} is above ${n t.latencyP95Seconds} s: the backends are saturated or slow. Compare `llm_gateway_backend_in_flight_requests` with their capacity.";
    })
    (alert "LlmGatewaySlowFirstToken" {
      expr = "histogram_quantile(0.95, sum by (${by}, le) (rate(llm_gateway_time_to_first_token_seconds_bucket{${sel}}[5m]))) > ${n t.ttftP95Seconds}";
      for = "10m";
      severity = "warning";
      summary = "p95 time to first token of {{ $labels.model }} is {{ $value | humanizeDuration }}";
      description = "Streamed requests for {{ $labels.model }} wait more than ${n t.ttftP95Seconds} s for their first token (95th percentile): requests queue in the inference servers. Add capacity or lower the backends' max_concurrency.";
    })
    (alert "LlmGatewayLedgerLagging" {
      expr = "llm_gateway_ledger_lag_seconds{${sel}} > ${n t.ledgerLagSeconds}";
      for = "5m";
      severity = "warning";
      summary = "Usage records of {{ $labels.instance }} are {{ $value | humanizeDuration }} behind";
      description = "The oldest usage record not yet in the database is older than ${n t.ledgerLagSeconds} s: the database refuses or is slow. Records wait safely in the spool; check `database` in /health and the database itself before the spool fills.";
    })
    (alert "LlmGatewaySpoolNearlyFull" {
      expr = "llm_gateway_ledger_spool_bytes{${sel}} / llm_gateway_ledger_spool_max_bytes{${sel}} > ${n t.spoolFullRatio}";
      for = "5m";
      severity = "critical";
      summary = "Usage spool of {{ $labels.instance }} is {{ $value | humanizePercentage }} full";
      description = "When the spool reaches ledger.spool_max_bytes, ledger.on_full applies: requests are refused (reject) or records are lost (drop). Bring the database back, or free disk and raise spool_max_bytes.";
    })
    (alert "LlmGatewayLedgerRecordsLost" {
      expr = "increase(llm_gateway_ledger_records_dropped_total{${sel}}[15m]) > 0";
      for = "0m";
      severity = "critical";
      summary = "{{ $labels.instance }} lost or set aside usage records";
      description = "Usage records were dropped (spool full or unwritable with on_full = drop) or refused by the database and set aside in rejected.jsonl in the state directory. See the gateway's log; records in rejected.jsonl can be inspected and loaded by hand.";
    })
    (alert "LlmGatewayKeyRefreshFailing" {
      expr = "increase(llm_gateway_key_refresh_failures_total{${sel}}[5m]) > 0";
      for = "10m";
      severity = "warning";
      summary = "{{ $labels.instance }} cannot reload its API keys";
      description = "The key table has not been reloaded from the database for 10 minutes: keys created or revoked since are not seen (the last table stays in use). Check the database connection.";
    })
    (alert "LlmGatewayConfigReloadFailed" {
      expr = "llm_gateway_config_last_reload_successful{${sel}} == 0";
      for = "1m";
      severity = "warning";
      summary = "The last configuration reload of {{ $labels.instance }} failed";
      description = "The previous configuration stays in effect. `systemctl status llm-gateway` and /health (config.last_reload) say which key is wrong; fix the file and reload again.";
    })
  ];

  renderRecord = r: ''
    - record: ${n r.name}
      expr: ${n r.expr}
  '';
  renderAlert = a: ''
    - alert: ${n a.name}
      expr: ${n a.expr}
      for: ${n a.for}
      labels:
        severity: ${n a.severity}
      annotations:
        summary: ${n a.summary}
        description: ${n a.description}
  '';
  indent =
    text:
    builtins.concatStringsSep "\n" (
      map (l: if l == "" then l else "      ${l}") (
        builtins.filter builtins.isString (builtins.split "\n" text)
      )
    );
in
{
  inherit defaults;
  descriptions = builtins.mapAttrs (_: v: v.description) documented;
  names = map (a: a.name) alerts;
  text = ''
    # Prometheus rules for llm-gateway (rendered from nix/alerts.nix; thresholds: README,
    # "Observability"). Targets are selected by job="${job}".
    groups:
      - name: llm-gateway-recording
        rules:
    ${indent (builtins.concatStringsSep "" (map renderRecord recording))}
      - name: llm-gateway-alerts
        rules:
    ${indent (builtins.concatStringsSep "" (map renderAlert alerts))}
  '';
}
