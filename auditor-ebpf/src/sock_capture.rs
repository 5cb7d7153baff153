//! Capture from the socket tracepoints (`--capture sockets`), with no syscall tracepoint at all.
//!
//! Why: while any syscall tracepoint is attached, every task on the host takes the kernel's slow
//! syscall path and runs the exit program, the benchmark client included; at `-P 1` that alone
//! cost the server ~10% of its throughput (BENCHMARKS.md, session 9). `sock:sock_send_length` and
//! `sock:sock_recv_length` fire inside `sock_sendmsg`/`sock_recvmsg`, so only socket I/O pays, and
//! the syscall's arguments (fd, buffer) are still in the task's saved user registers.
//!
//! What it costs in knowledge, and how each piece is recovered:
//! - There is no accept syscall exit: uprobes on the server's libc `accept4` and `accept` (attached
//!   per target process, so no other process pays) report accepts as `sys_exit` does. Where they
//!   cannot be attached (no libc), a target's socket is registered at its first read or write, its
//!   peer and local port read from `struct sock`, so a client that never sends is seen when it
//!   leaves.
//! - There is no close(): a read that returns end-of-stream or an error closes the connection
//!   (Valkey frees such a client at once), and a TCP socket the server closes is seen in
//!   `inet_sock_set_state` while the server is in `close()`. Otherwise an fd whose socket has
//!   another inode number was closed and reused unseen: the old connection is closed first.
//!
//! Field offsets of `struct sock` come from the kernel's BTF, read by user space (`CFG_SK*`).
use super::*;
use auditor_common::{
    CFG_SK_INO, CFG_SK_INO_DEREF, CFG_SKC_DADDR, CFG_SKC_DPORT, CFG_SKC_FAMILY, CFG_SKC_NUM,
    CFG_SKC_V6_DADDR, LISTEN_FD_UNKNOWN, SOCK_CLOSED, SOCK_IGNORED,
};
use aya_ebpf::{
    helpers::generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

const NR_CLOSE: u64 = 3;
// TCP states (include/net/tcp_states.h) a socket enters when the server closes it.
const TCP_FIN_WAIT1: i32 = 4;
const TCP_CLOSE: i32 = 7;
const TCP_LAST_ACK: i32 = 9;
const EINTR: i32 = 4;
const EAGAIN: i32 = 11;

/// Kernel memory at `addr`, or 0 when it cannot be read.
#[inline(always)]
fn kernel_u64(addr: u64) -> u64 {
    let mut v: u64 = 0;
    // SAFETY: fault-tolerant read of kernel memory into a local.
    unsafe { bpf_probe_read_kernel((&raw mut v).cast(), 8, addr as *const c_void) };
    v
}

/// The socket's inode number (what `/proc/<pid>/fd` shows as `socket:[N]`), 0 if unknown.
#[inline(always)]
fn sock_ino(sk: u64) -> u64 {
    let off = config(CFG_SK_INO);
    if off == 0 {
        return 0;
    }
    let deref = config(CFG_SK_INO_DEREF);
    if deref == 0 {
        return kernel_u64(sk + off);
    }
    let socket = kernel_u64(sk + off);
    if socket == 0 {
        return 0;
    }
    kernel_u64(socket + deref)
}

/// The current task's syscall registers `[dx, si, di, orig_ax]`.
#[inline(always)]
fn current_syscall() -> Option<[u64; 4]> {
    // SAFETY: the BTF pointer of the current task, handed straight to the helper that finds its
    // saved user registers.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    syscall_regs(regs)
}

/// Register a socket of target `tgid` seen for the first time at `fd` and tell user space who
/// its peer is. Returns its state.
#[inline(always)]
fn new_socket(tgid: u32, fd: u32, sk: u64, ino: u64) -> Option<*mut SocketState> {
    let key = socket_key(tgid, fd);
    let state = SocketState {
        out_mode: if config(CFG_REPLY_SCAN) != 0 {
            SCAN_TOKEN
        } else {
            SCAN_RAW
        },
        ino,
        ..SocketState::default()
    };
    SOCKETS.insert(&key, &state, 0).ok()?;
    let mut head = [0u8; 8];
    // SAFETY: fault-tolerant reads of the socket's own fields; offsets from the kernel's BTF.
    unsafe {
        bpf_probe_read_kernel(
            head.as_mut_ptr().cast(),
            2,
            (sk + config(CFG_SKC_FAMILY)) as *const c_void,
        );
    }
    let family = u16::from_ne_bytes([head[0], head[1]]);
    let mut addr = [0u8; 16];
    let mut port = 0u16;
    let mut local_port = 0u16;
    if family == AF_INET || family == AF_INET6 {
        let mut ports = [0u8; 4];
        // SAFETY: as above.
        unsafe {
            bpf_probe_read_kernel(
                ports.as_mut_ptr().cast(),
                2,
                (sk + config(CFG_SKC_DPORT)) as *const c_void,
            );
            bpf_probe_read_kernel(
                ports.as_mut_ptr().add(2).cast(),
                2,
                (sk + config(CFG_SKC_NUM)) as *const c_void,
            );
            if family == AF_INET {
                bpf_probe_read_kernel(
                    addr.as_mut_ptr().cast(),
                    4,
                    (sk + config(CFG_SKC_DADDR)) as *const c_void,
                );
            } else {
                bpf_probe_read_kernel(
                    addr.as_mut_ptr().cast(),
                    16,
                    (sk + config(CFG_SKC_V6_DADDR)) as *const c_void,
                );
            }
        }
        port = u16::from_be_bytes([ports[0], ports[1]]);
        local_port = u16::from_ne_bytes([ports[2], ports[3]]);
    }
    output_accept(
        &AcceptEvent {
            kind: EventKind::Accept as u8,
            _pad: 0,
            family,
            fd,
            tgid,
            listen_fd: LISTEN_FD_UNKNOWN,
            ts_ns: unsafe { bpf_ktime_get_ns() },
            port,
            local_port,
            _pad2: [0; 4],
            addr,
            ino,
        },
        false,
    );
    // (None when the report did not fit in the ring: the next read or write tries again.)
    SOCKETS.get_ptr_mut(&key)
}

/// One read or write of a socket by the current task; `ret` is what `sock_recvmsg`/`sock_sendmsg`
/// returned.
#[inline(always)]
fn sock_io(sk: u64, ret: i32, dir: u8) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !may_be_target(tgid) {
        return;
    }
    let Some([dx, si, di, nr]) = current_syscall() else {
        return;
    };
    // sendfile, splice and the like move bytes the server did not parse or produce as RESP.
    let Some((sys_dir, kind)) = data_syscall(nr) else {
        return;
    };
    if sys_dir != dir {
        return;
    }
    let fd = di as u32;
    let key = socket_key(tgid, fd);
    let ino = sock_ino(sk);
    let mut state = SOCKETS.get_ptr_mut(&key);
    if let Some(s) = state {
        // SAFETY: live map value; one socket is only ever served by one thread at a time.
        let (known, flags) = unsafe { ((*s).ino, (*s).flags) };
        if known == 0 {
            // Registered at accept (the uprobe cannot see the socket) or by user space without
            // its inode: this is its first read or write.
            unsafe { (*s).ino = ino };
        } else if known != ino {
            // The fd holds another socket: the one we knew was closed, unseen.
            if flags & SOCK_CLOSED == 0 && flags & SOCK_IGNORED == 0 {
                emit_close(tgid, fd);
            }
            let _ = SOCKETS.remove(&key);
            state = None;
        } else if flags & (SOCK_CLOSED | SOCK_IGNORED) != 0 {
            return;
        }
    }
    // End of stream, or an error other than "try again": Valkey frees the client now.
    let ends = (ret == 0 && dir == DIR_IN) || (ret < 0 && ret != -EAGAIN && ret != -EINTR);
    let state = match state {
        Some(s) => s,
        None => {
            // A client that connects and leaves without a word is still a connection.
            if (ret <= 0 && !ends) || !is_target(tgid) {
                return;
            }
            let Some(s) = new_socket(tgid, fd, sk, ino) else {
                return;
            };
            s
        }
    };
    if ret > 0 {
        if let Some(args) = buffer_args(dir, kind, fd, si, dx) {
            emit_data(pid_tgid, args, state, ret as i64);
        }
    } else if ends {
        // SAFETY: live map value (see above).
        unsafe { (*state).flags |= SOCK_CLOSED };
        emit_close(tgid, fd);
    }
}

