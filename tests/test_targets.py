"""Many servers per host: --comm / --all / --pid targets, servers started later, restarts, a server
in its own pid and network namespace, and the capabilities the daemon runs with."""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from conftest import AUDITOR, VALKEY_SERVER, Valkey, free_port, terminate, wait_until
from test_capture import info_audit

REQUIRED_CAPS = ["cap_bpf", "cap_perfmon", "cap_sys_ptrace", "cap_dac_read_search"]


def wait_control(proc, control, what):
    """Wait until an auditor started by hand answers PING on its control port."""
    def ready():
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            with redis.Redis(port=control, socket_timeout=0.5) as c:
                return c.ping()
        except redis.RedisError:
            return False
    wait_until(ready, timeout=30, what=what)


def set_and_wait(auditor, server, key):
    with server.client() as c:
        assert c.set(key, "v")
    recs = auditor.wait_records(
        lambda rs: any(r["command"] == "set" and r["keys"] == [key] for r in rs),
        what=f"SET {key} of server {server.port}")
    rec = next(r for r in recs if r["command"] == "set" and r["keys"] == [key])
    return rec


def test_comm_three_servers_a_fourth_later_and_a_restart(start_valkey, start_auditor):
    servers = [start_valkey() for _ in range(3)]
    auditor = start_auditor(None, extra=("--comm", "valkey-server"))
    for s in servers:
        rec = set_and_wait(auditor, s, f"key-{s.port}")
        assert rec["pid"] == s.pid and rec["server_port"] == s.port, rec

    # A fourth, started after the auditor: audited from its very first connection (the
    # fixture's own PING while it waits for the server to come up).
    fourth = start_valkey()
    recs = auditor.wait_records(
        lambda rs: any(r["pid"] == fourth.pid and r["command"] == "ping" for r in rs),
        what="the fourth server's first PING")
    mine = [r for r in recs if r["pid"] == fourth.pid]
    assert mine[0]["category"] == "CONNECTION" and mine[0]["command"] == "connection", mine[:3]
    assert all(r["server_port"] == fourth.port for r in mine if r["category"] != "AUDIT"), mine
    rec = set_and_wait(auditor, fourth, "key-fourth")
    assert rec["server_port"] == fourth.port

    # One killed and restarted: its open connection is closed in the log, the new process is
    # audited again under its new pid and the same port.
    victim = servers[1]
    held = victim.client()
    held.ping()
    old_pid = victim.pid
    victim.kill_and_restart()
    assert victim.pid != old_pid
    auditor.wait_records(
        lambda rs: any(r["pid"] == old_pid and r["command"] == "disconnection" for r in rs),
        what="the killed server's connections to be closed")
    rec = set_and_wait(auditor, victim, "key-after-restart")
    assert rec["pid"] == victim.pid and rec["server_port"] == victim.port
    held.close()
    # The others were never disturbed.
    for s in (servers[0], servers[2]):
        rec = set_and_wait(auditor, s, f"again-{s.port}")
        assert rec["pid"] == s.pid


def test_a_cluster_node_is_named_by_its_client_port_not_its_bus_port(start_valkey, start_auditor):
    # /proc/<pid>/net/tcp lists listeners in hash order: with three nodes, at least one bus port
    # came first there in QA's runs. The clients' port is the listener Valkey opened first.
    nodes = [start_valkey("--cluster-enabled", "yes", "--cluster-port", str(free_port())) for _ in range(3)]
    extra = [x for n in nodes[1:] for x in ("--pid", str(n.pid))]
    auditor = start_auditor(nodes[0].pid, extra=tuple(extra))
    for n in nodes:
        with n.client() as c:
            assert c.ping()
    recs = auditor.wait_records(lambda rs: {r["pid"] for r in rs if r["command"] == "ping"} >= {n.pid for n in nodes},
                                what="a PING record of every node")
    for n in nodes:
        ports = {r["server_port"] for r in recs if r["pid"] == n.pid and r["category"] != "AUDIT"}
        assert ports == {n.port}, (n.port, ports)


