"""Deployment artefacts: deploy/kubernetes (validated against a pinned Kubernetes API), deploy/systemd
(checked by `systemd-analyze verify`), the Dockerfile, and that all of them run the auditor the same way,
with the same least-privilege capability set as README "Least privilege".

The last tests run the real auditor with exactly the DaemonSet's arguments (only the config file's log
directory and the two listen addresses moved to this test's own) against a real valkey-server.

Every tool is real and required: a missing one is a failure that names the setup step that installs it.
"""
import contextlib
import copy
import json
import re
import shlex
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
import redis

from conftest import AUDITOR, ROOT, Valkey, control_answers, free_port, terminate, wait_until

K8S_DIR = ROOT / "deploy" / "kubernetes"
UNIT = ROOT / "deploy" / "systemd" / "auditor.service"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"
# The Kubernetes API the manifests are validated against (kubernetes-validate ships its schemas).
K8S_VERSION = "1.30.0"
# What the manifests and the unit must grant: nothing more, nothing less.
CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}
BINARY = "/usr/local/bin/auditor"


def _kubernetes_validate():
    try:
        import kubernetes_validate  # noqa: PLC0415
    except ImportError as e:
        pytest.fail(f"kubernetes-validate is missing from .venv ({e}): run scripts/setup.sh "
                    "(step 5 installs it into the venv)")
    return kubernetes_validate


def _yaml():
    try:
        import yaml  # noqa: PLC0415  (a dependency of kubernetes-validate)
    except ImportError as e:
        pytest.fail(f"PyYAML is missing from .venv ({e}): run scripts/setup.sh (step 5, kubernetes-validate)")
    return yaml


def _systemd_analyze():
    path = shutil.which("systemd-analyze")
    if not path:
        pytest.fail("systemd-analyze not found: run scripts/setup.sh (step 2 installs Debian package systemd)")
    return path


def manifests():
    """Every (file, document) of deploy/kubernetes, in file order."""
    yaml = _yaml()
    files = sorted(K8S_DIR.glob("*.yaml")) + sorted(K8S_DIR.glob("*.yml"))
    assert files, f"no manifests in {K8S_DIR}"
    out = []
    for f in files:
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
        assert docs, f"{f} holds no document"
        out.extend((f, d) for d in docs)
    return out


def manifest(kind):
    found = [d for _, d in manifests() if d.get("kind") == kind]
    assert len(found) == 1, f"expected exactly one {kind} in {K8S_DIR}, found {len(found)}"
    return found[0]


def daemonset_container():
    containers = manifest("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the DaemonSet runs one container, the auditor"
    return containers[0]


def daemonset_command():
    """The auditor's arguments in the DaemonSet (without the binary itself)."""
    c = daemonset_container()
    assert c["command"] == [BINARY], c["command"]
    return list(c["args"])


def configmap_conf():
    return manifest("ConfigMap")["data"]["auditor.conf"]


def unit_lines():
    """(key, value) of every assignment in the unit, continuation lines joined."""
    text = UNIT.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.append((key.strip(), value.strip()))
    return out


def unit_values(key):
    return [v for k, v in unit_lines() if k == key]


def unit_exec_start():
    (value,) = unit_values("ExecStart")
    return shlex.split(value)


def caps_of(words):
    return {w if w.startswith("CAP_") else f"CAP_{w}" for w in words}


def readme_least_privilege_caps():
    lines = README.read_text().splitlines()
    start = None
    for i, line in enumerate(lines):
        m = re.match(r"^(#+)\s.*least privilege", line, re.IGNORECASE)
        if m:
            start, level = i, len(m.group(1))
            break
    assert start is not None, 'README.md has no section whose heading contains "Least privilege"'
    body = []
    for line in lines[start + 1:]:
        m = re.match(r"^(#+)\s", line)
        if m and len(m.group(1)) <= level:
            break
        body.append(line)
    return set(re.findall(r"\bCAP_[A-Z_]+\b", "\n".join(body)))


# --- Kubernetes --------------------------------------------------------------------------------------------

def test_every_manifest_validates_strictly_against_pinned_kubernetes():
    kv = _kubernetes_validate()
    docs = manifests()
    for f, doc in docs:
        try:
            version = kv.validate(doc, K8S_VERSION, strict=True)
        except kv.utils.SchemaNotFoundError as e:
            pytest.fail(f"{f.name}: {e.message}")
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{f.name}: {doc.get('kind')}/{doc['metadata']['name']} is invalid for Kubernetes "
                        f"{e.version}: {path}: {e.message}")
        assert version == "1.30"
    kinds = sorted(d["kind"] for _, d in docs)
    assert {"DaemonSet", "ConfigMap", "Service"} <= set(kinds), kinds
    for _, doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "valkey-audit", doc["metadata"]


