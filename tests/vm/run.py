#!/usr/bin/env python3
"""Boots the Debian VM that tests/vm/image.sh built (in WORKDIR) and runs the shared
scenario (tests/vm/scenario.py) against it; ends with `N passed, M failed`.

    python3 tests/vm/run.py WORKDIR
"""

import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import driver  # noqa: E402
import scenario  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    work = sys.argv[1]
    gateway = driver.Machine(work, free_port())
    report = driver.Report()

    def switch_setting():
        # What an operator does on Debian: edit the file, then reload.
        gateway.succeed(
            "printf '\\n[[models]]\\nname = \"m2\"\\nroutes = [{ backend = \"mock\" }]\\n'"
            " >> /etc/llm-gateway/llm-gateway.toml && systemctl reload llm-gateway.service"
        )

    try:
        with report.subtest("boot"):
            gateway.start()
        if not report.failed:
            scenario.run(gateway, report.subtest, switch_setting)
    finally:
        gateway.crash()
    print(f"{len(report.passed)} passed, {len(report.failed)} failed")
    for name in report.failed:
        print(f"  failed: {name}")
    return 1 if report.failed or not report.passed else 0


if __name__ == "__main__":
    sys.exit(main())
