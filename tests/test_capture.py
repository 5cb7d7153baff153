"""End-to-end capture tests: a real valkey-server, real clients (redis-cli, redis-py, raw sockets),
the real auditor; assertions on the records it writes."""
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest
import redis

from conftest import REDIS_CLI, by_client, commands_of, free_port, wait_until


def read_until(s, predicate, timeout=10.0):
    s.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while not predicate(buf):
        if time.monotonic() > deadline:
            raise AssertionError(f"no complete reply: {buf[-200:]!r}")
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
    return buf


def info_audit(auditor):
    """The auditor's `INFO audit` fields, read with redis-cli from its control port."""
    out = subprocess.run([REDIS_CLI, "-p", str(auditor.control), "INFO", "audit"],
                         capture_output=True, text=True, timeout=10).stdout
    return dict(l.split(":", 1) for l in out.splitlines() if ":" in l)


def test_connect_disconnect_peer_and_basic_command(audited):
    valkey, auditor = audited
    c = valkey.client()
    c.set("k1", "v1")
    c.close()
    recs = auditor.wait_records(
        lambda rs: any(r["command"] == "disconnection" for r in rs), what="disconnection record")
    disc = [r for r in recs if r["command"] == "disconnection"]
    conn = [r for r in recs if r["command"] == "connection" and r["client_id"] == disc[0]["client_id"]]
    assert conn and disc
    assert conn[0]["client_ip"] == "127.0.0.1"
    assert conn[0]["category"] == "CONNECTION"
    assert conn[0]["client_port"] == disc[0]["client_port"] > 0
    sets = [r for r in recs if r["command"] == "set"]
    assert len(sets) == 1
    s = sets[0]
    assert s["category"] == "KEY_OP" and s["result"] == "SUCCESS"
    assert s["keys"] == ["k1"]
    assert "key=k1" in s["command_args"] and "payload=v1" in s["command_args"]
    assert s["username"] == "default"
    assert s["client_id"] == conn[0]["client_id"]
    assert s["pid"] == valkey.pid
    # Field order: the module's 13, then ours.
    line = auditor.lines()[0].decode()
    keys = list(json.loads(line).keys())
    assert keys == ["timestamp", "category", "command", "command_args", "result", "duration_us",
                    "keys_modified", "client_id", "username", "client_ip", "client_port",
                    "server_hostname", "error", "seq", "keys", "pid", "server_port"]
    seqs = [r["seq"] for r in auditor.records()]
    assert seqs == list(range(1, len(seqs) + 1))


def test_peer_port_matches_client_socket(audited):
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    local_port = s.getsockname()[1]
    s.sendall(b"*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n")
    read_until(s, lambda b: b.endswith(b"hi\r\n"))
    s.close()
    recs = auditor.wait_records(
        lambda rs: any(r["command"] == "disconnection" and r["client_port"] == local_port for r in rs))
    echo = [r for r in recs if r["command"] == "echo"]
    assert echo[0]["client_port"] == local_port
    assert echo[0]["category"] == "OTHER"
    assert echo[0]["command_args"] == "arg1=hi"


def test_unix_socket_client(audited):
    valkey, auditor = audited
    out = subprocess.run([REDIS_CLI, "-s", valkey.sock, "SET", "unixkey", "u"], capture_output=True, timeout=10)
    assert out.stdout.strip() == b"OK"
    recs = auditor.wait_records(lambda rs: any(r["command"] == "set" for r in rs))
    rec = [r for r in recs if r["command"] == "set"][0]
    assert rec["keys"] == ["unixkey"]
    assert rec["client_ip"] == valkey.sock
    assert rec["client_port"] == 0


def test_ipv6_client(audited):
    valkey, auditor = audited
    try:
        s = socket.create_connection(("::1", valkey.port), timeout=2)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    s.sendall(b"PING\r\n")
    read_until(s, lambda b: b.endswith(b"\r\n"))
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "ping" for r in rs))
    assert [r for r in recs if r["command"] == "ping"][0]["client_ip"] == "::1"


def test_client_connected_before_attach(valkey, start_auditor):
    early = socket.create_connection(("127.0.0.1", valkey.port))
    early_port = early.getsockname()[1]
    early.sendall(b"*3\r\n$3\r\nSET\r\n$6\r\nbefore\r\n$1\r\n1\r\n")
    read_until(early, lambda b: b == b"+OK\r\n")
    auditor = start_auditor(valkey.pid)
    early.sendall(b"*2\r\n$3\r\nGET\r\n$6\r\nbefore\r\n")
    read_until(early, lambda b: b.endswith(b"1\r\n"))
    recs = auditor.wait_records(lambda rs: any(r["command"] == "get" for r in rs))
    got = [r for r in recs if r["command"] == "get"][0]
    assert got["client_port"] == early_port
    assert got["username"] == "unknown"
    assert got["result"] == "SUCCESS"
    assert not any(r["command"] == "set" for r in recs)
    conn = [r for r in recs if r["command"] == "connection" and r["client_port"] == early_port]
    assert conn and "attached=existing" in conn[0]["command_args"]
    early.close()
    auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == early_port for r in rs))


def test_client_caught_mid_command_at_attach_has_its_unseen_commands_counted(valkey, start_auditor):
    """Attached while a client is half-way through a request: the command it completes after attach
    ran unseen, and so do the inline commands after it (the parser trusts no letter there: it may
    be a value's text). Each is a counted loss, from its reply; none is invented."""
    early = socket.create_connection(("127.0.0.1", valkey.port))
    early_port = early.getsockname()[1]
    early.sendall(b"*2\r\n$3\r\nGET\r\n$2\r\nk")
    auditor = start_auditor(valkey.pid)
    early.sendall(b"1\r\n")
    read_until(early, lambda b: b == b"$-1\r\n")
    for i in range(3):
        early.sendall(b"SET midattach%d x\r\n" % i)
        read_until(early, lambda b: b == b"+OK\r\n")
    early.sendall(b"DEL midattach0\r\n")
    read_until(early, lambda b: b == b":1\r\n")
    early.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == early_port
                                               for r in rs))
    mine = [r for r in recs if r["client_port"] == early_port and r["category"] not in ("CONNECTION", "AUDIT")]
    assert not [r for r in mine if r["category"] != "AUDIT_LOSS"], mine
    counts = [int(r["command_args"].split("count=")[1].split()[0]) for r in recs
              if r["category"] == "AUDIT_LOSS" and "cause=commands_not_captured" in r["command_args"]]
    assert sum(counts) == 5, [r["command_args"] for r in recs if r["category"] == "AUDIT_LOSS"]

