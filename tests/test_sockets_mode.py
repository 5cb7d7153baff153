"""`--capture sockets`: capture from the socket tracepoints, with no syscall tracepoint. Accepts come
from uprobes on the server's libc, closes are inferred (end of stream, the server's close() of a TCP
socket, an fd that holds another socket, a once-a-second check of the fd). These tests cover what
that mode has to recover on its own: connections that never send, those closes, the server's own
outgoing links, and connections open before attach. It is the default mode (`auto`) on this kernel, so
the rest of the suite runs in it too; scripts/test.sh runs test_capture.py again with
AUDITOR_CAPTURE=syscalls.
"""
import socket
import threading
import time
import subprocess

from conftest import REDIS_CLI, free_port, wait_until
from test_capture import Raw, info_audit, read_until, resp

SOCKETS = ("--capture", "sockets")


def unix_client(valkey):
    s = socket.socket(socket.AF_UNIX)
    s.connect(valkey.sock)
    return s


def call(s, *args):
    s.sendall(resp(*args))
    return read_until(s, lambda b: b.endswith(b"\r\n"))


def of_client(records, command, **fields):
    return [r for r in records if r["command"] == command
            and all(r[k] == v for k, v in fields.items())]


def test_tcp_and_unix_clients_are_named_by_their_peer(valkey, start_auditor):
    auditor = start_auditor(valkey.pid, extra=SOCKETS)
    tcp = Raw(valkey.port)
    assert tcp.call("SET", "k", "tcp") == b"+OK\r\n"
    u = unix_client(valkey)
    assert call(u, "SET", "k", "unix") == b"+OK\r\n"
    recs = auditor.wait_records(lambda rs: len(of_client(rs, "set")) == 2)
    by_payload = {r["command_args"]: r for r in of_client(recs, "set")}
    t = by_payload["key=k payload=tcp"]
    assert (t["client_ip"], t["client_port"], t["result"]) == ("127.0.0.1", tcp.port, "SUCCESS")
    x = by_payload["key=k payload=unix"]
    assert (x["client_ip"], x["client_port"], x["result"]) == (valkey.sock, 0, "SUCCESS")
    assert len(of_client(recs, "connection", client_port=tcp.port)) == 1
    tcp.close()
    u.close()
    recs = auditor.wait_records(lambda rs: len(of_client(rs, "disconnection")) == 2)
    assert not any(r["category"] == "AUDIT_LOSS" for r in recs)
    assert info_audit(auditor)["audit_capture_mode"] == "sockets"


def test_auto_mode_chooses_the_socket_tracepoints_on_this_kernel(valkey, start_auditor):
    """Linux 6.3+ with BTF, as here: `auto` (the default) captures at the socket tracepoints;
    `--capture syscalls` still chooses the syscall exits."""
    auto = start_auditor(valkey.pid, extra=("--capture", "auto"))
    syscalls = start_auditor(valkey.pid, extra=("--capture", "syscalls"))
    assert info_audit(auto)["audit_capture_mode"] == "sockets"
    assert info_audit(syscalls)["audit_capture_mode"] == "syscalls"
    c = Raw(valkey.port)
    assert c.call("SET", "both", "1") == b"+OK\r\n"
    for a in (auto, syscalls):
        recs = a.wait_records(lambda rs: of_client(rs, "set", client_port=c.port))
        assert of_client(recs, "set", client_port=c.port)[0]["result"] == "SUCCESS"
    c.close()


def test_a_client_that_never_sends_is_recorded_from_its_accept(valkey, start_auditor):
    """The accept uprobe reports the connection while the client is still silent."""
    auditor = start_auditor(valkey.pid, extra=SOCKETS)
    silent = socket.create_connection(("127.0.0.1", valkey.port))
    port = silent.getsockname()[1]
    auditor.wait_records(lambda rs: of_client(rs, "connection", client_port=port),
                         what="the silent client's connection record")
    silent.close()
    recs = auditor.wait_records(lambda rs: of_client(rs, "disconnection", client_port=port))
    seen = [r["command"] for r in recs if r["client_port"] == port]
    assert seen == ["connection", "disconnection"]
    u = unix_client(valkey)
    auditor.wait_records(lambda rs: of_client(rs, "connection", client_ip=valkey.sock),
                         what="the silent unix client's connection record")
    u.close()
    auditor.wait_records(lambda rs: len(of_client(rs, "disconnection", client_ip=valkey.sock)) == 1)


