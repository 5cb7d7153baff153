//! Least privilege: the capabilities the daemon needs, checked before anything is loaded, and
//! dropped once the programs are attached.
//!
//! * `CAP_BPF`: load the programs and create the maps.
//! * `CAP_PERFMON`: attach tracing programs to tracepoints.
//! * `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH`: read `/proc/<pid>/fd`, `environ` and `root` of
//!   servers run by other users (listening sockets, existing connections, pod identity). Both are
//!   needed: the `fd` directory and `environ` belong to the server's user (mode 0500 and 0400), so
//!   listing or reading them is a permission check (`CAP_DAC_READ_SEARCH`, read-only), and what
//!   they name is behind the ptrace check (`CAP_SYS_PTRACE`). Without the first, a server run as
//!   `valkey` showed nothing: no listening port, so none of its clients was audited. Kept for the
//!   daemon's lifetime, since new servers are described as they start.
//!
//! After attach, only those two stay: map updates and ring-buffer reads go through file
//! descriptors the daemon already holds and need no capability.

use anyhow::{Result, bail};
use caps::{CapSet, Capability, CapsHashSet};

/// The minimum set, with what each one is for (documented in README, deploy/).
pub const REQUIRED: [(Capability, &str); 4] = [
    (
        Capability::CAP_BPF,
        "to load the eBPF programs and create their maps",
    ),
    (
        Capability::CAP_PERFMON,
        "to attach the programs to syscall and sched tracepoints",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "to read /proc/<pid>/fd, environ and root of servers run by other users",
    ),
    (
        Capability::CAP_DAC_READ_SEARCH,
        "to list /proc/<pid>/fd and read environ of servers run by other users",
    ),
];

/// What the daemon keeps after attaching.
pub const KEPT: [Capability; 2] = [Capability::CAP_SYS_PTRACE, Capability::CAP_DAC_READ_SEARCH];

/// Fail with a message naming every missing capability.
pub fn check_required() -> Result<()> {
    let effective = caps::read(None, CapSet::Effective)
        .map_err(|e| anyhow::anyhow!("reading this process's capabilities: {e}"))?;
    let missing: Vec<String> = REQUIRED
        .iter()
        .filter(|(cap, _)| !effective.contains(cap))
        .map(|(cap, why)| format!("missing capability {cap} ({why})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing privileges (run as root, or grant exactly {}): {}",
            REQUIRED
                .iter()
                .map(|(c, _)| c.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            missing.join("; ")
        );
    }
    Ok(())
}

/// Keep only `KEPT`, in the effective and permitted sets; nothing is inheritable or ambient, and
/// nothing a program the daemon runs could regain.
pub fn drop_after_attach() -> Result<()> {
    let keep: CapsHashSet = KEPT.into_iter().collect();
    let err = |set: &str, e: caps::errors::CapsError| {
        anyhow::anyhow!("dropping capabilities ({set} set): {e}")
    };
    // A process of uid 0 that runs a program gives it every capability of its bounding set
    // (QA: `audit.archive_command` ran with all of them, CAP_SYS_ADMIN included, and so would
    // code that took over the daemon): the bounding set is emptied where the daemon may (with
    // CAP_SETPCAP, as plain root; under the unit and the DaemonSet it holds only the four), and
    // no program it runs gains privileges from a set-user-id or file-capability binary either.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        caps::clear(None, CapSet::Bounding).map_err(|e| err("bounding", e))?;
    }
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only and changes only this
    // thread's flag, which the threads started later inherit.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        bail!("setting no_new_privs: {}", std::io::Error::last_os_error());
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| err("ambient", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| err("inheritable", e))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| err("effective", e))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| err("permitted", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_is_a_subset_of_required() {
        for k in KEPT {
            assert!(REQUIRED.iter().any(|(c, _)| *c == k));
        }
    }
}