def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Raw:
    """A raw RESP client: exact bytes on the wire, one reply at a time."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.buf = b""

    def call(self, *args):
        self.sock.sendall(resp(*args))
        return self.read_reply()

    def read_reply(self):
        while True:
            n = self._complete(self.buf, 0)
            if n is not None:
                reply, self.buf = self.buf[:n], self.buf[n:]
                return reply
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def _complete(self, b, i):
        """Index just past one complete RESP value starting at i, or None."""
        end = b.find(b"\r\n", i)
        if end < 0:
            return None
        t, line = b[i:i + 1], b[i + 1:end]
        if t in b"$=!":
            n = int(line)
            if n < 0:
                return end + 2
            return end + 2 + n + 2 if len(b) >= end + 2 + n + 2 else None
        if t in b"*~>%|":
            n = int(line)
            n = n * 2 if t in b"%|" else n
            j = end + 2
            for _ in range(max(n, 0)):
                j = self._complete(b, j)
                if j is None:
                    return None
            if t == b"|":
                return self._complete(b, j)
            return j
        return end + 2

    def close(self):
        self.sock.close()


def test_an_auth_silenced_by_client_reply_off_cannot_hide_behind_an_excluded_user(
        valkey, start_auditor):
    """QA: under CLIENT REPLY OFF the server switches users without a word. The commands after it
    were judged as the user before it, so a client that logged in as a user `audit.excluderules`
    leaves out could switch to another one silently and go unrecorded. Now its user is unknown
    until the server says (ACL WHOAMI answers with it)."""
    admin = Raw(valkey.port)
    for user, pw in (("svc", "svc-pw"), ("admin2", "admin2-pw")):
        assert admin.call("ACL", "SETUSER", user, "on", f">{pw}", "~*", "+@all") == b"+OK\r\n"
    auditor = start_auditor(valkey.pid, settings=("audit.excluderules", "svc"))
    c = Raw(valkey.port)
    assert c.call("AUTH", "svc", "svc-pw") == b"+OK\r\n"
    assert c.call("SET", "hidden:by-rule", "1") == b"+OK\r\n"
    c.sock.sendall(resp("CLIENT", "REPLY", "OFF") + resp("AUTH", "admin2", "admin2-pw"))
    assert c.call("CLIENT", "REPLY", "ON") == b"+OK\r\n"
    assert c.call("DEL", "important") == b":0\r\n"
    assert c.call("ACL", "WHOAMI") == b"$6\r\nadmin2\r\n"
    assert c.call("FLUSHALL") == b"+OK\r\n"
    c.close()
    admin.close()
    recs = auditor.wait_records(
        lambda rs: any(r["command"] == "flushall" for r in rs), what="the FLUSHALL record")
    by_command = {r["command"]: r for r in recs}
    assert not any(r["keys"] == ["hidden:by-rule"] for r in recs)
    assert by_command["del"]["username"] == "unknown", by_command["del"]
    assert by_command["acl|whoami"]["username"] == "admin2"
    assert by_command["flushall"]["username"] == "admin2"
    assert b"admin2-pw" not in auditor.log.read_bytes()


def test_silenced_unsubscribe_confirmations_cannot_fake_a_login(valkey, start_auditor):
    """QA: Valkey sends (UN)SUBSCRIBE confirmations even with replies off or skipped. Taken for
    the next command's reply, every reply after it was paired one command late: a wrong-password
    AUTH as an excluded user read as a success, and the commands after it went unrecorded. Nor
    may a rule for an ACL user named `unknown` cover the users the auditor does not know."""
    admin = Raw(valkey.port)
    for user in ("alice", "unknown"):
        assert admin.call("ACL", "SETUSER", user, "on", ">pw", "~*", "+@all") == b"+OK\r\n"
    admin.close()
    auditor = start_auditor(valkey.pid, settings=("audit.excluderules", "alice,unknown"))
    c = Raw(valkey.port)
    c.sock.sendall(resp("CLIENT", "REPLY", "OFF") + resp("UNSUBSCRIBE")
                   + resp("CLIENT", "REPLY", "ON") + resp("AUTH", "alice", "wrong")
                   + resp("SET", "sub:visible", "1"))
    assert c.read_reply().startswith(b"*3\r\n$11\r\nunsubscribe\r\n")
    assert [c.read_reply() for _ in range(3)] == [
        b"+OK\r\n", b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        b"+OK\r\n"]
    c.sock.sendall(resp("CLIENT", "REPLY", "SKIP") + resp("SUBSCRIBE", "ch")
                   + resp("UNSUBSCRIBE", "ch") + resp("GET", "sub:visible"))
    assert [c.read_reply()[:14] for _ in range(3)] == [
        b"*3\r\n$9\r\nsubscr", b"*3\r\n$11\r\nunsub", b"$1\r\n1\r\n"]
    # A silenced AUTH: the user is not known from here on, and no user rule covers that.
    c.sock.sendall(resp("CLIENT", "REPLY", "OFF") + resp("AUTH", "nobody", "x"))
    assert c.call("CLIENT", "REPLY", "ON") == b"+OK\r\n"
    assert c.call("SET", "sub:unknown", "1") == b"+OK\r\n"
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["keys"] == ["sub:unknown"] for r in rs),
                                what="the SET after the silenced AUTH")
    mine = [(r["command"], r["result"], r["username"]) for r in recs
            if r["client_port"] == c.port and r["command"] in ("auth", "set", "get")]
    assert mine == [("auth", "FAILURE", "default"), ("set", "SUCCESS", "default"),
                    ("get", "SUCCESS", "default"), ("auth", "UNKNOWN", "default"),
                    ("set", "SUCCESS", "unknown")], mine


def test_unsubscribe_without_arguments_and_failed_silenced_subscribes_keep_replies_in_step(
        valkey, start_auditor):
    """QA: an UNSUBSCRIBE without arguments ended at its first confirmation (the connection then
    looked subscribed, and an LRANGE of [message, ...] was taken for a message), and a SUBSCRIBE
    the ACL refused under CLIENT REPLY SKIP took the next SUBSCRIBE's confirmation: either way
    every reply after it was paired one command late, a wrong-password AUTH as an excluded user
    read as a success, and the commands after it went unrecorded."""
    admin = Raw(valkey.port)
    assert admin.call("ACL", "SETUSER", "u", "on", ">p", "~*", "resetchannels", "&allowed",
                      "+@all") == b"+OK\r\n"
    assert admin.call("ACL", "SETUSER", "alice", "on", ">pw", "~*", "+@all") == b"+OK\r\n"
    assert admin.call("RPUSH", "msglist", "message", "c1", "data") == b":3\r\n"
    admin.close()
    auditor = start_auditor(valkey.pid, settings=("audit.excluderules", "alice"))
    c = Raw(valkey.port)
    c.sock.sendall(resp("SUBSCRIBE", "c1", "c2") + resp("UNSUBSCRIBE"))
    assert [c.read_reply()[-4:] for _ in range(4)] == [b":1\r\n", b":2\r\n", b":1\r\n", b":0\r\n"]
    c.sock.sendall(resp("LRANGE", "msglist", "0", "-1") + resp("AUTH", "alice", "wrong")
                   + resp("SET", "instep:1", "1"))
    assert [c.read_reply()[:4] for _ in range(3)] == [b"*3\r\n", b"-WRO", b"+OK\r"]
    assert c.call("AUTH", "u", "p") == b"+OK\r\n"
    c.sock.sendall(resp("CLIENT", "REPLY", "SKIP") + resp("SUBSCRIBE", "notallowed")
                   + resp("SUBSCRIBE", "allowed") + resp("PING") + resp("UNSUBSCRIBE")
                   + resp("AUTH", "alice", "wrong") + resp("SET", "instep:2", "1"))
    assert [c.read_reply()[:14] for _ in range(5)] == [
        b"*3\r\n$9\r\nsubscr", b"*2\r\n$4\r\npong\r\n", b"*3\r\n$11\r\nunsub",
        b"-WRONGPASS inv", b"+OK\r\n"]
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["keys"] == ["instep:2"] for r in rs),
                                what="the SET after the refused SUBSCRIBE")
    mine = [(r["command"], r["result"], r["username"]) for r in recs
            if r["client_port"] == c.port and r["category"] != "CONNECTION"]
    assert mine == [
        ("subscribe", "SUCCESS", "default"), ("unsubscribe", "SUCCESS", "default"),
        ("lrange", "SUCCESS", "default"), ("auth", "FAILURE", "default"),
        ("set", "SUCCESS", "default"), ("auth", "SUCCESS", "default"),
        ("client|reply", "UNKNOWN", "u"), ("subscribe", "UNKNOWN", "u"),
        ("subscribe", "SUCCESS", "u"), ("ping", "SUCCESS", "u"),
        ("unsubscribe", "SUCCESS", "u"), ("auth", "FAILURE", "u"), ("set", "SUCCESS", "u")], mine


def test_an_auth_hidden_by_a_capture_gap_leaves_the_user_unknown(valkey, start_auditor):
    """A read past the capture cap can hold whole commands: an AUTH among them changed the user
    while the records after it went on naming the user before it (QA). Now a gap that breaks the
    request framing makes the user unknown until a reply shows it."""
    admin = Raw(valkey.port)
    assert admin.call("ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "+@all") == b"+OK\r\n"
    admin.close()
    auditor = start_auditor(valkey.pid, extra=("--capture-cap", "4096"))
    c = Raw(valkey.port)
    c.sock.sendall(resp("SET", "gap:b1", "y" * 5000) + resp("SET", "gap:b2", "z" * 5000)
                   + resp("AUTH", "alice", "alice-pw"))
    assert [c.read_reply() for _ in range(3)] == [b"+OK\r\n"] * 3
    assert c.call("SET", "gap:after", "1") == b"+OK\r\n"
    # (After a gap, replies are not trusted to name the user: ACL WHOAMI leaves it unknown.)
    assert c.call("ACL", "WHOAMI") == b"$5\r\nalice\r\n"
    assert c.call("SET", "gap:still", "1") == b"+OK\r\n"
    assert c.call("AUTH", "alice", "alice-pw") == b"+OK\r\n"
    assert c.call("SET", "gap:known", "1") == b"+OK\r\n"
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["keys"] == ["gap:known"] for r in rs),
                                what="the SET after ACL WHOAMI")
    users = {r["keys"][0]: r["username"] for r in recs if r["command"] == "set"}
    assert users["gap:after"] == users["gap:still"] == "unknown", users
    assert users["gap:known"] == "alice", users
    assert any("cause=parser_resync_request" in r["command_args"] for r in recs)
    assert b"alice-pw" not in auditor.log.read_bytes()


def test_an_empty_request_uses_up_client_reply_skip(valkey, start_auditor):
    """Valkey resets the client after a blank line or `*0` as after a command, which uses up a
    CLIENT REPLY SKIP. The auditor took the next command for the skipped one: every reply after it
    was paired one command late, and an ACL WHOAMI took an ECHO's reply for the user's name, so
    with `audit.excluderules admin` alice's commands were hidden (QA)."""
    admin = Raw(valkey.port)
    assert admin.call("ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "+@all") == b"+OK\r\n"
    admin.close()
    auditor = start_auditor(valkey.pid, settings=("audit.excluderules", "admin"))
    c = Raw(valkey.port)
    assert c.call("AUTH", "alice", "alice-pw") == b"+OK\r\n"
    for empty in (b"\r\n", b"*0\r\n"):
        c.sock.sendall(b"CLIENT REPLY SKIP\r\n" + empty + b"ECHO admin\r\nACL WHOAMI\r\n")
        assert [c.read_reply() for _ in range(2)] == [b"$5\r\nadmin\r\n", b"$5\r\nalice\r\n"]
    # A line of spaces is no request that uses it up (Valkey 9.1.2): ECHO is the skipped one.
    c.sock.sendall(b"CLIENT REPLY SKIP\r\n   \r\nECHO admin\r\nACL WHOAMI\r\n")
    assert c.read_reply() == b"$5\r\nalice\r\n"
    assert c.call("SET", "skip:after", "1") == b"+OK\r\n"
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["keys"] == ["skip:after"] for r in rs),
                                what="alice's SET after the skips")
    mine = [r for r in recs if r["client_port"] == c.port and r["category"] != "CONNECTION"]
    assert [(r["command"], r["result"], r["username"]) for r in mine] == [
        ("auth", "SUCCESS", "default"),
        ("client|reply", "UNKNOWN", "alice"), ("echo", "SUCCESS", "alice"),
        ("acl|whoami", "SUCCESS", "alice"),
        ("client|reply", "UNKNOWN", "alice"), ("echo", "SUCCESS", "alice"),
        ("acl|whoami", "SUCCESS", "alice"),
        ("client|reply", "UNKNOWN", "alice"), ("echo", "UNKNOWN", "alice"),
        ("acl|whoami", "SUCCESS", "alice"),
        ("set", "SUCCESS", "alice")], mine


def test_auth_and_hello_with_acl_user(audited):
    valkey, auditor = audited
    admin = Raw(valkey.port)
    assert admin.call("ACL", "SETUSER", "alice", "on", ">s3cr3t-alice", "~*", "+@all") == b"+OK\r\n"
    c = Raw(valkey.port)
    assert c.call("AUTH", "alice", "wrong-pass-1").startswith(b"-WRONGPASS")
    c.call("SET", "after-bad", "1")
    assert c.call("AUTH", "alice", "s3cr3t-alice") == b"+OK\r\n"
    c.call("SET", "after-good", "1")
    c.close()
    s = Raw(valkey.port)
    assert s.call("HELLO", "3", "AUTH", "alice", "wrong-pass-2").startswith(b"-WRONGPASS")
    s.call("GET", "x")
    assert s.call("HELLO", "3", "AUTH", "alice", "s3cr3t-alice").startswith(b"%")
    s.call("GET", "y")
    s.close()
    admin.close()
    recs = auditor.wait_records(lambda rs: sum(r["command"] == "disconnection" for r in rs) >= 3)
    auths = [r for r in recs if r["command"] == "auth"]
    assert [a["result"] for a in auths] == ["FAILURE", "SUCCESS"]
    assert all(a["category"] == "AUTH" for a in auths)
    assert auths[0]["username"] == "default"  # the user the command ran as
    # ... and the user it tried to become, never the password
    assert [a["command_args"] for a in auths] == ["user=alice password=<REDACTED>"] * 2
    assert auths[0]["error"].startswith("WRONGPASS")
    after_bad = [r for r in recs if r["keys"] == ["after-bad"]][0]
    assert after_bad["username"] == "default"
    after_good = [r for r in recs if r["keys"] == ["after-good"]][0]
    assert after_good["username"] == "alice"
    hellos = [r for r in recs if r["command"] == "hello"]
    assert [h["result"] for h in hellos] == ["FAILURE", "SUCCESS"]
    assert all(h["category"] == "AUTH" for h in hellos)
    assert [r for r in recs if r["keys"] == ["x"]][0]["username"] == "default"
    assert [r for r in recs if r["keys"] == ["y"]][0]["username"] == "alice"
    disc = [r for r in recs if r["command"] == "disconnection" and r["client_port"] == s.port][0]
    assert disc["username"] == "alice"
    text = auditor.log.read_bytes()
    for secret in (b"s3cr3t-alice", b"wrong-pass-1", b"wrong-pass-2"):
        assert secret not in text


