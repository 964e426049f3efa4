"""The service under a real systemd: one scenario for the NixOS VM test (nix/tests/vm.nix)
and the Debian QEMU harness.

It uses only this subset of the NixOS test driver's Machine API, so that a small driver
can offer the same: succeed(cmd) -> stdout (fails on a non-zero exit), fail(cmd),
wait_for_unit(unit), wait_for_open_port(port), wait_until_succeeds(cmd, timeout=...),
crash() (hard power-off), start() (boot the same disk again).

The machine under test runs:
- llm-gateway.service from the module / dist unit (PostgreSQL local, peer auth), on
  API_PORT, socket-activated (llm-gateway.socket);
- mock-upstream.service: `llm-gateway mock-upstream` streaming slowly enough
  (40 chunks, 100 ms apart) that a stream is still open during a reload;
- `llm-gateway-admin`, which runs operator commands as the service's user.

`switch_setting()` is how the environment changes a setting and reloads: on NixOS it
switches to a specialisation (the `nixos-rebuild switch` path, so reloadTriggers are
exercised), on Debian it rewrites the config file and runs `systemctl reload`. After it,
the model "m2" must exist.
"""

import json
import re

UNIT = "llm-gateway.service"
API_PORT = 8080
API = f"http://127.0.0.1:{API_PORT}"
MEMORY_MAX = 4 * 1024**3


def prop(gw, name):
    return gw.succeed(f"systemctl show -P {name} {UNIT}").strip()