def test_quit_over_unix_then_a_new_client_on_the_same_fd(valkey, start_auditor):
    """The server closes the first socket, and the next client gets its fd (and often its memory):
    the inode number tells them apart, so the second client's commands are not the first one's."""
    subprocess.run([REDIS_CLI, "-p", str(valkey.port), "ACL", "SETUSER", "alice", "on", ">pw",
                    "~*", "+@all"], check=True, capture_output=True)
    auditor = start_auditor(valkey.pid, extra=SOCKETS)
    first = unix_client(valkey)
    assert call(first, "AUTH", "alice", "pw") == b"+OK\r\n"
    assert call(first, "SET", "q1", "v") == b"+OK\r\n"
    assert call(first, "QUIT") == b"+OK\r\n"
    first.close()
    second = unix_client(valkey)
    assert call(second, "SET", "q2", "v") == b"+OK\r\n"
    recs = auditor.wait_records(lambda rs: of_client(rs, "set", command_args="key=q2 payload=v"))
    q1 = of_client(recs, "set", command_args="key=q1 payload=v")[0]
    q2 = of_client(recs, "set", command_args="key=q2 payload=v")[0]
    assert q1["username"] == "alice"
    assert q2["username"] == "default"
    assert q1["client_id"] != q2["client_id"]
    ended = of_client(recs, "disconnection", client_id=q1["client_id"])
    assert ended and ended[0]["seq"] < q2["seq"]
    second.close()


def test_a_unix_client_the_server_kills_is_closed_without_fd_reuse(valkey, start_auditor):
    """No event marks the server's close() of a unix socket: the auditor sees its fd empty."""
    auditor = start_auditor(valkey.pid, extra=SOCKETS)
    victim = unix_client(valkey)
    assert call(victim, "CLIENT", "SETNAME", "victim") == b"+OK\r\n"
    killer = Raw(valkey.port)
    assert killer.call("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal") == b":1\r\n"
    recs = auditor.wait_records(lambda rs: of_client(rs, "client|setname"))
    vid = of_client(recs, "client|setname")[0]["client_id"]
    auditor.wait_records(lambda rs: of_client(rs, "disconnection", client_id=vid), timeout=5,
                         what="the killed unix client's disconnection")
    killer.close()
    victim.close()


def test_unix_clients_killed_before_their_accept_is_handled_are_closed(valkey, start_auditor):
    """Connected, used and killed within a few milliseconds, before the auditor reads their accept:
    their fds are already gone then, and each still gets its disconnection record."""
    auditor = start_auditor(valkey.pid, extra=SOCKETS)
    killer = Raw(valkey.port)
    killer.call("ACL", "SETUSER", "bob", "on", ">pw", "~*", "+@all")
    for _ in range(3):
        victims = [unix_client(valkey) for _ in range(2)]
        for v in victims:
            assert call(v, "AUTH", "bob", "pw") == b"+OK\r\n"
        assert killer.call("CLIENT", "KILL", "USER", "bob") == b":2\r\n"
        for v in victims:
            v.close()
    auth = lambda rs: [r["client_id"] for r in of_client(rs, "auth", client_ip=valkey.sock)]  # noqa: E731
    recs = auditor.wait_records(lambda rs: len(auth(rs)) == 6, what="six AUTH records")
    auditor.wait_records(
        lambda rs: all(of_client(rs, "disconnection", client_id=c) for c in auth(recs)), timeout=5,
        what="a disconnection record for each killed unix client")
    killer.close()