def test_secrets_never_logged(audited):
    valkey, auditor = audited
    c = Raw(valkey.port)
    for cmd in (
        ("ACL", "SETUSER", "bob", "on", ">bobsecret", "#" + "a" * 64, "~*", "+@all"),
        ("ACL", "SETUSER", "bob", "<bobsecret"),
        # Errors that quote the rule: the secret must not come back through the error field.
        ("ACL", "SETUSER", "bob", "<gonesecret"),
        ("ACL", "SETUSER", "bob", "#shorthashsecret"),
        ("CONFIG", "SET", "requirepass", "reqsecret"),
        ("AUTH", "reqsecret"),
        ("CONFIG", "SET", "masterauth", "mastersecret", "maxmemory", "0"),
        ("CONFIG", "SET", "requirepass", ""),
        ("MIGRATE", "127.0.0.1", "1", "", "0", "100", "AUTH", "migsecret", "KEYS", "a"),
        ("MIGRATE", "127.0.0.1", "1", "", "0", "100", "AUTH2", "miguser", "mig2secret", "KEYS", "a"),
        ("HELLO", "2", "AUTH", "default", "hellosecret"),
    ):
        c.call(*cmd)
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" for r in rs))
    text = auditor.log.read_bytes()
    for secret in (b"bobsecret", b"a" * 64, b"reqsecret", b"mastersecret", b"migsecret", b"mig2secret",
                   b"hellosecret", b"gonesecret", b"shorthashsecret"):
        assert secret not in text, secret
    acl_errors = [r["error"] for r in recs if r["command"] == "acl|setuser" and r["result"] == "FAILURE"]
    assert len(acl_errors) == 2 and all("<REDACTED>" in e for e in acl_errors), acl_errors
    cfg = [r for r in recs if r["command"] == "config|set"]
    assert len(cfg) == 3 and all(r["category"] == "CONFIG" for r in cfg)
    assert "param=requirepass" in cfg[0]["command_args"]
    # Every setting one CONFIG SET changes is named (the password change is not hidden behind the
    # first), never a value.
    assert cfg[1]["command_args"] == "subcommand=SET param=masterauth param=maxmemory"
    assert len([r for r in recs if r["command"] == "migrate"]) == 2



def test_secrets_of_renamed_commands_never_logged(start_valkey, start_auditor):
    """`rename-command` (a common hardening step) makes CONFIG, ACL and AUTH commands the
    auditor does not know by name: the words that take a secret still hide it, and a renamed
    AUTH that fails is known by its WRONGPASS."""
    valkey = start_valkey("--rename-command", "CONFIG", "cfg-9f3a", "--rename-command", "ACL", "acl-x",
                          "--rename-command", "AUTH", "myauth")
    auditor = start_auditor(valkey.pid)
    c = Raw(valkey.port)
    assert c.call("cfg-9f3a", "SET", "requirepass", "cfgrenamedsecret") == b"+OK\r\n"
    assert c.call("acl-x", "SETUSER", "bob", "on", ">bobrenamedsecret") == b"+OK\r\n"
    c.call("acl-x", "SETUSER", "u3", "(>selrenamedsecret +get)")
    assert c.call("acl-x", "SETUSER", "u5", "on >spacerenamedsecret").startswith(b"-ERR")
    assert c.call("myauth", "bob", "wrongrenamedsecret").startswith(b"-WRONGPASS")
    assert c.call("cfg-9f3a", "SET", "masterauth", "masterrenamedsecret") == b"+OK\r\n"
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" for r in rs))
    text = auditor.log.read_bytes()
    for secret in (b"cfgrenamedsecret", b"bobrenamedsecret", b"wrongrenamedsecret", b"masterrenamedsecret",
                   b"selrenamedsecret", b"spacerenamedsecret"):
        assert secret not in text, secret
    failed = [r for r in recs if r["command"] == "myauth" and r["result"] == "FAILURE"]
    assert [(r["category"], r["command_args"]) for r in failed] == [("AUTH", "password=<REDACTED>")]


def test_secrets_of_renamed_commands_in_every_failure_never_logged(start_valkey, start_auditor):
    """A renamed AUTH refused for want of a configured password, or with WRONGPASS inside
    MULTI/EXEC, and a renamed CONFIG setting primaryauth (masterauth's new name)."""
    valkey = start_valkey("--rename-command", "CONFIG", "cfg-9f3a", "--rename-command", "AUTH", "myauth")
    auditor = start_auditor(valkey.pid)
    c = Raw(valkey.port)
    assert c.call("myauth", "nopassRenamedSecret").startswith(b"-ERR AUTH <password> called without")
    assert c.call("cfg-9f3a", "SET", "primaryauth", "primaryRenamedSecret") == b"+OK\r\n"
    assert c.call("cfg-9f3a", "SET", "requirepass", "reqRenamedSecret") == b"+OK\r\n"
    assert c.call("MULTI") == b"+OK\r\n"
    assert c.call("myauth", "default", "multiRenamedSecret") == b"+QUEUED\r\n"
    assert b"WRONGPASS" in c.call("EXEC")
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" for r in rs))
    text = auditor.log.read_bytes()
    for secret in (b"nopassRenamedSecret", b"primaryRenamedSecret", b"reqRenamedSecret", b"multiRenamedSecret"):
        assert secret not in text, secret
    auths = [(r["category"], r["command_args"]) for r in recs if r["command"] == "myauth"]
    assert auths == [("AUTH", "password=<REDACTED>")] * 2, auths


def test_secrets_in_quotes_spaces_typos_and_several_rules_never_logged(audited):
    """Passwords that hold quotes (Valkey's error quotes them as typed), a password typed with
    a space in CONFIG SET (its second word taken for a parameter), several ACL rules in one
    argument, a mistyped subcommand; and a script cannot pass itself off as a failed AUTH."""
    valkey, auditor = audited
    c = Raw(valkey.port)
    replies = [c.call(*cmd) for cmd in (
        ("ACL", "SETUSER", "bob", "on", "'QuoteSecret1'"),
        ("ACL", "SETUSER", "bob", "on", "bob'sQuoteSecret2"),
        ("HELLO", "3", "AUTH", "default", "x", "'QuoteTail3"),
        ("CONFIG", "SET", "requirepass", "my", "TailSecret4"),
        ("CONFIG", "SET", "requirepass", "my", "passTail5", "wordTail5"),
        ("ACL", "SETUSER", "bob", "+@all >RuleSecret6"),
        ("ACL", "SETUSR", "bob", ">TypoSecret7"),
        ("COMMAND", "GETKEY", "AUTH", "TypoSecret8"),
    )]
    assert all(r.startswith(b"-") for r in replies), replies
    assert c.call("SET", "victim", "1") == b"+OK\r\n"
    script = "redis.call('DEL', KEYS[1]); return redis.error_reply('WRONGPASS hidden')"
    assert c.call("EVAL", script, "1", "victim") == b"-WRONGPASS hidden\r\n"
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" for r in rs))
    text = auditor.log.read_bytes()
    for secret in (b"QuoteSecret1", b"QuoteSecret2", b"QuoteTail3", b"TailSecret4", b"passTail5",
                   b"wordTail5", b"RuleSecret6", b"TypoSecret7", b"TypoSecret8"):
        assert secret not in text, secret
    cfg = [r["command_args"] for r in recs if r["command"] == "config|set"]
    assert cfg == ["subcommand=SET param=requirepass param=<REDACTED>"] * 2, cfg
    ev = [r for r in recs if r["command"] == "eval"][0]
    assert (ev["category"], ev["keys"], ev["error"]) == ("KEY_OP", ["victim"], "WRONGPASS hidden"), ev
    assert "redis.call('DEL'" in ev["command_args"], ev


def test_secrets_valkey_changes_before_quoting_them_or_typed_with_a_space_never_logged(audited):
    """Valkey quotes a failing ACL rule after making CR/LF spaces and cutting it at a NUL or at 512
    bytes; a password typed with a space leaves its second word as a syntax error Valkey quotes;
    COMMAND GETKEYS names a whole command. None of it may show a password, and fixed texts that
    happen to contain the password (`username-password`) must not be redacted (that told it)."""
    valkey, auditor = audited
    c = Raw(valkey.port)
    long_secret = "<LongSecret" + "x" * 600
    replies = [c.call(*cmd) for cmd in (
        ("ACL", "SETUSER", "dave", "<CrSecret\r\nCrPart"),
        ("ACL", "SETUSER", "dave", "<NulSecret\0NulPart"),
        ("ACL", "SETUSER", "dave", long_secret),
        ("ACL", "SETUSER", "dave", "on", ">SpPass3", "SpWord3"),
        ("ACL", "SETUSER", "dave", "(>SelSecret4)"),
        ("ACL", "SETUSER", "dave", "on >OneArgSecret5"),
        ("HELLO", "3", "AUTH", "default", "SpPass2", "SpWord2"),
        ("COMMAND", "GETKEYS", "AUTH", "GkSecret1"),
        ("COMMAND", "GETKEYSANDFLAGS", "CONFIG", "SET", "requirepass", "GkSecret2"),
        ("AUTH", "alice", "password"),
    )]
    assert all(r.startswith(b"-") for r in replies), replies
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" for r in rs))
    text = auditor.log.read_bytes()
    for secret in (b"CrSecret", b"CrPart", b"NulSecret", b"NulPart", b"LongSecret", b"SpPass3",
                   b"SpWord3", b"SelSecret4", b"OneArgSecret5", b"SpPass2", b"SpWord2",
                   b"GkSecret1", b"GkSecret2"):
        assert secret not in text, secret
    acl = [r["error"] for r in recs if r["command"] == "acl|setuser"]
    assert len(acl) == 6 and all("modifier '<REDACTED>" in e for e in acl), acl
    auth = [r for r in recs if r["command"] == "auth"][0]
    assert auth["error"] == "WRONGPASS invalid username-password pair or user is disabled.", auth