def test_cluster_bus_links_are_not_parsed_as_clients(start_valkey, start_auditor):
    a, b = (start_valkey("--cluster-enabled", "yes", "--cluster-port", str(free_port())) for _ in range(2))
    auditor = start_auditor(a.pid, extra=("--pid", str(b.pid)))
    with b.client() as c:
        bus_b = int(c.config_get("cluster-port")["cluster-port"])
    with a.client() as c:
        c.execute_command("CLUSTER", "MEET", "127.0.0.1", str(b.port), str(bus_b))

    def gossip_received(n):
        with n.client() as c:
            info = c.execute_command("CLUSTER", "INFO").decode()
        stats = dict(l.split(":", 1) for l in info.split("\r\n") if ":" in l)
        return int(stats.get("cluster_stats_messages_received", 0)) >= 5
    wait_until(lambda: gossip_received(a) and gossip_received(b), timeout=30, what="gossip over the bus")
    # Records are written in the order the kernel saw the syscalls: once the marker is in, what
    # the bus links carried before it has been handled.
    marker = []
    for n in (a, b):
        with n.client() as c:
            c.echo(f"marker-{n.port}")
        marker.append(f"marker-{n.port}")
    recs = auditor.wait_records(lambda rs: all(any(m in r["command_args"] for r in rs) for m in marker),
                                what="the markers")
    assert not [r for r in recs if r["category"] == "AUDIT_LOSS"], [r for r in recs if r["category"] == "AUDIT_LOSS"]
    odd = [r for r in recs if r["category"] not in ("AUDIT", "CONNECTION")
           and not r["command"].startswith(("cluster", "echo", "config", "ping", "hello", "client"))]
    assert not odd, odd

    # A client cannot pass itself off as a bus link by sending the bus's signature first: what
    # the server answers it is RESP, and its commands are audited.
    s = socket.create_connection(("127.0.0.1", a.port))
    s.sendall(b"RCmb\r\n*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$11\r\nafter-rcmb!\r\n")
    got = b""
    while b"after-rcmb!" not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    s.close()
    auditor.wait_records(lambda rs: any("after-rcmb!" in r["command_args"] for r in rs),
                         what="the ECHO after RCmb")


def test_pid_target_exit_ends_the_auditor(valkey, start_auditor):
    auditor = start_auditor(valkey.pid)
    set_and_wait(auditor, valkey, "k")
    valkey.proc.kill()
    valkey.proc.wait()
    assert auditor.proc.wait(15) == 0
    assert "exited; stopping" in auditor.stderr_path.read_text()


def test_follow_restarts_audits_the_successor(valkey, start_auditor):
    auditor = start_auditor(valkey.pid, extra=("--follow-restarts",))
    set_and_wait(auditor, valkey, "before")
    old = valkey.pid
    valkey.kill_and_restart()
    rec = set_and_wait(auditor, valkey, "after")
    assert rec["pid"] == valkey.pid != old and rec["server_port"] == valkey.port
    assert auditor.proc.poll() is None
    # The stop record names both: the one that exited and the successor audited at stop.
    assert auditor.stop() == 0
    stop = auditor.records()[-1]
    assert (stop["category"], stop["command"]) == ("AUDIT", "stop"), stop
    assert f"pids={old},{valkey.pid}" in stop["command_args"].split(), stop


def test_follow_restarts_audits_the_successor_of_a_server_whose_binary_was_upgraded(
        tmp_path, start_auditor):
    # QA: a package upgrade renames a new binary over the running server's; its /proc/<pid>/exe
    # then reads "<path> (deleted)", and the restarted server (the new file, same path and port)
    # was never taken for its successor: nothing more was audited, the auditor kept waiting.
    binary = tmp_path / "bin" / "valkey-server"
    binary.parent.mkdir()
    shutil.copy(VALKEY_SERVER, binary)
    server = Valkey(tmp_path, binary=binary)
    try:
        upgrade = binary.parent / ".valkey-server.new"
        shutil.copy(VALKEY_SERVER, upgrade)
        os.rename(upgrade, binary)
        assert os.readlink(f"/proc/{server.pid}/exe").endswith(" (deleted)")
        auditor = start_auditor(server.pid, extra=("--follow-restarts",))
        set_and_wait(auditor, server, "before-upgrade")
        old = server.pid
        server.kill_and_restart()
        rec = set_and_wait(auditor, server, "after-upgrade")
        assert rec["pid"] == server.pid != old
    finally:
        server.stop()


