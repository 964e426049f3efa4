"""A small stand-in for the NixOS test driver: the Machine methods tests/vm/scenario.py
uses, for a Debian VM under QEMU (TCG) reached over ssh, and a `subtest` that counts
passes and failures instead of stopping at the first one."""

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import traceback


class Machine:
    """One QEMU VM booted from `disk` (kernel and initrd given), with ssh on `ssh_port`."""

    def __init__(self, work, ssh_port, memory="1536", cpus="2"):
        self.work = work
        self.ssh_port = ssh_port
        self.memory = memory
        self.cpus = cpus
        self.proc = None
        self.boots = 0
        self.qmp = os.path.join(work, "qmp.sock")

    # -- power ---------------------------------------------------------------------

    def start(self):
        """Boots (again) from the same disk and waits for ssh."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.boots += 1
        self.console = os.path.join(self.work, f"console-{self.boots}.log")
        cmd = [
            "qemu-system-x86_64",
            "-accel", "tcg,thread=multi",
            "-cpu", "max",
            "-smp", self.cpus,
            "-m", self.memory,
            "-display", "none",
            "-monitor", "none",
            "-serial", f"file:{self.console}",
            "-kernel", os.path.join(self.work, "vmlinuz"),
            "-initrd", os.path.join(self.work, "initrd.img"),
            "-append", "console=ttyS0 root=/dev/vda rw quiet systemd.show_status=1",
            "-drive", f"file={os.path.join(self.work, 'disk.img')},format=raw,if=virtio",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        started = time.monotonic()
        deadline = started + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._console_tail()
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}")
            rc, _ = self.execute("true", timeout=20, quiet=True)
            if rc == 0:
                print(f"[vm] boot {self.boots}: ssh up after {time.monotonic() - started:.0f} s")
                return
            time.sleep(2)
        self._console_tail()
        raise RuntimeError("the VM did not boot (no ssh within 600 s)")

    def crash(self):
        """Hard power-off through the QEMU monitor (QMP `quit`: the guest gets no
        warning; the disk keeps what reached it). Kills QEMU if the monitor fails."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(self.qmp)
                s.recv(4096)  # greeting
                for command in ("qmp_capabilities", "quit"):
                    s.sendall(json.dumps({"execute": command}).encode() + b"\n")
                    s.recv(4096)
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"[vm] QMP quit failed ({e}); killing QEMU", file=sys.stderr)
            self.proc.kill()
            self.proc.wait()

    def shutdown(self):
        self.execute("systemctl poweroff", timeout=30, quiet=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.crash()

    def _console_tail(self, lines=60):
        try:
            with open(self.console, errors="replace") as f:
                tail = f.read().splitlines()[-lines:]
        except OSError:
            tail = ["(no console log)"]
        print(f"[vm] last {lines} console lines:", *tail, sep="\n", file=sys.stderr)

    # -- commands ------------------------------------------------------------------

    def execute(self, command, timeout=900, quiet=False):
        ssh = [
            "ssh", "-q",
            "-i", os.path.join(self.work, "id_ed25519"),
            "-p", str(self.ssh_port),
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=10",
            "-o", "BatchMode=yes",
            "root@127.0.0.1",
            "bash -c " + shlex.quote(command),
        ]
        try:
            p = subprocess.run(
                ssh, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return 124, f"timed out after {timeout} s"
        if not quiet and p.returncode != 0 and p.stderr:
            print(p.stderr, file=sys.stderr, end="")
        return p.returncode, p.stdout

    def succeed(self, command, timeout=900):
        rc, out = self.execute(command, timeout=timeout)
        if rc != 0:
            raise AssertionError(f"command failed ({rc}): {command}\n{out}")
        return out

    def fail(self, command, timeout=900):
        rc, out = self.execute(command, timeout=timeout)
        if rc == 0:
            raise AssertionError(f"command succeeded but should fail: {command}\n{out}")
        return out

    def wait_until_succeeds(self, command, timeout=900):
        deadline = time.monotonic() + timeout
        while True:
            rc, out = self.execute(command, timeout=max(10, timeout), quiet=True)
            if rc == 0:
                return out
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s: {command}\n{out}")
            time.sleep(1)

    def wait_for_unit(self, unit, timeout=900):
        self.wait_until_succeeds(f"systemctl is-active --quiet {shlex.quote(unit)}", timeout)

    def wait_for_open_port(self, port, timeout=900):
        self.wait_until_succeeds(f"ss -Hltn 'sport = :{port}' | grep -q .", timeout)


class Report:
    """`subtest` for the scenario: runs each step, records and prints its outcome."""

    def __init__(self):
        self.passed = []
        self.failed = []

    @contextlib.contextmanager
    def subtest(self, name):
        started = time.monotonic()
        print(f"[subtest] {name}", flush=True)
        try:
            yield
        except Exception:  # one failed step is reported, the next ones still run
            self.failed.append(name)
            print(f"[FAIL] {name} ({time.monotonic() - started:.0f} s)", flush=True)
            traceback.print_exc()
        else:
            self.passed.append(name)
            print(f"[ok] {name} ({time.monotonic() - started:.0f} s)", flush=True)