def test_command_mix(audited):
    valkey, auditor = audited
    c = valkey.client(single_connection_client=True)
    assert c.config_get("maxmemory")
    c.config_set("maxmemory-policy", "allkeys-lru")
    c.mset({"m1": "a", "m2": "b", "m3": "c"})
    c.delete("m1", "m2", "nokey")
    c.setex("ttlkey", 100, "ttlvalue")
    c.hset("h1", mapping={"f1": "v1", "f2": "v2"})
    c.eval("return redis.call('set', KEYS[1], ARGV[1])", 2, "ek1", "ek2", "earg")
    p = c.pipeline(transaction=True)
    p.set("tx1", "1")
    p.incr("tx1")
    assert p.execute() == [True, 2]
    c.set("str", "x")
    with pytest.raises(redis.exceptions.ResponseError):
        c.lpush("str", "y")
    with pytest.raises(redis.exceptions.ResponseError):
        c.execute_command("NOSUCHCOMMAND", "arg")
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" for r in rs))
    cmds = [r for r in recs if r["category"] != "CONNECTION"]
    names = [r["command"] for r in cmds]
    assert "config|get" in names and "config|set" in names
    cs = [r for r in cmds if r["command"] == "config|set"][0]
    assert cs["category"] == "CONFIG" and "param=maxmemory-policy" in cs["command_args"]
    mset = [r for r in cmds if r["command"] == "mset"][0]
    assert mset["keys"] == ["m1", "m2", "m3"]
    dele = [r for r in cmds if r["command"] == "del"][0]
    assert dele["keys"] == ["m1", "m2", "nokey"]
    setex = [r for r in cmds if r["command"] == "setex"][0]
    assert "payload=ttlvalue" in setex["command_args"] and setex["keys"] == ["ttlkey"]
    hset = [r for r in cmds if r["command"] == "hset"][0]
    assert hset["keys"] == ["h1"] and hset["category"] == "KEY_OP"
    ev = [r for r in cmds if r["command"] == "eval"][0]
    assert ev["keys"] == ["ek1", "ek2"] and ev["result"] == "SUCCESS"
    tx = [r["command"] for r in cmds if r["command"] in ("multi", "set", "incrby", "exec") and
          (r["keys"] in (["tx1"], []))]
    assert tx[-4:] == ["multi", "set", "incrby", "exec"]
    assert all(r["result"] == "SUCCESS" for r in cmds if r["keys"] == ["tx1"])
    wrong = [r for r in cmds if r["command"] == "lpush"][0]
    assert wrong["result"] == "FAILURE" and wrong["error"].startswith("WRONGTYPE")
    unk = [r for r in cmds if r["command"] == "NOSUCHCOMMAND"][0]
    assert unk["result"] == "FAILURE" and unk["error"].startswith("rejected=unknown command")
    assert all(r["duration_us"] >= 0 for r in cmds)


def test_transactions_exec_discard_and_reset(audited):
    valkey, auditor = audited
    c = Raw(valkey.port)
    assert c.call("SET", "txs", "notanumber") == b"+OK\r\n"
    # EXEC: each queued command gets its own result from EXEC's reply.
    assert c.call("MULTI") == b"+OK\r\n"
    assert c.call("SET", "tx-a", "1") == b"+QUEUED\r\n"
    assert c.call("INCR", "txs") == b"+QUEUED\r\n"
    assert c.call("EXEC").startswith(b"*2\r\n+OK\r\n-ERR")
    # DISCARD and RESET: nothing queued ran.
    assert c.call("MULTI") == b"+OK\r\n"
    assert c.call("SET", "tx-b", "1") == b"+QUEUED\r\n"
    assert c.call("DISCARD") == b"+OK\r\n"
    assert c.call("MULTI") == b"+OK\r\n"
    assert c.call("SET", "tx-c", "1") == b"+QUEUED\r\n"
    assert c.call("RESET") == b"+RESET\r\n"
    assert c.call("EXISTS", "tx-b", "tx-c") == b":0\r\n"
    # EXECABORT: EXEC ran and failed (the module's exec FAILURE), not a command the server refused.
    assert c.call("MULTI") == b"+OK\r\n"
    assert c.call("SET", "tx-d", "1") == b"+QUEUED\r\n"
    assert c.call("NOSUCHCMD").startswith(b"-ERR unknown command")
    execabort = c.call("EXEC")
    assert execabort.startswith(b"-EXECABORT"), execabort
    c.sock.close()
    recs = auditor.wait_records(
        lambda rs: any(r["command"] == "disconnection" and r["client_port"] == c.port for r in rs))
    got = [(r["command"], r["keys"], r["result"], r["error"]) for r in commands_of(recs, c.port)]
    assert got == [
        ("set", ["txs"], "SUCCESS", ""),
        ("multi", [], "SUCCESS", ""),
        ("set", ["tx-a"], "SUCCESS", ""),
        ("incr", ["txs"], "FAILURE", "ERR value is not an integer or out of range"),
        ("exec", [], "SUCCESS", ""),
        ("multi", [], "SUCCESS", ""),
        ("set", ["tx-b"], "FAILURE", "discarded"),
        ("discard", [], "SUCCESS", ""),
        ("multi", [], "SUCCESS", ""),
        ("set", ["tx-c"], "FAILURE", "discarded by RESET"),
        ("reset", [], "SUCCESS", ""),
        ("exists", ["tx-b", "tx-c"], "SUCCESS", ""),
        ("multi", [], "SUCCESS", ""),
        # (The refused command's record comes at once; the queued ones' at EXEC.)
        ("NOSUCHCMD", [], "FAILURE", "rejected=unknown command 'NOSUCHCMD', with args beginning with: "),
        ("set", ["tx-d"], "FAILURE", "not executed: transaction aborted"),
        ("exec", [], "FAILURE", execabort.decode().strip()[1:]),
    ], got


def test_client_garbage_is_a_protocol_error_record_not_a_loss(audited):
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(resp("SET", "before-garbage", "1") + b"*2\r\n$-5\r\n")
    # The server answers the SET, refuses the rest and closes the connection.
    data = read_until(s, lambda b: b"Protocol error" in b)
    assert data.startswith(b"+OK\r\n-ERR Protocol error"), data
    s.close()
    recs = auditor.wait_records(
        lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port for r in rs))
    mine = commands_of(recs, port)
    assert [(r["command"], r["result"]) for r in mine] == [("set", "SUCCESS"), ("protocol_error", "FAILURE")]
    assert mine[1]["command_args"] == "reason=invalid bulk length"
    assert mine[1]["error"] == "rejected=Protocol error: invalid bulk length"
    assert not any(r["category"] == "AUDIT_LOSS" for r in recs)

    # The counters are published every 100 ms.
    wait_until(lambda: info_audit(auditor).get("audit_client_protocol_errors") == "1", timeout=10,
               what="audit_client_protocol_errors:1")
    assert info_audit(auditor)["audit_lost_parser_resync_request"] == "0"


def commands_of_closed_connection(auditor, port):
    """(command, command_args, result) of the connection from `port`, once its disconnection
    is written."""
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port
                                               for r in rs))
    return [(r["command"], r["command_args"], r["result"]) for r in recs if r["client_port"] == port
            and r["category"] != "CONNECTION"]


def test_inline_command(audited):
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    s.sendall(b'SET inlinekey "inline value"\r\n')
    read_until(s, lambda b: b == b"+OK\r\n")
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "set" for r in rs))
    r = [r for r in recs if r["command"] == "set"][0]
    assert r["keys"] == ["inlinekey"] and "payload=inline value" in r["command_args"]



def test_inline_quotes_joined_to_text_are_split_as_valkey_splits_them(audited):
    """Valkey 9.1.2 joins a quoted part to the text around it (`"FLUSH"ALL` runs FLUSHALL): each
    such command is recorded as what the server ran, none is taken for a protocol error."""
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    s.sendall(b'SET "k"2 changed\r\n"FLUSH"ALL\r\nECHO \'it\'\'s\'\r\n')
    read_until(s, lambda b: b == b"+OK\r\n+OK\r\n$3\r\nits\r\n")
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "echo" for r in rs))
    mine = [r for r in recs if r["category"] not in ("CONNECTION", "AUDIT")]
    assert [(r["command"], r["keys"], r["result"]) for r in mine] == [
        ("set", ["k2"], "SUCCESS"), ("flushall", [], "SUCCESS"), ("echo", [], "SUCCESS")], mine


def test_an_inline_value_ending_in_a_backslash_before_its_closing_quote_is_run_and_recorded(audited):
    """Valkey 9.1.2 reads `"v\\"` ending a line as `v\\` and a closing quote (an escape needs a byte
    after the escaped one). QA: taken for an unclosed quote, the line became a protocol error and
    the ACL SETUSER and CONFIG SET after it in the same write were run but never recorded."""
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(b'SET k1 "v\\"\r\nACL SETUSER backdoor on nopass +@all ~*\r\n'
              b"SET 'k3' 'x\\'\r\nCONFIG SET maxmemory-policy noeviction\r\nECHO done\r\n")
    read_until(s, lambda b: b == b"+OK\r\n+OK\r\n+OK\r\n+OK\r\n$4\r\ndone\r\n")
    s.close()
    assert valkey.client().get("k1") == b"v\\" and valkey.client().get("k3") == b"x\\"
    recs = auditor.wait_records(lambda rs: any(r["command"] == "echo" for r in rs))
    mine = [r for r in recs if r["client_port"] == port and r["category"] != "CONNECTION"]
    assert [(r["command"], r["keys"], r["result"]) for r in mine] == [
        ("set", ["k1"], "SUCCESS"), ("acl|setuser", [], "SUCCESS"), ("set", ["k3"], "SUCCESS"),
        ("config|set", [], "SUCCESS"), ("echo", [], "SUCCESS")], mine


def test_inline_lines_are_read_as_valkey_reads_them_0xff_and_long_lines(audited):
    """Valkey 9.1.2 drops every 0xff byte written in an inline line (`FLUSH\\xffALL` runs
    FLUSHALL), and runs a line over 64 KiB whose end its read got. QA: the first was recorded as
    an unknown command (an AUTH so spelt with its password in the clear); the second was taken
    for a refused line at a ring-chunk boundary, and the commands after it went unrecorded."""
    valkey, auditor = audited
    valkey.client().execute_command("ACL", "SETUSER", "bob", "on", ">BobSecret1", "~*", "+@all")
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(b"SET \xffvictim x\r\nA\xffUTH bob BobSecret1\r\nECHO " + b"y" * 100_000
              + b"\r\nCON\xffFIG SET maxmemory-policy noeviction\r\nECHO done\r\n")
    read_until(s, lambda b: b.endswith(b"+OK\r\n$4\r\ndone\r\n"))
    s.close()
    assert valkey.client().get("victim") == b"x"
    recs = auditor.wait_records(lambda rs: any(r["command_args"] == "arg1=done" for r in rs))
    mine = [r for r in recs if r["client_port"] == port and r["category"] != "CONNECTION"]
    assert [(r["command"], r["keys"], r["result"], r["username"]) for r in mine] == [
        ("set", ["victim"], "SUCCESS", "default"), ("auth", [], "SUCCESS", "default"),
        ("echo", [], "SUCCESS", "bob"), ("config|set", [], "SUCCESS", "bob"),
        ("echo", [], "SUCCESS", "bob")], mine
    assert b"BobSecret1" not in auditor.log.read_bytes()


def test_commands_after_bytes_the_server_refused_are_not_recorded(audited):
    """A bulk payload with a wrong CRLF: Valkey refuses it ("invalid CRLF in request") and closes
    the connection without reading what follows. The log says so and invents no command."""
    valkey, auditor = audited
    valkey.client().set("keep-me", "1")
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(b"*2\r\n$3\r\nGET\r\n$6\r\nsecretXY\r\n" + resp("FLUSHALL")
              + resp("CONFIG", "SET", "maxmemory", "1"))
    read_until(s, lambda b: b == b"-ERR Protocol error: invalid CRLF in request\r\n")
    s.close()
    assert valkey.client().get("keep-me") == b"1"
    mine = commands_of_closed_connection(auditor, port)
    assert mine == [("protocol_error", "reason=invalid CRLF in request", "FAILURE")], mine

