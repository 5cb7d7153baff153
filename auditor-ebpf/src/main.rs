//! Kernel side of the auditor: syscall tracepoints that copy the bytes a target valkey-server moves on
//! its client sockets into one ring buffer, with the connection tuples and close events.
//!
//! Filtering happens before any copy, by TGID (so Valkey's io-threads are included): the calling
//! process must pass the `TARGET_HINTS` prefilter, and then the (TGID, fd) pair must be in `SOCKETS`
//! (filled at accept of a process in `TARGETS`, by user space for connections that existed before
//! attach, emptied at close). Every other process costs one array load.
#![no_std]
#![no_main]

mod reply_scan;
mod sock_capture;

use core::{ffi::c_void, mem::MaybeUninit};

use auditor_common::{
    AF_INET, AF_INET6, AcceptEvent, CFG_CAPTURE_CAP, CFG_LEN, CFG_REPLY_SCAN, CFG_WAKEUP_BYTES,
    CHUNK_SIZE, CloseEvent, Comm, DATA_HDR_LEN, DIR_IN, DIR_OUT, DataEvent, EventKind, MAX_CHUNKS,
    ProcEvent, SCAN_RAW, SCAN_TOKEN, SOCK_UNREPORTED, STAT_LEN, STAT_RING_DROP_BYTES,
    STAT_RING_DROPS, STAT_RING_PEAK, STAT_RING_WRITES, SocketState, TARGET_HINT_SLOTS,
    crosses_wakeup, data_records_ring_bytes, socket_key, target_hint_slot,
};
use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_probe_read_kernel, bpf_probe_read_user, bpf_ringbuf_output},
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};

/// Processes to audit, by TGID. Value unused.
#[map]
static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(256, 0);

/// A prefilter in front of `TARGETS`, indexed by `target_hint_slot(tgid)`: non-zero when some
/// target (now or earlier) has a TGID in that slot. Every syscall exit of every process on the host
/// runs `sys_exit`, so rejecting the other processes costs an array load (inlined by the verifier)
/// instead of a hash lookup. Slots are only ever set, never cleared, so a plain store is safe from
/// both the kernel (exec) and user space; a stale slot only costs the exact lookup behind it.
#[map]
static TARGET_HINTS: Array<u32> = Array::with_max_entries(TARGET_HINT_SLOTS, 0);

/// Command names whose processes become targets the moment they exec (`--comm`, `--all`,
/// `--follow-restarts`): added here in the kernel, so not even the first connection is missed.
#[map]
static COMMS: HashMap<Comm, u32> = HashMap::with_max_entries(64, 0);

/// Sockets of the targets that are captured, keyed by `socket_key(tgid, fd)`.
#[map]
static SOCKETS: HashMap<u64, SocketState> = HashMap::with_max_entries(65536, 0);

/// Settings written by user space (see `CFG_*`).
#[map]
static CONFIG: Array<u64> = Array::with_max_entries(CFG_LEN, 0);

/// Per-CPU counters (see `STAT_*`): every failed ring-buffer write is counted here.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_LEN, 0);

