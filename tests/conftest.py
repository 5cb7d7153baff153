"""Fixtures for the integration tests: a real valkey-server (from the project's venv), the real
auditor binary attached to it, and helpers that wait on conditions with deadlines (never sleep-and-hope).
"""
import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
AUDITOR = Path(os.environ.get("AUDITOR_BIN", ROOT / "target" / "release" / "auditor"))
VALKEY_SERVER = Path(os.environ.get("VALKEY_SERVER", ROOT / ".venv" / "bin" / "valkey-server"))
REDIS_CLI = shutil.which("redis-cli") or "redis-cli"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last={last!r})")


class Valkey:
    def __init__(self, tmp_path, extra_args=(), binary=VALKEY_SERVER):
        self.port = free_port()
        self.dir = tmp_path / f"valkey-{self.port}"
        self.dir.mkdir()
        self.sock = str(self.dir / "valkey.sock")
        args = [
            str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "-::1",
            "--unixsocket", self.sock, "--unixsocketperm", "777", "--save", "", "--appendonly", "no",
            "--dir", str(self.dir), "--protected-mode", "no", "--enable-debug-command", "yes",
            *extra_args,
        ]
        self.args = args
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        wait_until(self._ping, what="valkey-server to answer PING")

    def kill_and_restart(self):
        """SIGKILL the server and start it again with the same command line (a crash and restart)."""
        self.proc.kill()
        self.proc.wait()
        self.start()

    def _ping(self):
        try:
            with redis.Redis(port=self.port, socket_timeout=0.5) as r:
                return r.ping()
        except Exception:
            return False

    def client(self, **kw):
        return redis.Redis(port=self.port, **kw)

    def stop(self):
        terminate(self.proc)


def terminate(proc, timeout=10):
    """SIGTERM a child process, SIGKILL it if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def control_answers(port, timeout=0.5):
    """Whether an auditor's control port answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64) == b"+PONG\r\n"
    except OSError:
        return False


class Auditor:
    def __init__(self, tmp_path, pid, fmt="json", extra=(), settings=(), env=None):
        self.control = free_port()
        self.log = tmp_path / f"audit-{self.control}.log"
        self.stderr_path = tmp_path / f"auditor-{self.control}.stderr"
        target = ["--pid", str(pid)] if pid is not None else []
        args = [str(AUDITOR), *target, "--control", f"127.0.0.1:{self.control}", *extra,
                "audit.protocol", f"file {self.log}", "audit.format", fmt, *settings]
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     env={**os.environ, **(env or {})})
        self.fmt = fmt
        wait_until(self._ready, timeout=30, what="auditor control port to answer PONG")

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"auditor exited with {self.proc.returncode}: {self.stderr_path.read_text()}")
        return control_answers(self.control)

    def lines(self):
        if not self.log.exists():
            return []
        data = self.log.read_bytes()
        # Only complete lines: a record is exactly one line.
        return [l for l in data.split(b"\n")[:-1]]

    def records(self):
        assert self.fmt == "json"
        return [json.loads(l) for l in self.lines()]

    def wait_records(self, predicate, timeout=10.0, what="records"):
        """Wait until predicate(records) is truthy; return the records."""
        def check():
            recs = self.records()
            return recs if predicate(recs) else None
        try:
            return wait_until(check, timeout=timeout, what=what)
        except AssertionError as e:
            # Say what was written instead: how many records, of which commands, and any loss.
            recs = self.records() if self.fmt == "json" else []
            counts = collections.Counter(r.get("command") for r in recs)
            losses = [r for r in recs if r.get("category") == "AUDIT_LOSS"]
            raise AssertionError(f"{e}; {len(recs)} records written, commands {dict(counts.most_common(8))}, "
                                 f"loss records {losses[:3]}; auditor stderr: "
                                 f"{self.stderr_path.read_text(errors='replace')[-2000:]}") from None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("auditor did not stop on SIGTERM")
            self.stderr.close()
            return rc
        self.stderr.close()
        return self.proc.returncode


@pytest.fixture
def valkey(tmp_path):
    v = Valkey(tmp_path)
    yield v
    v.stop()


@pytest.fixture
def start_valkey(tmp_path):
    servers = []

    def start(*extra_args):
        v = Valkey(tmp_path, extra_args)
        servers.append(v)
        return v
    yield start
    for v in servers:
        v.stop()


@pytest.fixture
def start_auditor(tmp_path):
    auditors = []

    def start(pid, **kw):
        a = Auditor(tmp_path, pid, **kw)
        auditors.append(a)
        return a
    yield start
    for a in auditors:
        a.stop()


@pytest.fixture
def audited(valkey, start_auditor):
    """A valkey-server with an auditor (json format) attached."""
    return valkey, start_auditor(valkey.pid)


def by_client(records, client_id):
    return [r for r in records if r["client_id"] == client_id]


def commands_of(records, client_port):
    return [r for r in records if r["client_port"] == client_port and r["category"] != "CONNECTION"]