def chat(gw, key, stream=False, model="m", out=None):
    body = json.dumps(
        {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    )
    cmd = (
        f"curl -sS --fail-with-body -N {API}/v1/chat/completions "
        f"-H 'content-type: application/json' -H 'authorization: Bearer {key}' -d '{body}'"
    )
    return gw.succeed(cmd + (f" > {out}" if out else ""))


def usage_rows(gw):
    return int(
        gw.succeed(
            "runuser -u postgres -- psql -d llm-gateway -tAc 'SELECT count(*) FROM usage_records'"
        ).strip()
    )


def restarted(gw, before_restarts, before_pid):
    """Waits until systemd restarted the service and it serves again."""
    gw.wait_until_succeeds(
        f"test $(systemctl show -P NRestarts {UNIT}) -gt {before_restarts}", timeout=90
    )
    gw.wait_for_unit(UNIT)
    gw.wait_until_succeeds(f"curl -sf {API}/health", timeout=60)
    assert prop(gw, "MainPID") != before_pid, "a new process"


def run(gw, subtest, switch_setting, prometheus=None, threshold="1.5"):
    with subtest("active after boot, READY reached, STATUS shown"):
        gw.wait_for_unit(UNIT)
        gw.wait_for_open_port(API_PORT)
        assert prop(gw, "ActiveState") == "active"
        assert prop(gw, "UnitFileState") == "enabled"
        status = gw.succeed(f"systemctl status --no-pager {UNIT}")
        assert "serving" in status and "backends healthy" in status, status

    with subtest("/health"):
        health = json.loads(gw.succeed(f"curl -sf {API}/health"))
        assert health["database"]["engine"] == "postgres", health
        assert health["database"]["state"] == "up", health

    with subtest("chat completions through the gateway, with a key"):
        out = gw.succeed("llm-gateway-admin keys create --name vm-test")
        key = re.search(r"sk-lgw-[0-9a-f]{16}-[0-9a-f]{64}", out).group(0)
        gw.succeed(
            f"curl -s -o /dev/null -w '%{{http_code}}' -d '{{}}' {API}/v1/chat/completions"
            " | grep -qx 401"
        )
        # The key table is reloaded every auth.refresh_interval (5 s).
        gw.wait_until_succeeds(
            f"curl -sf {API}/v1/chat/completions -H 'content-type: application/json' "
            f"-H 'authorization: Bearer {key}' "
            """-d '{"model":"m","messages":[{"role":"user","content":"hi"}]}'""",
            timeout=30,
        )
        plain = json.loads(chat(gw, key))
        assert plain["choices"][0]["message"]["content"], plain
        streamed = chat(gw, key, stream=True)
        assert streamed.rstrip().endswith("data: [DONE]"), streamed

    with subtest("usage rows in PostgreSQL"):
        gw.wait_until_succeeds(
            "test $(runuser -u postgres -- psql -d llm-gateway -tAc "
            "'SELECT count(*) FROM usage_records') -ge 2",
            timeout=30,
        )

    with subtest("SIGKILL: restarted with a new PID, NRestarts + 1"):
        restarts, pid = prop(gw, "NRestarts"), prop(gw, "MainPID")
        gw.succeed(f"systemctl kill --signal=KILL {UNIT}")
        restarted(gw, restarts, pid)

    with subtest("SIGSTOP: the watchdog kills and restarts it"):
        restarts, pid = prop(gw, "NRestarts"), prop(gw, "MainPID")
        gw.succeed(f"systemctl kill --signal=STOP {UNIT}")
        restarted(gw, restarts, pid)
        gw.succeed(f"journalctl -u {UNIT} --no-pager | grep -i 'watchdog timeout'")

    with subtest("reload with a stream open: the stream completes, the change is live"):
        restarts, pid = prop(gw, "NRestarts"), prop(gw, "MainPID")
        gw.succeed("rm -f /tmp/stream.out /tmp/stream.rc")
        gw.succeed(
            f"(curl -sS -N {API}/v1/chat/completions -H 'content-type: application/json' "
            f"-H 'authorization: Bearer {key}' "
            """-d '{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}' """
            "> /tmp/stream.out 2>&1 || rc=$?; echo ${rc:-0} > /tmp/stream.rc) >/dev/null 2>&1 &"
        )
        gw.wait_until_succeeds("grep -q 'data: ' /tmp/stream.out", timeout=30)
        switch_setting()
        gw.wait_until_succeeds("test -f /tmp/stream.rc", timeout=60)
        assert gw.succeed("cat /tmp/stream.rc").strip() == "0"
        assert gw.succeed("cat /tmp/stream.out").rstrip().endswith("data: [DONE]")
        # /v1/models needs a key like every /v1 route.
        gw.wait_until_succeeds(
            f"curl -sf -H 'authorization: Bearer {key}' {API}/v1/models | grep -q '\"m2\"'",
            timeout=30,
        )
        assert prop(gw, "MainPID") == pid, "reloaded, not restarted"
        assert prop(gw, "NRestarts") == restarts

    with subtest("restart with socket activation: no connection attempt is refused"):
        # Clients connect without pause while the service restarts; the socket stays with
        # systemd, so connections wait in its backlog for the new process.
        gw.succeed(
            "rm -f /tmp/codes /tmp/codes.done; (for i in $(seq 1 150); do curl -s -o /dev/null "
            f"-w '%{{http_code}}\\n' {API}/health >> /tmp/codes; done; touch /tmp/codes.done)"
            " >/dev/null 2>&1 &"
        )
        gw.wait_until_succeeds("test $(wc -l < /tmp/codes) -ge 10", timeout=60)
        gw.succeed(f"systemctl restart {UNIT}")
        gw.wait_until_succeeds("test -f /tmp/codes.done", timeout=300)
        codes = gw.succeed("sort /tmp/codes | uniq -c")
        assert codes.split() == ["150", "200"], codes

    with subtest("journald: structured fields and the syslog identifier"):
        chat(gw, key)
        entries = [
            json.loads(line)
            for line in gw.succeed(f"journalctl -u {UNIT} -o json --no-pager").splitlines()
        ]
        assert any(e.get("SYSLOG_IDENTIFIER") == "llm-gateway" for e in entries)
        access = [e for e in entries if e.get("MESSAGE") == "request finished"]
        assert access, "an access event in the journal"
        last = access[-1]
        for field in ("MODEL", "BACKEND", "STATUS", "LATENCY_MS", "REQUEST_ID"):
            assert field in last, (field, last)

    with subtest("memory.max of the unit's cgroup is MemoryMax"):
        cgroup = prop(gw, "ControlGroup")
        assert int(gw.succeed(f"cat /sys/fs/cgroup{cgroup}/memory.max")) == MEMORY_MAX

    with subtest(f"systemd-analyze security at or under {threshold}"):
        gw.succeed(
            f"systemd-analyze security --threshold={int(float(threshold) * 10)} {UNIT}"
        )

    if prometheus is not None:
        with subtest("Prometheus on another machine scrapes the gateway: up == 1"):
            prometheus.wait_for_unit("prometheus.service")
            prometheus.wait_until_succeeds(
                "curl -sf 'http://127.0.0.1:9090/api/v1/query?query=up%7Bjob%3D%22llm-gateway%22%7D'"
                " | grep -q '\"1\"'",
                timeout=120,
            )
        with subtest("it loads the shipped alert rules, and LlmGatewayDown is not firing"):
            prometheus.wait_until_succeeds(
                "curl -sf http://127.0.0.1:9090/api/v1/rules | jq -e '[.data.groups[]"
                " | select(.name == \"llm-gateway-alerts\") | .rules[] | .health == \"ok\"]"
                " | length > 0 and all'",
                timeout=120,
            )
            data = json.loads(prometheus.succeed("curl -sf http://127.0.0.1:9090/api/v1/rules"))
            groups = {g["name"]: g for g in data["data"]["groups"]}
            prometheus.succeed(f"promtool check rules {groups['llm-gateway-alerts']['file']}")
            down = [r for r in groups["llm-gateway-alerts"]["rules"] if r["name"] == "LlmGatewayDown"]
            assert down and down[0]["state"] == "inactive", down

    with subtest("hard power-off and boot: back, with its data"):
        rows = usage_rows(gw)
        gw.crash()
        gw.start()
        gw.wait_for_unit(UNIT)
        gw.wait_until_succeeds(f"curl -sf {API}/health", timeout=120)
        assert usage_rows(gw) >= rows