/// The one ring buffer to user space: a single ring keeps a global order across CPUs. User space may
/// resize it before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Where a data syscall's bytes are (read from its arguments at exit).
#[repr(C)]
#[derive(Clone, Copy)]
struct DataArgs {
    fd: u32,
    dir: u8,
    _pad: [u8; 3],
    /// Buffer (plain syscalls) or `struct iovec *` (vectored ones).
    ptr: u64,
    /// 0 for a plain buffer, else the iovec count.
    iovcnt: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct AcceptArgs {
    listen_fd: u32,
    _pad: u32,
    sockaddr: u64,
}

/// Staging area for one ring record: header, then up to two chunks' worth of room so the verifier can
/// prove `fill + n` in bounds without relating the two registers (each is bounded by `CHUNK_SIZE`).
const SCRATCH_LEN: usize = DATA_HDR_LEN + 2 * CHUNK_SIZE;

#[repr(C, align(8))]
struct Scratch {
    bytes: [u8; SCRATCH_LEN],
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch bytes (a fresh map pointer the verifier can bound).
#[inline(always)]
fn scratch_bytes() -> Option<*mut u8> {
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: pointer into the per-CPU scratch value.
    Some(unsafe { (*scratch).bytes.as_mut_ptr() })
}

/// A ring record holding a whole chunk, reserved in the ring and filled straight from the user
/// buffer: one copy instead of two (user → scratch → ring). `bpf_ringbuf_reserve` needs a
/// constant size, so only whole chunks go this way; the same layout as a header and `chunk_len`
/// bytes, so user space reads it like any other data record.
#[repr(C)]
struct WholeChunk {
    hdr: DataEvent,
    bytes: [u8; CHUNK_SIZE],
}

/// The copy loop's state lives in a per-CPU map value, not on the stack: the verifier then sees its
/// fields as unknown scalars on every `bpf_loop` iteration and checks the callback once, instead of
/// following exact values through thousands of iterations.
#[map]
static COPY_CTX: PerCpuArray<CopyCtx> = PerCpuArray::with_max_entries(1, 0);

// Tracepoint field offsets (from /sys/kernel/tracing/events/syscalls/*/format).
const ARG0: usize = 16;

/// Whether `tgid` may be a target: false for certain, true means "ask `TARGETS`" (or `SOCKETS`,
/// whose key holds the TGID too).
#[inline(always)]
fn may_be_target(tgid: u32) -> bool {
    TARGET_HINTS
        .get(target_hint_slot(tgid))
        .is_some_and(|v| *v != 0)
}

#[inline(always)]
fn is_target(tgid: u32) -> bool {
    // SAFETY: read-only lookup of a plain value.
    may_be_target(tgid) && unsafe { TARGETS.get(&tgid) }.is_some()
}

#[inline(always)]
fn bump(index: u32, by: u64) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += by };
    }
}

#[inline(always)]
fn config(index: u32) -> u64 {
    CONFIG.get(index).copied().unwrap_or(0)
}

/// The buffer of a data syscall on a captured socket of a target, from its arguments (`fd`, buffer
/// or iovec or msghdr pointer, count), with the socket's state, or `None` when it is not one. (One
/// hash lookup per data syscall: the state pointer is handed on rather than looked up again.)
#[inline(always)]
fn data_args(
    tgid: u32,
    dir: u8,
    kind: ArgKind,
    fd: u64,
    arg1: u64,
    arg2: u64,
) -> Option<(DataArgs, *mut SocketState)> {
    let fd = fd as u32;
    let state = SOCKETS.get_ptr_mut(&socket_key(tgid, fd))?;
    Some((buffer_args(dir, kind, fd, arg1, arg2)?, state))
}

/// Where a data syscall's bytes are, from its arguments after the fd.
#[inline(always)]
fn buffer_args(dir: u8, kind: ArgKind, fd: u32, arg1: u64, arg2: u64) -> Option<DataArgs> {
    let (ptr, iovcnt) = match kind {
        ArgKind::Plain => (arg1, 0),
        ArgKind::Iovec => (arg1, arg2),
        ArgKind::Msghdr => {
            // struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
            let mut iov: u64 = 0;
            let mut cnt: u64 = 0;
            // SAFETY: reading user memory through the helper, which tolerates faults.
            unsafe {
                bpf_probe_read_user((&raw mut iov).cast(), 8, (arg1 + 16) as *const c_void);
                bpf_probe_read_user((&raw mut cnt).cast(), 8, (arg1 + 24) as *const c_void);
            }
            (iov, cnt)
        }
    };
    if ptr == 0 {
        return None;
    }
    Some(DataArgs {
        fd,
        dir,
        _pad: [0; 3],
        ptr,
        iovcnt,
    })
}

/// The direction and argument layout of a data syscall, by number; `None` for any other syscall.
#[inline(always)]
fn data_syscall(nr: u64) -> Option<(u8, ArgKind)> {
    Some(match nr {
        NR_READ | NR_RECVFROM => (DIR_IN, ArgKind::Plain),
        NR_READV => (DIR_IN, ArgKind::Iovec),
        NR_RECVMSG => (DIR_IN, ArgKind::Msghdr),
        NR_WRITE | NR_SENDTO => (DIR_OUT, ArgKind::Plain),
        NR_WRITEV => (DIR_OUT, ArgKind::Iovec),
        NR_SENDMSG => (DIR_OUT, ArgKind::Msghdr),
        _ => return None,
    })
}