def test_nothing_after_a_nul_in_an_inline_line_is_recorded(audited):
    """Valkey looks for an inline line's end with strchr, which stops at a NUL: the line never
    ends for the server, and neither it nor the FLUSHALL behind it runs. The log invents neither;
    once more than 64 KiB are pending the server refuses them, and the log says so."""
    valkey, auditor = audited
    valkey.client().set("keep-me", "1")
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(b"PING\r\nSET keep-me a\x00b\r\nFLUSHALL\r\n")
    read_until(s, lambda b: b == b"+PONG\r\n")
    s.sendall(b"x" * 70000)
    read_until(s, lambda b: b == b"-ERR Protocol error: too big inline request\r\n")
    s.close()
    assert valkey.client().get("keep-me") == b"1"
    mine = commands_of_closed_connection(auditor, port)
    assert mine == [("ping", "", "SUCCESS"),
                    ("protocol_error", "reason=too big inline request", "FAILURE")], mine


def test_nothing_after_quit_is_recorded(audited):
    """QUIT closes the connection without reading on: the commands behind it in the same write
    never run and get no record; a transaction QUIT leaves is discarded."""
    valkey, auditor = audited
    valkey.client().set("keep-me", "1")
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(resp("MULTI") + resp("SET", "queued", "1") + resp("QUIT") + resp("EXEC")
              + resp("DEL", "keep-me") + resp("FLUSHALL"))
    read_until(s, lambda b: b == b"+OK\r\n+QUEUED\r\n+OK\r\n")
    s.close()
    assert valkey.client().get("keep-me") == b"1"
    assert commands_of_closed_connection(auditor, port) == [
        ("multi", "", "SUCCESS"), ("quit", "", "SUCCESS"), ("set", "key=queued payload=1", "FAILURE")]


def test_pubsub_inside_multi_never_passes_a_failed_auth_for_a_success(audited):
    """SUBSCRIBE a b in a transaction writes two confirmations for one EXEC element, pushing the
    AUTH's WRONGPASS out of the array: the auth record and the user after it must not say that
    the failed AUTH succeeded (results from the SUBSCRIBE on are unknown, and so is the user)."""
    valkey, auditor = audited
    valkey.client().execute_command("ACL", "SETUSER", "admin", "on", ">right", "+@all", "~*", "&*")
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(resp("HELLO", "3") + resp("MULTI") + resp("SUBSCRIBE", "a", "b") + resp("AUTH", "admin", "wrong")
              + resp("EXEC") + resp("ACL", "WHOAMI"))
    read_until(s, lambda b: b.endswith(b"$7\r\ndefault\r\n"))
    s.close()
    mine = commands_of_closed_connection(auditor, port)
    results = {command: result for command, _, result in mine}
    assert results["auth"] == "UNKNOWN" and results["acl|whoami"] == "UNKNOWN", mine
    recs = auditor.records()
    users = {r["command"]: r["username"] for r in recs if r["client_port"] == port}
    assert users["acl|whoami"] != "admin" and users["disconnection"] != "admin", users


def test_a_connection_inside_multi_at_attach_gets_no_guessed_result(valkey, start_auditor):
    """Open before attach and inside MULTI already: +QUEUED is no result, and the INCR that fails
    at EXEC must not be written as a SUCCESS that modified a key."""
    valkey.client().set("s", "not-a-number")
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(resp("MULTI"))
    read_until(s, lambda b: b == b"+OK\r\n")
    auditor = start_auditor(valkey.pid)
    s.sendall(resp("INCR", "s"))
    read_until(s, lambda b: b == b"+QUEUED\r\n")
    s.sendall(resp("EXEC"))
    read_until(s, lambda b: b.startswith(b"*1\r\n-ERR") and b.endswith(b"\r\n"))
    s.close()
    mine = commands_of_closed_connection(auditor, port)
    assert [(c, r) for c, _, r in mine] == [("incr", "UNKNOWN"), ("exec", "SUCCESS")], mine


def test_acl_denials_name_their_reason_and_object(audited):
    """The module's `acl_deny_reason=<r> acl_object=<o>`: Valkey 9.1.2's texts name neither key
    nor channel, so a command of one key or channel names it; a queued command whose right went
    before EXEC is a command denial."""
    valkey, auditor = audited
    admin = valkey.client()
    admin.execute_command("ACL", "SETUSER", "lim", "on", ">pw", "~allowed*", "&okch", "+@all")
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(resp("AUTH", "lim", "pw") + resp("GET", "forb") + resp("PUBLISH", "forbch", "m")
              + resp("MULTI") + resp("GET", "allowed1"))
    read_until(s, lambda b: b.endswith(b"+OK\r\n+QUEUED\r\n"))
    admin.execute_command("ACL", "SETUSER", "lim", "-get")
    s.sendall(resp("EXEC"))
    read_until(s, lambda b: b.startswith(b"*1\r\n-NOPERM") and b.endswith(b"\r\n"))
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port
                                               for r in rs))
    denied = [(r["command"], r["category"], r["error"]) for r in commands_of(recs, port)
              if r["result"] == "FAILURE"]
    assert denied == [("get", "AUTH", "acl_deny_reason=key acl_object=forb"),
                      ("publish", "AUTH", "acl_deny_reason=channel acl_object=forbch"),
                      ("get", "AUTH", "acl_deny_reason=command")], denied


def test_an_inline_line_past_64k_ended_in_the_same_read_is_run_and_recorded(audited):
    """Valkey refuses an inline line only when more than 64 KiB of it are pending without its end
    after a read: a 65,540-byte SET sent in one write is run, and so is the FLUSHALL behind it."""
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(b"SET padding " + b"a" * 65528 + b"\r\nFLUSHALL\r\n" + resp("SET", "after", "1"))
    replies = read_until(s, lambda b: b.count(b"\r\n") >= 3)
    s.close()
    if replies != b"+OK\r\n+OK\r\n+OK\r\n":
        pytest.skip(f"the server split the line over reads differently: {replies[:80]!r}")
    assert [c for c, _, _ in commands_of_closed_connection(auditor, port)] == ["set", "flushall", "set"]


def test_requests_refused_by_the_unauthenticated_limits_are_protocol_errors(audited):
    """With requirepass, Valkey takes at most 10 arguments and 16 KiB bulks before AUTH: it
    refuses more and closes, having run nothing. The log says so and invents no command."""
    valkey, auditor = audited
    valkey.client().config_set("requirepass", "pw")
    ports = []
    for sent, reason in ((resp("DEL", *["k"] * 11) + resp("PING"), "unauthenticated multibulk length"),
                         (b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$20000\r\n" + b"x" * 100,
                          "unauthenticated bulk length")):
        s = socket.create_connection(("127.0.0.1", valkey.port))
        ports.append(port := s.getsockname()[1])
        s.sendall(sent)
        read_until(s, lambda b: b == f"-ERR Protocol error: {reason}\r\n".encode())
        s.close()
        assert commands_of_closed_connection(auditor, port) == [
            ("protocol_error", f"reason={reason}", "FAILURE")]


def test_a_transaction_left_before_exec_is_discarded(audited):
    """The client leaves inside MULTI: the server never runs the queued commands."""
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(resp("MULTI") + resp("SET", "never", "1"))
    read_until(s, lambda b: b == b"+OK\r\n+QUEUED\r\n")
    s.close()
    assert commands_of_closed_connection(auditor, port) == [
        ("multi", "", "SUCCESS"), ("set", "key=never payload=1", "FAILURE")]
    assert valkey.client().exists("never") == 0


def test_subscribe_then_publish(audited):
    valkey, auditor = audited
    sub = socket.create_connection(("127.0.0.1", valkey.port))
    sub_port = sub.getsockname()[1]
    sub.sendall(b"*3\r\n$9\r\nSUBSCRIBE\r\n$3\r\nch1\r\n$3\r\nch2\r\n")
    read_until(sub, lambda b: b.count(b"subscribe") >= 2 and b.endswith(b":2\r\n"))
    pub = valkey.client()
    assert pub.publish("ch1", "hello") == 1
    read_until(sub, lambda b: b.endswith(b"hello\r\n"))
    sub.sendall(b"*1\r\n$4\r\nPING\r\n")
    read_until(sub, lambda b: b.endswith(b"$0\r\n\r\n"))
    sub.sendall(b"*1\r\n$11\r\nUNSUBSCRIBE\r\n")
    read_until(sub, lambda b: b.endswith(b":0\r\n"))
    sub.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nz\r\n")
    read_until(sub, lambda b: b.endswith(b"$-1\r\n"))
    sub.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == sub_port for r in rs))
    mine = commands_of(recs, sub_port)
    assert [r["command"] for r in mine] == ["subscribe", "ping", "unsubscribe", "get"]
    assert all(r["result"] == "SUCCESS" for r in mine)
    pubrec = [r for r in recs if r["command"] == "publish"][0]
    assert pubrec["result"] == "SUCCESS"


def test_resp3_push_subscribe(audited):
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n")
    read_until(s, lambda b: b"modules" in b)
    s.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$1\r\nc\r\n*2\r\n$3\r\nGET\r\n$1\r\nq\r\n")
    read_until(s, lambda b: b.endswith(b"_\r\n"))
    valkey.client().publish("c", "m")
    read_until(s, lambda b: b.endswith(b"m\r\n"))
    s.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nr\r\n")
    read_until(s, lambda b: b.endswith(b"_\r\n"))
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port for r in rs))
    assert [r["command"] for r in commands_of(recs, port)] == ["hello", "subscribe", "get", "get"]


def test_client_reply_off_skip(audited):
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(b"CLIENT REPLY OFF\r\nSET a 1\r\nCLIENT REPLY ON\r\nCLIENT REPLY SKIP\r\nSET b 2\r\nGET a\r\n")
    read_until(s, lambda b: b == b"+OK\r\n$1\r\n1\r\n")
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port for r in rs))
    mine = commands_of(recs, port)
    assert [r["command"] for r in mine] == ["client|reply", "set", "client|reply", "client|reply", "set", "get"]
    assert [r["result"] for r in mine] == ["UNKNOWN", "UNKNOWN", "SUCCESS", "UNKNOWN", "UNKNOWN", "SUCCESS"]


def test_refused_client_reply_hides_nothing(audited):
    """A user denied CLIENT REPLY: the refusal is its reply; later results and the user stay right."""
    valkey, auditor = audited
    admin = valkey.client()
    admin.execute_command("ACL", "SETUSER", "nocl", "on", ">pw", "~*", "+@all", "-client")
    admin.execute_command("ACL", "SETUSER", "bob", "on", ">pw", "~*", "+@all")
    admin.set("str", "abc")
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(b"AUTH nocl pw\r\n")
    read_until(s, lambda b: b == b"+OK\r\n")
    s.sendall(b"CLIENT REPLY OFF\r\n")
    read_until(s, lambda b: b.startswith(b"-NOPERM") and b.endswith(b"\r\n"))
    # A refused SKIP in a pipeline: every reply still belongs to its own command.
    s.sendall(b"CLIENT REPLY SKIP\r\nINCR str\r\nGET str\r\nAUTH bob pw\r\nSET evil 1\r\n")
    read_until(s, lambda b: b.endswith(b"$3\r\nabc\r\n+OK\r\n+OK\r\n"))
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port for r in rs))
    mine = [(r["command"], r["result"], r["username"]) for r in commands_of(recs, port)]
    assert mine == [
        ("auth", "SUCCESS", "default"),
        ("client|reply", "FAILURE", "nocl"),
        ("client|reply", "FAILURE", "nocl"),
        ("incr", "FAILURE", "nocl"),
        ("get", "SUCCESS", "nocl"),
        ("auth", "SUCCESS", "nocl"),
        ("set", "SUCCESS", "bob"),
    ]
    denied = [r for r in commands_of(recs, port) if r["command"] == "client|reply"]
    assert all(r["category"] == "AUTH" and r["error"] == "acl_deny_reason=command" for r in denied)