def test_a_replicas_link_to_its_primary_is_not_a_client(start_valkey, start_auditor):
    primary = start_valkey()
    replica = start_valkey()
    auditor = start_auditor(replica.pid, extra=SOCKETS)
    subprocess.run([REDIS_CLI, "-p", str(replica.port), "REPLICAOF", "127.0.0.1", str(primary.port)],
                   check=True, capture_output=True)
    wait_until(lambda: b"master_link_status:up" in subprocess.run(
        [REDIS_CLI, "-p", str(replica.port), "INFO", "replication"], capture_output=True).stdout,
        timeout=30, what="replication link up")
    p = Raw(primary.port)
    assert p.call("SET", "replicated", "1") == b"+OK\r\n"
    wait_until(lambda: subprocess.run([REDIS_CLI, "-p", str(replica.port), "GET", "replicated"],
                                      capture_output=True).stdout.strip() == b"1", what="replica has the key")
    # The replica's own client, after the replicated write: every record before its ECHO is in.
    r = Raw(replica.port)
    assert r.call("ECHO", "after") == b"$5\r\nafter\r\n"
    recs = auditor.wait_records(lambda rs: of_client(rs, "echo"))
    assert not of_client(recs, "set"), "the replication stream was audited as a client's"
    assert not any(r["client_port"] == primary.port for r in recs)
    p.close()
    r.close()


def test_a_migrate_whose_connect_is_refused_is_no_client(valkey, start_auditor):
    """The server's own socket for MIGRATE, reset by a port nothing listens on, has lost its local
    port when first seen: it must not be taken for a client connecting in."""
    auditor = start_auditor(valkey.pid, extra=SOCKETS)
    dead = free_port()
    c = Raw(valkey.port)
    assert c.call("SET", "k", "v") == b"+OK\r\n"
    assert c.call("MIGRATE", "127.0.0.1", str(dead), "k", "0", "1000").startswith(b"-IOERR")
    assert c.call("ECHO", "after") == b"$5\r\nafter\r\n"
    recs = auditor.wait_records(lambda rs: of_client(rs, "echo"))
    assert of_client(recs, "migrate")[0]["result"] == "FAILURE"
    assert not any(r["client_port"] == dead for r in recs), [r for r in recs if r["client_port"] == dead]
    c.close()


def test_a_client_open_before_attach_keeps_its_unknown_user(valkey, start_auditor):
    early = socket.create_connection(("127.0.0.1", valkey.port))
    early_port = early.getsockname()[1]
    assert call(early, "SET", "before", "1") == b"+OK\r\n"
    auditor = start_auditor(valkey.pid, extra=SOCKETS)
    assert call(early, "GET", "before") == b"$1\r\n1\r\n"
    recs = auditor.wait_records(lambda rs: of_client(rs, "get", client_port=early_port))
    conn = of_client(recs, "connection", client_port=early_port)
    assert len(conn) == 1 and "attached=existing" in conn[0]["command_args"]
    assert of_client(recs, "get", client_port=early_port)[0]["username"] == "unknown"
    early.close()
    auditor.wait_records(lambda rs: of_client(rs, "disconnection", client_port=early_port))


def test_a_client_sending_while_the_auditor_attaches_keeps_every_result(valkey, start_auditor):
    """Registered as open at attach before the server becomes a target: taken at its first read in
    mid-conversation instead, its replies were matched to older requests for good."""
    busy = Raw(valkey.port)
    assert busy.call("SET", "str", "x") == b"+OK\r\n"
    stop = threading.Event()
    seen = []

    def traffic():
        while not stop.is_set():
            seen.append(busy.call("INCR", "n"))
            seen.append(busy.call("LPUSH", "str", "v"))
            time.sleep(0.001)
    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(0.2)
        auditor = start_auditor(valkey.pid, extra=SOCKETS)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(10)
    assert all(r.startswith(b":") for r in seen[0::2]) and all(r.startswith(b"-WRONGTYPE") for r in seen[1::2])
    assert busy.call("ECHO", "end") == b"$3\r\nend\r\n"
    recs = auditor.wait_records(lambda rs: of_client(rs, "echo", client_port=busy.port))
    mine = [r for r in recs if r["client_port"] == busy.port]
    assert [r["command_args"] for r in mine if r["command"] == "connection"] == ["type=normal attached=existing"]
    wrong = [(r["command"], r["result"], r["duration_us"]) for r in mine
             if (r["command"], r["result"]) not in {("incr", "SUCCESS"), ("lpush", "FAILURE"), ("echo", "SUCCESS")}
             and r["category"] != "CONNECTION"]
    assert not wrong, wrong[:5]
    assert sum(r["command"] == "incr" for r in mine) > 50
    busy.sock.close()
