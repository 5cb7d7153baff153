//! Types shared by the kernel programs (`auditor-ebpf`) and the daemon (`auditor`).
//!
//! Every ring-buffer record starts with a one-byte [`EventKind`] tag; the rest of the layout depends
//! on it. All structs are `#[repr(C)]` and plain old data so both sides read the same bytes.
#![no_std]

/// Largest payload one ring-buffer record carries. A syscall that moved more bytes is sent as several
/// chunk records (driven by `bpf_loop`), all with the same `stream_pos`.
pub const CHUNK_SIZE: usize = 16000;
/// Upper bound of chunks per syscall; the effective bound is `CONFIG[CFG_CAPTURE_CAP] / CHUNK_SIZE`.
pub const MAX_CHUNKS: u32 = 4096;
/// Default capture cap per syscall (bytes). Past it the event's `total_len` says what was not copied.
/// User space skips such a tail by RESP lengths only while it lies inside one bulk payload; a tail
/// that holds framing (the next argument's header, the next reply) costs a resync. Valkey moves
/// more than 64 KiB in one syscall for commands with several large arguments (its reads of big
/// bulks) and for pipelined replies (a `writev` of 64 KiB of reply blocks plus one more), so with a
/// 64 KiB cap such commands lost their records and their neighbours' results; 1 MiB covers them.
pub const DEFAULT_CAPTURE_CAP: u64 = 1024 * 1024;

/// Index in the `CONFIG` array map: capture cap per syscall, bytes.
pub const CFG_CAPTURE_CAP: u32 = 0;
/// Index in the `CONFIG` array map: ring-buffer wake-up threshold in bytes (0: wake on every record).
pub const CFG_WAKEUP_BYTES: u32 = 1;
pub const CFG_LEN: u32 = 4;

/// Index in the per-CPU `STATS` array: ring-buffer records that could not be written.
pub const STAT_RING_DROPS: u32 = 0;
/// Index in the per-CPU `STATS` array: payload bytes that could not be written to the ring buffer.
pub const STAT_RING_DROP_BYTES: u32 = 1;
/// Index in the per-CPU `STATS` array: records written.
pub const STAT_RING_WRITES: u32 = 2;
/// Index in the per-CPU `STATS` array: the most unread bytes a data event saw in the ring since user
/// space last reset it (ring-buffer use, reported as a gauge).
pub const STAT_RING_PEAK: u32 = 3;
pub const STAT_LEN: u32 = 4;

#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Data = 1,
    Accept = 2,
    Close = 3,
    /// A process whose command name is in `COMMS` called exec (it is already in `TARGETS`).
    Exec = 4,
    /// A target forked (a child process, or a thread: user space tells them apart).
    Fork = 5,
    /// The last thread of a target exited (it was removed from `TARGETS`).
    Exit = 6,
}

/// Direction of a data event, seen from the server.
pub const DIR_IN: u8 = 0;
pub const DIR_OUT: u8 = 1;

/// Address families as the kernel numbers them.
pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Header of a data record; `chunk_len` payload bytes follow it directly.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DataEvent {
    pub kind: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
    pub fd: u32,
    pub tgid: u32,
    pub tid: u32,
    /// `bpf_ktime_get_ns()` at syscall exit.
    pub ts_ns: u64,
    /// Position of the syscall's first byte in this direction's byte stream of the socket. A jump
    /// between consecutive events tells user space exactly how many bytes it never saw.
    pub stream_pos: u64,
    /// Bytes the syscall really moved (its return value).
    pub total_len: u32,
    /// Offset of this chunk within the syscall's bytes.
    pub chunk_off: u32,
    /// Payload bytes in this record.
    pub chunk_len: u32,
    /// Bytes of the syscall that were copied at all (min(total_len, cap)); the rest was not captured.
    pub captured_len: u32,
}

pub const DATA_HDR_LEN: usize = core::mem::size_of::<DataEvent>();

/// A connection accepted by the target (accept/accept4 exit).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AcceptEvent {
    pub kind: u8,
    pub _pad: u8,
    pub family: u16,
    pub fd: u32,
    pub tgid: u32,
    pub listen_fd: u32,
    pub ts_ns: u64,
    /// Peer port in host byte order (0 for unix sockets).
    pub port: u16,
    pub _pad2: [u8; 6],
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
}

/// A socket fd closed by the target.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CloseEvent {
    pub kind: u8,
    pub _pad: [u8; 3],
    pub fd: u32,
    pub tgid: u32,
    pub _pad2: u32,
    pub ts_ns: u64,
}

/// A process lifecycle event of a target (`Exec`, `Fork`, `Exit`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    pub kind: u8,
    pub _pad: [u8; 3],
    /// The process (the parent, for `Fork`).
    pub tgid: u32,
    /// `Fork`: the child's pid (a thread id when the fork created a thread).
    pub child: u32,
    pub _pad2: u32,
    pub ts_ns: u64,
    /// Command name after exec (`Exec`), else the process's.
    pub comm: [u8; 16],
}

/// Per-socket state kept in the kernel's `SOCKETS` map, keyed by `(tgid << 32) | fd`. Only fds in this
/// map are captured, which is how non-socket fds (Valkey's `/proc/self/stat` reads) are ignored.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketState {
    /// Bytes read so far (position of the next inbound byte).
    pub in_pos: u64,
    /// Bytes written so far.
    pub out_pos: u64,
}

/// Key of the `COMMS` map: a command name as the kernel stores it (`TASK_COMM_LEN`, NUL-padded).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    /// The kernel keeps the first 15 bytes of a name.
    pub fn from_name(name: &[u8]) -> Comm {
        let mut c = [0u8; 16];
        let n = name.len().min(15);
        c[..n].copy_from_slice(&name[..n]);
        Comm(c)
    }
}

/// Slots of the kernel's `TARGET_HINTS` prefilter (a power of two).
pub const TARGET_HINT_SLOTS: u32 = 16384;

/// The `TARGET_HINTS` slot of a TGID.
#[inline(always)]
pub const fn target_hint_slot(tgid: u32) -> u32 {
    tgid & (TARGET_HINT_SLOTS - 1)
}

pub const fn socket_key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid.
    unsafe impl aya::Pod for super::SocketState {}
    // SAFETY: a NUL-padded command name, every bit pattern valid.
    unsafe impl aya::Pod for super::Comm {}
}
