"""Delivery: the file sink (rolling, retention, archiving, reopen, full disk), syslog to a real
rsyslogd, the TCP sink against a real collector that goes away, backpressure and loss accounting.

Every test uses real components (valkey-server, the auditor binary, rsyslogd, a TCP collector in a
thread, a real tmpfs) and asserts on what a user sees: the records that were written or received.
Waits are on conditions with deadlines; the only fixed waits are the ones the scenario itself asks for
(a collector that stays away for 10 s, a minute boundary for `roll_cycle minutely`).
"""
import contextlib
import ctypes
import errno
import json
import os
import platform
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import AUDITOR, control_answers, free_port, terminate, wait_until
from test_capture import Raw, resp
from test_control import cli, config_get

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


# ---------------------------------------------------------------------------------------------------
# helpers


def info(auditor):
    out = cli(auditor, "INFO", "audit")
    return dict(l.split(":", 1) for l in out.splitlines() if ":" in l)


def parse_lines(data):
    """Records of a byte stream of whole lines; a torn (unterminated) tail is returned separately."""
    *whole, tail = data.split(b"\n")
    return [json.loads(l) for l in whole], tail


def read_records(path):
    recs, tail = parse_lines(Path(path).read_bytes())
    assert tail == b"", f"{path} ends with a torn line: {tail[:80]!r}"
    return recs


def read_or_empty(path):
    """The file's bytes; nothing while a roll has renamed it and not yet created the new one."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return b""


def send_sets(sock, keys, value=b"v"):
    """Pipeline one SET per key on `sock` and wait for every +OK."""
    sock.sendall(b"".join(resp("SET", k, value) for k in keys))
    want = 5 * len(keys)
    got = bytearray()
    sock.settimeout(60)
    while len(got) < want:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("valkey closed the connection")
        got += chunk
    assert bytes(got) == b"+OK\r\n" * len(keys)


def connect(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def sets_of(records):
    return [r["keys"][0] for r in records if r["command"] == "set"]


def loss_counts(records, cause):
    out = []
    for r in records:
        if r["category"] == "AUDIT_LOSS" and f"cause={cause} " in r["command_args"] + " ":
            m = re.search(r"\bcount=(\d+)", r["command_args"])
            assert m, r["command_args"]
            out.append(int(m.group(1)))
    return out


def assert_gapless(records, first=1):
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(first, first + len(seqs))), f"seq not gapless: {seqs[:5]}..{seqs[-5:]}"


ROLLED_RE = r"{stem}-(\d{{8}})-(\d{{6}})(?:-(\d+))?\.log"


def rolled_files(directory, stem="audit"):
    """Rolled files of <stem>.log, oldest first, ordered by parsed (timestamp, N): plain name order
    is wrong within one second (audit-…-143000-1.log < audit-…-143000.log)."""
    pattern = re.compile(ROLLED_RE.format(stem=re.escape(stem)))
    found = []
    for p in Path(directory).iterdir():
        m = pattern.fullmatch(p.name)
        if m:
            found.append(((m.group(1), m.group(2), int(m.group(3) or 0)), p))
    return [p for _, p in sorted(found)]


def stamp_of(path):
    m = re.search(r"-(\d{8})-(\d{6})(?:-\d+)?\.log$", path.name)
    return datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S")


def set_one_by_one(valkey, live, keys, value):
    """SET each key and wait until its record is in the live file before the next: every batch the
    sink writes is then one line."""
    c = Raw(valkey.port)
    for k in keys:
        c.call("SET", k, value)
        wait_until(lambda: f'"keys":["{k}"]'.encode() in read_or_empty(live), interval=0.002,
                   what=f"the record of {k} in the live file")
    c.close()


def log_mode():
    """0640 less the umask the auditor inherits from us."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o640 & ~umask


def record_time(rec):
    return datetime.strptime(rec["timestamp"], "%Y-%m-%d %H:%M:%S")


def file_auditor(start_auditor, valkey, path, *settings, **kw):
    """An auditor writing json to `path` (the fixture's own log path is replaced)."""
    a = start_auditor(valkey.pid, settings=("audit.protocol", f"file {path}", *settings), **kw)
    a.log = Path(path)
    return a