def test_strict_validation_rejects_unknown_fields():
    """The check above really is strict: a misspelt field in the DaemonSet is an error."""
    kv = _kubernetes_validate()
    bad = copy.deepcopy(manifest("DaemonSet"))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {"runAsUser": 0}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_daemonset_privileges_mounts_resources_and_probes():
    ds = manifest("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    c = daemonset_container()
    assert pod.get("hostPID") is True, "hostPID: the auditor must see the node's valkey-server processes"
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()

    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    add = sc["capabilities"]["add"]
    assert len(add) == len(set(add)) and caps_of(add) == CAPS, add
    assert sc.get("privileged", False) is False
    assert sc["runAsUser"] == 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc.get("allowPrivilegeEscalation") is False

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}

    def host_path_at(mount_path):
        assert mount_path in mounts, f"nothing mounted at {mount_path}"
        v = volumes[mounts[mount_path]["name"]]
        assert "hostPath" in v, f"{mount_path} must be the node's ({v})"
        return v["hostPath"]["path"]

    assert host_path_at("/sys/kernel/tracing") == "/sys/kernel/tracing"
    assert host_path_at("/sys/fs/bpf") == "/sys/fs/bpf"
    assert host_path_at("/sys/kernel/btf") == "/sys/kernel/btf"
    assert mounts["/sys/kernel/btf"].get("readOnly") is True
    assert host_path_at("/var/log/valkey") == "/var/log/valkey"
    assert not mounts["/var/log/valkey"].get("readOnly", False)
    # /proc is the host's through hostPID; a hostPath /proc would only add a second view.
    assert "/proc" not in mounts
    # The config comes from the ConfigMap, at the path the args name.
    cfg = volumes[mounts["/etc/auditor"]["name"]]
    assert cfg["configMap"]["name"] == manifest("ConfigMap")["metadata"]["name"]
    args = daemonset_command()
    assert args[args.index("--config") + 1] == "/etc/auditor/auditor.conf"

    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"

    res = c["resources"]
    for k in ("cpu", "memory"):
        assert res["requests"][k] and res["limits"][k], res

    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"control": 6380, "metrics": 9464}, ports
    for probe in ("livenessProbe", "readinessProbe"):
        port = c[probe]["tcpSocket"]["port"]
        assert port in ("control", 6380), f"{probe} must check the control port, not {port}"
    control = args[args.index("--control") + 1]
    metrics = args[args.index("--metrics") + 1]
    assert control == f"0.0.0.0:{ports['control']}" and metrics == f"0.0.0.0:{ports['metrics']}"


def test_service_targets_the_metrics_port():
    svc = manifest("Service")
    ds = manifest("DaemonSet")
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items(), (svc["spec"]["selector"], labels)
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = svc["spec"]["ports"]
    assert port["name"] == "metrics" and port["port"] == 9464
    container_ports = {p["name"]: p["containerPort"] for p in daemonset_container()["ports"]}
    assert port.get("targetPort", port["port"]) in ("metrics", container_ports["metrics"])


def test_configmap_holds_audit_settings():
    conf = configmap_conf()
    settings = dict(line.split(None, 1) for line in conf.splitlines()
                    if line.strip() and not line.lstrip().startswith("#"))
    assert all(k.startswith("audit.") for k in settings), settings
    assert settings["audit.protocol"] == "file /var/log/valkey/audit-%port%.log"
    assert settings["audit.format"] == "json"
    assert settings["audit.events"] == "all"


def test_daemonset_command():
    assert daemonset_command() == [
        "--all", "--follow-restarts", "--config", "/etc/auditor/auditor.conf",
        "--control", "0.0.0.0:6380", "--metrics", "0.0.0.0:9464",
    ]


# --- systemd -----------------------------------------------------------------------------------------------

def _verify(unit_path):
    # --man=no: no man pages needed for Documentation= lines; the host's own units may produce warnings,
    # which the callers filter out by looking only at lines naming our unit.
    return subprocess.run([_systemd_analyze(), "verify", "--man=no", str(unit_path)],
                          capture_output=True, text=True, timeout=60)