/// The current syscall's `[dx, si, di, orig_ax]` from the saved user registers at `regs`
/// (`struct pt_regs *`).
#[inline(always)]
fn syscall_regs(regs: u64) -> Option<[u64; 4]> {
    // Uninitialised, since a zeroing `memset` would be a byte loop here.
    let mut r = MaybeUninit::<[u64; 4]>::uninit();
    // SAFETY: fault-tolerant read of the kernel's saved registers of the current task; the helper
    // writes all 32 bytes (zeroes on failure) and we only read them on success.
    if unsafe {
        bpf_probe_read_kernel(
            r.as_mut_ptr().cast(),
            32,
            (regs as usize + PT_REGS_DX) as *const c_void,
        )
    } < 0
    {
        return None;
    }
    // SAFETY: initialised by the successful read above.
    Some(unsafe { r.assume_init() })
}

#[derive(Clone, Copy)]
enum ArgKind {
    Plain,
    Iovec,
    Msghdr,
}

/// State of the chunked copy driven by `bpf_loop`; lives on the stack of the exit handler.
#[repr(C)]
struct CopyCtx {
    iov: u64,
    iovcnt: u64,
    iov_idx: u64,
    cur_base: u64,
    cur_len: u64,
    /// Bytes still to copy (never more than the capture cap).
    left: u64,
    /// Bytes staged in the scratch buffer.
    fill: u64,
    /// Offset, within the syscall, of the staged bytes.
    off: u64,
    flags: u64,
    hdr: DataEvent,
}

/// Write `hdr` in front of the `len` payload bytes staged in the scratch and send them as one ring
/// record; a full ring is counted (`dropped` payload bytes lost). Returns false when it was full.
#[inline(always)]
fn output_staged(scratch: *mut u8, hdr: DataEvent, len: u64, flags: u64, dropped: u64) -> bool {
    // SAFETY: the scratch holds DATA_HDR_LEN + 2 * CHUNK_SIZE bytes and callers bound len by
    // CHUNK_SIZE.
    let ret = unsafe {
        core::ptr::write_unaligned(scratch.cast::<DataEvent>(), hdr);
        bpf_ringbuf_output(
            (&raw const EVENTS).cast_mut().cast(),
            scratch.cast(),
            DATA_HDR_LEN as u64 + len,
            flags,
        )
    };
    if ret < 0 {
        bump(STAT_RING_DROPS, 1);
        bump(STAT_RING_DROP_BYTES, dropped);
        return false;
    }
    bump(STAT_RING_WRITES, 1);
    true
}

/// Entry `idx` of a user `struct iovec` array: (base, length), or `None` if it cannot be read.
#[inline(always)]
fn read_iovec(iov: u64, idx: u64) -> Option<(u64, u64)> {
    let mut pair = [0u64; 2];
    // SAFETY: reading one user `struct iovec` through the fault-tolerant helper.
    let r = unsafe {
        bpf_probe_read_user(
            pair.as_mut_ptr().cast(),
            16,
            (iov + idx * 16) as *const c_void,
        )
    };
    (r >= 0).then_some((pair[0], pair[1]))
}

/// Send the staged bytes as one ring record. Returns false when the ring is full.
#[inline(always)]
fn flush(c: &mut CopyCtx, scratch: *mut u8) -> bool {
    let mut fill = c.fill;
    if fill == 0 {
        return true;
    }
    if fill > CHUNK_SIZE as u64 {
        fill = CHUNK_SIZE as u64;
    }
    c.hdr.chunk_off = c.off as u32;
    c.hdr.chunk_len = fill as u32;
    if !output_staged(scratch, c.hdr, fill, c.flags, c.left + fill) {
        return false;
    }
    c.off += fill;
    c.fill = 0;
    true
}