@contextlib.contextmanager
def small_tmpfs(path, size="256k"):
    path.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                         capture_output=True, timeout=10)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.decode().strip()}")
    try:
        yield path
    finally:
        # Room again first, so that an auditor still writing there can finish and stop.
        for filler in path.glob("filler*"):
            filler.unlink()
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def fill_disk(path):
    """Write a filler file until the file system is full (ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# start and stop records


def test_start_and_stop_records_and_clean_stop_flushes(valkey, start_auditor):
    a = start_auditor(valkey.pid)
    first = a.wait_records(lambda rs: len(rs) >= 1, what="start record")[0]
    assert (first["category"], first["command"], first["seq"]) == ("AUDIT", "start", 1)
    args = first["command_args"]
    assert re.search(r"\bversion=\d+\.\d+\.\d+", args), args
    assert f"pids={valkey.pid}" in args.split()
    assert f"protocol=file {a.log}" in args
    for setting in ("format=json", "fsync=everysec", "roll_cycle=never", "overflow=block"):
        assert setting in args.split(), (setting, args)
    assert re.search(r"\bmax_queue_size=\d+\b", args), args
    assert first["pid"] == a.proc.pid

    # SIGTERM right after the last reply: every record still in flight is written, then `stop`.
    s = connect(valkey.port)
    keys = [f"flush:{i}" for i in range(5000)]
    send_sets(s, keys)
    # The stop record carries the settings in force at the end (QA: run-time changes showed nowhere).
    assert cli(a, "CONFIG", "SET", "audit.exclude_commands", "ping").strip() == "OK"
    assert a.stop() == 0
    recs = read_records(a.log)
    assert_gapless(recs)
    assert sets_of(recs) == keys
    last = recs[-1]
    assert (last["category"], last["command"]) == ("AUDIT", "stop")
    assert re.search(r"\bversion=\d+\.\d+\.\d+", last["command_args"])
    assert f"pids={valkey.pid}" in last["command_args"].split()
    assert "exclude_commands=ping" in last["command_args"].split(), last["command_args"]
    assert "format=json" in last["command_args"].split(), last["command_args"]
    s.close()


@contextlib.contextmanager
def wall_clock_stepped(seconds):
    """Step the host's wall clock by `seconds` (as NTP or a resumed VM does), and back after by
    what the monotonic clock says passed."""
    mono0 = time.monotonic_ns()
    wall0 = time.clock_gettime_ns(time.CLOCK_REALTIME)
    time.clock_settime_ns(time.CLOCK_REALTIME, wall0 + seconds * 1_000_000_000)
    try:
        yield
    finally:
        time.clock_settime_ns(time.CLOCK_REALTIME, wall0 + time.monotonic_ns() - mono0)


def test_record_times_follow_a_step_of_the_wall_clock(valkey, start_auditor):
    """Records show the host's wall time even after it steps: event stamps come from the kernel's
    monotonic clock, and the offset between the two is read afresh, not once at start."""
    a = start_auditor(valkey.pid)
    c = Raw(valkey.port)
    c.call("SET", "before-step", "1")
    recs = a.wait_records(lambda rs: sets_of(rs) == ["before-step"], what="the record before the step")
    assert abs((record_time(recs[-1]) - datetime.now()).total_seconds()) < 5
    with wall_clock_stepped(-3 * 3600):
        c.call("SET", "after-step", "1")
        recs = a.wait_records(lambda rs: sets_of(rs) == ["before-step", "after-step"],
                              what="the record after the step")
        stepped_now = datetime.now()
        after = [r for r in recs if r["command"] == "set"][-1]
        assert abs((record_time(after) - stepped_now).total_seconds()) < 5, (after, stepped_now)
    c.close()


# ---------------------------------------------------------------------------------------------------
# file sink


def test_file_mode_0640_and_missing_directory_is_a_clear_error(valkey, start_auditor, tmp_path):
    missing = tmp_path / "no-such-dir" / "audit.log"
    out = subprocess.run([str(AUDITOR), "--pid", str(valkey.pid), "--control", f"127.0.0.1:{free_port()}",
                          "audit.protocol", f"file {missing}"], capture_output=True, timeout=30)
    assert out.returncode == 1
    err = out.stderr.decode().strip()
    assert len(err.splitlines()) == 1, err
    assert "does not exist" in err and str(missing.parent) in err, err

    logs = tmp_path / "logs"
    logs.mkdir()
    live = logs / "audit.log"
    a = file_auditor(start_auditor, valkey, live)
    a.wait_records(lambda rs: rs, what="start record")
    assert stat.S_IMODE(live.stat().st_mode) == log_mode()

    # The same at run time: refused with the reason, the running file stays in use.
    reply = cli(a, "CONFIG", "SET", "audit.protocol", f"file {missing}")
    assert reply.startswith("ERR") and "does not exist" in reply, reply
    assert config_get(a, "audit.protocol")["audit.protocol"] == f"file {live}"
    Raw(valkey.port).call("SET", "still", "here")
    recs = a.wait_records(lambda rs: "still" in sets_of(rs), what="record after the refused CONFIG SET")
    assert not missing.parent.exists()
    assert_gapless(recs)

    # Destinations the sink could not open are refused too, not accepted and then never switched to:
    # a path that is a directory, and a syslog collector nobody listens on.
    isdir = tmp_path / "isdir.log"
    isdir.mkdir()
    reply = cli(a, "CONFIG", "SET", "audit.protocol", f"file {isdir}")
    assert reply.startswith("ERR") and "Is a directory" in reply, reply
    reply = cli(a, "CONFIG", "SET", "audit.protocol", "syslog local2",
                "audit.syslog_target", f"tcp://127.0.0.1:{free_port()}")
    assert reply.startswith("ERR") and "audit.protocol" in reply, reply
    assert config_get(a, "audit.protocol")["audit.protocol"] == f"file {live}"
    assert config_get(a, "audit.syslog_target")["audit.syslog_target"] == "local"
    Raw(valkey.port).call("SET", "still", "there")
    recs = a.wait_records(lambda rs: "there" in [r["command_args"].split("payload=")[-1] for r in rs],
                          what="record in the running file after the refused CONFIG SETs")
    assert_gapless(recs)


def test_a_log_directory_owned_by_another_user_is_warned_about_at_start(valkey, start_auditor, tmp_path):
    """Once attached the auditor holds no CAP_DAC_OVERRIDE: in a directory of another user's
    (/var/log/valkey owned by valkey) it could not roll or reopen later, so it says so at start."""
    logs = tmp_path / "foreign"
    logs.mkdir(mode=0o755)
    os.chown(logs, 65534, 65534)
    a = file_auditor(start_auditor, valkey, logs / "audit.log")
    wait_until(lambda: "is not writable without CAP_DAC_OVERRIDE" in a.stderr_path.read_text(),
               what="the warning about the log directory")
    assert str(logs) in a.stderr_path.read_text()
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    b = file_auditor(start_auditor, valkey, mine / "audit.log")
    b.wait_records(lambda rs: len(rs) >= 1, what="the start record")
    assert "CAP_DAC_OVERRIDE" not in b.stderr_path.read_text()


def test_roll_by_size_then_retention_by_total_size(valkey, start_auditor, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    live = logs / "audit.log"
    max_file = 16 * 1024
    a = file_auditor(start_auditor, valkey, live, "audit.max_file_size", str(max_file))
    # One record at a time (each is written before the next command runs), so that every batch is
    # one line and the roll points are exact: a file is rolled when the next line would not fit.
    keys = [f"size:{i:03d}" for i in range(120)]
    set_one_by_one(valkey, live, keys, "x" * 1000)

    def all_written():
        try:
            files = rolled_files(logs) + [live]
            recs = [r for f in files for r in read_records(f)]
        except (OSError, AssertionError):
            return None  # a roll or a write in progress: look again
        return (files, recs) if sets_of(recs)[-1:] == [keys[-1]] else None
    files, recs = wait_until(all_written, timeout=30, what="every record across rolled files")
    rolled = files[:-1]
    assert len(rolled) >= 5, [f.name for f in rolled]
    # In (timestamp, N) order the files hold the records in order, none lost or doubled.
    assert_gapless(recs)
    assert sets_of(recs) == keys
    for i, f in enumerate(rolled):
        size = f.stat().st_size
        assert size <= max_file, (f.name, size)
        first_next = files[i + 1].read_bytes().split(b"\n", 1)[0]
        assert size + len(first_next) + 1 > max_file, f"{f.name} rolled early ({size} bytes)"
        assert stat.S_IMODE(f.stat().st_mode) == log_mode()
    # Timestamps in names never decrease and name the start of the file's content (the time its
    # first line was written, which follows that command's own timestamp closely).
    assert [stamp_of(f) for f in rolled] == sorted(stamp_of(f) for f in rolled)
    for f in rolled:
        assert abs((stamp_of(f) - record_time(read_records(f)[0])).total_seconds()) <= 2, f.name

    # Retention: lowering audit.max_log_size applies at once, oldest deleted first.
    sizes = {f: f.stat().st_size for f in rolled}
    limit = 4 * max_file
    assert sum(sizes.values()) > limit
    assert cli(a, "CONFIG", "SET", "audit.max_log_size", str(limit)).strip() == "OK"

    def trimmed():
        try:
            files = rolled_files(logs)
            return files if sum(f.stat().st_size for f in files) <= limit else None
        except FileNotFoundError:
            return None  # deleted while we looked
    kept = wait_until(trimmed, timeout=10, what="retention to delete rolled files")
    deleted = [f for f in rolled if f not in kept]
    assert deleted and deleted == rolled[:len(deleted)], "the oldest must go first"
    assert kept == rolled[len(deleted):]
    # It stopped as soon as the total fit: keeping the last deleted file would have been too much.
    assert sum(sizes[f] for f in kept) + sizes[deleted[-1]] > limit
    # What is kept is the newest records, contiguous up to the live file.
    remaining = [r for f in kept + [live] for r in read_records(f)]
    assert_gapless(remaining, first=remaining[0]["seq"])
    assert remaining[-1]["seq"] >= recs[-1]["seq"]  # (+ the CONFIG record of the CONFIG SET)
    assert sets_of(remaining) == keys[-len(sets_of(remaining)):]


def test_roll_by_time_minutely(valkey, start_auditor, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    live = logs / "audit.log"
    # Keep the "before" traffic well away from a minute boundary.
    if datetime.now().second >= 55:
        wait_until(lambda: datetime.now().second < 55, timeout=6, interval=0.1, what="a new minute")
    a = file_auditor(start_auditor, valkey, live, "audit.roll_cycle", "minutely")
    c = Raw(valkey.port)
    before = [f"before:{i}" for i in range(20)]
    for k in before:
        c.call("SET", k, "1")
    a.wait_records(lambda rs: sets_of(rs) == before, what="records before the minute boundary")
    assert rolled_files(logs) == []
    left = 60 - datetime.now().second
    rolled = wait_until(lambda: rolled_files(logs), timeout=left + 5, interval=0.1,
                        what="the minutely roll at the minute boundary")
    after = [f"after:{i}" for i in range(20)]
    for k in after:
        c.call("SET", k, "1")
    c.close()
    a.wait_records(lambda rs: sets_of(rs) == after, what="records after the boundary in the live file")
    assert len(rolled) == 1
    old = read_records(rolled[0])
    new = read_records(live)
    assert sets_of(old) == before
    assert_gapless(old + new)
    stamp = stamp_of(rolled[0])
    # Named after the start of its content, in the minute its records belong to.
    assert stamp <= record_time(old[0])
    assert all(record_time(r).replace(second=0) == stamp.replace(second=0) for r in old)
    late = [r for r in new
            if r["command"] == "set" and record_time(r).replace(second=0) <= stamp.replace(second=0)]
    assert not late, (rolled[0].name, late)



def test_archive_command_moving_files_away_never_gets_a_name_twice(valkey, start_auditor, tmp_path):
    """An archive command that moves each rolled file away leaves no file of that second on disk;
    the next roll in the same second must still get a new name, or the archive overwrites the
    earlier file and its records are gone."""
    logs, archive = tmp_path / "logs", tmp_path / "archive"
    logs.mkdir(), archive.mkdir()
    live = logs / "audit.log"
    a = file_auditor(start_auditor, valkey, live, "audit.max_file_size", "3000")
    assert cli(a, "CONFIG", "SET", "audit.archive_command",
               f"/bin/mv -n %path {archive}/").strip() == "OK"
    # Many rolls within each second (one record per batch, ~10 records per file).
    set_one_by_one(valkey, live, [f"mv:{i}" for i in range(150)], "y" * 100)
    rolled_names = []

    def all_archived():
        rolled_names[:] = [p.name for p in archive.iterdir()]
        recs = [r for p in archive.iterdir() for r in read_records(p)] + read_records(live)
        keys = {r["keys"][0] for r in recs if r["command"] == "set"}
        return len(keys) == 150 and not rolled_files(logs) and recs
    recs = wait_until(all_archived, timeout=20, what="every record in the archive or the live file")
    assert_gapless(sorted(recs, key=lambda r: r["seq"]))
    assert len(rolled_names) >= 10, rolled_names

def test_sighup_while_the_auditor_starts_does_not_end_it(valkey, tmp_path):
    """QA: SIGHUP's default action ends a process, and the handler was installed only once the
    auditor was up: a logrotate reload landing during a (re)start killed it, with an empty log."""
    log = tmp_path / "hup.log"
    control = free_port()
    proc = subprocess.Popen([str(AUDITOR), "--pid", str(valkey.pid), "--control", f"127.0.0.1:{control}",
                             "audit.protocol", f"file {log}", "audit.format", "json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def handles_hangup():
            # (Before its first instruction no process can: bit 0 of SigBlk or SigCgt is SIGHUP.)
            assert proc.poll() is None, proc.stderr.read()
            status = Path(f"/proc/{proc.pid}/status").read_text()
            return any(int(re.search(rf"^{field}:\s*([0-9a-f]+)", status, re.M).group(1), 16) & 1
                       for field in ("SigBlk", "SigCgt"))
        wait_until(handles_hangup, interval=0.001, what="the auditor to hold or catch SIGHUP")

        # From the start, not only once it is up (loading and attaching take a while).
        assert not control_answers(control, timeout=0.2), "SIGHUP was handled only once the auditor was up"

        def answers():
            # A HUP every round until the control port answers: the rest of start-up is covered.
            assert proc.poll() is None, f"auditor ended by SIGHUP: {proc.returncode}"
            proc.send_signal(signal.SIGHUP)
            return control_answers(control, timeout=0.2)
        wait_until(answers, timeout=30, interval=0.01, what="the control port, under SIGHUPs")
        Raw(valkey.port).call("SET", "after-hup", "1")

        def written():
            lines = log.read_bytes().splitlines() if log.exists() else []
            return any(json.loads(l).get("keys") == ["after-hup"] for l in lines)
        wait_until(written, what="the SET's record")
    finally:
        terminate(proc)


def test_archive_command_runs_without_the_capabilities_the_daemon_dropped(valkey, start_auditor, tmp_path):
    """QA: the daemon, uid 0, dropped its capabilities but not its bounding set, so the archive
    command (or code that took the daemon over) got every capability back at exec, CAP_SYS_ADMIN
    included. It gets none now, and cannot gain any through a set-user-id program."""
    logs = tmp_path / "logs"
    logs.mkdir()
    status = tmp_path / "status.txt"
    script = tmp_path / "archive.sh"
    script.write_text("#!/bin/sh\n"
                      f"grep -E '^(CapPrm|CapEff|CapBnd|NoNewPrivs):' /proc/self/status > '{status}.tmp'\n"
                      f"mv '{status}.tmp' '{status}'\n")
    script.chmod(0o755)
    live = logs / "audit.log"
    a = file_auditor(start_auditor, valkey, live, "audit.max_file_size", "3000")
    assert cli(a, "CONFIG", "SET", "audit.archive_command", f"{script} %path").strip() == "OK"
    set_one_by_one(valkey, live, [f"caps:{i}" for i in range(40)], "y" * 100)
    wait_until(status.exists, timeout=20, what="the archive command to run")
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields == {"CapPrm": "0" * 16, "CapEff": "0" * 16, "CapBnd": "0" * 16, "NoNewPrivs": "1"}, fields


def test_archive_command_failing_once_succeeds_on_retry(valkey, start_auditor, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    archive = tmp_path / "archive"
    archive.mkdir()
    calls = tmp_path / "calls.txt"
    marker = tmp_path / "failed-once"
    script = tmp_path / "archive.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"printf '%s|%s|%s\\n' \"$#\" \"$1\" \"$2\" >> '{calls}'\n"
        f"if [ ! -e '{marker}' ]; then touch '{marker}'; echo busy >&2; exit 1; fi\n"
        f"exec cp \"$1\" '{archive}/'\n")
    script.chmod(0o755)
    live = logs / "audit.log"
    # max_log_size is tiny, but while archive_command is set nothing is deleted.
    a = file_auditor(start_auditor, valkey, live, "audit.max_file_size", "4000", "audit.max_log_size", "1",
                     "audit.max_archive_retries", "3")
    # Shell metacharacters reach the script as they are: no shell runs the command.
    literal = "a;b $HOME `x`"
    assert cli(a, "CONFIG", "SET", "audit.archive_command", f'{script} %path "{literal}"').strip() == "OK"
    # One record per batch, so that each file is rolled at its size (a batch is never split).
    set_one_by_one(valkey, live, [f"arch:{i}" for i in range(40)], "y" * 50)
    rolled = wait_until(lambda: (lambda r: r if len(r) >= 3 else None)(rolled_files(logs)),
                        timeout=10, what="three rolled files")

    def archived():
        copies = {p.name for p in archive.iterdir()}
        return all(f.name in copies for f in rolled)
    wait_until(archived, timeout=20, what="every rolled file archived")
    for f in rolled:
        assert (archive / f.name).read_bytes() == f.read_bytes()
        assert f.exists(), "archived files are not deleted by retention"
    lines = calls.read_text().splitlines()
    # The first call failed and the same file was given again; every argument as written.
    assert lines[0] == lines[1] == f"2|{rolled[0]}|{literal}", lines
    assert marker.exists()
    by_path = [l.split("|")[1] for l in lines[1:]]
    assert sorted(set(by_path)) == sorted(by_path), "each file archived once after the retry"
    all_recs = [r for f in rolled_files(logs) + [live] for r in read_records(f)]
    assert_gapless(all_recs)


def test_sighup_and_config_set_reopen_after_mv(valkey, start_auditor, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    live = logs / "audit.log"
    a = file_auditor(start_auditor, valkey, live, "audit.fsync", "always")
    assert config_get(a, "audit.fsync")["audit.fsync"] == "always"
    c = Raw(valkey.port)
    one = [f"one:{i}" for i in range(100)]
    for k in one:
        c.call("SET", k, "1")
    a.wait_records(lambda rs: sets_of(rs) == one, what="first records")

    # logrotate: mv, then SIGHUP (postrotate).
    os.rename(live, logs / "audit.log.1")
    a.proc.send_signal(signal.SIGHUP)
    wait_until(live.exists, what="a new file at the original path")
    assert a.proc.poll() is None, "SIGHUP must not stop the auditor"
    two = [f"two:{i}" for i in range(100)]
    for k in two:
        c.call("SET", k, "2")
    a.wait_records(lambda rs: sets_of(rs) == two, what="records in the reopened file")
    assert stat.S_IMODE(live.stat().st_mode) == log_mode()

    # Same with CONFIG SET audit.protocol to the same path instead of SIGHUP.
    os.rename(live, logs / "audit.log.2")
    assert cli(a, "CONFIG", "SET", "audit.protocol", f"file {live}").strip() == "OK"
    wait_until(live.exists, what="a new file after CONFIG SET audit.protocol")
    three = [f"three:{i}" for i in range(100)]
    for k in three:
        c.call("SET", k, "3")
    c.close()
    a.wait_records(lambda rs: sets_of(rs) == three, what="records after CONFIG SET")
    assert a.stop() == 0
    first = read_records(logs / "audit.log.1")
    second = read_records(logs / "audit.log.2")
    third = read_records(live)
    assert sets_of(first) == one and sets_of(second) == two and sets_of(third) == three
    assert_gapless(first + second + third)
    assert third[-1]["command"] == "stop"


def test_full_disk_keeps_records_and_resumes_without_torn_line_or_gap(valkey, start_auditor, tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        live = disk / "audit.log"
        a = file_auditor(start_auditor, valkey, live)
        s = connect(valkey.port)
        early = [f"early:{i}" for i in range(10)]
        send_sets(s, early)
        a.wait_records(lambda rs: sets_of(rs) == early, what="records before the disk fills")
        filler = disk / "filler"
        fill_disk(filler)
        full = [f"full:{i:04d}" for i in range(400)]
        send_sets(s, full, b"z" * 200)  # ~300 KB of records: more than the whole disk

        f = wait_until(lambda: (lambda f: f if int(f["audit_total_errors"]) > 0
                                and f["audit_file_status"] == "error" else None)(info(a)),
                       timeout=15, what="INFO audit to show the write error")
        # Whatever reached the disk is whole lines only.
        data = live.read_bytes()
        assert data.endswith(b"\n")
        parse_lines(data)
        # The operator is told at once, once.
        err = a.stderr_path.read_text()
        assert err.count("(retrying)") == 1 and "No space left on device" in err, err

        filler.unlink()
        recs = a.wait_records(lambda rs: sets_of(rs)[-1:] == [full[-1]], timeout=20,
                              what="writing to resume when space returns")
        s.close()
        assert sets_of(recs) == early + full
        assert_gapless(recs)
        f = wait_until(lambda: (lambda f: f if f["audit_file_status"] == "connected" else None)(info(a)),
                       what="file status back to connected")
        assert "the file sink writes again" in a.stderr_path.read_text()
        assert int(f["audit_total_errors"]) > 0
        assert int(f["audit_lost_queue_overflow"]) == 0 and int(f["audit_lost_ring_buffer_events"]) == 0
        assert a.stop() == 0
        recs = read_records(live)
        assert_gapless(recs)
        assert recs[-1]["command"] == "stop"



def test_bytes_written_in_info_is_the_size_of_the_log(valkey, start_auditor):
    """`audit_bytes_written` adds up every byte of the log, whatever lengths a batch mixes."""
    a = start_auditor(valkey.pid)
    s = connect(valkey.port)
    keys = [f"len:{'x' * (i * 7 % 31)}:{i}" for i in range(50)]
    send_sets(s, keys)
    a.wait_records(lambda rs: sets_of(rs) == keys, what="the 50 SET records")
    size = a.log.stat().st_size
    f = wait_until(lambda: (lambda f: f if int(f["audit_bytes_written"]) == size else None)(info(a)),
                   what=f"audit_bytes_written to reach the log's {size} bytes")
    assert int(f["audit_total_events"]) == len(a.lines())
    s.close()


def test_ring_losses_show_in_info_while_the_sink_is_stuck(valkey, start_auditor, tmp_path):
    """With `overflow block` and a full disk the capture thread waits for room and stops reading
    the ring, which then overflows; INFO audit must show those losses while they happen, not once
    the disk has room again."""
    with small_tmpfs(tmp_path / "disk") as disk:
        live = disk / "audit.log"
        a = file_auditor(start_auditor, valkey, live, "audit.max_queue_size", "65536",
                         extra=("--ring-bytes", "65536"))
        filler = disk / "filler"
        fill_disk(filler)
        conns = overflow_ring(valkey)
        try:
            f = wait_until(lambda: (lambda f: f if int(f["audit_lost_ring_buffer_events"]) > 0
                                    else None)(info(a)),
                           timeout=10, what="INFO audit to count ring losses while the disk is full")
            assert f["audit_file_status"] == "error", f
            assert 0 < int(f["audit_lost_ring_buffer_events"]) <= kernel_ring_drops(a.proc.pid)
            # The ring's fill shows too, although the capture thread is not reading it.
            assert int(f["audit_ring_buffer_used_bytes"]) > 65536 // 2, f
        finally:
            for c in conns:
                c.close()
            filler.unlink()
        assert a.stop() == 0

def test_full_disk_with_overflow_drop_counts_every_dropped_record(valkey, start_auditor, tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        live = disk / "audit.log"
        a = file_auditor(start_auditor, valkey, live, "audit.overflow", "drop", "audit.max_queue_size", "65536")
        s = connect(valkey.port)
        send_sets(s, ["warm"])
        a.wait_records(lambda rs: sets_of(rs) == ["warm"], what="first record")
        filler = disk / "filler"
        fill_disk(filler)
        stuck = [f"stuck:{i:02d}" for i in range(20)]
        send_sets(s, stuck, b"q" * 100)
        wait_until(lambda: info(a)["audit_file_status"] == "error", what="the write error")
        # The sink is stuck on a batch it cannot write: these overflow the queue.
        keys = [f"drop:{i:05d}" for i in range(3000)]
        send_sets(s, keys, b"q" * 100)
        # The loss must show in INFO while it happens, not only once the disk has room again.
        try:
            lost_while_full = wait_until(lambda: int(info(a)["audit_lost_queue_overflow"]), timeout=5,
                                         what="INFO audit_lost_queue_overflow while the disk is full")
        except AssertionError:
            lost_while_full = 0
        filler.unlink()
        recs = a.wait_records(lambda rs: loss_counts(rs, "queue_overflow"), timeout=20,
                              what="an AUDIT_LOSS record for the queue overflow")
        f = wait_until(lambda: (lambda f: f if int(f["audit_queue_bytes"]) == 0 else None)(info(a)),
                       what="the queue to drain")
        s.close()
        assert a.stop() == 0
        recs = read_records(live)
        assert_gapless(recs)  # seq is gapless over what was written
        written = sets_of(recs)
        assert written[:21] == ["warm"] + stuck
        assert written[21:] == [k for k in keys if k in set(written)], "order kept"
        missing = len(keys) - len(written[21:])
        counts = loss_counts(recs, "queue_overflow")
        assert missing > 0
        assert sum(counts) == missing == int(f["audit_lost_queue_overflow"])
        loss = [r for r in recs if r["category"] == "AUDIT_LOSS"]
        assert all(r["command"] == "loss" for r in loss)
        assert lost_while_full > 0, "INFO audit_lost_queue_overflow stayed 0 while records were being dropped"


def test_stop_while_the_disk_is_full_ends_within_a_grace_period(valkey, start_auditor, tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        live = disk / "audit.log"
        a = file_auditor(start_auditor, valkey, live, "audit.max_queue_size", "65536")
        fill_disk(disk / "filler")
        s = connect(valkey.port)
        send_sets(s, [f"unwritable:{i:04d}" for i in range(1000)], b"u" * 100)
        wait_until(lambda: info(a)["audit_file_status"] == "error", what="the write error")
        a.proc.send_signal(signal.SIGTERM)
        try:
            # The sink gives a failing destination a bounded grace period at shutdown (10 s).
            a.proc.wait(25)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM while the disk is full: the auditor did not exit within 25 s")
        finally:
            s.close()
        err = a.stderr_path.read_text()
        assert "giving up" in err and "unwritten records" in err, err
        # The log cannot say what was lost: stderr, the last place left, has the totals.
        assert "auditor: losses (INFO audit" in err and "audit_lost_sink=" in err, err
        data = live.read_bytes()
        assert data == b"" or data.endswith(b"\n")


def test_stop_in_drop_mode_on_a_full_disk_reports_every_drop_before_the_stop_record(
        valkey, start_auditor, tmp_path):
    """QA: records dropped while the disk was full and the stop came had no loss record (the
    queue was over its bound), nor did the stop record always get in: both are forced in at the
    end, and the counts add up to what INFO said."""
    with small_tmpfs(tmp_path / "disk") as disk:
        live = disk / "audit.log"
        a = file_auditor(start_auditor, valkey, live, "audit.overflow", "drop", "audit.max_queue_size", "65536")
        filler = disk / "filler"
        fill_disk(filler)
        s = connect(valkey.port)
        keys = [f"drop:{i:05d}" for i in range(3000)]
        send_sets(s, keys, b"q" * 100)
        s.close()
        wait_until(lambda: (lambda f: f["audit_file_status"] == "error"
                            and int(f["audit_lost_queue_overflow"]) > 0)(info(a)),
                   what="records dropped while the disk is full")
        a.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the stop is under way while the disk is still full
        filler.unlink()
        assert a.proc.wait(30) == 0
        recs = read_records(live)
        assert recs[-1]["command"] == "stop", recs[-1]
        assert_gapless(recs)
        # The run's total, as INFO counted it, is on stderr at exit.
        lost = int(re.search(r"audit_lost_queue_overflow=(\d+)", a.stderr_path.read_text()).group(1))
        # (The client's disconnection record may be among the dropped.)
        missing = len(keys) - len(sets_of(recs)) + (not any(r["command"] == "disconnection" for r in recs))
        assert sum(loss_counts(recs, "queue_overflow")) == lost == missing


def test_stop_ends_even_when_the_sink_write_never_returns(valkey, start_auditor, tmp_path):
    """QA: `file /dev/stdout` into a pipe whose reader stalls blocked the sink's write for good,
    and SIGTERM never ended the auditor."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open, never read
    try:
        a = file_auditor(start_auditor, valkey, fifo, "audit.tcp_timeout_ms", "100")
        s = connect(valkey.port)
        send_sets(s, [f"piped:{i:05d}" for i in range(5000)], b"p" * 100)  # far more than a pipe holds
        s.close()
        a.proc.send_signal(signal.SIGTERM)
        try:
            a.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM with a stalled pipe as the sink: the auditor did not exit within 30 s")
        err = a.stderr_path.read_text()
        assert "giving up at shutdown: the sink wrote nothing for" in err, err
        assert "audit_lost_sink=" in err, err
    finally:
        os.close(reader)