/// Accepts in flight, by thread: the listening fd and sockaddr pointer of an `accept4` call,
/// from its entry to its return.
#[map]
static ACCEPTS: HashMap<u64, AcceptArgs> = HashMap::with_max_entries(4096, 0);

/// Entry of libc's `accept4`/`accept` in a target: keep its arguments for the return.
#[uprobe]
pub fn accept_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_target((pid_tgid >> 32) as u32) {
        return 0;
    }
    let (Some(listen_fd), Some(sockaddr)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    let args = AcceptArgs {
        listen_fd: listen_fd as u32,
        _pad: 0,
        sockaddr,
    };
    let _ = ACCEPTS.insert(&pid_tgid, &args, 0);
    0
}

/// Return of libc's `accept4`/`accept`: the new fd is a connection, reported as at `sys_exit`
/// (its inode is taken at its first read or write).
#[uretprobe]
pub fn accept_return(ctx: RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: read-only lookup; the value is copied out before the entry is removed.
    let Some(args) = (unsafe { ACCEPTS.get(&pid_tgid) }).copied() else {
        return 0;
    };
    let _ = ACCEPTS.remove(&pid_tgid);
    let ret: i32 = ctx.ret();
    emit_accept(
        pid_tgid,
        u64::from(args.listen_fd),
        args.sockaddr,
        i64::from(ret),
        false,
    );
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    sock_io(sk, ret, DIR_IN);
    0
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_length(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    sock_io(sk, ret, DIR_OUT);
    0
}

/// A TCP socket changes state. When the server's own `close()` takes one of its client sockets out
/// of ESTABLISHED or CLOSE_WAIT, that connection is over.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !may_be_target(tgid) {
        return 0;
    }
    let newstate: i32 = ctx.arg(2);
    if newstate != TCP_FIN_WAIT1 && newstate != TCP_LAST_ACK && newstate != TCP_CLOSE {
        return 0;
    }
    let Some([_, _, di, nr]) = current_syscall() else {
        return 0;
    };
    if nr != NR_CLOSE {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let fd = di as u32;
    let key = socket_key(tgid, fd);
    let Some(s) = SOCKETS.get_ptr_mut(&key) else {
        return 0;
    };
    // SAFETY: live map value.
    let (known, flags) = unsafe { ((*s).ino, (*s).flags) };
    // Another socket changing state while the server closes this fd (a timer, a reset) is not
    // this fd's close.
    if known != 0 && known != sock_ino(sk) {
        return 0;
    }
    let _ = SOCKETS.remove(&key);
    if flags & (SOCK_CLOSED | SOCK_IGNORED) == 0 {
        emit_close(tgid, fd);
    }
    0
}