def test_a_skip_after_a_refused_off_in_one_write_leaves_later_results_right(audited):
    """CLIENT REPLY OFF refused inside MULTI, then DISCARD and CLIENT REPLY SKIP, all in one write:
    the SKIP silences only the SET after it; GET and every later command keep their results."""
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(resp("MULTI") + resp("CLIENT", "REPLY", "OFF") + resp("DISCARD")
              + resp("CLIENT", "REPLY", "SKIP") + resp("SET", "skx", "1") + resp("GET", "skx"))
    read_until(s, lambda b: b.endswith(b"+OK\r\n$1\r\n1\r\n"))
    s.sendall(resp("ECHO", "later"))
    read_until(s, lambda b: b.endswith(b"$5\r\nlater\r\n"))
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port for r in rs))
    assert [(r["command"], r["result"]) for r in commands_of(recs, port)] == [
        ("multi", "SUCCESS"), ("client|reply", "FAILURE"), ("discard", "SUCCESS"),
        ("client|reply", "UNKNOWN"), ("set", "UNKNOWN"), ("get", "SUCCESS"), ("echo", "SUCCESS")]

def test_a_script_cannot_pass_its_errors_off_as_rejections_or_acl_denials(audited):
    """What a script returns is its own failure; the server refusing EVAL itself is still a denial."""
    valkey, auditor = audited
    valkey.client().execute_command("ACL", "SETUSER", "noeval", "on", ">pw", "~*", "+@all", "-eval")
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(
        resp("EVAL", "return redis.error_reply('NOPERM fake')", "0")
        + resp("EVAL", "return redis.error_reply('ERR unknown command hi')", "0")
        + resp("AUTH", "noeval", "pw")
        + resp("EVAL", "return 1", "0")
    )
    read_until(s, lambda b: b.endswith(b"'eval' command\r\n"))
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port for r in rs))
    evals = [(r["category"], r["result"], r["error"]) for r in commands_of(recs, port) if r["command"] == "eval"]
    assert evals[:2] == [
        ("KEY_OP", "FAILURE", "NOPERM fake"),
        ("KEY_OP", "FAILURE", "ERR unknown command hi"),
    ]
    assert evals[2] == ("AUTH", "FAILURE", "acl_deny_reason=command")


def test_keys_modified_counts_what_the_reply_says_changed(audited):
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(
        resp("SET", "km:a", "1")  # 1
        + resp("SET", "km:a", "2", "NX")  # refused: 0
        + resp("DEL", "km:a", "km:missing")  # one deleted: 1
        + resp("BLPOP", "km:list", "0.01")  # timed out: 0
        + resp("SET", "km:b", "1")
        + resp("SET", "km:c", "1")
        + resp("COPY", "km:b", "km:c")  # destination exists: 0
        + resp("DEL", "km:b", "km:c")  # 2
        + resp("MIGRATE", "127.0.0.1", "1", "km:none", "0", "1000")  # +NOKEY: 0
        + resp("MIGRATE", "127.0.0.1", "1", "", "0", "1000", "KEYS", "km:x", "km:y")  # +NOKEY: 0
        + resp("PING")
    )
    read_until(s, lambda b: b.endswith(b"+PONG\r\n"))
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port for r in rs))
    got = [(r["command"], r["keys_modified"]) for r in commands_of(recs, port)]
    assert got == [("set", 1), ("set", 0), ("del", 1), ("blpop", 0), ("set", 1), ("set", 1),
                   ("copy", 0), ("del", 2), ("migrate", 0), ("migrate", 0), ("ping", 0)], got


def test_a_deep_script_reply_keeps_the_pipeline_results(audited):
    """A script may return a table nested thousands deep (up to Lua's stack limit): a valid reply,
    so no loss, and the results of the commands behind it stay known."""
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    script = "local t={} local c=t for i=1,5000 do local n={} c[1]=n c=n end c[1]=1 return t"
    s.sendall(resp("EVAL", script, "0") + resp("SET", "deep:s", "1") + resp("INCR", "deep:n")
              + resp("HSET", "deep:s", "f", "v"))
    read_until(s, lambda b: b.endswith(b"\r\n") and b"WRONGTYPE" in b)
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port
                                               for r in rs))
    got = [(r["command"], r["result"]) for r in commands_of(recs, port)]
    assert got == [("eval", "SUCCESS"), ("set", "SUCCESS"), ("incr", "SUCCESS"), ("hset", "FAILURE")], got
    assert not [r for r in recs if r["category"] == "AUDIT_LOSS"]


def test_resp3_array_reply_of_a_subscribed_client_is_not_a_message(audited):
    valkey, auditor = audited
    admin = valkey.client()
    admin.rpush("ml", "message", "ch", "hello")
    admin.set("sl", "notint")
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(b"HELLO 3\r\n")
    read_until(s, lambda b: b"modules" in b and b.endswith(b"*0\r\n"))
    s.sendall(b"SUBSCRIBE zz\r\nLRANGE ml 0 -1\r\nINCR sl\r\nECHO e1\r\n")
    read_until(s, lambda b: b.endswith(b"$2\r\ne1\r\n"))
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port for r in rs))
    mine = [(r["command"], r["result"]) for r in commands_of(recs, port)]
    assert mine == [
        ("hello", "SUCCESS"),
        ("subscribe", "SUCCESS"),
        ("lrange", "SUCCESS"),
        ("incr", "FAILURE"),
        ("echo", "SUCCESS"),
    ]


def test_blocking_command_reply_later(audited):
    valkey, auditor = audited
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(b"*3\r\n$5\r\nBLPOP\r\n$5\r\nqueue\r\n$1\r\n0\r\n*2\r\n$3\r\nGET\r\n$2\r\nzz\r\n")
    time.sleep(0.2)  # let BLPOP block (it has no reply to wait on yet)
    valkey.client().rpush("queue", "job")
    read_until(s, lambda b: b.endswith(b"$-1\r\n"))
    s.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port for r in rs))
    mine = commands_of(recs, port)
    assert [r["command"] for r in mine] == ["blpop", "get"]
    assert mine[0]["duration_us"] >= 100_000


def test_monitor(audited):
    valkey, auditor = audited
    m = socket.create_connection(("127.0.0.1", valkey.port))
    mport = m.getsockname()[1]
    m.sendall(b"MONITOR\r\n")
    read_until(m, lambda b: b == b"+OK\r\n")
    valkey.client().set("seen-by-monitor", "1")
    read_until(m, lambda b: b"seen-by-monitor" in b)
    m.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == mport for r in rs))
    assert [r["command"] for r in commands_of(recs, mport)] == ["monitor"]


def _pipeline_payload(n, tag):
    parts = []
    expect = []
    for i in range(n):
        k = f"{tag}:{i}".encode()
        if i % 3 == 0:
            parts.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(str(i)), str(i).encode()))
            expect.append(("set", k.decode(), "SUCCESS"))
        elif i % 3 == 1:
            parts.append(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k))
            expect.append(("get", k.decode(), "SUCCESS"))
        else:
            parts.append(b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(k), k))
            expect.append(("incr", k.decode(), "SUCCESS"))
    return b"".join(parts), expect