# ---------------------------------------------------------------------------------------------------
# syslog: a real rsyslogd


def _listening(proto, port):
    """Whether a socket of /proc/net/<proto> is bound to 127.0.0.1:port (and listening, for tcp)."""
    want = f"0100007F:{port:04X}"
    try:
        lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if fields[1] == want and (proto != "tcp" or fields[3] == "0A"):
            return True
    return False


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rsyslog:
    """rsyslogd in the foreground with its own config: imudp and imtcp on free loopback ports, and
    imuxsock creating /dev/log when `local`. Each input writes to its own file with a template that
    shows facility, severity, tag, pid and message."""

    TEMPLATE = "%syslogfacility-text%.%syslogseverity-text% %programname%[%procid%] %msg%\\n"

    def __init__(self, directory, local):
        self.dir = directory
        self.dir.mkdir()
        self.local = local
        self.udp = free_udp_port()
        self.tcp = free_port()
        conf = self.dir / "rsyslog.conf"
        local_part = ""
        if local:
            local_part = (
                'module(load="imuxsock" SysSock.Name="/dev/log" SysSock.RateLimit.Interval="0")\n'
                f'if $inputname == "imuxsock" then {{ action(type="omfile" file="{self.dir}/local.log" '
                'template="t") }\n')
        conf.write_text(
            f'global(workDirectory="{self.dir}")\n'
            'module(load="imudp")\n'
            'module(load="imtcp")\n'
            f'template(name="t" type="string" string="{self.TEMPLATE}")\n'
            f'ruleset(name="r_udp") {{ action(type="omfile" file="{self.dir}/udp.log" template="t") }}\n'
            f'ruleset(name="r_tcp") {{ action(type="omfile" file="{self.dir}/tcp.log" template="t") }}\n'
            f'input(type="imudp" address="127.0.0.1" port="{self.udp}" ruleset="r_udp" rcvbufSize="4m")\n'
            f'input(type="imtcp" address="127.0.0.1" port="{self.tcp}" ruleset="r_tcp")\n'
            + local_part)
        self.log = open(self.dir / "rsyslogd.out", "wb")
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._ready, timeout=15, what="rsyslogd to listen")

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"rsyslogd exited: {(self.dir / 'rsyslogd.out').read_text()}")
        return (_listening("udp", self.udp) and _listening("tcp", self.tcp)
                and (not self.local or os.path.exists("/dev/log")))

    def messages(self, name, pid):
        """(facility.severity, record) of the auditor's messages in <name>.log."""
        path = self.dir / f"{name}.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_bytes().split(b"\n")[:-1]:
            head, _, msg = line.decode().partition(" ")
            tag, _, msg = msg.partition(" ")
            if tag != f"valkey-audit[{pid}]":
                continue
            out.append((head, json.loads(msg.strip())))
        return out

    def stop(self):
        terminate(self.proc)
        self.log.close()
        if self.local and os.path.exists("/dev/log"):
            os.unlink("/dev/log")


