//! Which processes are audited, and what each one is: pid, port, container and pod.
//!
//! Targets come from `--pid` (explicit), `--comm <name>` and `--all` (every valkey-server or
//! redis-server, found in /proc at start and caught at exec by the kernel's `COMMS` map). A target
//! that forks a child process (a daemonizing server) has the child audited too; one that exits is
//! dropped, and with `--follow-restarts` an explicit target's successor (the same executable,
//! listening on the same port once it listens) is audited again.
//!
//! Where the identity comes from (all read from /proc of the host, which needs CAP_SYS_PTRACE and
//! CAP_DAC_READ_SEARCH for access to processes of other users):
//! * pid inside the container: the last `NSpid:` value of `/proc/<pid>/status`;
//! * port: the first TCP listener in the server's own network namespace (`/proc/<pid>/net/tcp*`);
//! * container id: the 64-hex id in `/proc/<pid>/cgroup` (docker, containerd, CRI-O, podman);
//! * pod: the `pod<uid>` part of a kubepods cgroup path marks a Kubernetes pod. Its name is the
//!   server's `HOSTNAME` (`/proc/<pid>/environ`; Kubernetes sets it to the pod name), its namespace
//!   the service-account namespace file seen through `/proc/<pid>/root`, or `POD_NAMESPACE` in its
//!   environment;
//! * node: the auditor's own `NODE_NAME` (the DaemonSet sets it from `spec.nodeName`), else the
//!   host name, for servers in pods.

use std::collections::HashMap;
use std::sync::Arc;

use crate::procscan;
use crate::record::ServerInfo;

/// What the command line asked to audit.
#[derive(Clone, Debug, Default)]
pub struct TargetSpec {
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
    pub all: bool,
    pub follow_restarts: bool,
}

/// Command names `--all` watches.
pub const SERVER_COMMS: [&str; 2] = ["valkey-server", "redis-server"];

impl TargetSpec {
    /// Command names whose exec makes a target (the kernel matches the first 15 bytes).
    pub fn watched_comms(&self) -> Vec<String> {
        let mut v: Vec<String> = self.comms.clone();
        if self.all {
            v.extend(SERVER_COMMS.iter().map(|s| s.to_string()));
        }
        v.sort();
        v.dedup();
        v
    }

    /// Does a process with this command name match `--comm` / `--all`?
    pub fn matches_comm(&self, comm: &str) -> bool {
        let comm = comm.trim_end_matches('\0');
        self.watched_comms().iter().any(|w| comm_eq(w, comm))
    }

    /// Only explicit pids: the auditor ends when the last of them exits (without --follow-restarts).
    pub fn explicit_only(&self) -> bool {
        self.comms.is_empty() && !self.all
    }
}

/// The kernel keeps 15 bytes of a command name.
pub fn comm_eq(watched: &str, comm: &str) -> bool {
    let w = &watched.as_bytes()[..watched.len().min(15)];
    let c = &comm.as_bytes()[..comm.len().min(15)];
    w == c
}

/// Command name of a process (empty when it is gone).
pub fn comm_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end_matches('\n').to_string())
        .unwrap_or_default()
}

/// The executable of a process (empty when it is gone). A restarted server is recognised by it:
/// its command line cannot be used, since Valkey rewrites it (the process title).
pub fn exe_of(pid: u32) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt as _;
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| exe_path(p.as_os_str().as_bytes()))
        .unwrap_or_default()
}

/// The executable's path from its `/proc/<pid>/exe` link: the kernel adds ` (deleted)` once the
/// file was replaced (a package upgrade renames a new one over it), and the server restarted
/// after the upgrade runs the new file at the same path (QA: `--follow-restarts` never took it
/// for the successor of one started before the upgrade).
fn exe_path(link: &[u8]) -> Vec<u8> {
    link.strip_suffix(b" (deleted)").unwrap_or(link).to_vec()
}

/// The parent of `pid` (0 if unknown), from `/proc/<pid>/stat`.
pub fn parent_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The command name in parentheses may hold spaces: fields count from its end.
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// True for a process (thread group leader), false for a thread or a pid that is gone.
pub fn is_process(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| status_field(&s, "Tgid:").map(|v| v.trim() == pid.to_string()))
        .unwrap_or(false)
}

fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
}

/// The pid inside the innermost pid namespace, when it differs from the host pid.
pub fn parse_ns_pid(status: &str, pid: u32) -> u32 {
    status_field(status, "NSpid:")
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&ns| ns != pid)
        .unwrap_or(0)
}

/// Container id and pod uid from `/proc/<pid>/cgroup` (cgroup v1 or v2).
pub fn parse_cgroup(text: &str) -> (String, String) {
    let mut container = String::new();
    let mut pod = String::new();
    for line in text.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        for part in path.split('/') {
            if pod.is_empty()
                && let Some(uid) = pod_uid(part)
            {
                pod = uid;
            }
            if container.is_empty()
                && let Some(id) = container_id(part)
            {
                container = id;
            }
        }
    }
    (container, pod)
}

/// `kubepods-burstable-pod<uid>.slice` (systemd driver, `_` for `-`) or `pod<uid>` (cgroupfs).
fn pod_uid(part: &str) -> Option<String> {
    let part = part.strip_suffix(".slice").unwrap_or(part);
    let at = part.rfind("pod")?;
    let uid = part[at + 3..].replace('_', "-");
    let ok = uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then_some(uid)
}

/// `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`, or a
/// bare 64-hex directory (`/docker/<id>`, cgroupfs kubepods).
fn container_id(part: &str) -> Option<String> {
    let part = part.strip_suffix(".scope").unwrap_or(part);
    let id = part.rsplit('-').next().unwrap_or(part);
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_string())
}