@pytest.mark.parametrize("mode", ["one_write", "byte_per_write"])
def test_10000_pipelined(audited, mode):
    valkey, auditor = audited
    n = 10000
    payload, expect = _pipeline_payload(n, mode)
    s = socket.create_connection(("127.0.0.1", valkey.port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    port = s.getsockname()[1]
    got = bytearray()
    done = threading.Event()

    def reader():
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            got.extend(chunk)
            if done.is_set():
                break
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    if mode == "one_write":
        s.sendall(payload)
    else:
        for i in range(len(payload)):
            s.send(payload[i:i + 1])
    recs = auditor.wait_records(lambda rs: len(commands_of(rs, port)) >= n, timeout=120, what=f"{n} records")
    done.set()
    s.close()
    mine = commands_of(recs, port)
    assert len(mine) == n
    assert [(r["command"], r["keys"][0], r["result"]) for r in mine] == expect


def test_big_values_bounded_memory(audited):
    valkey, auditor = audited
    c = valkey.client()
    c.set("big5", b"x" * (5 * 1024 * 1024))
    c.set("big100", b"y" * (100 * 1024 * 1024))
    assert c.strlen("big100") == 100 * 1024 * 1024
    recs = auditor.wait_records(lambda rs: sum(r["command"] == "set" for r in rs) >= 2)
    sets = {r["keys"][0]: r for r in recs if r["command"] == "set"}
    for k, ch in (("big5", "x"), ("big100", "y")):
        r = sets[k]
        assert r["result"] == "SUCCESS"
        assert f"payload={ch * 1024}...(truncated)" in r["command_args"]
    rss_kb = int([l for l in open(f"/proc/{auditor.proc.pid}/status") if l.startswith("VmHWM")][0].split()[1])
    assert rss_kb < 64 * 1024, f"auditor peak RSS {rss_kb} kB"


def test_io_threads_50_clients(start_valkey, start_auditor):
    valkey = start_valkey("--io-threads", "4")
    auditor = start_auditor(valkey.pid)
    per_client = 200
    errors = []

    def worker(n):
        try:
            c = redis.Redis(port=valkey.port, single_connection_client=True)
            for i in range(per_client):
                c.set(f"io:{n}:{i}", i)
            c.close()
        except Exception as e:  # pragma: no cover - surfaced below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    recs = auditor.wait_records(lambda rs: sum(r["command"] == "set" for r in rs) >= 50 * per_client
                                and sum(r["command"] == "disconnection" for r in rs) >= 50, timeout=60)
    keys = sorted(r["keys"][0] for r in recs if r["command"] == "set")
    assert keys == sorted(f"io:{n}:{i}" for n in range(50) for i in range(per_client))
    assert not any(r["category"] == "AUDIT_LOSS" for r in recs)


def test_sigterm_flushes_and_exits_zero(valkey, start_auditor):
    auditor = start_auditor(valkey.pid)
    c = valkey.client()
    for i in range(100):
        c.set(f"t{i}", i)
    assert auditor.stop() == 0
    recs = auditor.records()
    assert sum(r["command"] == "set" for r in recs) == 100


def test_bad_pid_and_not_valkey(tmp_path):
    from conftest import AUDITOR
    out = subprocess.run([str(AUDITOR), "--pid", "999999999"], capture_output=True, timeout=10)
    assert out.returncode != 0 and b"no process with pid" in out.stderr and b"panick" not in out.stderr
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        out = subprocess.run([str(AUDITOR), "--pid", str(sleeper.pid)], capture_output=True, timeout=10)
        assert out.returncode != 0 and b"not a valkey-server" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    finally:
        sleeper.kill()


def test_text_and_csv_formats_one_line(valkey, start_auditor):
    for fmt in ("text", "csv"):
        auditor = start_auditor(valkey.pid, fmt=fmt)
        c = valkey.client()
        c.set(f"nl\nkey,{fmt}", 'va"l,ue\\x\nline2')
        c.close()
        wait_until(lambda: any(b"disconnection" in l for l in auditor.lines()), what=f"{fmt} disconnection")
        lines = auditor.lines()
        sets = [l for l in lines if (b"[KEY_OP] set" in l if fmt == "text" else b",KEY_OP,set," in l)]
        assert len(sets) == 1, lines
        auditor.stop()


def test_ground_truth_20_connections(audited):
    """Each client records what it sent and what it got; the log must match exactly."""
    valkey, auditor = audited
    admin = Raw(valkey.port)
    assert admin.call("ACL", "SETUSER", "gt", "on", ">gtpass", "~*", "+@all") == b"+OK\r\n"
    admin.close()
    truth = {}
    errors = []

    def client(n):
        try:
            rnd = random.Random(n)
            c = Raw(valkey.port)
            user = "default"
            sent = []
            for i in range(1000):
                k = f"gt:{n}:{rnd.randrange(20)}"
                choice = rnd.randrange(10)
                if choice == 0:
                    args, cmd, keys = ("SET", k, f"v{i}"), "set", [k]
                elif choice == 1:
                    args, cmd, keys = ("GET", k), "get", [k]
                elif choice == 2:
                    args, cmd, keys = ("INCR", k), "incr", [k]
                elif choice == 3:
                    k2 = f"gt:{n}:h"
                    args, cmd, keys = ("HSET", k2, "f", i), "hset", [k2]
                elif choice == 4:
                    k2 = f"gt:{n}:{rnd.randrange(20)}"
                    args, cmd, keys = ("MSET", k, "1", k2, "2"), "mset", [k, k2]
                elif choice == 5:
                    args, cmd, keys = ("DEL", k), "del", [k]
                elif choice == 6:
                    args, cmd, keys = ("LPUSH", f"gt:{n}:h", "x"), "lpush", [f"gt:{n}:h"]
                elif choice == 7:
                    args, cmd, keys = ("BOGUSCMD", k), "BOGUSCMD", []
                elif choice == 8:
                    pw = "gtpass" if rnd.random() < 0.5 else "nope"
                    args, cmd, keys = ("AUTH", "gt", pw), "auth", []
                else:
                    args, cmd, keys = ("EXPIRE", k, 100), "expire", [k]
                reply = c.call(*args)
                ok = not reply.startswith(b"-")
                sent.append((cmd, keys, "SUCCESS" if ok else "FAILURE", user))
                if cmd == "auth" and ok:
                    user = "gt"
            truth[c.port] = sent
            c.close()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    recs = auditor.wait_records(
        lambda rs: all(any(r["command"] == "disconnection" and r["client_port"] == p for r in rs) for p in truth),
        timeout=60, what="all disconnections")
    for port, sent in truth.items():
        got = [(r["command"], r["keys"], r["result"], r["username"]) for r in commands_of(recs, port)]
        assert got == sent, port
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert not any(r["category"] == "AUDIT_LOSS" for r in recs)


def test_syscalls_over_64k_with_several_commands_or_arguments_lose_nothing(audited):
    """Valkey moves more than 64 KiB per syscall for commands with several big arguments and for
    pipelined replies: with the default capture cap every record is still exact and nothing is
    reported lost."""
    valkey, auditor = audited
    c = valkey.client(single_connection_client=True)
    assert c.execute_command("LPUSH", "big-list", *[b"q" * 70000] * 10) == 10
    p = c.pipeline(transaction=False)
    p.set("big-val", b"y" * 200000)
    p.get("big-val")
    p.strlen("big-val")
    assert p.execute()[2] == 200000
    c.set("not-int", "val")
    p = c.pipeline(transaction=False)
    for _ in range(20000):
        p.incr("not-int")
    assert len(p.execute(raise_on_error=False)) == 20000
    c.close()
    c.connection_pool.disconnect()  # the pipelines' connection
    recs = auditor.wait_records(lambda rs: sum(r["command"] == "disconnection" for r in rs) >= 2)
    mine = [r for r in recs if r["category"] != "CONNECTION"]
    head = [(r["command"], r["keys"], r["result"]) for r in mine if r["command"] != "incrby"]
    assert ("lpush", ["big-list"], "SUCCESS") in head
    assert [h for h in head if h[1] == ["big-val"]] == [
        ("set", ["big-val"], "SUCCESS"), ("get", ["big-val"], "SUCCESS"), ("strlen", ["big-val"], "SUCCESS")]
    incrs = [r for r in mine if r["command"] == "incrby"]
    assert len(incrs) == 20000
    assert all(r["result"] == "FAILURE" and r["error"].startswith("ERR value is not an integer")
               for r in incrs)
    assert not any(r["category"] == "AUDIT_LOSS" for r in recs)


def test_reply_scan_keeps_results_of_pipelined_replies_far_over_the_capture_cap(valkey, start_auditor):
    """With --reply-scan the kernel walks the replies and leaves out bulk payloads past their first
    bytes, so a write of many large replies (20 x 200 KB = 4 MB, four times the capture cap) still
    gives every command its own result, and the replies after it line up."""
    auditor = start_auditor(valkey.pid, extra=("--reply-scan",))
    c = valkey.client(single_connection_client=True)
    c.set("huge", b"h" * 200_000)
    c.rpush("biglist", *[b"e" * 3000] * 400)
    p = c.pipeline(transaction=False)
    for _ in range(20):
        p.get("huge")
    p.lrange("biglist", 0, -1)
    p.incr("huge")
    p.strlen("huge")
    p.get("missing")
    res = p.execute(raise_on_error=False)
    assert len(res[0]) == 200_000 and len(res[20]) == 400 and res[23] is None
    c.close()
    c.connection_pool.disconnect()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" for r in rs))
    mine = [(r["command"], r["result"]) for r in recs if r["category"] != "CONNECTION"]
    assert mine[-24:] == [("get", "SUCCESS")] * 20 + [
        ("lrange", "SUCCESS"), ("incrby", "FAILURE"), ("strlen", "SUCCESS"), ("get", "SUCCESS")]
    incr = [r for r in recs if r["command"] == "incrby"][0]
    assert incr["error"].startswith("ERR value is not an integer")
    assert not any(r["category"] == "AUDIT_LOSS" for r in recs)

    # What the kernel left out is counted apart from bytes not captured (counters every 100 ms):
    # at least the 20 x 200 KB payloads and the list's 400 x 3000 bytes past their prefixes.
    least = 20 * (200_000 - 64) + 400 * (3000 - 64)
    wait_until(lambda: int(info_audit(auditor).get("audit_reply_bytes_elided", 0)) >= least,
               timeout=10, what="audit_reply_bytes_elided")
    assert info_audit(auditor)["audit_bytes_not_captured"] == "0"



def test_commands_lost_in_a_capture_gap_are_counted_by_their_replies(valkey, start_auditor):
    """A read past the capture cap whose uncaptured part holds whole commands: they ran, unseen.
    Their replies answer no request the auditor knows, and say how many there were."""
    auditor = start_auditor(valkey.pid, extra=("--capture-cap", "4096"))
    c = Raw(valkey.port)
    assert c.call("PING") == b"+PONG\r\n"
    # One write, one read: the SET's value runs past the cap, PING and ECHO lie wholly beyond it.
    c.sock.sendall(resp("SET", "capk", b"z" * 8000) + resp("PING") + resp("ECHO", "tail"))
    assert [c.read_reply() for _ in range(3)] == [b"+OK\r\n", b"+PONG\r\n", b"$4\r\ntail\r\n"]
    assert c.call("ECHO", "after") == b"$5\r\nafter\r\n"
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" for r in rs))
    mine = [(r["command"], r["command_args"]) for r in recs if r["client_port"] == c.port
            and r["category"] != "CONNECTION"]
    assert mine[0] == ("ping", "") and mine[-1] == ("echo", "arg1=after"), mine
    loss = [args for cmd, args in mine if cmd == "loss"]
    assert loss[0].startswith("cause=parser_resync_request count=1 "), loss
    assert loss[1] == ("cause=commands_not_captured count=3 bytes=0 "
                       "reason=replies to commands in a capture gap"), loss
    wait_until(lambda: info_audit(auditor)["audit_lost_commands_not_captured"] == "3",
               what="INFO audit to count the three commands")

def test_loss_counters_in_info_add_up_the_counts_of_the_loss_records(valkey, start_auditor):
    auditor = start_auditor(valkey.pid, extra=("--capture-cap", "4096"))
    c = Raw(valkey.port)
    for i in range(20):
        c.call("SET", f"big:{i}", "v" * 10_000)
    s = socket.create_connection(("127.0.0.1", valkey.port))
    port = s.getsockname()[1]
    s.sendall(b"".join(resp("GET", f"big:{i}") for i in range(20)))
    read_until(s, lambda b: b.count(b"v" * 10_000) == 20)
    s.close()
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == port
                                               for r in rs))
    counts = {}
    for r in recs:
        if r["category"] == "AUDIT_LOSS":
            args = dict(kv.split("=", 1) for kv in r["command_args"].split(" ")[:3])
            counts[args["cause"]] = counts.get(args["cause"], 0) + int(args["count"])
    assert counts.get("parser_resync_reply", 0) >= 1, counts
    causes = ("parser_resync_reply", "parser_resync_request", "commands_not_captured")
    # The counters are published about every 100 ms.
    wait_until(lambda: all(int(info_audit(auditor)[f"audit_lost_{c}"]) == counts.get(c, 0) for c in causes),
               what=f"INFO counters equal to the records' counts {counts}")