def test_rsyslog_receives_every_record_in_order_with_facility(valkey, start_auditor, tmp_path):
    # /dev/log is created by our rsyslogd when nothing provides it; if another daemon owns it, only
    # the remote targets are tested (its messages would not reach our files).
    local = not os.path.exists("/dev/log")
    rs = Rsyslog(tmp_path / "rsyslog", local)
    try:
        phases = [
            ("udp", "syslog local4", f"udp://127.0.0.1:{rs.udp}", "rfc3164", "local4"),
            ("tcp", "syslog local5", f"tcp://127.0.0.1:{rs.tcp}", "rfc5424", "local5"),
        ]
        if local:
            phases.insert(0, ("local", "syslog local3", "local", "rfc3164", "local3"))
        name, protocol, target, fmt, _ = phases[0]
        a = start_auditor(valkey.pid, settings=("audit.protocol", protocol, "audit.syslog_target", target,
                                                "audit.syslog_format", fmt))
        for i, (name, protocol, target, fmt, facility) in enumerate(phases):
            if i:
                assert cli(a, "CONFIG", "SET", "audit.protocol", protocol, "audit.syslog_target", target,
                           "audit.syslog_format", fmt).strip() == "OK"
            s = connect(valkey.port)
            keys = [f"{name}:{j:03d}" for j in range(300)]
            send_sets(s, keys)
            s.close()
            msgs = wait_until(lambda: (lambda m: m if sets_of([r for _, r in m]) == keys else None)(
                rs.messages(name, a.proc.pid)), timeout=15, what=f"rsyslog to receive the {name} records")
            assert info(a)["audit_syslog_status"] == "connected"
        assert a.stop() == 0
        wait_until(lambda: any(r["command"] == "stop" for _, r in rs.messages(phases[-1][0], a.proc.pid)),
                   timeout=15, what="the stop record")
        union = []
        for name, _, _, _, facility in phases:
            msgs = rs.messages(name, a.proc.pid)
            assert msgs, name
            assert {h for h, _ in msgs} == {f"{facility}.notice"}, name
            seqs = [r["seq"] for _, r in msgs]
            assert seqs == sorted(set(seqs)), f"{name}: out of order or duplicated"
            union += [r for _, r in msgs]
        union.sort(key=lambda r: r["seq"])
        assert_gapless(union)
        assert union[0]["command"] == "start" and union[-1]["command"] == "stop"
    finally:
        rs.stop()



