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
/// Index in the `CONFIG` array map: non-zero to scan the reply streams of sockets accepted from now
/// on and leave the tails of large bulk payloads out of the ring (see [`SCAN_TOKEN`]).
pub const CFG_REPLY_SCAN: u32 = 2;
/// Index in the `CONFIG` array map (`--capture sockets`): offset in `struct sock` of `sk_ino`, or of
/// `sk_socket` when [`CFG_SK_INO_DEREF`] is non-zero (kernels before 6.18 have no `sk_ino`). The
/// socket's inode number tells a new socket from an old one whose memory and fd it reuses.
pub const CFG_SK_INO: u32 = 3;
/// Index in the `CONFIG` array map: 0 when [`CFG_SK_INO`] is `sk_ino`; else the offset of the
/// inode number from the `struct socket` that `sk_socket` points to (through `socket_alloc`).
pub const CFG_SK_INO_DEREF: u32 = 4;
/// Index in the `CONFIG` array map: offset in `struct sock` of `skc_family` (u16).
pub const CFG_SKC_FAMILY: u32 = 5;
/// Index in the `CONFIG` array map: offset in `struct sock` of `skc_daddr` (IPv4 peer).
pub const CFG_SKC_DADDR: u32 = 6;
/// Index in the `CONFIG` array map: offset in `struct sock` of `skc_dport` (peer port, network order).
pub const CFG_SKC_DPORT: u32 = 7;
/// Index in the `CONFIG` array map: offset in `struct sock` of `skc_num` (local port, host order).
pub const CFG_SKC_NUM: u32 = 8;
/// Index in the `CONFIG` array map: offset in `struct sock` of `skc_v6_daddr` (IPv6 peer).
pub const CFG_SKC_V6_DADDR: u32 = 9;
pub const CFG_LEN: u32 = 16;

/// `DataEvent::flags`: the payload is a list of segments, each a [`SegmentHdr`] and its bytes, at
/// increasing offsets of the syscall; the bytes between segments lie inside bulk payloads the kernel
/// chose not to copy (see [`SCAN_TOKEN`]).
pub const DATA_FLAG_SEGMENTS: u8 = 1;
/// `DataEvent::flags`: the syscall's bytes from `captured_len` on were not looked at (the scan's
/// step budget ran out, or the user buffer faulted); user space treats them like an uncaptured tail.
pub const DATA_FLAG_TAIL: u8 = 2;

/// One segment of a [`DATA_FLAG_SEGMENTS`] record: `len` bytes of the syscall from offset `off`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SegmentHdr {
    pub off: u32,
    pub len: u32,
}
pub const SEGMENT_HDR_LEN: usize = core::mem::size_of::<SegmentHdr>();

/// Reply-stream scanner modes (`SocketState::out_mode`). The kernel walks the RESP tokens of what
/// the server writes (every reply is a sequence of lines, some followed by a bulk payload) and
/// leaves out of the ring the part of a bulk payload past its first [`ELIDE_PREFIX`] bytes when it
/// is longer than [`ELIDE_MIN`]: records never need reply payloads, only headers, error texts and
/// the first element of pub/sub frames. `SCAN_RAW` (0, what user space registers pre-existing
/// sockets with, whose stream position inside a reply is unknown) copies every byte, as does a
/// socket whose stream stopped looking like RESP.
pub const SCAN_RAW: u32 = 0;
/// At the first byte of a token (a type byte).
pub const SCAN_TOKEN: u32 = 1;
/// Inside a line that is not a bulk length (`+`, `-`, `:`, aggregate headers, ...): up to its LF.
pub const SCAN_LINE: u32 = 2;
/// Inside a bulk length line (`$`, `=`, `!`): digits accumulate in `out_acc`.
pub const SCAN_HEADER: u32 = 3;
/// Copying `out_keep` more bytes (a short payload and its CRLF, or a payload's CRLF), then a token.
pub const SCAN_KEEP: u32 = 4;
/// Copying the first `out_keep` bytes of a long payload, then skipping `out_skip`.
pub const SCAN_PREFIX: u32 = 5;
/// Skipping `out_skip` payload bytes, then keeping the payload's CRLF.
pub const SCAN_SKIP: u32 = 6;
/// Bulk payloads longer than this are elided past their prefix.
pub const ELIDE_MIN: u64 = 256;
/// Bytes of an elided payload that are still copied (user space keeps 64 of an aggregate's first
/// element: pub/sub frame names).
pub const ELIDE_PREFIX: u64 = 64;
/// `SocketState::out_hdr` bit: the bulk length line had a minus sign (a null).
pub const SCAN_HDR_NEG: u32 = 0x100;

/// Index in the per-CPU `STATS` array: ring-buffer records that could not be written.
pub const STAT_RING_DROPS: u32 = 0;
/// Index in the per-CPU `STATS` array: payload bytes that could not be written to the ring buffer.
pub const STAT_RING_DROP_BYTES: u32 = 1;
/// Index in the per-CPU `STATS` array: records written.
pub const STAT_RING_WRITES: u32 = 2;
/// Index in the per-CPU `STATS` array: the most unread bytes a data event saw in the ring since user
/// space last reset it (ring-buffer use, reported as a gauge).
pub const STAT_RING_PEAK: u32 = 3;
/// Index in the per-CPU `STATS` array: reply bytes the scanner left out since a scanned write on
/// this CPU last forced a wake-up. They count toward the wake-up threshold as if they had been
/// copied, so elision does not stretch the consumer's batches (kernel-internal).
pub const STAT_WAKE_ELIDED: u32 = 4;
pub const STAT_LEN: u32 = 5;

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
    /// `DATA_FLAG_*`.
    pub flags: u8,
    pub _pad: u8,
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