def test_gap_inside_value_is_skipped_and_framing_loss_is_recorded(valkey, start_auditor):
    auditor = start_auditor(valkey.pid, extra=("--capture-cap", "200"))
    c = Raw(valkey.port)
    # A value far past the capture cap: the bytes past the cap are inside its bulk payload and are
    # skipped using the RESP length; the record is complete and nothing is lost.
    assert c.call("SET", "bigcap", b"z" * 300_000) == b"+OK\r\n"
    assert c.call("GET", "small") == b"$-1\r\n"
    # Many pipelined commands in one write: the server reads them in 16 KiB pieces of which only the
    # first 200 bytes are captured, so framing breaks: the auditor resyncs and writes loss records.
    payload = b"".join(resp("SET", f"p{i}", "v") for i in range(3000))
    c.sock.sendall(payload)
    for _ in range(3000):
        c.read_reply()
    assert c.call("GET", "after") == b"$-1\r\n"
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" for r in rs))
    mine = commands_of(recs, c.port)
    assert mine[0]["command"] == "set" and mine[0]["keys"] == ["bigcap"] and mine[0]["result"] == "SUCCESS"
    assert "payload=" in mine[0]["command_args"]
    assert mine[1]["command"] == "get" and mine[1]["keys"] == ["small"]
    loss = [r for r in recs if r["category"] == "AUDIT_LOSS"]
    # Replies to the batch are one large write as well, so the reply stream resyncs too.
    assert any("cause=parser_resync_request" in r["command_args"] for r in loss)
    assert all(r["command_args"].startswith(("cause=parser_resync_request", "cause=parser_resync_reply",
                                             "cause=commands_not_captured")) for r in loss)
    # Each resync says how many bytes it never saw (the part of a 16 KiB read past the 200-byte cap).
    assert all(int(r["command_args"].split(" bytes=")[1].split()[0]) > 0 for r in loss
               if not r["command_args"].startswith("cause=commands_not_captured"))
    assert mine[-1]["command"] == "get" and mine[-1]["keys"] == ["after"] and mine[-1]["result"] == "SUCCESS"
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))


def test_existing_connection_user_from_client_list(valkey, start_auditor):
    admin = Raw(valkey.port)
    assert admin.call("ACL", "SETUSER", "alice", "on", ">alicepw", "~*", "+@all") == b"+OK\r\n"
    assert admin.call("ACL", "SETUSER", "auditor", "on", ">auditorpw", "+client|list") == b"+OK\r\n"
    early = Raw(valkey.port)
    assert early.call("AUTH", "alice", "alicepw") == b"+OK\r\n"
    auditor = start_auditor(valkey.pid, extra=("--server-user", "auditor"),
                            env={"AUDITOR_SERVER_PASSWORD": "auditorpw"})
    early.call("GET", "k-early")
    admin.call("GET", "k-admin")
    early.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == early.port
                                               for r in rs))
    assert [r["username"] for r in recs if r["keys"] == ["k-early"]] == ["alice"]
    assert [r["username"] for r in recs if r["keys"] == ["k-admin"]] == ["default"]
    assert not any(r["command"] in ("client|list", "auth") for r in recs)
    assert b"auditorpw" not in auditor.log.read_bytes()


def test_target_exit_stops_auditor_cleanly(valkey, start_auditor):
    auditor = start_auditor(valkey.pid)
    c = Raw(valkey.port)
    c.call("SET", "last", "1")
    valkey.proc.kill()
    valkey.proc.wait()
    assert auditor.proc.wait(20) == 0
    recs = auditor.records()
    assert [r["keys"] for r in recs if r["command"] == "set"] == [["last"]]
    assert any(r["command"] == "disconnection" and r["client_port"] == c.port for r in recs)


def test_events_and_payload_settings(valkey, start_auditor):
    auditor = start_auditor(valkey.pid, settings=("audit.events", "keys,auth", "audit.payload_maxsize", "4"))
    c = Raw(valkey.port)
    c.call("SET", "kkkkkkkkkk", "vvvvvvvvvv")
    c.call("SET", "L" * 300, "v")
    c.call("PING")
    c.call("AUTH", "nopass-user", "x")
    c.call("CONFIG", "GET", "maxmemory")
    c.close()
    c2 = Raw(valkey.port)
    c2.call("GET", "sentinel-key")
    # Records of one connection are written in order, and c's were complete before c2 started.
    recs = auditor.wait_records(lambda rs: any(r["keys"] == ["sentinel-key"] for r in rs))
    cats = {r["category"] for r in recs if r["category"] != "AUDIT"}
    assert cats == {"KEY_OP", "AUTH"}, cats
    s, long_key = [r for r in recs if r["command"] == "set"]
    # payload_maxsize cuts values; keys (which the module never cuts) only past 255 bytes.
    assert s["command_args"] == "key=kkkkkkkkkk payload=vvvv...(truncated)"
    assert s["keys"] == ["kkkkkkkkkk"]
    assert long_key["command_args"] == "key=" + "L" * 255 + "...(truncated) payload=v"
    assert long_key["keys"] == ["L" * 255]
    auditor.stop()
    c2.close()
    a2 = start_auditor(valkey.pid, settings=("audit.payload_disable", "yes"))
    c3 = Raw(valkey.port)
    c3.call("SET", "pk", "secretish-value")
    rs = a2.wait_records(lambda rs: any(r["command"] == "set" for r in rs))
    assert [r["command_args"] for r in rs if r["command"] == "set"] == ["key=pk"]
    c3.close()
    a3 = start_auditor(valkey.pid, settings=("audit.enabled", "no"))
    c4 = Raw(valkey.port)
    c4.call("SET", "off", "1")
    c4.close()
    assert a3.stop() == 0
    assert [r["command"] for r in a3.records()] == ["start", "stop"]


def test_json_escaping_of_hostile_bytes(audited):
    valkey, auditor = audited
    c = Raw(valkey.port)
    key = b'k"\\\n\r\t\x00\xff\xfe\xe2\x80\xa8end'
    c.call("SET", key, b'v"\n\x01')
    c.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "set" for r in rs))
    lines = auditor.lines()
    assert all(l.count(b"\n") == 0 for l in lines)
    s = [r for r in recs if r["command"] == "set"][0]
    assert s["keys"] == ['k"\\\n\r\t\x00\\xff\\xfe\u2028end']


def test_missing_privileges_one_clear_line(valkey, tmp_path):
    from conftest import AUDITOR
    import shutil as sh
    capsh = sh.which("capsh")
    if capsh is None:
        pytest.fail("capsh missing: scripts/setup.sh installs libcap2-bin")
    out = subprocess.run(
        [capsh, "--drop=cap_bpf,cap_perfmon,cap_sys_admin", "--", "-c",
         f"{AUDITOR} --pid {valkey.pid} --control 127.0.0.1:0 audit.protocol 'file {tmp_path}/x.log'"],
        capture_output=True, timeout=30)
    assert out.returncode == 1
    err = out.stderr.decode()
    assert "missing privileges" in err and "panick" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_a_server_that_cannot_be_asked_for_users_does_not_stop_auditing(valkey, start_auditor):
    """--server-user with a wrong password for this server: a warning, then auditing as without
    credentials (connections open before attach show `unknown` until they AUTH)."""
    early = Raw(valkey.port)
    assert early.call("PING") == b"+PONG\r\n"
    auditor = start_auditor(valkey.pid, extra=("--server-user", "nosuchuser"),
                            env={"AUDITOR_SERVER_PASSWORD": "wrong"})
    early.call("GET", "k-early-unknown")
    early.close()
    recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" and r["client_port"] == early.port
                                               for r in rs))
    assert [r["username"] for r in recs if r["keys"] == ["k-early-unknown"]] == ["unknown"]


def test_the_event_dump_is_owner_only(valkey, start_auditor, tmp_path):
    """`--dump-events` holds every byte clients sent, passwords included."""
    dump = tmp_path / "events.dump"
    dump.write_bytes(b"")
    dump.chmod(0o644)
    start_auditor(valkey.pid, extra=("--dump-events", str(dump)))
    assert dump.stat().st_mode & 0o777 == 0o600


TLS_SERVER = r'''
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
def serve(conn):
    try:
        s = ctx.wrap_socket(conn, server_side=True)
        while (data := s.recv(65536)):
            s.sendall(b"+OK\r\n" * max(data.count(b"*"), 1))
    except OSError:
        pass
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


def test_a_tls_connection_is_a_visible_loss_not_garbage(start_auditor, tmp_path):
    """On a TLS port the socket carries ciphertext: the connection is known by the server's
    first bytes (a TLS handshake record), nothing of it is parsed, and an AUDIT_LOSS record says
    its commands are not audited. (This valkey-server has no TLS: a Python TLS server stands in,
    audited with --any-process; the detection reads only the bytes on the socket.)"""
    import ssl
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True,
                   capture_output=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", TLS_SERVER, str(port), str(cert), str(key)],
                              stdout=subprocess.PIPE)
    try:
        assert server.stdout.readline() == b"ready\n"
        auditor = start_auditor(server.pid, extra=("--any-process",))
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
            for _ in range(50):
                s.sendall(resp(b"SET", b"tls-key", b"tls-value"))
                assert s.recv(64) == b"+OK\r\n"
        recs = auditor.wait_records(lambda rs: any(r["command"] == "disconnection" for r in rs),
                                    what="the TLS connection's disconnection")
        mine = [r for r in recs if r["category"] not in ("AUDIT", "CONNECTION") or r["command"] == "disconnection"]
        assert [(r["category"], r["command"]) for r in mine] == [("AUDIT_LOSS", "loss"),
                                                                ("CONNECTION", "disconnection")], mine
        assert mine[0]["command_args"].startswith("cause=tls_connection count=0 "), mine[0]
        assert mine[1]["command_args"] == "type=tls"
        # (INFO's counters are published about every 100 ms.)
        wait_until(lambda: "audit_tls_connections:1\n" in subprocess.run(
            [REDIS_CLI, "-p", str(auditor.control), "INFO", "audit"], capture_output=True, text=True).stdout,
                   what="INFO audit_tls_connections:1")
    finally:
        server.kill()
        server.wait()


def test_a_small_ring_is_woken_in_time_for_steady_traffic(valkey, start_auditor):
    """The kernel wakes the capture thread once per `--wakeup-bytes` entering the ring. It used to
    wake it only when the unread data crossed the threshold, which the records' own headers could
    step over: the thread then slept until its 10 ms poll while a 64 KiB ring overflowed on one
    client's sequential SETs (half of 2000 lost). The rule itself is unit-tested in
    auditor-common (`crosses_wakeup`); here a small ring must carry steady traffic whole. (A
    64 KiB ring holds only ~10 ms of this traffic, and the test failed once in CI in syscalls
    mode, records missing: any longer stall of the capture thread overflows it. 256 KiB holds
    ~40 ms.)"""
    a = start_auditor(valkey.pid, extra=("--ring-bytes", "262144", "--wakeup-bytes", "1024"),
                      settings=("audit.events", "all"))
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", valkey.port))
        for _ in range(500):
            s.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n")
            read_until(s, lambda b: b.endswith(b"+OK\r\n"))
        s.close()
    a.wait_records(lambda rs: sum(r["command"] == "set" for r in rs) >= 2000,
                   what="2000 set records")
    f = info_audit(a)
    assert f["audit_lost_ring_buffer_events"] == "0", f
    assert not [r for r in a.records() if r["category"] == "AUDIT_LOSS"]


@pytest.mark.parametrize("args,text", [
    (("--ring-bytes", "16384"), "at least 32768"),
    (("--ring-bytes", "100000"), "power of two"),
    (("--ring-bytes", "0"), "power of two"),
    (("--ring-bytes", "65536", "--wakeup-bytes", "65536"), "below the ring buffer size"),
])
def test_bad_ring_sizes_are_refused_with_a_clear_error(valkey, args, text):
    from conftest import AUDITOR
    p = subprocess.run([str(AUDITOR), "--pid", str(valkey.pid), *args], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode != 0
    assert text in p.stderr, p.stderr