/// A variable of a NUL-separated environment block.
pub fn environ_var(environ: &[u8], name: &str) -> Option<String> {
    environ.split(|&b| b == 0).find_map(|kv| {
        let kv = std::str::from_utf8(kv).ok()?;
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

/// Everything the records say about a server, read from /proc now.
pub fn describe(pid: u32, hostname: &str, node_name: Option<&str>) -> ServerInfo {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let (container_id, pod_uid) = parse_cgroup(&cgroup);
    let port = procscan::tcp_listen_addrs(pid)
        .first()
        .map(|a| a.port())
        .unwrap_or(0);
    // A server without TCP is named by its unix socket (its `%port%` file); the first one opened.
    let unix_socket = if port == 0 {
        procscan::unix_listeners(pid)
            .into_iter()
            .min()
            .map(|(_, path)| Arc::from(path.as_str()))
    } else {
        None
    };
    let mut info = ServerInfo {
        hostname: hostname.to_string(),
        pid,
        ns_pid: parse_ns_pid(&status, pid),
        port,
        unix_socket: unix_socket.unwrap_or_default(),
        container_id,
        ..ServerInfo::default()
    };
    if !pod_uid.is_empty() {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        info.pod_name = environ_var(&environ, "HOSTNAME").unwrap_or_default();
        info.pod_namespace = std::fs::read_to_string(format!(
            "/proc/{pid}/root/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        ))
        .map(|s| s.trim().to_string())
        .ok()
        .or_else(|| environ_var(&environ, "POD_NAMESPACE"))
        .unwrap_or_default();
        info.node_name = node_name.unwrap_or(hostname).to_string();
    }
    info
}

/// Every process on the host whose command name matches the spec's `--comm` / `--all`.
pub fn scan_matching(spec: &TargetSpec) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id() && spec.matches_comm(&comm_of(pid)))
        .collect();
    pids.sort_unstable();
    pids
}

/// One audited process.
#[derive(Clone, Debug)]
pub struct Target {
    /// Named by `--pid` (or the successor of one, under --follow-restarts).
    pub explicit: bool,
    /// Its executable (see `exe_of`).
    pub exe: Vec<u8>,
    /// A successor under --follow-restarts: the port its predecessor listened on, checked once
    /// it listens (0: none).
    pub succeeds_port: u16,
    /// A successor under --follow-restarts of a server without a TCP port, not yet seen
    /// listening: one found listening on a TCP port is another server (its slot goes back).
    pub succeeds_unix: bool,
    pub info: Arc<ServerInfo>,
    /// Unix socket paths of its listeners, by listening fd.
    pub unix_paths: HashMap<u32, String>,
    /// TCP ports it listens on (`--capture sockets` tells accepted sockets by them).
    pub listen_ports: Vec<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgraded_executable_keeps_its_path() {
        assert_eq!(
            exe_path(b"/usr/bin/valkey-server (deleted)"),
            b"/usr/bin/valkey-server"
        );
        assert_eq!(
            exe_path(b"/usr/bin/valkey-server"),
            b"/usr/bin/valkey-server"
        );
    }

    #[test]
    fn cgroup_v2_containerd_pod() {
        let text = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f2a1b4c_5d6e_4f70_8192_a3b4c5d6e7f8.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n";
        let (c, p) = parse_cgroup(text);
        assert_eq!(
            c,
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        );
        assert_eq!(p, "3f2a1b4c-5d6e-4f70-8192-a3b4c5d6e7f8");
    }

    #[test]
    fn cgroup_docker_and_plain() {
        let id = "a".repeat(64);
        assert_eq!(
            parse_cgroup(&format!("0::/system.slice/docker-{id}.scope\n")),
            (id.clone(), String::new())
        );
        assert_eq!(
            parse_cgroup(&format!("12:memory:/docker/{id}\n")),
            (id.clone(), String::new())
        );
        assert_eq!(
            parse_cgroup(&format!(
                "0::/kubepods/besteffort/pod3f2a1b4c-5d6e-4f70-8192-a3b4c5d6e7f8/{id}\n"
            )),
            (id, "3f2a1b4c-5d6e-4f70-8192-a3b4c5d6e7f8".to_string())
        );
        assert_eq!(
            parse_cgroup("0::/user.slice/user-0.slice/session-3.scope\n"),
            (String::new(), String::new())
        );
    }

    #[test]
    fn ns_pid_only_when_different() {
        assert_eq!(parse_ns_pid("Name:\tx\nNSpid:\t4242\t1\n", 4242), 1);
        assert_eq!(parse_ns_pid("NSpid:\t4242\n", 4242), 0);
        assert_eq!(parse_ns_pid("", 4242), 0);
    }

    #[test]
    fn comm_matching_uses_the_kernels_15_bytes() {
        let spec = TargetSpec {
            comms: vec!["a-very-long-server-name".into()],
            ..TargetSpec::default()
        };
        assert!(spec.matches_comm("a-very-long-ser"));
        assert!(!spec.matches_comm("valkey-server"));
        let all = TargetSpec {
            all: true,
            ..TargetSpec::default()
        };
        assert!(all.matches_comm("valkey-server"));
        assert!(all.matches_comm("redis-server"));
        assert!(!all.matches_comm("bash"));
        assert!(!all.explicit_only() && TargetSpec::default().explicit_only());
    }

    #[test]
    fn environ_lookup() {
        let env = b"PATH=/bin\0HOSTNAME=valkey-0\0POD_NAMESPACE=prod\0";
        assert_eq!(environ_var(env, "HOSTNAME").as_deref(), Some("valkey-0"));
        assert_eq!(environ_var(env, "POD_NAMESPACE").as_deref(), Some("prod"));
        assert_eq!(environ_var(env, "HOME"), None);
    }
}