def test_syslog_tcp_server_down_at_start_gets_every_record_once_it_is_up(valkey, start_auditor):
    """A remote syslog server that is down when the auditor starts (restarting, not up yet) does
    not leave the server unaudited: the auditor runs, records wait, and all arrive in order."""
    port = free_port()
    a = start_auditor(valkey.pid, settings=("audit.protocol", "syslog local5",
                                            "audit.syslog_target", f"tcp://127.0.0.1:{port}"))
    assert "records wait in the queue until it answers" in a.stderr_path.read_text()
    keys = [f"down-at-start:{i}" for i in range(50)]
    c = Raw(valkey.port)
    for k in keys:
        c.call("SET", k, "1")
    c.close()
    assert info(a)["audit_syslog_status"] == "error"
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(15)
    conn, _ = server.accept()
    conn.settimeout(1)
    data = b""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        recs = [json.loads(l[l.index(b"{"):]) for l in data.split(b"\n")[:-1]]
        if sets_of(recs) == keys:
            break
        try:
            chunk = conn.recv(1 << 16)
        except socket.timeout:
            continue
        if not chunk:
            break
        data += chunk
    assert sets_of(recs) == keys, sets_of(recs)
    assert recs[0]["command"] == "start"
    assert_gapless(recs)
    conn.close()
    server.close()


def test_syslog_tcp_reconnect_on_sighup_sends_nothing_twice(valkey, start_auditor):
    """SIGHUP (logrotate's postrotate) reconnects to a TCP syslog server: what the old connection's
    server had acknowledged was sent again on the new one (QA: 17 duplicates in 10 SIGHUPs)."""
    col = Collector()
    col.start()
    a = start_auditor(valkey.pid, settings=("audit.protocol", "syslog local5",
                                            "audit.syslog_target", f"tcp://127.0.0.1:{col.port}"))
    keys = []
    stop = threading.Event()

    def traffic():
        c = connect(valkey.port)
        while not stop.is_set():
            key = f"hup:{len(keys):05d}"
            send_sets(c, [key])
            keys.append(key)
            time.sleep(0.001)
        c.close()
    t = threading.Thread(target=traffic)
    t.start()
    try:
        for _ in range(8):
            time.sleep(0.3)
            os.kill(a.proc.pid, signal.SIGHUP)
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(30)

    def received():
        with col.lock:
            data = b"".join(bytes(b) for b in col.buffers)
        return [json.loads(l[l.index(b"{"):]) for l in data.split(b"\n") if b"{" in l]
    assert a.stop() == 0
    recs = wait_until(lambda: (lambda rs: rs if rs and rs[-1]["command"] == "stop" else None)(
        received()), timeout=20, what="the stop record at the syslog server")
    assert set(keys) <= set(sets_of(recs))
    seqs = [r["seq"] for r in recs]
    assert len(seqs) == len(set(seqs)), sorted(q for q in set(seqs) if seqs.count(q) > 1)
    assert len(col.buffers) > 1, "the SIGHUPs reconnected"
    col.kill()


def test_syslog_tcp_server_that_stalls_gets_no_cut_message(valkey, start_auditor):
    """A syslog server that stops reading: a send timed out midway through a message, the
    connection was reset and the message sent again whole on the next, and the server logged the
    cut prefix as a message of its own (QA, with rsyslog). The rest of a cut message now follows on
    the same connection."""
    port = free_port()
    listener = socket.socket()
    # Small buffers, so that a pause fills them and the auditor's sends time out.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    reading = threading.Event()
    reading.set()
    buffers = []
    done = threading.Event()

    def serve():
        listener.settimeout(0.1)
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            buf = bytearray()
            buffers.append(buf)
            threading.Thread(target=read, args=(conn, buf), daemon=True).start()

    def read(conn, buf):
        conn.settimeout(0.1)
        while not done.is_set():
            if not reading.is_set():
                time.sleep(0.01)
                continue
            try:
                chunk = conn.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            buf.extend(chunk)
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    a = start_auditor(valkey.pid, settings=("audit.protocol", "syslog local5",
                                            "audit.syslog_target", f"tcp://127.0.0.1:{port}",
                                            "audit.payload_maxsize", "5000"))
    stop = threading.Event()

    def traffic():
        c = connect(valkey.port)
        i = 0
        while not stop.is_set():
            send_sets(c, [f"stall:{i:06d}"], b"x" * 2000)
            i += 1
        c.close()
    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(0.5)
        reading.clear()  # the server stops reading for longer than the 2 s send timeout
        wait_until(lambda: "syslog: sending to" in a.stderr_path.read_text(), timeout=20,
                   what="a send to time out")
        time.sleep(1)
        reading.set()
        time.sleep(1)
    finally:
        stop.set()
        t.join(30)
    assert a.stop() == 0

    def whole():
        data = [bytes(b) for b in buffers]
        return data if data and data[-1].rstrip().endswith(b'"stop"}') or any(
            b'"command":"stop"' in d for d in data) else None
    data = wait_until(whole, timeout=30, what="the stop record at the syslog server")
    done.set()
    listener.close()
    seqs = []
    for d in data:
        assert d == b"" or d.endswith(b"\n"), f"a connection ended inside a message: {d[-80:]!r}"
        for line in d.split(b"\n")[:-1]:
            seqs.append(json.loads(line[line.index(b"{"):])["seq"])
    assert sorted(seqs) == list(range(1, max(seqs) + 1)), "each record once"


def test_udp_syslog_receiver_down_is_seen_and_its_losses_counted(valkey, start_auditor):
    """A UDP syslog receiver that goes away answers with ICMP port unreachable: the sink sees it,
    the records wait in the queue, and the datagrams refused are counted (syslog_refused), instead
    of every record of the outage vanishing without a word."""
    def listen(port=0):
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        r.bind(("127.0.0.1", port))
        r.settimeout(0.1)
        return r
    receiver = listen()
    port = receiver.getsockname()[1]
    a = start_auditor(valkey.pid, settings=("audit.protocol", "syslog local3", "audit.syslog_target",
                                            f"udp://127.0.0.1:{port}"))
    received = []

    def drain(r):
        while True:
            try:
                message = r.recv(1 << 17)
            except socket.timeout:
                return
            received.append(json.loads(message.partition(b"]: ")[2]))
    c = Raw(valkey.port)
    c.call("SET", "before", "v")
    wait_until(lambda: drain(receiver) or any(r["keys"] == ["before"] for r in received),
               what="a record before the outage")
    receiver.close()
    keys = [f"down:{i:04d}" for i in range(1500)]
    for k in keys:
        c.call("SET", k, "v")
    wait_until(lambda: info(a)["audit_syslog_status"] == "error", timeout=10,
               what="the sink to see the receiver gone")
    receiver = listen(port)
    try:
        c.call("SET", "after", "v")
        wait_until(lambda: drain(receiver) or any(r["keys"] == ["after"] for r in received),
                   timeout=20, what="records to flow again once the receiver is back")
        wait_until(lambda: drain(receiver) or loss_counts(received, "syslog_refused"), timeout=10,
                   what="an AUDIT_LOSS syslog_refused record")
    finally:
        receiver.close()
        c.close()
    got = {r["keys"][0] for r in received if r["command"] == "set"}
    missing = [k for k in keys if k not in got]
    refused = sum(loss_counts(received, "syslog_refused"))
    # Only datagrams in flight when the port closed are gone, each refusal counted at least once.
    assert 1 <= refused and len(missing) < 100, (refused, len(missing))
    assert int(info(a)["audit_lost_sink"]) >= refused