/// `AcceptEvent::listen_fd` of a socket first seen at its first read or write (`--capture
/// sockets`): which listening socket accepted it is not known.
pub const LISTEN_FD_UNKNOWN: u32 = u32::MAX;

/// A connection accepted by the target (accept/accept4 exit), or, with `--capture sockets`, a
/// socket of the target seen for the first time.
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
    /// Local port (TCP, `--capture sockets`; 0 otherwise): tells accepted sockets from the
    /// server's own outgoing links, since `listen_fd` is unknown there.
    pub local_port: u16,
    pub _pad2: [u8; 4],
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
    /// The socket's inode number (`--capture sockets`; 0 otherwise).
    pub ino: u64,
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
    /// Reply-stream scanner state (`SCAN_*`), kept by the kernel between writes.
    pub out_mode: u32,
    /// Type byte of the bulk length line being read, with `SCAN_HDR_NEG`.
    pub out_hdr: u32,
    /// Bulk length read so far (`SCAN_HEADER`).
    pub out_acc: u64,
    /// Bytes still to copy (`SCAN_KEEP`, `SCAN_PREFIX`).
    pub out_keep: u64,
    /// Bytes still to skip (`SCAN_PREFIX` after its keep, `SCAN_SKIP`).
    pub out_skip: u64,
    /// Inode number of the socket (`--capture sockets`; 0 until known): an fd whose socket has
    /// another inode was closed and reused unseen.
    pub ino: u64,
    /// `SOCK_*` flags.
    pub flags: u64,
}

/// `SocketState::flags`: the connection was reported closed (end of stream or an I/O error); the
/// entry stays so that late calls on the same socket are not taken for a new connection.
pub const SOCK_CLOSED: u64 = 1;
/// `SocketState::flags`: not a client connection (the server's own link to a primary, the cluster
/// bus): nothing is captured.
pub const SOCK_IGNORED: u64 = 2;
/// `SocketState::flags` (`--capture syscalls`): the socket's accept report did not fit in the
/// ring. Its data is counted as ring loss, not captured, until user space registers it again (it
/// cannot tell this socket's data from another connection's on the same fd before that).
pub const SOCK_UNREPORTED: u64 = 4;

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

/// Ring bytes the data records of one syscall take: per chunk of up to [`CHUNK_SIZE`] captured
/// bytes, the kernel's 8-byte header, ours, and the bytes, padded to 8.
#[inline(always)]
pub const fn data_records_ring_bytes(captured: u64) -> u64 {
    let chunks = captured / CHUNK_SIZE as u64 + 1;
    captured + chunks * (8 + DATA_HDR_LEN as u64 + 7)
}

/// Whether records of `size` ring bytes entering a ring that holds `avail` unread bytes must wake
/// the consumer: once per `wakeup` bytes that enter, at each crossing of a multiple of it. (Waking
/// only when the unread data crossed `wakeup` itself missed crossings that a record's headers
/// stepped over, and from then on every record was above it: the consumer slept to its poll.)
#[inline(always)]
pub const fn crosses_wakeup(avail: u64, size: u64, wakeup: u64) -> bool {
    wakeup != 0 && avail / wakeup != (avail + size) / wakeup
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern valid.
    unsafe impl aya::Pod for super::SocketState {}
    // SAFETY: a NUL-padded command name, every bit pattern valid.
    unsafe impl aya::Pod for super::Comm {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ring bytes of one record as the kernel lays it out (its 8-byte header, then ours and the
    /// bytes, rounded up to 8).
    fn actual_ring_bytes(captured: u64) -> u64 {
        8 + (DATA_HDR_LEN as u64 + captured).div_ceil(8) * 8
    }

    #[test]
    fn the_size_estimate_covers_what_the_ring_takes() {
        for captured in 0..=CHUNK_SIZE as u64 {
            assert!(data_records_ring_bytes(captured) >= actual_ring_bytes(captured));
        }
    }

    #[test]
    fn a_consumer_that_does_not_read_is_woken_once_per_threshold_of_input() {
        // Steady traffic into a ring nobody drains for a while (the consumer busy or not yet
        // scheduled): every `wakeup` bytes that enter wake it again, whatever the record sizes.
        for wakeup in [1024u64, 4096, 65536] {
            for captured in [1u64, 31, 33, 100, 1000, 5000] {
                let (mut avail, mut since_wake, mut wakes) = (0, 0, 0);
                for _ in 0..2000 {
                    let size = data_records_ring_bytes(captured);
                    let wake = crosses_wakeup(avail, size, wakeup);
                    avail += size;
                    since_wake += size;
                    if wake {
                        wakes += 1;
                        since_wake = 0;
                    }
                    // What entered since the last wake-up stays under one threshold.
                    assert!(since_wake < wakeup, "wakeup {wakeup}, captured {captured}");
                }
                assert!(wakes >= avail / (wakeup + data_records_ring_bytes(captured)));
            }
        }
    }

    #[test]
    fn no_threshold_no_forced_wake_up() {
        assert!(!crosses_wakeup(0, 1 << 20, 0));
    }
}