def _unit_with_real_binary(tmp_path, text=None):
    if not AUDITOR.exists():
        pytest.fail(f"{AUDITOR} missing: run `cargo build --release` (scripts/test.sh does)")
    text = UNIT.read_text() if text is None else text
    old = f"ExecStart={BINARY} "
    assert text.count(old) == 1, f"the unit must start {BINARY} exactly once"
    out = tmp_path / UNIT.name
    out.write_text(text.replace(old, f"ExecStart={AUDITOR} "))
    # Only ExecStart's binary changed.
    diff = [(a, b) for a, b in zip(text.splitlines(), out.read_text().splitlines()) if a != b]
    assert len(diff) == 1 and diff[0][0].startswith("ExecStart="), diff
    return out


def _lines_about(result, unit_path):
    return [line for line in (result.stdout + result.stderr).splitlines()
            if unit_path.name in line or str(unit_path) in line]


def test_systemd_unit_verifies(tmp_path):
    unit = _unit_with_real_binary(tmp_path)
    r = _verify(unit)
    assert r.returncode == 0, f"systemd-analyze verify failed ({r.returncode}):\n{r.stdout}{r.stderr}"
    assert _lines_about(r, unit) == [], r.stdout + r.stderr


def test_systemd_verify_reports_a_bad_unit(tmp_path):
    """The check above would see a problem: an unknown key and a bad value are reported on lines naming
    the unit (they do not change the exit code, hence the output filter)."""
    text = UNIT.read_text().replace("[Service]\n", "[Service]\nProtectSytem=strict\nRestart=sometimes\n", 1)
    unit = _unit_with_real_binary(tmp_path, text)
    lines = _lines_about(_verify(unit), unit)
    assert any("ProtectSytem" in line for line in lines), lines
    assert any("sometimes" in line for line in lines), lines


def test_systemd_unit_hardening():
    values = dict(unit_lines())
    for key, want in {
        "Restart": "on-failure", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "NoNewPrivileges": "yes", "LimitMEMLOCK": "infinity", "ProtectKernelModules": "yes",
        "ProtectClock": "yes", "RestrictNamespaces": "yes", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "RestrictRealtime": "yes", "SystemCallArchitectures": "native",
    }.items():
        assert values.get(key) == want, f"{key}={values.get(key)!r}, want {want!r}"
    rw = " ".join(unit_values("ReadWritePaths")).split()
    assert {"/var/log/valkey", "/sys/fs/bpf", "/etc/auditor"} <= set(rw), rw
    # /proc/<pid> of servers run by other users must stay visible, tracefs readable.
    assert values.get("ProtectProc", "default") == "default"
    assert values.get("ProcSubset", "all") == "all"
    assert "InaccessiblePaths" not in values
    assert values.get("User", "root") == "root"


def test_systemd_exec_start_is_the_daemonset_command():
    argv = unit_exec_start()
    assert argv[0] == BINARY
    assert argv[1:] == [a.replace("0.0.0.0:", "127.0.0.1:") for a in daemonset_command()]


# --- one capability set everywhere -------------------------------------------------------------------------

def test_capabilities_are_the_same_everywhere():
    ds = caps_of(daemonset_container()["securityContext"]["capabilities"]["add"])
    (bounding,) = unit_values("CapabilityBoundingSet")
    (ambient,) = unit_values("AmbientCapabilities")
    assert ds == CAPS
    assert set(bounding.split()) == CAPS, bounding
    assert set(ambient.split()) == CAPS, ambient
    assert readme_least_privilege_caps() == CAPS


# --- Docker ------------------------------------------------------------------------------------------------