def test_udp_syslog_record_longer_than_a_datagram_is_a_counted_loss_not_a_torn_message(valkey, start_auditor):
    """An MSET of 100 keys of 1 KB makes a JSON record of ~100 KB, more than one UDP datagram carries
    (65,507 bytes): it must not arrive cut (invalid JSON), nor vanish uncounted."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(0.1)
    a = start_auditor(valkey.pid, settings=("audit.protocol", "syslog local3", "audit.syslog_target",
                                            f"udp://127.0.0.1:{receiver.getsockname()[1]}"))
    received = []

    def receive(until):
        def done():
            while True:
                try:
                    message = receiver.recv(1 << 17)
                except socket.timeout:
                    break
                assert message.startswith(b"<157>"), message[:40]  # local3.notice
                head, sep, record = message.partition(b"]: ")
                assert sep and head.endswith(f" valkey-audit[{a.proc.pid}".encode()), message[:80]
                received.append(json.loads(record))  # a torn record fails here
            return until(received)
        return done

    s = connect(valkey.port)
    fits = [f"fit{i:02d}".ljust(1000, "k") for i in range(50)]  # ~52 KB: one datagram
    too_long = [f"big{i:03d}".ljust(1000, "k") for i in range(100)]
    for keys in (fits, too_long):
        s.sendall(resp("MSET", *[w for k in keys for w in (k, "v")]))
        assert s.recv(16) == b"+OK\r\n"
    s.sendall(resp("ECHO", "after-the-long-one"))
    assert s.recv(64) == b"$18\r\nafter-the-long-one\r\n"
    s.close()
    wait_until(receive(lambda rs: loss_counts(rs, "record_too_long")
                       and any(r["command_args"] == "arg1=after-the-long-one" for r in rs)),
               timeout=15, what="the records after the long one and the AUDIT_LOSS record")
    receiver.close()

    msets = [r for r in received if r["command"] == "mset"]
    assert [r["keys"] for r in msets] == [fits], "the 50-key record arrives whole, the 100-key one not at all"
    assert loss_counts(received, "record_too_long") == [1]
    loss = next(r for r in received if r["category"] == "AUDIT_LOSS")
    assert int(re.search(r"\bbytes=(\d+)", loss["command_args"]).group(1)) > 100_000
    assert info(a)["audit_lost_sink"] == "1"
    assert info(a)["audit_syslog_status"] == "connected"
    # seq: the one record not sent is the only gap.
    seqs = sorted(r["seq"] for r in received)
    missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
    assert len(missing) == 1 and msets[0]["seq"] < missing[0] < loss["seq"], (missing, seqs)


# ---------------------------------------------------------------------------------------------------
# TCP collector


class Collector:
    """A TCP collector: accepts connections and keeps the bytes each one received. `kill()` makes it
    go away (listener closed, connections closed after reading what its kernel already took in),
    `start()` listens again on the same port."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.lock = threading.Lock()
        self.buffers = []
        self.listener = None
        self.accepting = None
        self.threads = []
        self.socks = []

    def start(self):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.05)
        self.listener = listener
        self.accepting = threading.Event()
        self.accepting.set()
        t = threading.Thread(target=self._accept, args=(listener, self.accepting), daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self, listener, accepting):
        while accepting.is_set():
            try:
                s, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            s.settimeout(None)
            buf = bytearray()
            with self.lock:
                self.buffers.append(buf)
                self.socks.append(s)
            t = threading.Thread(target=self._read, args=(s, buf), daemon=True)
            t.start()
            self.threads.append(t)
        listener.close()

    def _read(self, s, buf):
        while True:
            try:
                chunk = s.recv(1 << 20)
            except OSError:
                break
            if not chunk:
                break
            with self.lock:
                buf.extend(chunk)
        s.close()

    def kill(self):
        self.accepting.clear()
        for t in self.threads[:1]:
            t.join(5)
        self.threads = self.threads[1:]
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
        # The readers end when the auditor closes its side; what reached this host is read.
        for t in self.threads:
            t.join(10)
        self.threads = []

    def records(self):
        """Records of every connection, in accept order; a line cut by a closed connection (no
        newline) is not a record."""
        with self.lock:
            chunks = [bytes(b) for b in self.buffers]
        out = []
        for data in chunks:
            out += parse_lines(data)[0]
        return out

    def close(self):
        if self.accepting is not None:
            self.accepting.clear()
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def test_tcp_collector_killed_for_10s_gets_every_record_once_in_order(valkey, start_auditor, tmp_path):
    col = Collector()
    col.start()
    try:
        a = start_auditor(valkey.pid, settings=(
            "audit.protocol", f"tcp 127.0.0.1:{col.port}", "audit.tcp_retry_interval_ms", "200",
            "audit.tcp_timeout_ms", "2000", "audit.spool_dir", str(tmp_path)))
        wait_until(lambda: any(r["command"] == "start" for r in col.records()), what="start record")

        n_batches, per_batch = 100, 500
        conns = [connect(valkey.port), connect(valkey.port)]
        keys = [[f"tcp:{b:03d}:{i:03d}" for i in range(per_batch)] for b in range(n_batches)]
        done = []
        failure = []

        def traffic():
            try:
                t0 = time.monotonic()
                for b in range(n_batches):
                    # Paced over ~15 s, so that commands run all through the outage.
                    delay = t0 + b * 0.15 - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    send_sets(conns[b % 2], keys[b])
                    done.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                failure.append(e)
        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        wait_until(lambda: len(done) >= 12 or failure, timeout=30, what="traffic to start")
        col.kill()
        killed_at, during_before = time.monotonic(), len(done)
        time.sleep(10)  # the collector stays away for 10 s while commands go on
        during = len(done) - during_before
        assert a.proc.poll() is None
        assert info(a)["audit_tcp_status"] != "connected"
        col.start()
        restarted_at = time.monotonic()
        t.join(60)
        assert not failure, failure
        assert len(done) == n_batches
        assert during >= 50, f"only {during} batches ran while the collector was away"
        assert restarted_at - killed_at >= 10
        for c in conns:
            c.close()
        expected = [k for batch in keys for k in batch]
        wait_until(lambda: len(sets_of(col.records())) >= len(expected), timeout=90,
                   what="the collector to receive every SET record")
        assert a.stop() == 0
        recs = wait_until(lambda: (lambda r: r if r and r[-1]["command"] == "stop" else None)(col.records()),
                          timeout=15, what="the stop record")
    finally:
        col.close()
    seqs = [r["seq"] for r in recs]
    assert len(seqs) == len(set(seqs)), f"{len(seqs) - len(set(seqs))} records received twice"
    assert_gapless(recs)
    got = sets_of(recs)
    assert sorted(got) == sorted(expected)
    # Per connection, in the order the commands ran.
    for parity in (0, 1):
        mine = [k for k in got if int(k.split(":")[1]) % 2 == parity]
        assert mine == [k for b in range(parity, n_batches, 2) for k in keys[b]]
    assert not [r for r in recs if r["category"] == "AUDIT_LOSS"]



def test_tcp_records_that_fit_neither_collector_nor_spool_at_stop_are_reported(valkey, start_auditor,
                                                                                tmp_path):
    """A collector that accepts and never reads; at SIGTERM the backlog goes to the spool as far as
    it has room, and what is left over is said on stderr, never dropped without a word."""
    spool = tmp_path / "spool"
    spool.mkdir()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # accepted by the kernel, never read
    port = listener.getsockname()[1]
    try:
        a = start_auditor(valkey.pid, settings=(
            "audit.protocol", f"tcp 127.0.0.1:{port}", "audit.tcp_timeout_ms", "1000",
            "audit.spool_dir", str(spool), "audit.spool_max_size", "100000"))
        s = connect(valkey.port)
        keys = [f"stuck:{i:05d}" for i in range(6000)]
        send_sets(s, keys, b"s" * 200)  # ~2.5 MB of records, far more than the socket buffers
        wait_until(lambda: int(info(a)["audit_events_key_op"]) >= len(keys), timeout=30,
                   what="the sink to take every record")
        s.close()
        assert a.stop() == 0
        err = a.stderr_path.read_text()
        m = re.search(r"at shutdown: tcp 127\.0\.0\.1:\d+: backlog not delivered within 1000 ms; "
                      r"\d+ bytes kept in \S+; (\d+) records \((\d+) bytes\) only in memory", err)
        assert m and int(m.group(1)) > 1000, err
    finally:
        listener.close()