def test_follow_restarts_ignores_another_server_started_while_waiting(valkey, start_valkey, start_auditor):
    auditor = start_auditor(valkey.pid, extra=("--follow-restarts",))
    set_and_wait(auditor, valkey, "before")
    valkey.proc.kill()
    valkey.proc.wait()
    # Same executable, another port, clients at once (start() itself waits for a PING).
    other = start_valkey()
    with other.client() as c:
        assert c.set("not-the-successor", "v")
    valkey.start()
    rec = set_and_wait(auditor, valkey, "after")
    assert rec["pid"] == valkey.pid and rec["server_port"] == valkey.port
    stray = [r for r in auditor.records() if r["pid"] == other.proc.pid]
    assert not stray, (auditor.stderr_path.read_text(), stray[:2])
    # Nor is it among the servers the stop record says were audited (QA).
    assert auditor.stop() == 0
    stop = auditor.records()[-1]
    assert stop["command"] == "stop"
    pids = dict(w.split("=", 1) for w in stop["command_args"].split() if w.startswith("pids="))["pids"]
    assert str(other.proc.pid) not in pids.split(","), stop


def test_follow_restarts_finds_the_successor_started_with_another_server(valkey, start_auditor,
                                                                          tmp_path):
    """Another server of the same executable started in the same instant as the successor took
    the only slot for it, and the successor was never audited (QA). Every process of the
    executable is now a candidate until one listens on the port."""
    auditor = start_auditor(valkey.pid, extra=("--follow-restarts",))
    set_and_wait(auditor, valkey, "before")
    valkey.proc.kill()
    valkey.proc.wait()
    other_port = free_port()
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = subprocess.Popen([str(VALKEY_SERVER), "--port", str(other_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(other_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        valkey.start()  # the successor, at once
        rec = set_and_wait(auditor, valkey, "after")
        assert rec["pid"] == valkey.pid and rec["server_port"] == valkey.port
        with redis.Redis(port=other_port) as r:
            wait_until(lambda: r.ping(), what="the other server")
            assert r.set("not-the-successor", "v")
        assert not [r for r in auditor.records() if r["pid"] == other.pid]
    finally:
        other.kill()
        other.wait()


def test_follow_restarts_of_a_unix_only_server_skips_a_tcp_server_of_the_same_executable(
        start_auditor, tmp_path):
    """A server without a TCP port has no port to tell its successor by: the first process of the
    executable took its slot, so another server started first (on a TCP port) was audited and the
    successor was not (QA). Now a candidate found listening on TCP is another server."""
    sock = str(tmp_path / "unix-only.sock")

    def unix_only():
        proc = subprocess.Popen([str(VALKEY_SERVER), "--port", "0", "--unixsocket", sock,
                                 "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(lambda: redis.Redis(unix_socket_path=sock).ping(), what="the unix-only server")
        return proc

    def echo(client, word):
        assert client.execute_command("ECHO", word) == word.encode()
    first = unix_only()
    other = successor = None
    try:
        auditor = start_auditor(first.pid, extra=("--follow-restarts",))
        echo(redis.Redis(unix_socket_path=sock), "from-first")
        first.kill()
        first.wait()
        other_port = free_port()
        other_dir = tmp_path / "other"
        other_dir.mkdir()
        other = subprocess.Popen([str(VALKEY_SERVER), "--port", str(other_port), "--bind",
                                  "127.0.0.1", "--save", "", "--appendonly", "no",
                                  "--dir", str(other_dir)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time.sleep(0.3)  # (the other server execs first: it must not take the slot for good)
        successor = unix_only()
        with redis.Redis(port=other_port) as r:
            wait_until(lambda: r.ping(), what="the other server")
            echo(r, "from-other")
        echo(redis.Redis(unix_socket_path=sock), "from-successor")
        auditor.wait_records(lambda rs: any(r["command_args"] == "arg1=from-successor"
                                            and r["pid"] == successor.pid for r in rs),
                             what="the successor's ECHO")
        assert not [r for r in auditor.records() if r["pid"] == other.pid]
    finally:
        for p in (first, other, successor):
            if p is not None:
                p.kill()
                p.wait()


def test_all_finds_servers_running_before_start(valkey, start_auditor):
    auditor = start_auditor(None, extra=("--all",))
    rec = set_and_wait(auditor, valkey, "all-key")
    assert rec["pid"] == valkey.pid and rec["server_port"] == valkey.port


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_server_in_its_own_pid_and_network_namespace(tmp_path, start_auditor):
    unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
    assert unshare and nsenter, "util-linux (unshare, nsenter) missing: scripts/setup.sh installs it"
    auditor = start_auditor(None, extra=("--comm", "valkey-server"))
    port = free_port()
    (tmp_path / "ns").mkdir()
    cmd = (f"ip link set lo up && exec {VALKEY_SERVER} --port {port} --bind 127.0.0.1 --save '' "
           f"--appendonly no --dir {tmp_path / 'ns'}")
    outer = subprocess.Popen([unshare, "--pid", "--net", "--mount", "--fork", "--mount-proc",
                              "sh", "-c", cmd], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    host_pid = None
    try:
        host_pid = wait_until(
            lambda: next((c for c in children(outer.pid) if comm(c) == "valkey-server"), None),
            what="the namespaced valkey-server")

        def cli(*args):
            return subprocess.run([nsenter, f"--net=/proc/{host_pid}/ns/net", "redis-cli", "-p",
                                   str(port), *args], capture_output=True, text=True, timeout=10)
        wait_until(lambda: cli("PING").stdout.strip() == "PONG", what="PING inside the namespace")
        assert cli("SET", "ns-key", "v").stdout.strip() == "OK"
        recs = auditor.wait_records(
            lambda rs: any(r["command"] == "set" and r["keys"] == ["ns-key"] for r in rs),
            what="the namespaced SET")
        rec = next(r for r in recs if r["command"] == "set" and r["keys"] == ["ns-key"])
        assert rec["pid"] == host_pid
        assert rec["container_pid"] == 1, rec
        assert rec["server_port"] == port
        assert rec["client_ip"] == "127.0.0.1"
    finally:
        # The server is pid 1 of its namespace: unshare does not pass SIGTERM on, so stop it first.
        if host_pid is not None:
            os.kill(host_pid, signal.SIGTERM)
            wait_until(lambda: outer.poll() is not None, what="the namespaced server to exit")
        terminate(outer)


def all_caps():
    last = int(open("/proc/sys/kernel/cap_last_cap").read())
    out = subprocess.run(["capsh", f"--decode={(1 << (last + 1)) - 1:x}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split("=", 1)[1].strip().split(",")


def run_with_caps(keep, args, **kw):
    drop = [c for c in all_caps() if c not in keep]
    capsh = shutil.which("capsh")
    assert capsh, "capsh missing: scripts/setup.sh installs libcap2-bin"
    quoted = " ".join(f"'{a}'" for a in args)
    return subprocess.Popen([capsh, f"--drop={','.join(drop)}", "--", "-c", f"exec {quoted}"], **kw)


def cap_eff(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return None


def thread_nice(pid):
    """{thread name: nice value} of a process's threads."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        # Fields after the name start at field 3; nice is field 19.
        out[name] = int(stat[stat.rindex(")") + 2:].split()[19 - 3])
    return out


def test_worker_threads_run_at_nice_minus_5_and_nice_is_a_flag(valkey, start_auditor):
    auditor = start_auditor(valkey.pid)
    nice = thread_nice(auditor.proc.pid)
    assert nice["capture"] == -5 and nice["sink"] == -5, nice
    other = start_auditor(valkey.pid, extra=("--nice", "3"))
    nice = thread_nice(other.proc.pid)
    assert nice["capture"] == 3 and nice["sink"] == 3, nice


def test_runs_with_exactly_the_documented_capabilities(valkey, tmp_path):
    log = tmp_path / "caps.log"
    control = free_port()
    args = [str(AUDITOR), "--comm", "valkey-server", "--control", f"127.0.0.1:{control}",
            "audit.protocol", f"file {log}", "audit.format", "json"]
    proc = run_with_caps(REQUIRED_CAPS, args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def records():
            if not log.exists():
                return []
            import json
            return [json.loads(l) for l in log.read_bytes().split(b"\n")[:-1]]

        wait_control(proc, control, "auditor with the minimal capabilities")
        # After attach only CAP_SYS_PTRACE (bit 19) and CAP_DAC_READ_SEARCH (bit 2) are left.
        assert cap_eff(proc.pid) == (1 << 19) | (1 << 2)
        # Without CAP_SYS_NICE the default nice -5 cannot be set: the threads keep nice 0.
        assert set(thread_nice(proc.pid).values()) == {0}
        with valkey.client() as c:
            c.set("caps-key", "v")
        wait_until(lambda: any(r["command"] == "set" and r["keys"] == ["caps-key"]
                               for r in records()), what="a record with minimal capabilities")
        # A server started after the drop is still picked up (map updates need no capability).
        later = Valkey(tmp_path)
        try:
            with later.client() as c:
                c.set("caps-later", "v")
            wait_until(lambda: any(r["keys"] == ["caps-later"] and r["pid"] == later.pid
                                   for r in records()), what="the later server's record")
        finally:
            later.stop()
    finally:
        terminate(proc)


def test_a_server_run_by_another_user_is_audited_with_exactly_the_documented_capabilities(tmp_path):
    # QA: with CAP_SYS_PTRACE alone, /proc/<pid>/fd of a server run as another user (mode 0500,
    # owned by it) could not be listed: its listening ports and open connections were unknown and
    # not one of its commands was recorded, without a word. Packages run valkey-server as `valkey`.
    import json
    import tempfile
    home = Path(tempfile.mkdtemp(prefix="auditor-other-user-"))
    os.chmod(home, 0o777)
    server_bin = home / "valkey-server"
    shutil.copy(VALKEY_SERVER, server_bin)
    os.chmod(server_bin, 0o755)
    port = free_port()
    server = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               str(server_bin), "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(home)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    log = tmp_path / "other-user.log"
    proc = None
    try:
        def ping():
            try:
                with redis.Redis(port=port, socket_timeout=0.5) as r:
                    return r.ping()
            except redis.RedisError:
                return False
        wait_until(ping, what="valkey-server run as nobody to answer PING")
        assert os.stat(f"/proc/{server.pid}").st_uid == 65534
        before = redis.Redis(port=port)
        before.ping()  # a connection open at attach
        control = free_port()
        proc = run_with_caps(REQUIRED_CAPS, [str(AUDITOR), "--pid", str(server.pid), "--control",
                                             f"127.0.0.1:{control}", "audit.protocol",
                                             f"file {log}", "audit.format", "json"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_control(proc, control, "auditor with the minimal capabilities")
        before.set("set-on-a-connection-open-at-attach", "v")
        with redis.Redis(port=port) as after:
            after.set("set-on-a-new-connection", "v")

        def keys():
            if not log.exists():
                return set()
            return {k for line in log.read_bytes().split(b"\n")[:-1]
                    for k in json.loads(line)["keys"]}
        wait_until(lambda: {"set-on-a-connection-open-at-attach",
                            "set-on-a-new-connection"} <= keys(),
                   what="both SETs on the server run as nobody")
        before.close()
    finally:
        if proc is not None:
            terminate(proc)
        terminate(server)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("missing", REQUIRED_CAPS)
def test_one_capability_fewer_fails_naming_it(missing):
    keep = [c for c in REQUIRED_CAPS if c != missing]
    proc = run_with_caps(keep, [str(AUDITOR), "--all", "--control", f"127.0.0.1:{free_port()}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rc = proc.wait(20)
    err = proc.stderr.read().decode()
    assert rc != 0
    assert f"missing capability {missing.upper()}" in err, err


def test_one_file_per_server_with_port_placeholder(start_valkey, tmp_path):
    import json
    a, b = start_valkey(), start_valkey()
    control = free_port()
    template = tmp_path / "logs" / "audit-%port%.log"
    template.parent.mkdir()
    proc = subprocess.Popen([str(AUDITOR), "--comm", "valkey-server", "--control",
                             f"127.0.0.1:{control}", "audit.protocol", f"file {template}",
                             "audit.format", "json"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_control(proc, control, "auditor")
        for s in (a, b):
            with s.client() as c:
                c.set(f"file-of-{s.port}", "v")

        def records(port):
            path = tmp_path / "logs" / f"audit-{port}.log"
            if not path.exists():
                return []
            return [json.loads(l) for l in path.read_bytes().split(b"\n")[:-1]]
        for s in (a, b):
            recs = wait_until(lambda: (r := records(s.port)) and any(
                x["keys"] == [f"file-of-{s.port}"] for x in r) and r,
                what=f"records in audit-{s.port}.log")
            assert all(r["server_port"] == s.port and r["pid"] == s.pid for r in recs), recs
        own = wait_until(lambda: records("auditor"), what="the auditor's own records")
        assert own[0]["category"] == "AUDIT" and own[0]["command"] == "start"
    finally:
        terminate(proc)



def test_a_unix_only_server_has_its_own_file_with_port_placeholder(tmp_path):
    """A server with `port 0` has no port for `%port%`: its file is named by its unix socket, and
    the auditor's own records stay apart."""
    import json
    sock = tmp_path / "only.sock"
    server = subprocess.Popen([str(VALKEY_SERVER), "--port", "0", "--unixsocket", str(sock),
                               "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    control = free_port()
    template = tmp_path / "logs" / "audit-%port%.log"
    template.parent.mkdir()
    proc = None
    try:
        def ping():
            try:
                with redis.Redis(unix_socket_path=str(sock), socket_timeout=0.5) as r:
                    return r.ping()
            except Exception:
                return False
        wait_until(ping, what="the unix-only server to answer PING")
        proc = subprocess.Popen([str(AUDITOR), "--pid", str(server.pid), "--control",
                                 f"127.0.0.1:{control}", "audit.protocol", f"file {template}",
                                 "audit.format", "json"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        wait_control(proc, control, "auditor")
        with redis.Redis(unix_socket_path=str(sock)) as c:
            c.set("unix-only-key", "v")
        name = "unix-" + str(sock).lstrip("/").replace("/", "-")

        def records(key):
            path = tmp_path / "logs" / f"audit-{key}.log"
            if not path.exists():
                return []
            return [json.loads(l) for l in path.read_bytes().split(b"\n")[:-1]]
        recs = wait_until(lambda: (r := records(name)) and any(
            x["keys"] == ["unix-only-key"] for x in r) and r, what=f"records in audit-{name}.log")
        assert all(r["pid"] == server.pid and r["server_port"] == 0 for r in recs), recs
        assert {r["command"] for r in recs} >= {"connection", "set"}, recs
        own = wait_until(lambda: records("auditor"), what="the auditor's own records")
        assert all(r["category"].startswith("AUDIT") for r in own), own
    finally:
        if proc is not None:
            terminate(proc)
        terminate(server)

def test_server_port_follows_config_set_port(valkey, start_auditor):
    """After CONFIG SET port, records carry the port the server now listens on, and INFO says so."""
    auditor = start_auditor(valkey.pid)
    old = valkey.port
    set_and_wait(auditor, valkey, "before-move")
    new = free_port()
    with valkey.client() as c:
        assert c.config_set("port", new)
    valkey.port = new  # the fixture's client and stop follow the server
    rec = set_and_wait(auditor, valkey, "after-move")
    assert (rec["server_port"], rec["pid"]) == (new, valkey.pid) != (old, valkey.pid), rec
    assert f"port={new}," in info_audit(auditor)[f"audit_target_{valkey.pid}"]


def test_commands_pipelined_after_config_set_port_carry_the_new_port(valkey, start_auditor):
    """A pipeline's replies come in one write: the commands after a CONFIG SET port in it kept the
    old `server_port`, the server being described again only after the whole write (QA)."""
    auditor = start_auditor(valkey.pid)
    old, new = valkey.port, free_port()
    with valkey.client() as c:
        p = c.pipeline(transaction=False)
        p.set("piped:before", 1)
        p.execute_command("CONFIG", "SET", "port", str(new))
        p.set("piped:after", 2)
        assert p.execute() == [True, b"OK", True]
    valkey.port = new
    recs = auditor.wait_records(
        lambda rs: any(r["keys"] == ["piped:after"] for r in rs), what="the SET after the move")
    ports = {r["keys"][0]: r["server_port"] for r in recs if r["command"] == "set"}
    assert ports == {"piped:before": old, "piped:after": new}, ports
