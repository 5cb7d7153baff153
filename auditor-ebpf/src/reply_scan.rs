//! The reply-stream scanner: what a server writes to a socket accepted under capture is walked token
//! by token (RESP is a sequence of lines, some followed by a bulk payload and its CRLF), and of a bulk
//! payload longer than `ELIDE_MIN` only the first `ELIDE_PREFIX` bytes are copied. Records never
//! need reply payloads, so a `GET` of a 1 KiB value moves ~80 bytes through the ring instead of
//! ~1 KiB, and a pipelined read of several large values is covered whole, however large the write
//! (past the capture cap, only raw copies lose bytes).
//!
//! The kept bytes go into one ring record per `CHUNK_SIZE` as segments (`SegmentHdr` + bytes, at
//! their offset in the syscall); user space feeds each at its stream position, so the bytes left
//! out are gaps inside bulk payloads, which its parser absorbs. The scan state lives in the socket's
//! `SocketState` between writes. Anything that does not look like RESP turns the socket to
//! `SCAN_RAW` for good: every byte is copied again, as for sockets that existed before attach.
//!
//! Payload bytes past the prefix are never read from user memory. The scan reads `WINDOW` bytes
//! ahead at a time; a line of up to 16 bytes whole in it is taken in one step (two per step), longer
//! lines a byte per step. Used only with `--reply-scan`: one helper read per reply costs about what
//! copying a 1 KiB reply does, so it pays only for large payloads (BENCHMARKS.md, session 9).
use core::ffi::c_void;

use auditor_common::{
    CHUNK_SIZE, DATA_FLAG_SEGMENTS, DATA_FLAG_TAIL, DATA_HDR_LEN, DataEvent, ELIDE_MIN,
    ELIDE_PREFIX, SCAN_HDR_NEG, SCAN_HEADER, SCAN_KEEP, SCAN_LINE, SCAN_PREFIX, SCAN_RAW,
    SCAN_SKIP, SCAN_TOKEN, SEGMENT_HDR_LEN, STAT_WAKE_ELIDED, SegmentHdr, SocketState,
};
use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::generated::{bpf_loop, bpf_probe_read_user},
    macros::map,
    maps::PerCpuArray,
};

use crate::{STATS, output_staged, read_iovec, scratch_bytes};

/// Bytes read ahead from user memory while looking for token boundaries: a payload's CRLF, the next
/// bulk header and its 64-byte prefix fit in one read.
const WINDOW: u64 = 96;
/// `bpf_loop`'s own limit is 1 << 23.
const MAX_STEPS: u64 = 1 << 22;

#[repr(C)]
pub struct ScanCtx {
    iov: u64,
    iovcnt: u64,
    iov_idx: u64,
    /// Unconsumed part of the current user buffer.
    cur_base: u64,
    cur_len: u64,
    /// Offset in the syscall of `cur_base`.
    off: u64,
    /// The syscall's length.
    total: u64,
    /// Payload bytes of the record being built (segment headers included).
    fill: u64,
    /// Bytes read ahead at `fill..fill + win`, the user bytes at `cur_base`.
    win: u64,
    /// Offset of the open segment's header plus one; 0: none open.
    seg: u64,
    mode: u64,
    hdr: u64,
    acc: u64,
    keep: u64,
    skip: u64,
    /// Ring-buffer wake-up flags for every record of this syscall.
    ring_flags: u64,
    /// Every byte of the syscall was handled (0 or 1).
    done: u64,
    /// Payload bytes skipped in this syscall.
    elided: u64,
    event: DataEvent,
}

#[map]
static SCAN_CTX: PerCpuArray<ScanCtx> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn min(a: u64, b: u64) -> u64 {
    if a < b { a } else { b }
}

/// Write the open segment's length (or drop it if empty).
#[inline(always)]
fn close_segment(c: &mut ScanCtx, s: *mut u8) {
    if c.seg == 0 {
        return;
    }
    let at = c.seg - 1;
    c.seg = 0;
    if at >= CHUNK_SIZE as u64 || c.fill < at + SEGMENT_HDR_LEN as u64 {
        return;
    }
    let len = c.fill - at - SEGMENT_HDR_LEN as u64;
    if len == 0 {
        c.fill = at;
        return;
    }
    // SAFETY: `at < CHUNK_SIZE` and the scratch holds DATA_HDR_LEN + 2 * CHUNK_SIZE bytes.
    unsafe {
        core::ptr::write_unaligned(
            s.add(DATA_HDR_LEN + at as usize + 4).cast::<u32>(),
            len as u32,
        );
    }
}