/// Copy the next `CHUNK_SIZE` bytes of the current user buffer straight into a ring record (see
/// [`WholeChunk`]); the `bpf_loop` callback's return value (0: go on, 1: stop).
#[inline(always)]
fn copy_whole_chunk(c: &mut CopyCtx) -> i64 {
    let Some(mut entry) = EVENTS.reserve::<WholeChunk>(0) else {
        bump(STAT_RING_DROPS, 1);
        bump(STAT_RING_DROP_BYTES, c.left);
        return 1;
    };
    c.hdr.chunk_off = c.off as u32;
    c.hdr.chunk_len = CHUNK_SIZE as u32;
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` points to a reserved ring record of `size_of::<WholeChunk>()` bytes; the
    // header is written whole and the payload by the fault-tolerant helper.
    let r = unsafe {
        core::ptr::write_unaligned(&raw mut (*rec).hdr, c.hdr);
        bpf_probe_read_user(
            (&raw mut (*rec).bytes).cast(),
            CHUNK_SIZE as u32,
            c.cur_base as *const c_void,
        )
    };
    if r < 0 {
        // The user buffer vanished under us: the rest shows as a gap.
        entry.discard(0);
        return 1;
    }
    entry.submit(c.flags);
    bump(STAT_RING_WRITES, 1);
    c.off += CHUNK_SIZE as u64;
    c.cur_base += CHUNK_SIZE as u64;
    c.cur_len -= CHUNK_SIZE as u64;
    c.left -= CHUNK_SIZE as u64;
    0
}

#[inline(never)]
extern "C" fn copy_step(_index: u64, _unused: *mut c_void) -> i64 {
    let Some(c) = COPY_CTX.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU map value; the program runs to completion on this CPU.
    let c = unsafe { &mut *c };
    let Some(scratch) = scratch_bytes() else {
        return 1;
    };
    if c.left == 0 {
        let _ = flush(c, scratch);
        return 1;
    }
    if c.cur_len == 0 {
        if c.iov_idx >= c.iovcnt {
            let _ = flush(c, scratch);
            return 1;
        }
        let iovec = read_iovec(c.iov, c.iov_idx);
        c.iov_idx += 1;
        let Some((base, len)) = iovec else {
            let _ = flush(c, scratch);
            return 1;
        };
        c.cur_base = base;
        c.cur_len = len;
        return 0;
    }
    if c.fill == 0 && c.cur_len >= CHUNK_SIZE as u64 && c.left >= CHUNK_SIZE as u64 {
        return copy_whole_chunk(c);
    }
    let mut fill = c.fill;
    if fill >= CHUNK_SIZE as u64 {
        fill = CHUNK_SIZE as u64 - 1;
    }
    let mut n = c.cur_len;
    if n > c.left {
        n = c.left;
    }
    let space = CHUNK_SIZE as u64 - fill;
    if n > space {
        n = space;
    }
    if n > CHUNK_SIZE as u64 {
        n = CHUNK_SIZE as u64;
    }
    // SAFETY: fill < CHUNK_SIZE and n <= CHUNK_SIZE, and the scratch has room for 2 * CHUNK_SIZE.
    let r = unsafe {
        let dst = scratch.add(DATA_HDR_LEN + fill as usize);
        bpf_probe_read_user(dst.cast(), n as u32, c.cur_base as *const c_void)
    };
    if r < 0 {
        // The user buffer vanished under us: what we have is still sent, the rest shows as a gap.
        let _ = flush(c, scratch);
        return 1;
    }
    c.fill = fill + n;
    c.cur_base += n;
    c.cur_len -= n;
    c.left -= n;
    if (c.fill >= CHUNK_SIZE as u64 || c.left == 0) && !flush(c, scratch) {
        return 1;
    }
    0
}

#[inline(always)]
fn emit_data(pid_tgid: u64, args: DataArgs, state: *mut SocketState, ret: i64) -> u32 {
    if ret <= 0 {
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let ret = ret as u64;
    // SAFETY: map value pointer; one direction of one socket is only ever advanced by one thread
    // at a time, since Valkey never reads (or writes) one client from two threads at once.
    let pos = unsafe {
        if args.dir == DIR_IN {
            let p = (*state).in_pos;
            (*state).in_pos = p + ret;
            p
        } else {
            let p = (*state).out_pos;
            (*state).out_pos = p + ret;
            p
        }
    };
    let cap = config(CFG_CAPTURE_CAP);
    let captured = if ret < cap { ret } else { cap };
    let wakeup = config(CFG_WAKEUP_BYTES);
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if let Some(p) = STATS.get_ptr_mut(STAT_RING_PEAK) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            if avail > *p {
                *p = avail;
            }
        }
    }
    // Wake the consumer once per `wakeup` bytes that enter the ring: when this syscall's records
    // take the unread data across a multiple of the threshold. Not once per record while the
    // consumer is still busy with the last batch (each wake-up costs the server an irq_work), and
    // never a missed one for good: a wake-up only "when the unread data crosses the threshold"
    // was lost whenever the records' own headers made the crossing or the consumer read between
    // the query and the reservation, and from then on every record was above it (the consumer
    // then only woke at its 10 ms poll, and small rings overflowed on modest traffic). `avail`
    // is a snapshot; the next crossing corrects any race.
    let flags = if wakeup == 0 {
        0
    } else if crosses_wakeup(avail, data_records_ring_bytes(captured), wakeup) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    };
    let (iov, iovcnt, cur_base, cur_len) = if args.iovcnt == 0 {
        (0, 0, args.ptr, ret)
    } else {
        (args.ptr, args.iovcnt, 0, 0)
    };
    let c = CopyCtx {
        iov,
        iovcnt,
        iov_idx: 0,
        cur_base,
        cur_len,
        left: captured,
        fill: 0,
        off: 0,
        flags,
        hdr: DataEvent {
            kind: EventKind::Data as u8,
            dir: args.dir,
            flags: 0,
            _pad: 0,
            fd: args.fd,
            tgid,
            tid: pid_tgid as u32,
            ts_ns: unsafe { bpf_ktime_get_ns() },
            stream_pos: pos,
            total_len: ret as u32,
            chunk_off: 0,
            chunk_len: 0,
            captured_len: captured as u32,
        },
    };
    if captured == 0 {
        return 0;
    }
    // SAFETY: live map value (see above).
    if args.dir == DIR_OUT && unsafe { (*state).out_mode } != SCAN_RAW {
        let flags = reply_scan::wake_for_elided(c.flags, wakeup);
        reply_scan::emit_scanned(state, c.hdr, args.ptr, args.iovcnt, ret, captured, flags);
        return 0;
    }
    // Fast path for the common case, a plain buffer that fits one record: one copy, one output,
    // no loop and no per-CPU loop state.
    if iovcnt == 0 && captured <= CHUNK_SIZE as u64 {
        let Some(base) = scratch_bytes() else {
            return 0;
        };
        let mut n = captured;
        if n > CHUNK_SIZE as u64 {
            n = CHUNK_SIZE as u64;
        }
        let mut hdr = c.hdr;
        hdr.chunk_len = n as u32;
        // SAFETY: the scratch value holds DATA_HDR_LEN + 2 * CHUNK_SIZE bytes and n <= CHUNK_SIZE.
        unsafe {
            if bpf_probe_read_user(
                base.add(DATA_HDR_LEN).cast(),
                n as u32,
                cur_base as *const c_void,
            ) < 0
            {
                return 0;
            }
            output_staged(base, hdr, n, c.flags, n);
        }
        return 0;
    }
    let Some(ctx_ptr) = COPY_CTX.get_ptr_mut(0) else {
        return 0;
    };
    let chunks = captured / CHUNK_SIZE as u64 + 2;
    let mut loops = chunks + 2 * iovcnt;
    if loops > MAX_CHUNKS as u64 {
        loops = MAX_CHUNKS as u64;
    }
    // SAFETY: per-CPU map value, written before the loop that reads it; the callback follows the
    // bpf_loop contract and takes its state from COPY_CTX.
    unsafe {
        core::ptr::write(ctx_ptr, c);
        bpf_loop(
            loops as u32,
            copy_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    0
}

#[inline(always)]
fn emit_accept(
    pid_tgid: u64,
    listen_fd: u64,
    sockaddr: u64,
    ret: i64,
    keep_unreported: bool,
) -> u32 {
    if ret < 0 {
        return 0; // EAGAIN ends every accept loop of Valkey
    }
    let args = AcceptArgs {
        listen_fd: listen_fd as u32,
        _pad: 0,
        sockaddr,
    };
    let tgid = (pid_tgid >> 32) as u32;
    let fd = ret as u32;
    // A new socket starts both streams at 0, replacing whatever an earlier fd of that number had;
    // its reply stream starts at a token, so it can be scanned (see `reply_scan`).
    let state = SocketState {
        out_mode: if config(CFG_REPLY_SCAN) != 0 {
            SCAN_TOKEN
        } else {
            SCAN_RAW
        },
        ..SocketState::default()
    };
    let _ = SOCKETS.insert(&socket_key(tgid, fd), &state, 0);
    let mut raw = [0u8; 28];
    if args.sockaddr != 0 {
        // SAFETY: fault-tolerant read of the sockaddr the caller passed (sockaddr_in6 is 28 bytes).
        unsafe {
            bpf_probe_read_user(raw.as_mut_ptr().cast(), 28, args.sockaddr as *const c_void);
        }
    }
    let family = u16::from_ne_bytes([raw[0], raw[1]]);
    let port = u16::from_be_bytes([raw[2], raw[3]]);
    let mut addr = [0u8; 16];
    if family == AF_INET {
        addr[..4].copy_from_slice(&raw[4..8]);
    } else if family == AF_INET6 {
        addr.copy_from_slice(&raw[8..24]);
    }
    let ev = AcceptEvent {
        kind: EventKind::Accept as u8,
        _pad: 0,
        family,
        fd,
        tgid,
        listen_fd: args.listen_fd,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        port: if family == AF_INET || family == AF_INET6 {
            port
        } else {
            0
        },
        local_port: 0,
        _pad2: [0; 4],
        addr,
        ino: 0,
    };
    output_accept(&ev, keep_unreported);
    0
}

/// Report a connection. If the ring is full, its data must not reach a user space that never
/// heard of it (dropped unseen, or, once its fd held another connection, taken for that one's):
/// with `keep_unreported` (syscall tracepoints) the socket stays in `SOCKETS` marked
/// `SOCK_UNREPORTED`, its data counted as ring loss until user space finds and registers it;
/// otherwise it leaves `SOCKETS`, and in `--capture sockets` its next read or write registers it
/// again (`sock_capture::new_socket`).
#[inline(always)]
fn output_accept(ev: &AcceptEvent, keep_unreported: bool) {
    if EVENTS.output::<AcceptEvent>(ev, 0).is_err() {
        bump(STAT_RING_DROPS, 1);
        let key = socket_key(ev.tgid, ev.fd);
        match SOCKETS.get_ptr_mut(&key) {
            // SAFETY: map value pointer.
            Some(state) if keep_unreported => unsafe { (*state).flags |= SOCK_UNREPORTED },
            _ => {
                let _ = SOCKETS.remove(&key);
            }
        }
    } else {
        bump(STAT_RING_WRITES, 1);
    }
}

// x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
const NR_READ: u64 = 0;
const NR_WRITE: u64 = 1;
const NR_READV: u64 = 19;
const NR_WRITEV: u64 = 20;
const NR_ACCEPT: u64 = 43;
const NR_SENDTO: u64 = 44;
const NR_RECVFROM: u64 = 45;
const NR_SENDMSG: u64 = 46;
const NR_RECVMSG: u64 = 47;
const NR_ACCEPT4: u64 = 288;

/// `struct pt_regs` (x86_64): dx, si, di and orig_ax are contiguous from offset 96.
const PT_REGS_DX: usize = 96;

/// Every syscall exit, one raw tracepoint: the arguments are still in the saved user registers, so
/// no per-syscall state is kept between enter and exit (no hash-map insert and delete on the
/// server's hot path), and one cheap program replaces eleven perf-event tracepoint pairs.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // Only the prefilter here: a data syscall's SOCKETS lookup (keyed by TGID and fd) already says
    // whether it is a target's captured socket, so a target pays no TARGETS lookup for its reads
    // and writes, and none at all for its other syscalls. Accepts ask TARGETS below.
    if !may_be_target(tgid) {
        return 0;
    }
    let regs: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    let Some([dx, si, di, nr]) = syscall_regs(regs) else {
        return 0;
    };
    if nr == NR_ACCEPT || nr == NR_ACCEPT4 {
        if is_target(tgid) {
            emit_accept(pid_tgid, di, si, ret, true);
        }
        return 0;
    }
    let Some((dir, kind)) = data_syscall(nr) else {
        return 0;
    };
    if ret <= 0 {
        return 0;
    }
    if let Some((args, state)) = data_args(tgid, dir, kind, di, si, dx) {
        // SAFETY: map value pointer.
        if unsafe { (*state).flags } & SOCK_UNREPORTED != 0 {
            bump(STAT_RING_DROPS, 1);
            bump(STAT_RING_DROP_BYTES, ret as u64);
            return 0;
        }
        emit_data(pid_tgid, args, state, ret);
    }
    0
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let fd: u64 = unsafe { ctx.read_at(ARG0) }.unwrap_or(u64::MAX);
    let fd = fd as u32;
    let key = socket_key(tgid, fd);
    // SAFETY: read-only lookup.
    if unsafe { SOCKETS.get(&key) }.is_none() {
        return 0;
    }
    let _ = SOCKETS.remove(&key);
    emit_close(tgid, fd);
    0
}

/// Tell user space that the target's socket `fd` is closed.
#[inline(always)]
fn emit_close(tgid: u32, fd: u32) {
    let ev = CloseEvent {
        kind: EventKind::Close as u8,
        _pad: [0; 3],
        fd,
        tgid,
        _pad2: 0,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    if EVENTS.output::<CloseEvent>(&ev, 0).is_err() {
        bump(STAT_RING_DROPS, 1);
    } else {
        bump(STAT_RING_WRITES, 1);
    }
}

#[inline(always)]
fn emit_proc(kind: EventKind, tgid: u32, child: u32, comm: [u8; 16]) {
    let ev = ProcEvent {
        kind: kind as u8,
        _pad: [0; 3],
        tgid,
        child,
        _pad2: 0,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm,
    };
    if EVENTS.output::<ProcEvent>(&ev, 0).is_err() {
        bump(STAT_RING_DROPS, 1);
    } else {
        bump(STAT_RING_WRITES, 1);
    }
}

// sched tracepoint field offsets (from /sys/kernel/tracing/events/sched/*/format).
const FORK_CHILD_PID: usize = 20;
const EXIT_GROUP_DEAD: usize = 32;

/// A process exec'd: if its new command name is watched, it is a target from now on.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let Ok(comm) = bpf_get_current_comm() else {
        return 0;
    };
    // SAFETY: read-only lookup.
    if unsafe { COMMS.get(&Comm(comm)) }.is_none() {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // The hint first: a data syscall that sees the TARGETS entry must also pass the prefilter.
    if let Some(hint) = TARGET_HINTS.get_ptr_mut(target_hint_slot(tgid)) {
        // SAFETY: a plain aligned u32 store into an array map value; slots are only ever set to 1.
        unsafe { core::ptr::write_volatile(hint, 1) };
    }
    let _ = TARGETS.insert(&tgid, &1, 0);
    emit_proc(EventKind::Exec, tgid, 0, comm);
    0
}

/// A target forked: user space decides whether the child is a server (a daemonizing valkey-server
/// forks and its parent exits) or a thread or a snapshot child.
#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let child: i32 = unsafe { ctx.read_at(FORK_CHILD_PID) }.unwrap_or(0);
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    emit_proc(EventKind::Fork, tgid, child as u32, comm);
    0
}

/// The last thread of a target exited: its connections are gone without close() calls.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let group_dead: u8 = unsafe { ctx.read_at(EXIT_GROUP_DEAD) }.unwrap_or(0);
    if group_dead == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !is_target(tgid) {
        return 0;
    }
    let _ = TARGETS.remove(&tgid);
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    emit_proc(EventKind::Exit, tgid, 0, comm);
    0
}

// Keep BPF_NOEXIST referenced for user space documentation parity (inserts from user space use it).
const _: u64 = BPF_NOEXIST as u64;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