def test_an_unusable_spool_directory_is_said(valkey, start_auditor, tmp_path):
    """QA: the unit's sandbox left the default spool directory read-only, and while the collector
    was away everything past the memory queue was dropped (counted) without a word about why."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    col = Collector()  # away
    a = start_auditor(valkey.pid, settings=(
        "audit.protocol", f"tcp 127.0.0.1:{col.port}", "audit.tcp_retry_interval_ms", "200",
        "audit.spool_dir", str(blocker / "spool"), "audit.max_queue_size", "65536"))
    try:
        s = connect(valkey.port)
        send_sets(s, [f"nospool:{i:05d}" for i in range(2000)], b"s" * 100)
        wait_until(lambda: "TCP sink: spool" in a.stderr_path.read_text(), timeout=30,
                   what="the auditor to say the spool cannot be used")
        said = a.stderr_path.read_text()
        assert str(blocker / "spool") in said and "dropped" in said, said
        s.close()
    finally:
        col.close()


def test_tcp_spool_overflow_loss_count_is_exact(valkey, start_auditor, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    col = Collector()  # not listening yet: the collector is away from the start
    spool_max = 200000
    # The collector named by tcp_host / tcp_port this time.
    a = start_auditor(valkey.pid, settings=(
        "audit.protocol", "tcp", "audit.tcp_host", "127.0.0.1", "audit.tcp_port", str(col.port),
        "audit.tcp_retry_interval_ms", "200",
        "audit.tcp_timeout_ms", "2000", "audit.spool_dir", str(spool), "audit.spool_max_size", str(spool_max),
        "audit.max_queue_size", "65536"))
    try:
        s = connect(valkey.port)
        keys = [f"spool:{i:05d}" for i in range(4000)]
        send_sets(s, keys, b"s" * 100)  # ~2 MB of records: far more than memory + spool
        # Every SET record has reached the sink (it counts what it took, kept or not).
        wait_until(lambda: int(info(a)["audit_events_key_op"]) >= len(keys), timeout=30,
                   what="the sink to take every record")
        spooled = list(spool.iterdir())
        assert len(spooled) == 1 and spool_max // 2 < spooled[0].stat().st_size <= spool_max + 256, spooled
        assert info(a)["audit_tcp_status"] != "connected"
        # What waits for the collector shows (memory and spool), beside what the sink took.
        wait_until(lambda: int(info(a)["audit_sink_backlog_bytes"]) >= spooled[0].stat().st_size,
                   what="INFO audit to show the backlog")

        col.start()
        wait_until(lambda: loss_counts(col.records(), "sink_overflow"), timeout=30,
                   what="the backlog and an AUDIT_LOSS sink_overflow record to reach the collector")
        s.sendall(resp("ECHO", "back"))
        wait_until(lambda: any(r["command"] == "echo" for r in col.records()), timeout=10,
                   what="a new record after the backlog")
        lost_sink = int(info(a)["audit_lost_sink"])
        s.close()
        assert a.stop() == 0
        recs = wait_until(lambda: (lambda r: r if r and r[-1]["command"] == "stop" else None)(col.records()),
                          timeout=15, what="the stop record")
    finally:
        col.close()
    seqs = [r["seq"] for r in recs]
    assert seqs == sorted(set(seqs)), "in order, no duplicates"
    missing = set(range(1, seqs[-1] + 1)) - set(seqs)
    counts = loss_counts(recs, "sink_overflow")
    assert missing, "the spool was supposed to overflow"
    assert sum(counts) == len(missing) == lost_sink, (counts, len(missing), lost_sink)
    got = sets_of(recs)
    # Drop newest: what was kept is the oldest records, memory then spool, with nothing missing among
    # them; the spool really held records (more than memory alone could).
    assert got == keys[:len(got)]
    kept_bytes = sum(len(json.dumps(r, separators=(",", ":"))) + 1 for r in recs if r["command"] == "set")
    assert kept_bytes > 65536 + spool_max // 2, kept_bytes


@pytest.mark.parametrize("spool_max", ["1000000", "0"])
def test_switching_away_from_a_tcp_sink_hands_its_backlog_to_the_new_one(
        valkey, start_auditor, tmp_path, spool_max):
    """What a TCP sink took and its collector never had (memory and spool) was dropped, unreported,
    when CONFIG SET audit.protocol switched to a file (QA). Now the new sink takes it first, in
    order, and what the old one had lost is reported there."""
    spool = tmp_path / "spool"
    spool.mkdir()
    col = Collector()  # never listening
    a = start_auditor(valkey.pid, settings=(
        "audit.protocol", f"tcp 127.0.0.1:{col.port}", "audit.tcp_retry_interval_ms", "200",
        "audit.tcp_timeout_ms", "1000", "audit.spool_dir", str(spool),
        "audit.spool_max_size", spool_max, "audit.max_queue_size", "65536"))
    s = connect(valkey.port)
    keys = [f"handover:{i:04d}" for i in range(1500)]
    send_sets(s, keys, b"h" * 100)  # ~500 KB of records: more than memory alone holds
    wait_until(lambda: int(info(a)["audit_events_key_op"]) >= len(keys), timeout=30,
               what="the TCP sink to take every record")
    assert int(info(a)["audit_sink_backlog_bytes"]) > 0
    new_log = tmp_path / "after-switch.log"
    assert cli(a, "CONFIG", "SET", "audit.protocol", f"file {new_log}").strip() == "OK"
    s.sendall(resp("SET", "after:switch", "1"))
    assert s.recv(100) == b"+OK\r\n"
    recs = wait_until(lambda: (lambda rs: rs if "after:switch" in sets_of(rs) else None)(
        read_records(new_log) if new_log.exists() else []), timeout=20,
        what="the record after the switch")
    s.close()
    seqs = [r["seq"] for r in recs]
    assert seqs == sorted(set(seqs)), "in order, no duplicates"
    missing = set(range(1, seqs[-1] + 1)) - set(seqs)
    lost = sum(loss_counts(recs, "sink_overflow"))
    assert lost == len(missing), (lost, len(missing))
    if spool_max == "0":
        assert missing, "memory alone was to overflow"
    else:
        assert not missing
        assert sets_of(recs) == [*keys, "after:switch"]
    # Nothing waits for the old collector any more.
    assert list(spool.iterdir()) == []
    assert int(info(a)["audit_sink_backlog_bytes"]) == 0
    col.close()
    assert a.stop() == 0


def test_switching_away_from_a_stalled_syslog_tcp_server_loses_and_repeats_nothing(
        valkey, start_auditor, tmp_path):
    """QA: switching audit.protocol away from a syslog server that had stopped reading dropped,
    uncounted, every message its TCP stack had not acknowledged, and wrote the batch in flight
    again whole (records in both places). Now the old connection is reset, what it had not
    acknowledged goes to the new sink, and the batch resumes where the old sink stopped."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    a = start_auditor(valkey.pid, settings=(
        "audit.protocol", "syslog local3", "audit.syslog_target", f"tcp://127.0.0.1:{port}",
        "audit.payload_maxsize", "20000"))
    stalled, _ = listener.accept()  # and never read until the switch
    s = connect(valkey.port)
    keys = [f"stall:{i:04d}" for i in range(400)]
    send_sets(s, keys, b"p" * 20000)  # ~8 MB of records: far more than the sockets hold
    wait_until(lambda: info(a)["audit_syslog_status"] == "error", timeout=30,
               what="the syslog sink to find its server stalled")
    new_log = tmp_path / "after-switch.log"
    assert cli(a, "CONFIG", "SET", "audit.protocol", f"file {new_log}").strip() == "OK"
    s.sendall(resp("SET", "after:switch", "1"))
    assert s.recv(100) == b"+OK\r\n"
    s.close()
    # (Read while the sink writes: a batch of 20 KB records may be half in the file.)
    wait_until(lambda: "after:switch" in sets_of(parse_lines(read_or_empty(new_log))[0]),
               timeout=30, what="the record after the switch")
    # What the old server got: whole messages, then at most one cut by the reset.
    stalled.settimeout(10)
    data = bytearray()
    while True:
        try:
            chunk = stalled.recv(1 << 20)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    stalled.close()
    listener.close()
    assert a.stop() == 0
    recs = read_records(new_log)
    old = sets_of([json.loads(line.split(b"]: ", 1)[1])
                   for line in bytes(data).split(b"\n")[:-1]])
    new = sets_of(recs)
    seqs = [r["seq"] for r in recs]
    assert seqs == sorted(set(seqs)), "in order, no duplicates"
    assert not set(old) & set(new), sorted(set(old) & set(new))[:5]
    assert sorted(set(old) | set(new)) == sorted([*keys, "after:switch"])
    assert old == keys[:len(old)] and len(old) < len(keys)
    assert not [r for r in recs if r["category"] == "AUDIT_LOSS"]


def test_tcp_sink_loss_shows_in_info_while_the_collector_is_away(valkey, start_auditor, tmp_path):
    col = Collector()  # never listening
    a = start_auditor(valkey.pid, settings=(
        "audit.protocol", f"tcp 127.0.0.1:{col.port}", "audit.tcp_retry_interval_ms", "200",
        "audit.tcp_timeout_ms", "1000", "audit.spool_dir", str(tmp_path), "audit.spool_max_size", "0",
        "audit.max_queue_size", "65536"))
    s = connect(valkey.port)
    send_sets(s, [f"away:{i:04d}" for i in range(2000)], b"a" * 100)  # far more than 64 KiB
    s.close()
    wait_until(lambda: int(info(a)["audit_events_key_op"]) >= 2000, timeout=30,
               what="the sink to take every record")
    # The records are gone for good (no spool): INFO must say so now, not when the collector returns.
    wait_until(lambda: int(info(a)["audit_lost_sink"]) > 0, timeout=5,
               what="INFO audit_lost_sink while the collector is away")


# ---------------------------------------------------------------------------------------------------
# kernel ring buffer overflow


_libc = ctypes.CDLL(None, use_errno=True)
_NR_BPF = 321  # x86_64
_BPF_MAP_LOOKUP_ELEM, _BPF_MAP_GET_FD_BY_ID = 1, 14


def _bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    fd = _libc.syscall(_NR_BPF, cmd, buf, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"bpf({cmd})")
    return fd


def kernel_ring_drops(auditor_pid):
    """The kernel's own count of ring-buffer records it could not write, read from the auditor's
    per-CPU STATS map (index 0), independently of the auditor."""
    if platform.machine() != "x86_64":
        pytest.skip("bpf(2) syscall number known for x86_64 only")
    ids = []
    for fdinfo in Path(f"/proc/{auditor_pid}/fdinfo").iterdir():
        try:
            fields = dict(l.split(":", 1) for l in fdinfo.read_text().splitlines() if ":" in l)
        except OSError:
            continue
        shape = tuple(fields.get(k, "").strip() for k in ("map_type", "key_size", "value_size", "max_entries"))
        if shape == ("6", "4", "8", "5"):  # PERCPU_ARRAY<u32, u64>[STAT_LEN]
            ids.append(int(fields["map_id"]))
    assert len(set(ids)) == 1, f"STATS map not found unambiguously: {ids}"
    fd = _bpf(_BPF_MAP_GET_FD_BY_ID, struct.pack("<III", ids[0], 0, 0))
    try:
        lo, _, hi = Path("/sys/devices/system/cpu/possible").read_text().strip().rpartition("-")
        ncpu = int(hi) + 1
        key = ctypes.c_uint32(0)
        values = (ctypes.c_uint64 * ncpu)()
        _bpf(_BPF_MAP_LOOKUP_ELEM, struct.pack("<IIQQQ", fd, 0, ctypes.addressof(key),
                                               ctypes.addressof(values), 0))
        return sum(values)
    finally:
        os.close(fd)


def overflow_ring(valkey):
    """Two connections pipelining 150 SETs of 60 KB each: far more than a 64 KiB ring can take."""
    value = b"r" * 60000
    conns = [connect(valkey.port) for _ in range(2)]
    errors = []

    def run(c, j):
        try:
            send_sets(c, [f"ring:{j}:{i}" for i in range(150)], value)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(c, j)) for j, c in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads), errors
    return conns