/// Send the record built so far.
#[inline(always)]
fn flush(c: &mut ScanCtx, s: *mut u8, tail: bool) {
    close_segment(c, s);
    let mut fill = c.fill;
    c.fill = 0;
    c.win = 0;
    if fill == 0 && !tail {
        return;
    }
    if fill > CHUNK_SIZE as u64 {
        fill = CHUNK_SIZE as u64;
    }
    let mut ev = c.event;
    ev.flags = DATA_FLAG_SEGMENTS | if tail { DATA_FLAG_TAIL } else { 0 };
    ev.chunk_len = fill as u32;
    ev.captured_len = c.off as u32;
    output_staged(s, ev, fill, c.ring_flags, fill);
}

/// Room for `want` more kept bytes in an open segment: flushes the record when fewer than
/// `min(want, WINDOW)` fit, opens a segment at the current offset. Returns how many fit.
#[inline(always)]
fn make_room(c: &mut ScanCtx, s: *mut u8, want: u64) -> u64 {
    let need = min(want, WINDOW) + SEGMENT_HDR_LEN as u64;
    if c.fill + need > CHUNK_SIZE as u64 {
        flush(c, s, false);
    }
    if c.seg == 0 {
        let at = c.fill;
        if at >= (CHUNK_SIZE - SEGMENT_HDR_LEN) as u64 {
            return 0;
        }
        let h = SegmentHdr {
            off: c.off as u32,
            len: 0,
        };
        // SAFETY: at + SEGMENT_HDR_LEN <= CHUNK_SIZE, inside the scratch.
        unsafe { core::ptr::write_unaligned(s.add(DATA_HDR_LEN + at as usize).cast(), h) };
        c.seg = at + 1;
        c.fill = at + SEGMENT_HDR_LEN as u64;
    }
    min(want, CHUNK_SIZE as u64 - c.fill)
}

/// Copy `n` (at most `CHUNK_SIZE - fill`) user bytes at `cur_base` to the record; false on a fault.
#[inline(always)]
fn read_user(c: &mut ScanCtx, s: *mut u8, n: u64) -> bool {
    let mut fill = c.fill;
    if fill >= CHUNK_SIZE as u64 {
        fill = CHUNK_SIZE as u64 - 1;
    }
    let mut n = n;
    if n > CHUNK_SIZE as u64 {
        n = CHUNK_SIZE as u64;
    }
    if n == 0 {
        return true;
    }
    // SAFETY: fill < CHUNK_SIZE and n <= CHUNK_SIZE, and the scratch has room for 2 * CHUNK_SIZE.
    unsafe {
        bpf_probe_read_user(
            s.add(DATA_HDR_LEN + fill as usize).cast(),
            n as u32,
            c.cur_base as *const c_void,
        ) >= 0
    }
}

/// `n` bytes at `cur_base` are done with (kept or skipped).
#[inline(always)]
fn advance(c: &mut ScanCtx, n: u64) {
    c.cur_base += n;
    c.cur_len -= n;
    c.off += n;
}

/// A fault in the user buffer: the rest of the syscall is a tail, and the socket copies raw.
#[inline(always)]
fn give_up(c: &mut ScanCtx) -> i64 {
    c.mode = SCAN_RAW as u64;
    1
}

/// No byte of the syscall is left.
#[inline(always)]
fn all_done(c: &ScanCtx) -> bool {
    c.cur_len == 0 && (c.off >= c.total || c.iov_idx >= c.iovcnt)
}

/// `n` window bytes are kept.
#[inline(always)]
fn take(c: &mut ScanCtx, n: u64) {
    c.fill += n;
    c.win -= n;
    advance(c, n);
}

/// Up to `keep` of the window's bytes are kept (`SCAN_KEEP`, `SCAN_PREFIX`); when none is left to
/// keep, a prefix goes on to its skip and anything else to the next token.
#[inline(always)]
fn take_kept(c: &mut ScanCtx) {
    let n = min(c.keep, c.win);
    take(c, n);
    c.keep -= n;
    if c.keep == 0 {
        c.mode = if c.mode == SCAN_PREFIX as u64 {
            SCAN_SKIP
        } else {
            SCAN_TOKEN
        } as u64;
    }
}

/// A line-typed token: simple strings and errors, numbers, nulls, booleans and aggregate headers.
#[inline(always)]
fn is_line_type(b: u8) -> bool {
    matches!(
        b,
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' | b'*' | b'%' | b'~' | b'>' | b'|'
    )
}

/// A token whose line is a length and is followed by that many payload bytes and a CRLF.
#[inline(always)]
fn is_bulk_type(b: u8) -> bool {
    matches!(b, b'$' | b'=' | b'!')
}