def test_dockerfile_builds_the_binary_the_manifests_run():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    assert len(stages) == 2, stages
    assert re.match(r"rust:\$\{RUST_VERSION\}-bookworm|rust:[\d.]+-bookworm", stages[0][0]), stages
    assert stages[1][0] == "debian:bookworm-slim", stages
    assert "rust-src" in text and "scripts/setup.sh --toolchain-only" in text
    assert re.search(r"cargo build --release .*-p auditor", text)
    assert re.search(r"^COPY --from=builder \S+ /usr/local/bin/auditor$", text, re.MULTILINE)
    entry = re.findall(r"^ENTRYPOINT\s+(.+)$", text, re.MULTILINE)
    assert [json.loads(e) for e in entry] == [[BINARY]]
    ignored = {l.strip().rstrip("/") for l in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {"target", ".venv", ".git"} <= ignored
    # The builder installs bpf-linker with the same script the hosts use.
    assert "--toolchain-only" in (ROOT / "scripts" / "setup.sh").read_text()


# --- the DaemonSet's command line, run for real ------------------------------------------------------------

class DaemonSetAuditor:
    """target/release/auditor with the DaemonSet's args; only the config file (its log directory moved
    to `tmp`) and the two listen addresses (127.0.0.1, free ports) differ."""

    def __init__(self, tmp):
        self.tmp = tmp
        conf_lines = []
        for line in configmap_conf().splitlines():
            if line.startswith("audit.protocol file "):
                path = Path(line.split(None, 2)[2])
                assert "%port%" in path.name, line
                line = f"audit.protocol file {tmp / path.name}"
            conf_lines.append(line)
        self.conf = tmp / "auditor.conf"
        self.conf.write_text("\n".join(conf_lines) + "\n")
        self.control, self.metrics = free_port(), free_port()
        args = daemonset_command()
        replaced = {"--config": str(self.conf), "--control": f"127.0.0.1:{self.control}",
                    "--metrics": f"127.0.0.1:{self.metrics}"}
        for flag, value in replaced.items():
            args[args.index(flag) + 1] = value
        self.args = [str(AUDITOR), *args]
        self.stderr_path = tmp / "auditor.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=err)

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")

    def check_running(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"auditor {shlex.join(self.args)} exited with {self.proc.returncode}:\n"
                                 f"{self.stderr()}")

    def wait_ready(self):
        def ready():
            self.check_running()
            return control_answers(self.control)
        wait_until(ready, timeout=30, what="auditor control port to answer PONG")

    def log_for(self, port):
        return self.tmp / f"audit-{port}.log"

    def records_for(self, port):
        log = self.log_for(port)
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_bytes().split(b"\n")[:-1]]


@pytest.fixture(scope="module")
def daemonset_run(tmp_path_factory):
    if not AUDITOR.exists():
        pytest.fail(f"{AUDITOR} missing: run `cargo build --release` (scripts/test.sh does)")
    tmp = tmp_path_factory.mktemp("daemonset")
    valkey = Valkey(tmp)
    auditor = None
    try:
        auditor = DaemonSetAuditor(tmp)
        yield valkey, auditor
    finally:
        if auditor is not None:
            terminate(auditor.proc, timeout=20)
        valkey.stop()


def test_daemonset_command_audits_a_real_server(daemonset_run):
    valkey, auditor = daemonset_run
    auditor.wait_ready()
    key = f"deploy:{valkey.port}"
    with redis.Redis(port=valkey.port, socket_timeout=5) as r:
        r.set(key, "v")
        assert r.get(key) == b"v"
        r.delete(key)

    def audited():
        auditor.check_running()
        recs = auditor.records_for(valkey.port)
        mine = [x for x in recs if key in x.get("keys", [])]
        return mine if len(mine) >= 3 else None

    mine = wait_until(audited, timeout=15, what=f"records of {key} in {auditor.log_for(valkey.port)}")
    assert [x["command"].lower() for x in mine[:3]] == ["set", "get", "del"], mine
    for rec in auditor.records_for(valkey.port):
        # %port% expanded: this file holds no other server's records (0: the auditor's own, e.g. AUDIT).
        assert rec.get("server_port", 0) in (0, valkey.port), rec
    for rec in mine:
        assert rec["server_port"] == valkey.port and rec["pid"] == valkey.pid, rec


def test_daemonset_probe_and_metrics_ports_answer(daemonset_run):
    """The liveness/readiness probes' port (control) accepts TCP; the Service's port (metrics) serves
    Prometheus text."""
    try:
        from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415
    except ImportError as e:
        pytest.fail(f"prometheus-client is missing from .venv ({e}): run scripts/setup.sh (step 5)")

    _, auditor = daemonset_run
    auditor.wait_ready()
    with contextlib.closing(socket.create_connection(("127.0.0.1", auditor.control), timeout=2)):
        pass
    url = f"http://127.0.0.1:{auditor.metrics}/metrics"

    def scrape():
        auditor.check_running()
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, resp.read().decode()
        except OSError:
            return None

    status, body = wait_until(scrape, timeout=10, what=f"{url} to answer")
    assert status == 200
    families = list(text_string_to_metric_families(body))
    assert families, body