def test_ring_buffer_overflow_loss_record_has_the_kernel_count(valkey, start_auditor):
    a = start_auditor(valkey.pid, extra=("--ring-bytes", "65536"))
    conns = overflow_ring(valkey)
    for c in conns:
        c.close()
    # Nothing runs on the server any more, so the kernel's count no longer moves; the auditor reports
    # it every 100 ms. Wait until the loss records, INFO and the kernel agree, and stay so.
    agreed = []
    last = {}

    def agree():
        kernel = kernel_ring_drops(a.proc.pid)
        recs = a.records()
        logged = sum(loss_counts(recs, "ring_buffer_full"))
        shown = int(info(a)["audit_lost_ring_buffer_events"])
        last.update(kernel=kernel, logged=logged, shown=shown)
        if not (kernel > 0 and logged == shown == kernel):
            agreed.clear()
            return None
        agreed.append(time.monotonic())
        return recs if agreed[-1] - agreed[0] >= 0.3 else None  # unchanged over 3 report periods
    try:
        recs = wait_until(agree, timeout=20, interval=0.05,
                          what="AUDIT_LOSS records and INFO to match the kernel's drop count")
    except AssertionError as e:
        raise AssertionError(f"{e}; last seen: {last}") from None
    kernel = kernel_ring_drops(a.proc.pid)
    assert sum(loss_counts(recs, "ring_buffer_full")) == kernel > 0
    loss = [r for r in recs if "cause=ring_buffer_full" in r["command_args"]]
    assert all(r["category"] == "AUDIT_LOSS" and r["command"] == "loss" for r in loss)
    assert all(re.search(r"\bbytes=\d+", r["command_args"]) for r in loss)
    assert_gapless(recs)


def test_ring_buffer_loss_just_before_stop_is_recorded(valkey, start_auditor):
    a = start_auditor(valkey.pid, extra=("--ring-bytes", "65536"))
    conns = overflow_ring(valkey)
    # Every reply is in: nothing more runs on the server, so the kernel's count is final. Stop at
    # once, before the auditor's next periodic look at the counter.
    kernel = kernel_ring_drops(a.proc.pid)
    assert kernel > 0, "the ring did not overflow"
    assert a.stop() == 0
    for c in conns:
        c.close()
    recs = read_records(a.log)
    assert recs[-1]["command"] == "stop"
    assert sum(loss_counts(recs, "ring_buffer_full")) == kernel


@pytest.mark.parametrize("family", ["tcp", "unix"])
@pytest.mark.parametrize("mode", ["sockets", "syscalls"])
def test_a_connection_whose_report_the_full_ring_dropped_is_audited_from_its_next_command(
        valkey, start_auditor, mode, family):
    """A connection accepted while the ring is full has no connection record in user space. The
    kernel kept capturing its socket all the same, and user space dropped every command of it
    unseen (QA; in syscalls mode, once the fd held another connection, they were written as that
    one's). Now its socket leaves the kernel's table when its report is lost; with socket
    tracepoints its next read registers it again, with syscall tracepoints user space finds it
    after the ring's losses (the client sockets the kernel does not know): audited from there, as
    itself, like a connection open at attach: what it sent meanwhile (an AUTH perhaps) is in the
    loss, so its user is unknown. (QA: a unix-socket one was taken for the server's own socket.)"""
    a = start_auditor(valkey.pid, extra=("--ring-bytes", "32768", "--capture", mode))
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        # Small records until the ring is full to the last few bytes.
        filler = connect(valkey.port)
        for i in range(2000):
            send_sets(filler, [f"fill:{i}"])
            if i % 50 == 49 and kernel_ring_drops(a.proc.pid) > 20:
                break
        assert kernel_ring_drops(a.proc.pid) > 20
        if family == "tcp":
            late = connect(valkey.port)
            port = late.getsockname()[1]

            def mine(r):
                return r["client_port"] == port
        else:
            late = socket.socket(socket.AF_UNIX)
            late.connect(valkey.sock)

            def mine(r):
                return r["client_ip"] == valkey.sock
        # Answered while the ring is still full: the server accepted it by then.
        late.sendall(resp("PING"))
        late.settimeout(10)
        assert late.recv(100) == b"+PONG\r\n"
        dropped_while_stopped = kernel_ring_drops(a.proc.pid)
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    if mode == "syscalls":
        # Until user space finds it (after the ring's losses are reported), what it sends is not
        # captured: counted as ring loss (QA: neither recorded nor counted).
        sent = 0
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            send_sets(late, [f"window:{sent}"])
            sent += 1
        a.wait_records(lambda rs: any(r["command"] == "connection" and mine(r) for r in rs),
                       what="the late connection found")
        # Everything sent before this one is in the log by the time it is.
        send_sets(late, ["window:end"])
        recs = a.wait_records(lambda rs: any(r["keys"] == ["window:end"] for r in rs),
                              what="the SET after the window")
        recorded = sum(1 for r in recs if r["keys"] and r["keys"][0].startswith("window:")) - 1
        uncaptured = sent - recorded
        # Request and reply of each, but around the moment it was found: the command in flight
        # then may have had its request dropped and its reply captured (counted as a command not
        # captured), and the one before it its reply dropped after its request was (CI: 5,486
        # drops for 2,744 commands).
        assert kernel_ring_drops(a.proc.pid) - dropped_while_stopped >= 2 * uncaptured - 2, (
            sent, recorded)
    wait_until(lambda: int(info(a)["audit_lost_ring_buffer_events"]) > 0, timeout=10,
               what="the ring's losses counted")
    send_sets(late, ["late:k"])
    recs = a.wait_records(lambda rs: any(r["keys"] == ["late:k"] for r in rs),
                          what="the late connection's SET")
    rec = next(r for r in recs if r["keys"] == ["late:k"])
    assert mine(rec) and (rec["result"], rec["username"]) == ("SUCCESS", "unknown"), rec
    conns = [r for r in recs if r["command"] == "connection" and mine(r)]
    assert len(conns) == 1 and "attached=existing" in conns[0]["command_args"], conns
    late.close()
    filler.close()
    assert a.stop() == 0


def test_a_close_the_full_ring_dropped_still_gets_its_disconnection(valkey, start_auditor):
    """With syscall tracepoints, a close whose report the full ring dropped left its connection open
    in user space until the auditor stopped: no disconnection record for as long as it ran. The
    once-a-second check of each connection's socket (the inode its fd holds) now ends it in both
    capture modes."""
    a = start_auditor(valkey.pid, extra=("--ring-bytes", "32768", "--capture", "syscalls"))
    # Closing these fills the last bytes a data record cannot (a close report is the smallest).
    spares = [connect(valkey.port) for _ in range(8)]
    victim = connect(valkey.port)
    ports = {c.getsockname()[1] for c in [*spares, victim]}
    port = victim.getsockname()[1]
    a.wait_records(lambda rs: ports <= {r["client_port"] for r in rs if r["command"] == "connection"},
                   what="the connection records")
    filler = connect(valkey.port)
    filler.settimeout(10)

    def closed_by_server():
        filler.sendall(resp("CLIENT", "LIST"))
        got = b""
        while not got.endswith(b"\r\n") or got.count(b"\n") < 2:
            got += filler.recv(65536)
        return not any(f":{p} ".encode() in got for p in ports)
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        for i in range(2000):
            send_sets(filler, [f"fill:{i}"])
            if i % 50 == 49 and kernel_ring_drops(a.proc.pid) > 20:
                break
        assert kernel_ring_drops(a.proc.pid) > 20
        for c in [*spares, victim]:
            c.close()
        wait_until(closed_by_server, timeout=10, what="the server to close the connections")
        # New connections take the closed ones' fds while their reports are dropped too (QA: only
        # the first was found; the others on reused fds were never audited).
        newcomers = [connect(valkey.port) for _ in range(3)]
        for c in newcomers:
            c.sendall(resp("PING"))
            c.settimeout(10)
            assert c.recv(100) == b"+PONG\r\n"
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    recs = a.wait_records(
        lambda rs: ports <= {r["client_port"] for r in rs if r["command"] == "disconnection"},
        timeout=10, what="a disconnection record for every closed connection")
    assert [r["client_port"] for r in recs if r["command"] == "disconnection"].count(port) == 1
    new_ports = {c.getsockname()[1] for c in newcomers}
    a.wait_records(lambda rs: new_ports <= {r["client_port"] for r in rs
                                            if r["command"] == "connection"},
                   what="the newcomers found")
    for i, c in enumerate(newcomers):
        send_sets(c, [f"newcomer:{i}"])
    recs = a.wait_records(lambda rs: sum(r["keys"][:1] == [f"newcomer:{i}"] for r in rs
                                         for i in range(3)) == 3,
                          what="every newcomer's SET")
    for i, c in enumerate(newcomers):
        rec = next(r for r in recs if r["keys"] == [f"newcomer:{i}"])
        assert (rec["client_port"], rec["result"]) == (c.getsockname()[1], "SUCCESS"), rec
        c.close()
    filler.close()
    assert a.stop() == 0


def test_ring_drops_until_the_stop_all_have_their_loss_records(valkey, start_auditor):
    """SIGTERM while the ring overflows: the kernel kept capturing (and dropping) until the programs
    were detached, after the last loss record was written, so stderr's closing count of ring drops
    was larger than what the log's records said (QA: 331-20,791 unrecorded). Now the kernel stops
    capturing first, the ring is read to its end, and then the drops are counted."""
    a = start_auditor(valkey.pid, extra=("--ring-bytes", "65536"),
                      settings=("audit.payload_disable", "yes"))
    bench = subprocess.Popen(["redis-benchmark", "-p", str(valkey.port), "-t", "set", "-n",
                              "3000000", "-P", "16", "-d", "1024", "-q"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: int(info(a)["audit_lost_ring_buffer_events"]) > 0, timeout=20,
                   what="the small ring to overflow")
        assert a.stop() == 0
    finally:
        bench.kill()
        bench.wait()
    err = a.stderr_path.read_text()
    m = re.search(r"audit_lost_ring_buffer_events=(\d+)", err)
    assert m, err
    recorded = sum(int(re.search(r"count=(\d+)", r["command_args"]).group(1))
                   for r in read_records(a.log)
                   if r["category"] == "AUDIT_LOSS" and "cause=ring_buffer_full" in r["command_args"])
    assert recorded == int(m.group(1)) > 0, (recorded, err[-500:])
    assert read_records(a.log)[-1]["command"] == "stop"