/// Reply bytes the scanner left out since this CPU's last forced wake-up force one too once they
/// reach the threshold, as if they had been copied: the consumer's work per wake-up follows the
/// traffic, not the ring bytes. (Counted in ring bytes alone, with ~13x fewer per `GET` of 1 KiB,
/// the consumer woke 70 times a second instead of 1400, each batch preempted the server for
/// longer, and GET throughput at `-P 16 -d 1024` fell by a fifth.) Only scanned writes pay for it.
#[inline(always)]
pub fn wake_for_elided(ring_flags: u64, wakeup: u64) -> u64 {
    let Some(p) = STATS.get_ptr_mut(STAT_WAKE_ELIDED) else {
        return ring_flags;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    unsafe {
        if ring_flags == BPF_RB_FORCE_WAKEUP as u64 || (wakeup != 0 && *p >= wakeup) {
            *p = 0;
            return BPF_RB_FORCE_WAKEUP as u64;
        }
    }
    ring_flags
}

/// The end of a bulk length line (`hdr`, `acc` set): keep a short payload, or the prefix of a long
/// one; what of it is in the window already is taken at once.
#[inline(always)]
fn start_payload(c: &mut ScanCtx) {
    if c.hdr & SCAN_HDR_NEG as u64 != 0 {
        c.mode = SCAN_TOKEN as u64;
        return;
    }
    if c.acc > ELIDE_MIN && c.hdr != b'!' as u64 {
        c.mode = SCAN_PREFIX as u64;
        c.keep = ELIDE_PREFIX;
        c.skip = c.acc - ELIDE_PREFIX;
    } else {
        c.mode = SCAN_KEEP as u64;
        c.keep = c.acc + 2;
    }
    take_kept(c);
}

const ONES: u64 = 0x0101_0101_0101_0101;

/// 1 + the index of the first LF among the first `valid` (1..=8) bytes of `w` (little-endian), or
/// 0 when there is none. Branch-free (a zero-byte test on `w ^ "\n\n..."`), so the verifier sees
/// one path.
#[inline(always)]
fn lf_in_word(w: u64, valid: u64) -> u64 {
    let x = w ^ (ONES * b'\n' as u64);
    // Bytes past `valid` are made non-zero (not LF) in x.
    let x = if valid >= 8 {
        x
    } else {
        x | (u64::MAX << (8 * valid))
    };
    let t = x.wrapping_sub(ONES) & !x & (ONES << 7);
    if t == 0 {
        return 0;
    }
    // The lowest flagged byte is exact; count the bytes up to and including it.
    let below = (t & t.wrapping_neg()) - 1;
    (below & ONES).wrapping_mul(ONES) >> 56
}

/// Fast path at a token start: a line of at most 16 bytes that is whole in the window (`+OK`,
/// `:1`, `*2`, `$1024`, ...) is taken in one step, with as much of its payload as the window
/// holds. Returns false to leave the token to the byte-at-a-time path (a longer line, a line cut
/// by the window's end, odd bytes).
#[inline(always)]
fn whole_line(c: &mut ScanCtx, s: *mut u8) -> bool {
    let f = c.fill;
    let win = c.win;
    if f >= CHUNK_SIZE as u64 {
        return false;
    }
    // SAFETY: f < CHUNK_SIZE and the scratch holds DATA_HDR_LEN + 2 * CHUNK_SIZE bytes, so the
    // 16 bytes at f are inside it (bytes past the window are stale, and masked out).
    let (w0, w1) = unsafe {
        let base = s.add(DATA_HDR_LEN + f as usize);
        (
            core::ptr::read_unaligned(base.cast::<u64>()),
            core::ptr::read_unaligned(base.add(8).cast::<u64>()),
        )
    };
    let mut lf = lf_in_word(w0, win);
    if lf == 0 && win > 8 {
        lf = lf_in_word(w1, win - 8);
        if lf != 0 {
            lf += 8;
        }
    }
    if lf < 3 {
        return false;
    }
    let t = w0 as u8;
    if is_line_type(t) {
        take(c, lf);
        return true;
    }
    if !is_bulk_type(t) {
        return false;
    }
    // `$-1`: a null.
    let neg = if (w0 >> 8) as u8 == b'-' {
        SCAN_HDR_NEG as u64
    } else {
        0
    };
    // Up to 6 digits, all in the first word (bytes 1 .. lf - 2); longer lengths (1 MB
    // and more) go the byte path.
    let digits = lf - 3 - if neg != 0 { 1 } else { 0 };
    if lf > 8 || digits == 0 || digits > 6 {
        return false;
    }
    let first = if neg != 0 { 2 } else { 1 };
    // The digits, most significant first from the low byte up, moved to the top of the
    // word and left-padded with '0's, then checked and summed pairwise (SWAR).
    let raw = (w0 >> (8 * first)) << (8 * (8 - digits));
    let v = raw | (ONES * b'0' as u64) >> (8 * digits);
    let d = v.wrapping_sub(ONES * b'0' as u64);
    if (v.wrapping_add(ONES * 0x46) | d) & (ONES << 7) != 0 {
        return false;
    }
    let d = ((d & 0x0F0F_0F0F_0F0F_0F0F).wrapping_mul(2561)) >> 8;
    let d = ((d & 0x00FF_00FF_00FF_00FF).wrapping_mul(6_553_601)) >> 16;
    let acc = ((d & 0x0000_FFFF_0000_FFFF).wrapping_mul(42_949_672_960_001)) >> 32;
    take(c, lf);
    c.hdr = t as u64 | neg;
    c.acc = acc;
    start_payload(c);
    true
}

/// A plain write of at most `WINDOW` bytes that holds one or two short replies, scanned without
/// the loop. False (with nothing consumed beyond what the loop resumes from) otherwise.
#[inline(always)]
fn short_write(c: &mut ScanCtx, s: *mut u8) -> bool {
    let n = make_room(c, s, c.cur_len);
    if n != c.cur_len || !read_user(c, s, n) {
        return false;
    }
    c.win = n;
    if !whole_line(c, s) {
        return false;
    }
    if c.cur_len != 0 && c.mode == SCAN_TOKEN as u64 {
        whole_line(c, s);
    }
    if c.cur_len == 0 {
        c.done = 1;
        return true;
    }
    false
}

#[inline(never)]
extern "C" fn scan_step(_index: u64, _unused: *mut c_void) -> i64 {
    let Some(c) = SCAN_CTX.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU map value; the program runs to completion on this CPU.
    let c = unsafe { &mut *c };
    let Some(s) = scratch_bytes() else {
        return 1;
    };
    if step(c, s) != 0 {
        return 1;
    }
    // The last byte handled: stop now rather than spend a step to find out.
    if all_done(c) {
        c.done = 1;
        return 1;
    }
    0
}

/// One step of the scan: an iovec change, a skip, a keep, or a token (a whole short line with
/// what the window holds of its payload, or one byte of a longer one). 0: go on; 1: stop.
#[inline(always)]
fn step(c: &mut ScanCtx, s: *mut u8) -> i64 {
    if all_done(c) {
        c.done = 1;
        return 1;
    }
    if c.cur_len == 0 {
        let iovec = read_iovec(c.iov, c.iov_idx);
        c.iov_idx += 1;
        let Some((base, len)) = iovec else {
            return give_up(c);
        };
        c.cur_base = base;
        c.cur_len = min(len, c.total - c.off);
        c.win = 0;
        return 0;
    }
    let mode = c.mode as u32;
    if mode == SCAN_SKIP {
        let n = min(c.skip, c.cur_len);
        advance(c, n);
        c.elided += n;
        c.skip -= n;
        c.win = 0;
        close_segment(c, s);
        if c.skip == 0 {
            c.mode = SCAN_KEEP as u64;
            c.keep = 2;
        }
        return 0;
    }
    if mode == SCAN_KEEP || mode == SCAN_PREFIX || mode == SCAN_RAW {
        let want = if mode == SCAN_RAW {
            c.cur_len
        } else {
            min(c.keep, c.cur_len)
        };
        if c.win == 0 {
            // A short keep (a payload's CRLF) reads a whole window: the next token is in it.
            let ahead = if want < WINDOW {
                min(WINDOW, c.cur_len)
            } else {
                want
            };
            let n = make_room(c, s, ahead);
            if n == 0 || !read_user(c, s, n) {
                return give_up(c);
            }
            c.win = n;
        }
        if mode == SCAN_RAW {
            take(c, c.win);
        } else {
            take_kept(c);
        }
        return 0;
    }
    // SCAN_TOKEN, SCAN_LINE, SCAN_HEADER: look at bytes.
    if c.win == 0 {
        let n = make_room(c, s, min(WINDOW, c.cur_len));
        if n == 0 || !read_user(c, s, n) {
            return give_up(c);
        }
        c.win = n;
    }
    if c.mode == SCAN_TOKEN as u64 && whole_line(c, s) {
        // Pipelined short replies: one more token from the same window in this step.
        if c.mode == SCAN_TOKEN as u64 && c.win > 0 {
            whole_line(c, s);
        }
        return 0;
    }
    // One byte per step: an unrolled loop of several bytes multiplies the verifier's states
    // past its limit, while a step's own cost is a few loads.
    let f = c.fill;
    if f >= CHUNK_SIZE as u64 {
        return give_up(c);
    }
    // SAFETY: f < CHUNK_SIZE, inside the scratch; the window's bytes were read there.
    let b = unsafe { *s.add(DATA_HDR_LEN + f as usize) };
    take(c, 1);
    let mode = c.mode as u32;
    if mode == SCAN_LINE {
        if b == b'\n' {
            c.mode = SCAN_TOKEN as u64;
        }
        return 0;
    }
    if mode == SCAN_TOKEN {
        if is_bulk_type(b) {
            c.mode = SCAN_HEADER as u64;
            c.hdr = b as u64;
            c.acc = 0;
        } else if is_line_type(b) {
            c.mode = SCAN_LINE as u64;
        } else {
            c.mode = SCAN_RAW as u64;
        }
        return 0;
    }
    // SCAN_HEADER.
    match b {
        b'0'..=b'9' => {
            if c.acc < 1 << 40 {
                c.acc = c.acc * 10 + (b - b'0') as u64;
            }
            return 0;
        }
        b'-' => {
            c.hdr |= SCAN_HDR_NEG as u64;
            return 0;
        }
        b'\r' => return 0,
        b'\n' => {}
        _ => {
            c.mode = SCAN_RAW as u64;
            return 0;
        }
    }
    start_payload(c);
    0
}

/// Scan and send one write of a scanned socket. `ptr`/`iovcnt` as in `DataArgs`; `budget` bounds
/// the work (the capture cap).
#[inline(always)]
pub fn emit_scanned(
    state: *mut SocketState,
    event: DataEvent,
    ptr: u64,
    iovcnt: u64,
    total: u64,
    budget: u64,
    ring_flags: u64,
) {
    let Some(cp) = SCAN_CTX.get_ptr_mut(0) else {
        return;
    };
    let (iov, iovcnt, cur_base, cur_len) = if iovcnt == 0 {
        (0, 0, ptr, total)
    } else {
        (ptr, iovcnt, 0, 0)
    };
    // SAFETY: `state` is a live SOCKETS value; the per-CPU context is written before the loop
    // that reads it.
    unsafe {
        core::ptr::write(
            cp,
            ScanCtx {
                iov,
                iovcnt,
                iov_idx: 0,
                cur_base,
                cur_len,
                off: 0,
                total,
                fill: 0,
                win: 0,
                seg: 0,
                mode: (*state).out_mode as u64,
                hdr: (*state).out_hdr as u64,
                acc: (*state).out_acc,
                keep: (*state).out_keep,
                skip: (*state).out_skip,
                ring_flags,
                done: 0,
                elided: 0,
                event,
            },
        );
    }
    let Some(s) = scratch_bytes() else {
        return;
    };
    // A write of one or two short replies (every write at `-P 1`) is taken here, without the
    // loop: one read, one or two lines.
    // SAFETY: per-CPU values of this CPU, as below.
    let handled = unsafe {
        let c = &mut *cp;
        c.iovcnt == 0 && c.total <= WINDOW && c.mode == SCAN_TOKEN as u64 && short_write(c, s)
    };
    if !handled {
        // A step consumes at least one byte, except at iovec edges and record flushes.
        let mut steps = budget + 4 * iovcnt + 64;
        if steps > MAX_STEPS {
            steps = MAX_STEPS;
        }
        // SAFETY: the callback follows the bpf_loop contract and takes its state from SCAN_CTX.
        unsafe {
            bpf_loop(
                steps as u32,
                scan_step as *mut c_void,
                core::ptr::null_mut(),
                0,
            );
        }
    }
    // SAFETY: per-CPU values of this CPU; nothing else runs here until the program returns.
    unsafe {
        let c = &mut *cp;
        let tail = c.done == 0 && c.off < c.total;
        if tail {
            // The rest was not looked at: where the next token starts is unknown.
            c.mode = SCAN_RAW as u64;
        }
        flush(c, s, tail);
        if let Some(p) = STATS.get_ptr_mut(STAT_WAKE_ELIDED) {
            *p += c.elided;
        }
        (*state).out_mode = c.mode as u32;
        (*state).out_hdr = c.hdr as u32;
        (*state).out_acc = c.acc;
        (*state).out_keep = c.keep;
        (*state).out_skip = c.skip;
    }
}
