//! Streaming, gap-tolerant RESP parsers for the two directions of a Valkey client connection.
//!
//! The auditor sees a connection as two byte streams copied out of syscalls by eBPF: client→server
//! requests and server→client replies. Bytes arrive in whatever pieces the capture produced (one
//! byte, or ten thousand pipelined commands in one buffer), some pieces never arrive (ring-buffer
//! loss, the per-syscall capture cap), and one argument may be 512 MB. Both parsers are therefore
//! byte-driven state machines, not "parse a complete frame" functions:
//!
//! * **Streaming.** `feed` consumes every byte it is given and records where it stopped in a small
//!   `state` enum (inside which header line, how many payload bytes remain, ...). Nothing waits for
//!   "enough bytes", so the events are the same whatever the split; the tests compare byte-by-byte
//!   feeding with whole-buffer feeding.
//! * **Bounded memory.** Payload bytes are never buffered. An argument keeps its first `keep` bytes
//!   plus its declared length; a reply keeps a 512-byte prefix. The only buffered line is an inline
//!   command, capped at 64 KiB as in Valkey (`PROTO_INLINE_MAX_SIZE`). Per request, retained
//!   prefixes are capped at 1 MiB and retained arguments at 100,000. Reply nesting is a stack of
//!   "values still expected" counters capped at depth 8192, so `*4000000000` costs one counter.
//! * **Gap tolerance.** `skip(n)` says `n` bytes were never captured. Inside a bulk payload (or its
//!   trailing CRLF) the position after the gap is still known exactly, so the gap is absorbed and
//!   the value is marked `lost`. Anywhere else the framing is unknowable: the parser drops the
//!   partial value, reports `Desync` and resynchronises (see below).
//! * **Never panics.** No slice indexing that can fail, no unwrap on data, saturating arithmetic.
//! * **Fast paths.** A whole, well-formed multibulk request, or top-level `+ - : $` reply, lying in
//!   one piece is read in one go, but only when the state machine would read it the same way;
//!   anything else goes through the state machine. The events never depend on the path taken (the
//!   tests compare whole-buffer with byte-by-byte feeding). With `feed_pooled`, argument and reply
//!   buffers come from a caller's [`BufPool`] that handled requests and replies are handed back to.
//!
//! # Requests (client → server)
//!
//! The parser mirrors Valkey's `processMultibulkBuffer`/`processInlineBuffer`, so the auditor
//! sees the commands the server executes:
//!
//! * A request starting with `*` is multibulk: `*<n>\r\n` then `n` times `$<len>\r\n<bytes>\r\n`.
//!   Numbers follow `string2ll` (no `+`, no leading zeros, at most 20 characters). `n <= 0` is no
//!   command; `n > INT_MAX` is "invalid multibulk length" (Valkey checks `INT_MAX`); a bulk length
//!   outside `0..=512 MiB` is "invalid bulk length"; a bulk header not starting with `$` is
//!   "expected '$'"; a header line with no CR within 64 KiB is "too big mbulk/bulk count string".
//! * Like Valkey, the byte after a header's CR and the two bytes after a payload are skipped
//!   without being checked. A stricter parser would let a client hide a command the server runs
//!   behind a malformed terminator. The exception is the tentative first request after a resync
//!   guess (below), where strict CRLF checks are how a wrong guess is detected.
//! * Anything else is an inline command: a line up to `\n` (a trailing `\r` is stripped), split
//!   as Valkey 9.1.2 splits it (quotes join the text around them). Blank lines are no command.
//!   Unbalanced quotes are a Desync, and so are more than 64 KiB of a line without its end at
//!   `end_read` (the end of one read of the server's, whose ring chunks were fed one by one; `feed`
//!   is a whole read: "too big inline request"; a longer line whose end came in the same read is
//!   run). Every 0xff written in a line is dropped, as Valkey drops it. A
//!   NUL before the `\n` means the line never ends, as for the server's `strchr`: nothing after
//!   it runs, until 64 KiB are pending and the server refuses them.
//!
//! Valkey closes the connection after a protocol error, so after one the parser only looks for
//! what might be the next command.
//!
//! # Replies (server → client)
//!
//! All RESP2 and RESP3 types. Scalars are read as a line (`+ - : , # ( _`) or as a length line and
//! a payload (`$ = !`). Aggregates (`* % ~ >`) push a frame holding the number of values they still
//! expect (two per pair for maps). A finished value pops every frame it completes; when none is
//! left the top-level reply is emitted. Attributes (`|`) push a frame that, once complete, counts
//! as nothing: the value after it takes its place. What is kept is a summary for the audit
//! record: kind, length, a text prefix, depth-1 error elements (EXEC), and the first and third
//! elements (pub/sub).
//!
//! # Resynchronisation
//!
//! After a Desync, or for a connection opened before the auditor attached (`new_resyncing`), the
//! parser drops bytes until a *candidate start*, then parses a *tentative* value from there. In
//! tentative mode a protocol error only returns to scanning (no second `Desync`), and the first
//! completed value ends tentative mode. Candidate starts are only checked at a *line start*: the
//! first byte after a gap or after attaching (captures come in whole syscalls, which usually begin
//! at a message boundary), or the byte after a line feed.
//!
//! * Requests: at a line start, `*<1-9 digits, at most INT_MAX>\r\n$`, i.e. clearly a multibulk
//!   command followed by its first bulk header. Also, an ASCII letter is taken as the start of an
//!   inline command when it is the very first byte seen (`new_resyncing`). Otherwise, after a
//!   gap, letters are too likely to be the tail of a value, or of a command (Valkey reads a
//!   pipeline 16 KiB at a time, so a read may begin mid-command even right after a reply), to
//!   be trusted.
//! * Replies: at a line start that follows `\r\n` (or is the first byte seen), any RESP type byte.
//!   This is best effort: an element of an interrupted array looks like a top-level reply. The
//!   caller treats requests pending at a Desync as having an unknown outcome.
//!
//! Every gap `skip` cannot absorb pushes exactly one `Desync`, even while already resynchronising:
//! the caller may have sent requests since the last one.

use std::mem;

use crate::argv::Arg;

/// Longest inline line, and longest `*`/`$` header line, that Valkey waits for before answering
/// "-ERR Protocol error" (`PROTO_INLINE_MAX_SIZE`).
const PROTO_INLINE_MAX_SIZE: usize = 64 * 1024;
/// Largest bulk argument Valkey accepts by default (`proto-max-bulk-len`).
const PROTO_MAX_BULK_LEN: i64 = 512 * 1024 * 1024;
/// Largest multibulk count Valkey accepts (`processMultibulkBuffer` rejects `ll > INT_MAX`).
const MAX_MULTIBULK_LEN: i64 = i32::MAX as i64;
/// `string2ll` rejects strings of `LONG_STR_SIZE` (21) bytes or more.
const MAX_NUMBER_LEN: usize = 20;
/// Retention budget of one request: argument entries kept in `Request::args`...
const MAX_RETAINED_ARGS: usize = 100_000;
/// ...and prefix bytes kept over all its arguments.
const MAX_RETAINED_PREFIX_BYTES: usize = 1024 * 1024;
/// Prefix kept of a reply's line or payload, and of each depth-1 error element.
pub const REPLY_TEXT_MAX: usize = 512;
/// Prefix kept of a reply's first element (`Reply::first`).
const REPLY_FIRST_MAX: usize = 64;
/// Depth-1 error elements kept per reply.
pub const MAX_ELEMENT_ERRORS: usize = 4096;
/// Deepest reply nesting followed; deeper is treated as garbage. A script can return a table
/// nested up to Lua's C-stack limit (`LUAI_MAXCSTACK`, 8000: Valkey 9.1.2 returns 5,000 levels and
/// refuses 10,000 with "reached lua stack limit"), so a client must not be able to hide its
/// pipeline's results behind a deep but valid reply. 16 bytes a level, freed after the reply.
const MAX_REPLY_DEPTH: usize = 8192;
/// The server writes reply length lines as plain numbers. A longer line means the bytes are not
/// RESP (typically after a wrong resync guess), and there is no point waiting for its CR.
const MAX_REPLY_LEN_LINE: u64 = 64;
/// A reused scratch buffer that grew beyond this is freed rather than kept for the next value, so
/// an idle connection holds almost nothing.
const SPARE_BUFFER_MAX: usize = 4096;
/// Desync reason for a gap that `skip` could not absorb. Every other reason is a protocol error in
/// bytes that were all seen.
pub const GAP_REASON: &str = "gap in stream";
/// Largest argument count the request fast path takes; larger requests go through the state machine.
const FAST_MAX_ARGS: i64 = 1024;
/// Recycled argv vectors kept in a [`BufPool`], and the largest capacity worth keeping.
const POOL_MAX_VECS: usize = 256;
const POOL_VEC_MAX_CAP: usize = 16;
/// Recycled byte buffers kept in a [`BufPool`], and the largest capacity worth keeping.
const POOL_MAX_BUFS: usize = 1024;
/// Covers the default argument prefix (`audit.payload_maxsize` 1024, plus one byte).
const POOL_BUF_MAX_CAP: usize = 2048;
/// A new small buffer gets at least this capacity, so that recycled buffers fit most short
/// arguments and replies (command names, keys, small values, `OK`) whatever they come back for.
const POOL_BUF_MIN_CAP: usize = 32;

/// Buffers of requests and replies that were handled, for the next ones to reuse: with a steady
/// stream of commands, parsing allocates nothing. Bounded (at most 1024 buffers of at most 2 KiB
/// and 256 argv vectors of at most 16 entries), and only what the caller hands back is kept.
///
/// One pool can serve every connection: pass it to [`RequestParser::feed_pooled`] and
/// [`ReplyParser::feed_pooled`], and hand what was handled back with [`BufPool::put_args`] and
/// [`BufPool::put_bytes`].
#[derive(Debug, Default)]
pub struct BufPool {
    vecs: Vec<Vec<Arg>>,
    bufs: Vec<Vec<u8>>,
}

impl BufPool {
    /// Keep the buffers of a handled request's argv for reuse.
    pub fn put_args(&mut self, mut args: Vec<Arg>) {
        for arg in args.drain(..) {
            self.put_bytes(arg.prefix);
        }
        if args.capacity() > 0
            && args.capacity() <= POOL_VEC_MAX_CAP
            && self.vecs.len() < POOL_MAX_VECS
        {
            self.vecs.push(args);
        }
    }

    /// Keep a byte buffer (a handled reply's text) for reuse.
    pub fn put_bytes(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() > 0
            && buf.capacity() <= POOL_BUF_MAX_CAP
            && self.bufs.len() < POOL_MAX_BUFS
        {
            buf.clear();
            self.bufs.push(buf);
        }
    }

    /// An empty argv vector.
    fn args(&mut self) -> Vec<Arg> {
        self.vecs.pop().unwrap_or_default()
    }

    /// An empty byte buffer with room for `keep` bytes.
    fn bytes(&mut self, keep: usize) -> Vec<u8> {
        if keep == 0 {
            return Vec::new();
        }
        if keep > POOL_BUF_MAX_CAP {
            return Vec::with_capacity(keep);
        }
        match self.bufs.pop() {
            Some(mut buf) => {
                buf.reserve(keep);
                buf
            }
            None => Vec::with_capacity(keep.max(POOL_BUF_MIN_CAP)),
        }
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.vecs.capacity() * mem::size_of::<Vec<Arg>>()
            + self
                .vecs
                .iter()
                .map(|v| v.capacity() * mem::size_of::<Arg>())
                .sum::<usize>()
            + self.bufs.capacity() * mem::size_of::<Vec<u8>>()
            + self.bufs.iter().map(Vec::capacity).sum::<usize>()
    }
}

/// A complete request (one command) parsed from the client->server stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The argv, within the retention budget. Each argument keeps up to `keep` bytes of prefix and
    /// its real length. Once the request's retained prefixes total 1 MiB, later arguments are
    /// still pushed, with a shorter or empty prefix and their real length (`lost` stays false,
    /// because every byte was seen). After 100,000 entries, arguments are only counted in `argc`.
    pub args: Vec<Arg>,
    /// Real argument count (may exceed `args.len()`).
    pub argc: u64,
    /// Came as an inline command.
    pub inline: bool,
    /// `ts` of the `feed` call that delivered the request's last byte. If the last byte was in a
    /// gap that `skip` absorbed, this is the `ts` of the latest `feed` call.
    pub done_ts: u64,
    /// Some bytes of this request were skipped (a gap inside a bulk payload or its CRLF).
    pub lost: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestEvent {
    Request(Request),
    /// A request without arguments (a blank inline line, `*0`, `*-1`): no command, but Valkey
    /// resets the client for it as after a command, which uses up a `CLIENT REPLY SKIP`.
    Empty,
    /// The stream broke framing. Either a gap that was not inside a bulk payload, or bytes that are
    /// not RESP (the server answers "-ERR Protocol error" and closes). The partial request was
    /// dropped and the parser is resynchronising.
    Desync {
        reason: &'static str,
    },
}

/// Where the request parser is in the client->server stream.
#[derive(Clone, Copy, Debug)]
enum RequestState {
    /// Between requests. The next byte chooses multibulk (`*`) or inline (anything else).
    Idle,
    /// In the `*<count>` line after the `*`. `cr`: its CR was seen, the next byte ends it.
    Count { line: NumLine, cr: bool },
    /// In a `$<len>` line. `first` is the byte that should be `$` (None: no byte yet).
    BulkLen {
        first: Option<u8>,
        line: NumLine,
        cr: bool,
    },
    /// In a bulk payload, `remaining` (> 0) bytes to go.
    Payload { remaining: u64 },
    /// After a payload, `left` (1 or 2) terminator bytes to go.
    Terminator { left: u8 },
    /// In an inline line. The bytes so far are in `RequestParser::inline_line`.
    Inline,
    /// Dropping bytes until something looks like the start of a request.
    Resync(RequestScan),
}

/// The resync scanner for requests. It matches `*<count>\r\n$` at a line start, one byte at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestScan {
    /// The very first byte of a connection seen mid-stream (an ASCII letter is accepted as inline).
    FirstByte,
    /// Looking for `*`, accepted only at a line start.
    Seek { line_start: bool },
    /// Matched `*`.
    Star,
    /// Matched `*` and `digits` digits of `count`.
    Digits { count: u64, digits: u8 },
    /// Matched `*<count>\r`.
    Cr { count: u64 },
    /// Matched `*<count>\r\n`; a `$` completes the match.
    Lf { count: u64 },
}

/// What one byte does to the resync scanner.
enum ScanStep {
    Continue(RequestScan),
    /// Start an inline command at this byte.
    Inline,
    /// `*<count>\r\n` was matched and this byte is the `$` of the first bulk header.
    Multibulk(u64),
}

/// `bytes` begin with a multibulk request's header and its first bulk header (`*<n>\r\n$`), the
/// candidate start the request parser resynchronises to.
pub fn starts_with_multibulk_header(bytes: &[u8]) -> bool {
    let Some(rest) = bytes.strip_prefix(b"*") else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    (1..=10).contains(&digits) && rest[0] != b'0' && rest[digits..].starts_with(b"\r\n$")
}

impl RequestScan {
    fn next(self, b: u8) -> ScanStep {
        match self {
            RequestScan::FirstByte if b.is_ascii_alphabetic() => ScanStep::Inline,
            RequestScan::FirstByte | RequestScan::Seek { line_start: true } if b == b'*' => {
                ScanStep::Continue(RequestScan::Star)
            }
            RequestScan::FirstByte | RequestScan::Seek { .. } => {
                ScanStep::Continue(RequestScan::Seek {
                    line_start: b == b'\n',
                })
            }
            RequestScan::Star => match b {
                b'1'..=b'9' => ScanStep::Continue(RequestScan::Digits {
                    count: u64::from(b - b'0'),
                    digits: 1,
                }),
                _ => Self::mismatch(b, false),
            },
            RequestScan::Digits { count, digits } => {
                if b.is_ascii_digit() && digits < 10 {
                    let count = count.saturating_mul(10).saturating_add(u64::from(b - b'0'));
                    ScanStep::Continue(RequestScan::Digits {
                        count,
                        digits: digits + 1,
                    })
                } else if b == b'\r' {
                    ScanStep::Continue(RequestScan::Cr { count })
                } else {
                    Self::mismatch(b, false)
                }
            }
            RequestScan::Cr { count } if b == b'\n' => {
                ScanStep::Continue(RequestScan::Lf { count })
            }
            RequestScan::Cr { .. } => Self::mismatch(b, false),
            RequestScan::Lf { count } if b == b'$' && count <= MAX_MULTIBULK_LEN as u64 => {
                ScanStep::Multibulk(count)
            }
            // The byte after the LF is itself at a line start and may begin the real command.
            RequestScan::Lf { .. } => Self::mismatch(b, true),
        }
    }

    /// A partial match failed at `b`. `b` can still start a match if it is at a line start.
    fn mismatch(b: u8, line_start: bool) -> ScanStep {
        RequestScan::Seek { line_start }.next(b)
    }
}

/// Streaming parser for the client->server direction of one connection.
#[derive(Debug)]
pub struct RequestParser {
    keep: usize,
    state: RequestState,
    /// Parsing the first request after a resync guess. Errors are silent (no second Desync) and
    /// terminators are checked strictly, because a failed check means the guess was wrong.
    tentative: bool,
    /// The request being parsed: retained args, real count, args still expected, bytes retained.
    args: Vec<Arg>,
    argc: u64,
    args_left: u64,
    retained_bytes: usize,
    lost: bool,
    /// The bulk argument being read, how much of it to keep, and whether it goes into `args`.
    arg: Arg,
    arg_keep: usize,
    arg_retained: bool,
    /// The inline line read so far, when it spans several `feed` calls (never over 64 KiB).
    inline_line: Vec<u8>,
    /// The inline line holds a NUL: Valkey looks for its end with `strchr`, which stops there,
    /// so the line never ends for the server. It waits until more than 64 KiB are pending and
    /// then refuses them ("too big inline request"); nothing after the NUL is ever executed.
    inline_unterminated: bool,
    /// `ts` of the latest `feed`, used for a request completed by a gap.
    last_ts: u64,
    /// Buffers to build requests from: the caller's pool during `feed_pooled`, a temporary one
    /// during `feed`, empty otherwise (so an idle parser holds no pool).
    pool: BufPool,
}

impl RequestParser {
    /// `keep`: max bytes of each argument kept as prefix (the caller passes max(payload_maxsize, 256)).
    pub fn new(keep: usize) -> Self {
        Self::with_state(keep, RequestState::Idle)
    }

    /// A parser for a connection that existed before the auditor attached. It drops bytes until
    /// `*<count>\r\n$` at a line start, except that an ASCII letter as the very first byte is taken
    /// as the start of an inline command. The first byte seen counts as a line start, because
    /// captures are whole syscalls. The first request is tentative (see the module doc).
    pub fn new_resyncing(keep: usize) -> Self {
        Self::with_state(keep, RequestState::Resync(RequestScan::FirstByte))
    }

    fn with_state(keep: usize, state: RequestState) -> Self {
        RequestParser {
            keep,
            state,
            tentative: false,
            args: Vec::new(),
            argc: 0,
            args_left: 0,
            retained_bytes: 0,
            lost: false,
            arg: Arg::default(),
            arg_keep: 0,
            arg_retained: false,
            inline_line: Vec::new(),
            inline_unterminated: false,
            last_ts: 0,
            pool: BufPool::default(),
        }
    }

    /// Changes the prefix kept per argument, from the next argument on.
    pub fn set_keep(&mut self, keep: usize) {
        self.keep = keep;
    }

    /// Like [`feed`](Self::feed), building requests from (and leaving partial ones in) buffers of
    /// `pool`. The events are the same; only allocations differ.
    pub fn feed_pooled(
        &mut self,
        data: &[u8],
        ts: u64,
        out: &mut Vec<RequestEvent>,
        pool: &mut BufPool,
    ) {
        mem::swap(&mut self.pool, pool);
        self.feed_inner(data, ts, out);
        mem::swap(&mut self.pool, pool);
    }

    /// Feeds one read's bytes and pushes completed requests and events to `out`.
    pub fn feed(&mut self, data: &[u8], ts: u64, out: &mut Vec<RequestEvent>) {
        self.feed_pooled(data, ts, out, &mut BufPool::default());
        self.end_read(out);
    }

    /// The end of one read of the server's (whose pieces were fed): like Valkey, refuse an inline
    /// line of which more than 64 KiB are pending without its end ("too big inline request").
    pub fn end_read(&mut self, out: &mut Vec<RequestEvent>) {
        if matches!(self.state, RequestState::Inline)
            && self.inline_line.len() > PROTO_INLINE_MAX_SIZE
        {
            self.fail("too big inline request", false, out);
        }
    }

    fn feed_inner(&mut self, data: &[u8], ts: u64, out: &mut Vec<RequestEvent>) {
        self.last_ts = ts;
        let mut pos = 0usize;
        while let Some(rest) = data.get(pos..).filter(|rest| !rest.is_empty()) {
            // Fast path: a whole, well-formed multibulk request in this piece.
            if matches!(self.state, RequestState::Idle)
                && rest.first() == Some(&b'*')
                && let Some(used) = self.fast_multibulk(rest, ts, out)
            {
                pos = pos.saturating_add(used);
                continue;
            }
            let used = self.step(rest, ts, out);
            debug_assert!(
                used > 0,
                "request parser made no progress in {:?}",
                self.state
            );
            // `max(1)` keeps a bug from turning into an endless loop in the daemon.
            pos = pos.saturating_add(used.max(1));
        }
    }

    /// Dropping bytes in search of a request's start (after attaching mid-command, or a gap).
    pub fn resyncing(&self) -> bool {
        matches!(self.state, RequestState::Resync(_))
    }

    /// `n` bytes of the stream were never captured (between the previous feed and the next).
    ///
    /// Inside a bulk payload, a gap reaching at most to the end of the payload's CRLF is absorbed.
    /// The argument is marked `lost` if payload bytes were missed, the request is marked `lost`,
    /// and true is returned. If the gap ends the last argument, the request is emitted now, with
    /// `done_ts` = the latest feed's ts. Otherwise (including at a request boundary, where the
    /// next bytes may be mid-command) the partial request is dropped, a `Desync` is pushed, the
    /// parser starts resynchronising and false is returned.
    pub fn skip(&mut self, n: u64, out: &mut Vec<RequestEvent>) -> bool {
        if n == 0 {
            return true;
        }
        let ts = self.last_ts;
        // Bytes still to come in the current argument, counting its CRLF.
        let to_arg_end = match self.state {
            RequestState::Payload { remaining } => Some(remaining.saturating_add(2)),
            RequestState::Terminator { left } => Some(u64::from(left)),
            _ => None,
        };
        match to_arg_end {
            Some(to_end) if n <= to_end => {
                self.lost = true;
                if let RequestState::Payload { .. } = self.state {
                    self.arg.lost = true;
                }
                match to_end - n {
                    0 => self.finish_arg(ts, out),
                    left @ 1..=2 => self.state = RequestState::Terminator { left: left as u8 },
                    left => {
                        self.state = RequestState::Payload {
                            remaining: left - 2,
                        }
                    }
                }
                true
            }
            _ => {
                out.push(RequestEvent::Desync { reason: GAP_REASON });
                self.reset_request();
                // Outside `feed` the parser keeps no pool.
                self.pool = BufPool::default();
                self.tentative = false;
                self.state = RequestState::Resync(RequestScan::Seek { line_start: true });
                false
            }
        }
    }

    /// Approximate heap bytes held (for tests of boundedness).
    #[allow(dead_code, reason = "boundedness tests; public for diagnostics")]
    pub fn heap_bytes(&self) -> usize {
        self.args.capacity() * mem::size_of::<Arg>()
            + self
                .args
                .iter()
                .map(|arg| arg.prefix.capacity())
                .sum::<usize>()
            + self.arg.prefix.capacity()
            + self.inline_line.capacity()
            + self.pool.heap_bytes()
    }

    /// The fast path for a whole multibulk request at the start of `data` (which starts with `*`),
    /// in the Idle state. It takes only requests the state machine would parse the same way:
    /// every header a valid number followed by CRLF, every payload followed by CRLF, and all of it
    /// in `data`. Then it pushes the request and returns the bytes used. Otherwise it changes
    /// nothing and returns None, and the state machine parses the request byte by byte.
    fn fast_multibulk(
        &mut self,
        data: &[u8],
        ts: u64,
        out: &mut Vec<RequestEvent>,
    ) -> Option<usize> {
        let (count, mut pos) = fast_number_line(data, 1)?;
        if !(1..=FAST_MAX_ARGS).contains(&count) {
            return None;
        }
        let mut args = self.pool.args();
        let mut retained_bytes = 0usize;
        for _ in 0..count {
            let header = match data.get(pos) {
                Some(b'$') => fast_number_line(data, pos + 1),
                _ => None,
            };
            let Some((len, start)) =
                header.filter(|(len, _)| (0..=PROTO_MAX_BULK_LEN).contains(len))
            else {
                self.pool.put_args(args);
                return None;
            };
            let len = len.unsigned_abs() as usize;
            let payload = data.get(start..start + len);
            if payload.is_none() || data.get(start + len..start + len + 2) != Some(b"\r\n") {
                self.pool.put_args(args);
                return None;
            }
            let payload = payload.unwrap_or_default();
            let (retained, keep) = retention(self.keep, len as u64, args.len(), retained_bytes);
            if retained {
                let mut prefix = self.pool.bytes(keep);
                prefix.extend_from_slice(payload.get(..keep).unwrap_or_default());
                retained_bytes = retained_bytes.saturating_add(prefix.len());
                args.push(Arg {
                    prefix,
                    len: len as u64,
                    lost: false,
                });
            }
            pos = start + len + 2;
        }
        out.push(RequestEvent::Request(Request {
            args,
            argc: count.unsigned_abs(),
            inline: false,
            done_ts: ts,
            lost: false,
        }));
        self.await_next_request();
        Some(pos)
    }

    /// Consumes at least one byte of `rest` (non-empty) and returns how many.
    fn step(&mut self, rest: &[u8], ts: u64, out: &mut Vec<RequestEvent>) -> usize {
        let Some(&b) = rest.first() else { return 0 };
        match self.state {
            RequestState::Idle => {
                if b == b'*' {
                    self.state = RequestState::Count {
                        line: NumLine::default(),
                        cr: false,
                    };
                    1
                } else {
                    self.state = RequestState::Inline;
                    self.step_inline(rest, ts, out)
                }
            }
            RequestState::Count { mut line, cr } => {
                if cr {
                    self.end_count_line(line, b, out);
                } else if b == b'\r' {
                    self.state = RequestState::Count { line, cr: true };
                } else {
                    line.push(b);
                    // Valkey counts the `*` too: more than 64 KiB without a CR is refused.
                    if line.total >= PROTO_INLINE_MAX_SIZE as u64 {
                        self.fail("too big mbulk count string", false, out);
                    } else {
                        self.state = RequestState::Count { line, cr: false };
                    }
                }
                1
            }
            RequestState::BulkLen {
                first,
                mut line,
                cr,
            } => {
                if cr {
                    self.end_bulk_len_line(first, line, b, out);
                } else if first.is_none() {
                    // Valkey looks for the CR first and checks the `$` afterwards, so an empty
                    // line ("\r") is "expected '$'" too.
                    self.state = RequestState::BulkLen {
                        first: Some(b),
                        line,
                        cr: b == b'\r',
                    };
                } else if b == b'\r' {
                    self.state = RequestState::BulkLen {
                        first,
                        line,
                        cr: true,
                    };
                } else {
                    line.push(b);
                    if line.total >= PROTO_INLINE_MAX_SIZE as u64 {
                        self.fail("too big bulk count string", false, out);
                    } else {
                        self.state = RequestState::BulkLen {
                            first,
                            line,
                            cr: false,
                        };
                    }
                }
                1
            }
            RequestState::Payload { remaining } => {
                let take = rest
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                let chunk = rest.get(..take).unwrap_or_default();
                if !self.arg.lost {
                    let room = self.arg_keep.saturating_sub(self.arg.prefix.len());
                    self.arg
                        .prefix
                        .extend_from_slice(chunk.get(..room.min(take)).unwrap_or_default());
                }
                let remaining = remaining.saturating_sub(take as u64);
                self.state = if remaining == 0 {
                    RequestState::Terminator { left: 2 }
                } else {
                    RequestState::Payload { remaining }
                };
                take
            }
            RequestState::Terminator { left } => {
                let expected = if left >= 2 { b'\r' } else { b'\n' };
                if b != expected && !self.arg.lost {
                    // After a resync guess, the guess was wrong; otherwise the client sent it, and
                    // Valkey refuses it so and closes the connection (9.1.2, checked).
                    let reason = if self.tentative {
                        "missing CRLF after bulk payload"
                    } else {
                        "invalid CRLF in request"
                    };
                    self.fail(reason, b == b'\n', out);
                    return 1;
                }
                let left = left.saturating_sub(1);
                if left == 0 {
                    self.finish_arg(ts, out);
                } else {
                    self.state = RequestState::Terminator { left };
                }
                1
            }
            RequestState::Inline => self.step_inline(rest, ts, out),
            RequestState::Resync(scan) => match scan.next(b) {
                ScanStep::Continue(next) => {
                    self.state = RequestState::Resync(next);
                    1
                }
                ScanStep::Inline => {
                    self.tentative = true;
                    self.state = RequestState::Inline;
                    self.step_inline(rest, ts, out)
                }
                ScanStep::Multibulk(count) => {
                    self.tentative = true;
                    self.begin_multibulk(count);
                    self.state = RequestState::BulkLen {
                        first: Some(b'$'),
                        line: NumLine::default(),
                        cr: false,
                    };
                    1
                }
            },
        }
    }

    /// `b` is the byte after the CR of a `*<count>` line (Valkey 9.1.2 refuses anything but LF
    /// there before it reads the number).
    fn end_count_line(&mut self, line: NumLine, b: u8, out: &mut Vec<RequestEvent>) {
        if b != b'\n' {
            let reason = if self.tentative {
                "expected LF after CR"
            } else {
                "invalid CRLF in request"
            };
            self.fail(reason, false, out);
            return;
        }
        // (The line ended in CRLF: the resync scan starts at a line start.)
        match line.value() {
            Some(count) if count > MAX_MULTIBULK_LEN => {
                self.fail("invalid multibulk length", true, out)
            }
            None => self.fail("invalid multibulk length", true, out),
            // `*0` and `*-1` are not commands; Valkey just moves on (resetting the client).
            Some(count) if count <= 0 => {
                if !self.tentative {
                    out.push(RequestEvent::Empty);
                }
                self.await_next_request();
            }
            Some(count) => {
                self.begin_multibulk(count.unsigned_abs());
                self.state = RequestState::BulkLen {
                    first: None,
                    line: NumLine::default(),
                    cr: false,
                };
            }
        }
    }

    /// `b` is the byte after the CR of a `$<len>` line.
    fn end_bulk_len_line(
        &mut self,
        first: Option<u8>,
        line: NumLine,
        b: u8,
        out: &mut Vec<RequestEvent>,
    ) {
        if self.tentative && b != b'\n' {
            self.fail("expected LF after CR", false, out);
            return;
        }
        if first != Some(b'$') {
            self.fail("expected '$'", b == b'\n', out);
            return;
        }
        if b != b'\n' {
            self.fail("invalid CRLF in request", false, out);
            return;
        }
        match line.value() {
            Some(len) if (0..=PROTO_MAX_BULK_LEN).contains(&len) => {
                self.begin_arg(len.unsigned_abs())
            }
            _ => self.fail("invalid bulk length", true, out),
        }
    }

    fn begin_multibulk(&mut self, count: u64) {
        self.reset_request();
        self.argc = count;
        self.args_left = count;
        // The count is a claim, not data: reserve a little and let the Vec grow with real args.
        self.args = self.pool.args();
        self.args
            .reserve(usize::try_from(count).unwrap_or(usize::MAX).min(16));
    }

    fn begin_arg(&mut self, len: u64) {
        let (retained, keep) = retention(self.keep, len, self.args.len(), self.retained_bytes);
        self.arg = Arg {
            prefix: self.pool.bytes(keep),
            len,
            lost: false,
        };
        self.arg_keep = keep;
        self.arg_retained = retained;
        self.state = if len == 0 {
            RequestState::Terminator { left: 2 }
        } else {
            RequestState::Payload { remaining: len }
        };
    }

    /// The current bulk argument's last terminator byte was consumed (or skipped).
    fn finish_arg(&mut self, ts: u64, out: &mut Vec<RequestEvent>) {
        let arg = mem::take(&mut self.arg);
        if self.arg_retained {
            self.retained_bytes = self.retained_bytes.saturating_add(arg.prefix.len());
            self.args.push(arg);
        }
        self.args_left = self.args_left.saturating_sub(1);
        if self.args_left > 0 {
            self.state = RequestState::BulkLen {
                first: None,
                line: NumLine::default(),
                cr: false,
            };
            return;
        }
        out.push(RequestEvent::Request(Request {
            args: mem::take(&mut self.args),
            argc: self.argc,
            inline: false,
            done_ts: ts,
            lost: self.lost,
        }));
        self.reset_request();
        self.await_next_request();
    }

    /// Inline state: `rest` continues (or, from Idle, starts) an inline line.
    fn step_inline(&mut self, rest: &[u8], ts: u64, out: &mut Vec<RequestEvent>) -> usize {
        let newline = if self.inline_unterminated {
            None
        } else {
            match rest.iter().position(|&b| b == b'\n' || b == 0) {
                Some(i) if rest.get(i) == Some(&0) => {
                    self.inline_unterminated = true;
                    None
                }
                found => found,
            }
        };
        let Some(newline) = newline else {
            // (Refused only at the end of the read, `end_read`, as the server checks: a read
            // comes in several pieces, and a piece without the line's end said nothing. QA: a
            // 100,000-byte line the server ran was refused here, and the commands after it in
            // the same write went unrecorded.)
            self.inline_line.extend_from_slice(rest);
            return rest.len();
        };
        let body = rest.get(..newline).unwrap_or_default();
        // No length check here: Valkey refuses only what it holds *without* a line end after a
        // read, so a line past 64 KiB whose end came in the same read is run (QA: a 65,540-byte
        // SET, then a FLUSHALL in the same write, were both run, and the FLUSHALL went unseen).
        if self.inline_line.is_empty() {
            // Usual case: the whole line is in this piece, so parse it in place without copying.
            self.finish_inline(body, ts, out);
        } else {
            let mut line = mem::take(&mut self.inline_line);
            line.extend_from_slice(body);
            self.finish_inline(&line, ts, out);
            line.clear();
            if line.capacity() <= SPARE_BUFFER_MAX {
                self.inline_line = line;
            }
        }
        newline.saturating_add(1)
    }

    /// `line` is a complete inline line without its `\n`.
    fn finish_inline(&mut self, line: &[u8], ts: u64, out: &mut Vec<RequestEvent>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match split_inline_args(line, self.keep) {
            None => self.fail("unbalanced quotes in request", true, out),
            Some((args, argc)) => {
                if argc > 0 {
                    out.push(RequestEvent::Request(Request {
                        args,
                        argc,
                        inline: true,
                        done_ts: ts,
                        lost: false,
                    }));
                } else if !self.tentative && line.is_empty() {
                    // (Only a line with nothing before its end: one of spaces uses up no SKIP
                    // on Valkey 9.1.2, checked by QA.)
                    out.push(RequestEvent::Empty);
                }
                self.await_next_request();
            }
        }
    }

    /// A complete unit (request, `*0`, blank line) was parsed: wait for the next request.
    fn await_next_request(&mut self) {
        self.state = RequestState::Idle;
        self.tentative = false;
    }

    /// Drops the partial request.
    fn reset_request(&mut self) {
        let args = mem::take(&mut self.args);
        self.pool.put_args(args);
        self.argc = 0;
        self.args_left = 0;
        self.retained_bytes = 0;
        self.lost = false;
        let arg = mem::take(&mut self.arg);
        self.pool.put_bytes(arg.prefix);
        self.arg_keep = 0;
        self.arg_retained = false;
        self.inline_line.clear();
        self.inline_unterminated = false;
        if self.inline_line.capacity() > SPARE_BUFFER_MAX {
            self.inline_line = Vec::new();
        }
    }

    /// Protocol error. Reports it unless the request was a resync guess, then resynchronises.
    /// `line_start`: the byte just consumed was a line feed.
    fn fail(&mut self, reason: &'static str, line_start: bool, out: &mut Vec<RequestEvent>) {
        if !self.tentative {
            out.push(RequestEvent::Desync { reason });
        }
        self.reset_request();
        self.tentative = false;
        self.state = RequestState::Resync(RequestScan::Seek { line_start });
    }
}

/// How much of a `len`-byte argument to keep, given what the request retains already. Returns
/// (pushed into `args` at all, prefix bytes to keep).
fn retention(keep: usize, len: u64, args_retained: usize, bytes_retained: usize) -> (bool, usize) {
    if args_retained >= MAX_RETAINED_ARGS {
        return (false, 0);
    }
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    (
        true,
        keep.min(len)
            .min(MAX_RETAINED_PREFIX_BYTES.saturating_sub(bytes_retained)),
    )
}

/// A header line `<number>\r\n` whose number starts at `data[start]`, when the state machine would
/// read it the same way: the CR within `MAX_NUMBER_LEN` bytes, an LF after it, and a number
/// `string2ll` accepts. Returns the number and the position after the LF.
fn fast_number_line(data: &[u8], start: usize) -> Option<(i64, usize)> {
    let rest = data.get(start..)?;
    let window = rest.get(..=MAX_NUMBER_LEN).unwrap_or(rest);
    let cr = window.iter().position(|&b| b == b'\r')?;
    if rest.get(cr + 1) != Some(&b'\n') {
        return None;
    }
    let n = string2ll(window.get(..cr)?)?;
    Some((n, start + cr + 2))
}

/// C `isspace` in the "C" locale, as `sdssplitargs` uses it.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits an inline line as Valkey 9.1.2 does. Returns the retained args and the real count, or
/// None for an unclosed quote. Arguments are separated by blanks (any C space before one, only
/// space, tab, CR and LF inside one); quoted parts join the text around them, as in a shell:
/// `"FLUSH"ALL` is `FLUSHALL`, `'it''s'` is `its` (checked against the real server: sdssplitargs
/// refused a closing quote followed by text, Valkey 9 does not, and taking such a line for a
/// protocol error left the commands it ran out of the log). In double quotes `\xHH`, `\n`, `\r`,
/// `\t`, `\b`, `\a` and `\<c>` (= c) are escapes; in single quotes only `\'`; either only when a
/// byte follows the escaped one (`"v\"` ending a line is `v\`: taken for an unclosed quote, it hid
/// the commands after it in the same read). A NUL ends the line.
pub fn split_inline_args(line: &[u8], keep: usize) -> Option<(Vec<Arg>, u64)> {
    let line = match line.iter().position(|&b| b == 0) {
        Some(nul) => line.get(..nul).unwrap_or_default(),
        None => line,
    };
    let ends_word = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let mut args = Vec::new();
    let mut argc = 0u64;
    let mut retained_bytes = 0usize;
    let mut token = Vec::new();
    let mut p = 0usize;
    loop {
        while p < line.len() && is_c_space(line[p]) {
            p += 1;
        }
        if p == line.len() {
            return Some((args, argc));
        }
        token.clear();
        while let Some(&c) = line.get(p).filter(|&&c| !ends_word(c)) {
            p += 1;
            match c {
                b'"' => loop {
                    let &c = line.get(p)?;
                    p += 1;
                    match c {
                        b'"' => break,
                        // An escape needs a byte after the escaped one: Valkey 9.1.2 reads
                        // `"v\"` at the end of a line as `v\` and a closing quote (checked).
                        b'\\' if p + 1 < line.len() => {
                            let hex = line
                                .get(p + 1..p + 3)
                                .and_then(|h| Some(hex_value(h[0])? * 16 + hex_value(h[1])?));
                            match (line[p], hex) {
                                (b'x', Some(byte)) => {
                                    token.push(byte);
                                    p += 3;
                                }
                                (e, _) => {
                                    push_literal(
                                        &mut token,
                                        match e {
                                            b'n' => b'\n',
                                            b'r' => b'\r',
                                            b't' => b'\t',
                                            b'b' => 0x08,
                                            b'a' => 0x07,
                                            other => other,
                                        },
                                    );
                                    p += 1;
                                }
                            }
                        }
                        c => push_literal(&mut token, c),
                    }
                },
                b'\'' => loop {
                    let &c = line.get(p)?;
                    p += 1;
                    match c {
                        b'\'' => break,
                        b'\\' if line.get(p) == Some(&b'\'') && p + 1 < line.len() => {
                            token.push(b'\'');
                            p += 1;
                        }
                        c => push_literal(&mut token, c),
                    }
                },
                c => push_literal(&mut token, c),
            }
        }
        argc += 1;
        let len = token.len() as u64;
        let (retained, keep) = retention(keep, len, args.len(), retained_bytes);
        if retained {
            let prefix = token.get(..keep).unwrap_or_default().to_vec();
            retained_bytes = retained_bytes.saturating_add(prefix.len());
            args.push(Arg {
                prefix,
                len,
                lost: false,
            });
        }
    }
}

/// A byte of an inline argument as written (not from a `\xHH` escape): Valkey 9.1.2 drops every
/// 0xff there, quoted or not (`FLUSH\xffALL` runs FLUSHALL, a lone one is an empty argument;
/// checked). QA: taken as written, `A\xffUTH bob <password>` was recorded as an unknown command
/// with its password in the clear, and a FLUSHALL so spelt passed every filter on its name.
fn push_literal(token: &mut Vec<u8>, b: u8) {
    if b != 0xff {
        token.push(b);
    }
}

/// The digits of a number line (after the type byte, before the CR), in a fixed array. A line
/// longer than `MAX_NUMBER_LEN` cannot be a valid number, so only its length is counted.
#[derive(Clone, Copy, Debug, Default)]
struct NumLine {
    bytes: [u8; MAX_NUMBER_LEN],
    kept: usize,
    /// All bytes pushed, kept or not.
    total: u64,
}

impl NumLine {
    fn push(&mut self, b: u8) {
        if let Some(slot) = self.bytes.get_mut(self.kept) {
            *slot = b;
            self.kept += 1;
        }
        self.total = self.total.saturating_add(1);
    }

    fn push_all(&mut self, bytes: &[u8]) {
        let room = MAX_NUMBER_LEN.saturating_sub(self.kept);
        for &b in bytes.iter().take(room) {
            self.push(b);
        }
        let not_kept = bytes.len().saturating_sub(room);
        self.total = self.total.saturating_add(not_kept as u64);
    }

    fn kept(&self) -> &[u8] {
        self.bytes.get(..self.kept).unwrap_or_default()
    }

    /// The line as `string2ll` reads it.
    fn value(&self) -> Option<i64> {
        if self.total > self.kept as u64 {
            return None;
        }
        string2ll(self.kept())
    }

    /// The whole line equals `s`.
    fn is(&self, s: &[u8]) -> bool {
        self.total == s.len() as u64 && self.kept() == s
    }
}

/// Valkey's `string2ll`: optional `-`, no `+`, no leading zeros, no spaces, at most 20 bytes, must
/// fit in an i64.
fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > MAX_NUMBER_LEN {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if !matches!(digits.first(), Some(b'1'..=b'9')) {
        return None;
    }
    let mut magnitude = 0u64;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        magnitude = magnitude
            .checked_mul(10)?
            .checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    Simple,
    Error,
    Integer,
    Bulk,
    Null,
    Array,
    Map,
    Set,
    Push,
    Attribute,
    Double,
    Boolean,
    BigNumber,
    Verbatim,
    BulkError,
}

impl ReplyKind {
    fn from_type_byte(b: u8) -> Option<Self> {
        Some(match b {
            b'+' => ReplyKind::Simple,
            b'-' => ReplyKind::Error,
            b':' => ReplyKind::Integer,
            b'$' => ReplyKind::Bulk,
            b'_' => ReplyKind::Null,
            b'*' => ReplyKind::Array,
            b'%' => ReplyKind::Map,
            b'~' => ReplyKind::Set,
            b'>' => ReplyKind::Push,
            b'|' => ReplyKind::Attribute,
            b',' => ReplyKind::Double,
            b'#' => ReplyKind::Boolean,
            b'(' => ReplyKind::BigNumber,
            b'=' => ReplyKind::Verbatim,
            b'!' => ReplyKind::BulkError,
            _ => return None,
        })
    }

    /// Types whose value is a CR-terminated line right after the type byte.
    fn is_line(self) -> bool {
        matches!(
            self,
            ReplyKind::Simple
                | ReplyKind::Error
                | ReplyKind::Integer
                | ReplyKind::Null
                | ReplyKind::Double
                | ReplyKind::Boolean
                | ReplyKind::BigNumber
        )
    }

    fn is_error(self) -> bool {
        matches!(self, ReplyKind::Error | ReplyKind::BulkError)
    }

    /// Scalars worth reporting as `Reply::first` (pub/sub message types, command names, ...).
    fn is_stringish(self) -> bool {
        matches!(
            self,
            ReplyKind::Simple | ReplyKind::Bulk | ReplyKind::Verbatim
        )
    }
}

/// Summary of one top-level reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Kind of the top-level value. Attributes are never returned: an attribute is skipped and
    /// the value after it is the reply. RESP2 null bulk (`$-1`) and null array (`*-1`) are `Null`,
    /// like RESP3 `_`.
    pub kind: ReplyKind,
    /// ts of the feed call that delivered the reply's first byte (an attribute's, if one precedes
    /// the value).
    pub start_ts: u64,
    /// Prefix (max 512 bytes) of the line of Simple/Error/Integer/Double/Boolean/BigNumber, or of
    /// the payload of Bulk/Verbatim/BulkError (for Verbatim, including its `txt:` format). For an
    /// aggregate whose first element ends in "subscribe" (a pub/sub confirmation), prefix (max
    /// 512 bytes) of its second element if that is a string (the channel); else empty.
    pub text: Vec<u8>,
    /// Element count for aggregates (Map: pairs), byte length for Bulk/Verbatim/BulkError, the
    /// value for Integer, -1 for any null, the line's real length for the other line types.
    pub len: i64,
    /// For aggregates: prefix (max 64 bytes) of the first element if it is a Simple, Bulk or
    /// Verbatim string (pub/sub: "message", "subscribe", ...).
    pub first: Option<Vec<u8>>,
    /// For aggregates: the third element if it is an Integer (pub/sub subscription count).
    pub third_int: Option<i64>,
    /// For top-level aggregates: index and text prefix (max 512) of depth-1 elements that are
    /// errors (`-` or `!`). At most 4096 are kept (EXEC results).
    pub element_errors: Vec<(u32, Vec<u8>)>,
    /// Number of depth-1 elements seen (Map: 2 per pair). Attributes do not count.
    pub elements: u64,
    /// Bytes of this reply were skipped.
    pub lost: bool,
}

impl Reply {
    pub fn is_error(&self) -> bool {
        self.kind.is_error()
    }

    /// A reply of `kind` with nothing in it, at `start_ts`.
    pub fn bare(kind: ReplyKind, start_ts: u64) -> Self {
        Reply {
            kind,
            start_ts,
            ..Reply::empty()
        }
    }

    fn empty() -> Self {
        Reply {
            kind: ReplyKind::Null,
            start_ts: 0,
            text: Vec::new(),
            len: 0,
            first: None,
            third_int: None,
            element_errors: Vec::new(),
            elements: 0,
            lost: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyEvent {
    Reply(Reply),
    /// The stream broke framing: a gap outside any bulk payload, or bytes that are not RESP. The
    /// partial reply was dropped and the parser is resynchronising.
    Desync {
        reason: &'static str,
    },
}

/// Where the reply parser is in the server->client stream.
#[derive(Clone, Copy, Debug)]
enum ReplyState {
    /// Expecting a type byte: a new top-level reply, or the next element of an open aggregate.
    Idle,
    /// In the line of a line-typed scalar (`+ - : , # ( _`), up to its CR.
    Line,
    /// The CR of a scalar line was seen, its LF is expected.
    LineLf,
    /// In the length line of `$ = ! * % ~ > |`.
    Len {
        type_byte: u8,
        line: NumLine,
        cr: bool,
    },
    /// In a bulk payload, `remaining` (> 0) bytes to go.
    Payload { remaining: u64 },
    /// After a bulk payload, `left` (1 or 2) bytes of its CRLF to go.
    Terminator { left: u8 },
    /// Dropping bytes until a type byte at a line start. `line_start`: the next byte is at a line
    /// start. `prev_cr`: the last byte was a CR.
    Resync { line_start: bool, prev_cr: bool },
}

/// Which part of the summary a value feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The top-level reply itself.
    Top,
    /// Depth-1 element number `n` of the top-level aggregate.
    Element(u64),
    /// Anything deeper, or inside an attribute: only its framing matters.
    Nested,
}

/// An aggregate being read: how many values it still expects.
#[derive(Clone, Copy, Debug)]
struct Frame {
    remaining: u64,
    /// Attribute frames are not values: when they complete, the next value takes their place.
    attribute: bool,
}

/// The value being read.
#[derive(Clone, Copy, Debug)]
struct Value {
    role: Role,
    kind: ReplyKind,
    /// Bytes of an Element's text worth keeping (0: not needed for the summary).
    element_text_max: usize,
    /// Bulk payload length.
    bulk_len: i64,
    /// Line length of a line-typed scalar.
    line_len: u64,
    /// Start of the line, for validating and reading `:`, `#` and `_`.
    number: NumLine,
    /// Payload bytes of this value were skipped: stop capturing, accept any terminator.
    lost: bool,
}

impl Value {
    fn new(role: Role, kind: ReplyKind) -> Self {
        let element_text_max = match role {
            Role::Element(_) if kind.is_error() => REPLY_TEXT_MAX,
            Role::Element(0) if kind.is_stringish() => REPLY_FIRST_MAX,
            _ => 0,
        };
        Value {
            role,
            kind,
            element_text_max,
            bulk_len: 0,
            line_len: 0,
            number: NumLine::default(),
            lost: false,
        }
    }
}

/// Streaming parser for the server->client direction of one connection.
#[derive(Debug)]
pub struct ReplyParser {
    state: ReplyState,
    /// Parsing the first reply after a resync guess: errors go back to scanning silently.
    tentative: bool,
    /// Open aggregates and attributes, innermost last.
    stack: Vec<Frame>,
    /// The top-level reply being summarised.
    reply: Reply,
    /// The reply's first byte (maybe an attribute's) was seen, so `reply.start_ts` is set.
    reply_started: bool,
    value: Value,
    /// Text of the current depth-1 element, when the summary needs it.
    element_text: Vec<u8>,
    /// Buffers for reply texts: the caller's pool during `feed_pooled`, a temporary one during
    /// `feed`, empty otherwise.
    pool: BufPool,
}

impl Default for ReplyParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplyParser {
    pub fn new() -> Self {
        Self::with_state(ReplyState::Idle)
    }

    /// Between replies: no byte of the next one seen yet.
    pub fn idle(&self) -> bool {
        matches!(self.state, ReplyState::Idle) && !self.reply_started && self.stack.is_empty()
    }

    /// A parser for a connection seen mid-stream. It drops bytes until a RESP type byte at a line
    /// start: the very first byte seen (captures are whole syscalls, usually whole replies) or a
    /// byte right after `\r\n`. The first reply is tentative (see the module doc).
    pub fn new_resyncing() -> Self {
        Self::with_state(ReplyState::Resync {
            line_start: true,
            prev_cr: false,
        })
    }

    fn with_state(state: ReplyState) -> Self {
        ReplyParser {
            state,
            tentative: false,
            stack: Vec::new(),
            reply: Reply::empty(),
            reply_started: false,
            value: Value::new(Role::Nested, ReplyKind::Null),
            element_text: Vec::new(),
            pool: BufPool::default(),
        }
    }

    /// Like [`feed`](Self::feed), taking reply text buffers from `pool`. The events are the same;
    /// only allocations differ.
    pub fn feed_pooled(
        &mut self,
        data: &[u8],
        ts: u64,
        out: &mut Vec<ReplyEvent>,
        pool: &mut BufPool,
    ) {
        mem::swap(&mut self.pool, pool);
        self.feed_inner(data, ts, out);
        mem::swap(&mut self.pool, pool);
    }

    /// The fast path for a whole top-level `+`, `-`, `:` or `$` reply at the start of `data`, in
    /// the Idle state with nothing open. It takes only replies the state machine would read the same
    /// way and pushes exactly the reply it would push, returning the bytes used. Otherwise it
    /// changes nothing and returns None.
    fn fast_reply(&mut self, data: &[u8], ts: u64, out: &mut Vec<ReplyEvent>) -> Option<usize> {
        let (kind, len, text, used) = match *data.first()? {
            b'+' | b'-' | b':' => {
                let rest = data.get(1..)?;
                let cr = rest.iter().position(|&b| b == b'\r')?;
                if rest.get(cr + 1) != Some(&b'\n') {
                    return None;
                }
                let body = rest.get(..cr)?;
                let (kind, len) = match data.first() {
                    Some(b'+') => (ReplyKind::Simple, i64::try_from(cr).ok()?),
                    Some(b'-') => (ReplyKind::Error, i64::try_from(cr).ok()?),
                    _ => {
                        if body.len() > MAX_NUMBER_LEN {
                            return None;
                        }
                        (ReplyKind::Integer, string2ll(body)?)
                    }
                };
                (kind, len, body, cr + 3)
            }
            b'$' => {
                let (n, start) = fast_number_line(data, 1)?;
                if n < 0 {
                    return None;
                }
                let end = start.checked_add(usize::try_from(n).ok()?)?;
                if data.get(end..end.checked_add(2)?) != Some(b"\r\n") {
                    return None;
                }
                (ReplyKind::Bulk, n, data.get(start..end)?, end + 2)
            }
            _ => return None,
        };
        let text = text.get(..REPLY_TEXT_MAX).unwrap_or(text);
        let mut t = self.pool.bytes(text.len());
        t.extend_from_slice(text);
        out.push(ReplyEvent::Reply(Reply {
            kind,
            start_ts: ts,
            text: t,
            len,
            first: None,
            third_int: None,
            element_errors: Vec::new(),
            elements: 0,
            lost: false,
        }));
        Some(used)
    }

    /// Feeds bytes and pushes completed replies and events to `out`.
    pub fn feed(&mut self, data: &[u8], ts: u64, out: &mut Vec<ReplyEvent>) {
        self.feed_pooled(data, ts, out, &mut BufPool::default());
    }

    fn feed_inner(&mut self, data: &[u8], ts: u64, out: &mut Vec<ReplyEvent>) {
        let mut pos = 0usize;
        while let Some(rest) = data.get(pos..).filter(|rest| !rest.is_empty()) {
            // Fast path: a whole top-level scalar reply in this piece.
            if matches!(self.state, ReplyState::Idle)
                && !self.tentative
                && !self.reply_started
                && self.stack.is_empty()
                && let Some(used) = self.fast_reply(rest, ts, out)
            {
                pos = pos.saturating_add(used);
                continue;
            }
            let used = self.step(rest, ts, out);
            debug_assert!(
                used > 0,
                "reply parser made no progress in {:?}",
                self.state
            );
            pos = pos.saturating_add(used.max(1));
        }
    }

    /// Same contract as [`RequestParser::skip`]. A gap inside a bulk payload (or its CRLF) at any
    /// depth is absorbed and marks the reply `lost`. If it completes the reply, the reply is
    /// emitted now.
    pub fn skip(&mut self, n: u64, out: &mut Vec<ReplyEvent>) -> bool {
        if n == 0 {
            return true;
        }
        let to_value_end = match self.state {
            ReplyState::Payload { remaining } => Some(remaining.saturating_add(2)),
            ReplyState::Terminator { left } => Some(u64::from(left)),
            _ => None,
        };
        match to_value_end {
            Some(to_end) if n <= to_end => {
                self.reply.lost = true;
                if let ReplyState::Payload { .. } = self.state {
                    self.value.lost = true;
                }
                match to_end - n {
                    0 => self.complete_scalar(out),
                    left @ 1..=2 => self.state = ReplyState::Terminator { left: left as u8 },
                    left => {
                        self.state = ReplyState::Payload {
                            remaining: left - 2,
                        }
                    }
                }
                true
            }
            _ => {
                out.push(ReplyEvent::Desync { reason: GAP_REASON });
                self.reset_reply();
                self.tentative = false;
                self.state = ReplyState::Resync {
                    line_start: true,
                    prev_cr: false,
                };
                false
            }
        }
    }

    /// Approximate heap bytes held (for tests of boundedness).
    #[allow(dead_code, reason = "boundedness tests; public for diagnostics")]
    pub fn heap_bytes(&self) -> usize {
        self.stack.capacity() * mem::size_of::<Frame>()
            + self.reply.text.capacity()
            + self.reply.first.as_ref().map_or(0, Vec::capacity)
            + self.reply.element_errors.capacity() * mem::size_of::<(u32, Vec<u8>)>()
            + self
                .reply
                .element_errors
                .iter()
                .map(|(_, text)| text.capacity())
                .sum::<usize>()
            + self.element_text.capacity()
            + self.pool.heap_bytes()
    }

    /// Consumes at least one byte of `rest` (non-empty) and returns how many.
    fn step(&mut self, rest: &[u8], ts: u64, out: &mut Vec<ReplyEvent>) -> usize {
        let Some(&b) = rest.first() else { return 0 };
        match self.state {
            ReplyState::Idle => {
                self.start_value(b, ts, out);
                1
            }
            ReplyState::Line => {
                let (body, used, found_cr) = match rest.iter().position(|&c| c == b'\r') {
                    Some(cr) => (
                        rest.get(..cr).unwrap_or_default(),
                        cr.saturating_add(1),
                        true,
                    ),
                    None => (rest, rest.len(), false),
                };
                self.capture(body);
                self.value.number.push_all(body);
                self.value.line_len = self.value.line_len.saturating_add(body.len() as u64);
                if found_cr {
                    self.state = ReplyState::LineLf;
                }
                used
            }
            ReplyState::LineLf => {
                if b != b'\n' {
                    self.fail("expected LF after CR", false, b == b'\r', out);
                } else {
                    self.end_line(out);
                }
                1
            }
            ReplyState::Len {
                type_byte,
                mut line,
                cr,
            } => {
                if cr {
                    if b != b'\n' {
                        self.fail("expected LF after CR", false, b == b'\r', out);
                    } else {
                        self.end_len_line(type_byte, line, out);
                    }
                } else if b == b'\r' {
                    self.state = ReplyState::Len {
                        type_byte,
                        line,
                        cr: true,
                    };
                } else {
                    line.push(b);
                    if line.total > MAX_REPLY_LEN_LINE {
                        self.fail("length line too long", false, false, out);
                    } else {
                        self.state = ReplyState::Len {
                            type_byte,
                            line,
                            cr: false,
                        };
                    }
                }
                1
            }
            ReplyState::Payload { remaining } => {
                let take = rest
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                if !self.value.lost {
                    self.capture(rest.get(..take).unwrap_or_default());
                }
                let remaining = remaining.saturating_sub(take as u64);
                self.state = if remaining == 0 {
                    ReplyState::Terminator { left: 2 }
                } else {
                    ReplyState::Payload { remaining }
                };
                take
            }
            ReplyState::Terminator { left } => {
                let expected = if left >= 2 { b'\r' } else { b'\n' };
                // The server always writes CRLF; after a gap in the payload our count may be off
                // by what the capture reported, so tolerate anything then.
                if b != expected && !self.value.lost {
                    self.fail("missing CRLF after bulk payload", false, b == b'\r', out);
                    return 1;
                }
                let left = left.saturating_sub(1);
                if left == 0 {
                    self.complete_scalar(out);
                } else {
                    self.state = ReplyState::Terminator { left };
                }
                1
            }
            ReplyState::Resync {
                line_start,
                prev_cr,
            } => {
                if line_start && ReplyKind::from_type_byte(b).is_some() {
                    self.tentative = true;
                    self.start_value(b, ts, out);
                } else {
                    self.state = ReplyState::Resync {
                        line_start: prev_cr && b == b'\n',
                        prev_cr: b == b'\r',
                    };
                }
                1
            }
        }
    }

    /// `b` is the type byte of a new value.
    fn start_value(&mut self, b: u8, ts: u64, out: &mut Vec<ReplyEvent>) {
        let Some(kind) = ReplyKind::from_type_byte(b) else {
            self.fail("unknown reply type byte", false, b == b'\r', out);
            return;
        };
        let is_attribute = kind == ReplyKind::Attribute;
        let role = match self.stack.as_slice() {
            [] => {
                if !self.reply_started {
                    self.reply_started = true;
                    self.reply.start_ts = ts;
                    if self.reply.text.capacity() == 0 {
                        self.reply.text = self.pool.bytes(1);
                    }
                }
                if is_attribute {
                    Role::Nested
                } else {
                    Role::Top
                }
            }
            [only] if !only.attribute && !is_attribute => {
                let index = self.reply.elements;
                self.reply.elements = index.saturating_add(1);
                Role::Element(index)
            }
            _ => Role::Nested,
        };
        if role == Role::Top {
            self.reply.kind = kind;
        }
        self.value = Value::new(role, kind);
        if role == Role::Element(1)
            && kind.is_stringish()
            && self
                .reply
                .first
                .as_deref()
                .is_some_and(|f| f.ends_with(b"subscribe"))
        {
            // A pub/sub confirmation's channel.
            self.value.element_text_max = REPLY_TEXT_MAX;
        }
        self.element_text.clear();
        self.state = if kind.is_line() {
            ReplyState::Line
        } else {
            ReplyState::Len {
                type_byte: b,
                line: NumLine::default(),
                cr: false,
            }
        };
    }

    /// Keeps the part of a scalar's bytes the summary needs.
    fn capture(&mut self, bytes: &[u8]) {
        let (dst, max) = match self.value.role {
            Role::Top => (&mut self.reply.text, REPLY_TEXT_MAX),
            Role::Element(_) => (&mut self.element_text, self.value.element_text_max),
            Role::Nested => return,
        };
        let room = max.saturating_sub(dst.len()).min(bytes.len());
        dst.extend_from_slice(bytes.get(..room).unwrap_or_default());
    }

    /// The LF of a line-typed scalar was consumed.
    fn end_line(&mut self, out: &mut Vec<ReplyEvent>) {
        let number = self.value.number;
        let invalid = match self.value.kind {
            ReplyKind::Integer if number.value().is_none() => Some("invalid integer"),
            ReplyKind::Boolean if !(number.is(b"t") || number.is(b"f")) => Some("invalid boolean"),
            ReplyKind::Null if number.total != 0 => Some("invalid null"),
            _ => None,
        };
        match invalid {
            Some(reason) => self.fail(reason, true, false, out),
            None => self.complete_scalar(out),
        }
    }

    /// The LF of a length line was consumed.
    fn end_len_line(&mut self, type_byte: u8, line: NumLine, out: &mut Vec<ReplyEvent>) {
        if line.is(b"?") {
            // RESP3 streamed strings/aggregates: Valkey never sends them.
            self.fail("streamed aggregates are not supported", true, false, out);
            return;
        }
        let Some(n) = line.value() else {
            self.fail("invalid length", true, false, out);
            return;
        };
        let kind = self.value.kind;
        match (type_byte, n) {
            // RESP2 null bulk string and null array.
            (b'$' | b'*', -1) => {
                self.value.kind = ReplyKind::Null;
                self.complete_scalar(out);
            }
            (_, ..=-1) => self.fail("invalid length", true, false, out),
            (b'$' | b'=' | b'!', len) => {
                self.value.bulk_len = len;
                self.state = if len == 0 {
                    ReplyState::Terminator { left: 2 }
                } else {
                    ReplyState::Payload {
                        remaining: len.unsigned_abs(),
                    }
                };
            }
            (b'|', pairs) => {
                let values = pairs.unsigned_abs().saturating_mul(2);
                if values == 0 {
                    self.state = ReplyState::Idle;
                } else {
                    self.open_frame(values, true, out);
                }
            }
            (_, count) => {
                if self.value.role == Role::Top {
                    self.reply.len = count;
                }
                let values = if kind == ReplyKind::Map {
                    count.unsigned_abs().saturating_mul(2)
                } else {
                    count.unsigned_abs()
                };
                if values == 0 {
                    self.state = ReplyState::Idle;
                    self.complete_value(out);
                } else {
                    self.open_frame(values, false, out);
                }
            }
        }
    }

    fn open_frame(&mut self, values: u64, attribute: bool, out: &mut Vec<ReplyEvent>) {
        if self.stack.len() >= MAX_REPLY_DEPTH {
            self.fail("nesting too deep", true, false, out);
            return;
        }
        self.stack.push(Frame {
            remaining: values,
            attribute,
        });
        self.state = ReplyState::Idle;
    }

    /// A non-aggregate value (line, bulk, or null) is complete: record it in the summary.
    fn complete_scalar(&mut self, out: &mut Vec<ReplyEvent>) {
        let value = self.value;
        match value.role {
            Role::Top => {
                self.reply.kind = value.kind;
                self.reply.len = match value.kind {
                    ReplyKind::Integer => value.number.value().unwrap_or(0),
                    ReplyKind::Bulk | ReplyKind::Verbatim | ReplyKind::BulkError => value.bulk_len,
                    ReplyKind::Null => -1,
                    _ => i64::try_from(value.line_len).unwrap_or(i64::MAX),
                };
            }
            Role::Element(index) => {
                if value.kind.is_error() {
                    if self.reply.element_errors.len() < MAX_ELEMENT_ERRORS {
                        let index = u32::try_from(index).unwrap_or(u32::MAX);
                        let mut text = mem::take(&mut self.element_text);
                        let real = if value.kind == ReplyKind::BulkError {
                            u64::try_from(value.bulk_len).unwrap_or(0)
                        } else {
                            value.line_len
                        };
                        if real > text.len() as u64 {
                            // Only the first 512 bytes are kept: say that there was more.
                            text.extend_from_slice(b"...");
                        }
                        self.reply.element_errors.push((index, text));
                    }
                } else if index == 0 && value.kind.is_stringish() {
                    self.reply.first = Some(mem::take(&mut self.element_text));
                } else if index == 1 && self.value.element_text_max > 0 {
                    // (An aggregate has no text of its own: see `Reply::text`.)
                    self.reply.text = mem::take(&mut self.element_text);
                } else if index == 2 && value.kind == ReplyKind::Integer {
                    self.reply.third_int = value.number.value();
                }
            }
            Role::Nested => {}
        }
        self.state = ReplyState::Idle;
        self.complete_value(out);
    }

    /// A value ended: count it in its aggregate, closing every aggregate it completes. Emits the
    /// reply when no aggregate is left.
    fn complete_value(&mut self, out: &mut Vec<ReplyEvent>) {
        loop {
            let Some(frame) = self.stack.last_mut() else {
                self.emit(out);
                return;
            };
            frame.remaining = frame.remaining.saturating_sub(1);
            if frame.remaining > 0 {
                return;
            }
            let attribute = frame.attribute;
            self.stack.pop();
            if attribute {
                // A complete attribute is not a value: the parent still expects the same count.
                return;
            }
        }
    }

    fn emit(&mut self, out: &mut Vec<ReplyEvent>) {
        let reply = mem::replace(&mut self.reply, Reply::empty());
        out.push(ReplyEvent::Reply(reply));
        self.reset_reply();
        self.tentative = false;
    }

    /// Drops the partial reply (after `emit`, there is none left to drop).
    fn reset_reply(&mut self) {
        self.stack.clear();
        if self.stack.capacity() > 64 {
            self.stack = Vec::new();
        }
        self.reply = Reply::empty();
        self.reply_started = false;
        self.value = Value::new(Role::Nested, ReplyKind::Null);
        self.element_text = Vec::new();
    }

    /// Protocol error. Reports it unless the reply was a resync guess, then resynchronises.
    /// `line_start`/`prev_cr` describe the bytes just consumed (a line feed after a CR / a CR).
    fn fail(
        &mut self,
        reason: &'static str,
        line_start: bool,
        prev_cr: bool,
        out: &mut Vec<ReplyEvent>,
    ) {
        if !self.tentative {
            out.push(ReplyEvent::Desync { reason });
        }
        self.reset_reply();
        self.tentative = false;
        self.state = ReplyState::Resync {
            line_start,
            prev_cr,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::Rng;

    const KEEP: usize = 256;

    /// A command encoded as a RESP multibulk request.
    fn multibulk(args: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    fn feed_requests(parser: &mut RequestParser, data: &[u8]) -> Vec<RequestEvent> {
        let mut out = Vec::new();
        parser.feed(data, 1, &mut out);
        out
    }

    fn parse_requests(data: &[u8]) -> Vec<RequestEvent> {
        feed_requests(&mut RequestParser::new(KEEP), data)
    }

    fn parse_requests_bytewise(data: &[u8]) -> Vec<RequestEvent> {
        let mut parser = RequestParser::new(KEEP);
        let mut out = Vec::new();
        for byte in data.chunks(1) {
            parser.feed(byte, 1, &mut out);
        }
        out
    }

    fn requests(events: &[RequestEvent]) -> Vec<&Request> {
        events
            .iter()
            .filter_map(|event| match event {
                RequestEvent::Request(request) => Some(request),
                RequestEvent::Empty => None,
                RequestEvent::Desync { reason } => panic!("unexpected desync: {reason}"),
            })
            .collect()
    }

    fn argv(request: &Request) -> Vec<&[u8]> {
        request
            .args
            .iter()
            .map(|arg| arg.prefix.as_slice())
            .collect()
    }

    fn only_argv(events: &[RequestEvent]) -> Vec<Vec<&[u8]>> {
        requests(events).into_iter().map(argv).collect()
    }

    fn request_desyncs(events: &[RequestEvent]) -> Vec<&'static str> {
        events
            .iter()
            .filter_map(|event| match event {
                RequestEvent::Desync { reason } => Some(*reason),
                RequestEvent::Request(_) | RequestEvent::Empty => None,
            })
            .collect()
    }

    /// Splits `data` at random points (pieces of 0 to `max_piece` bytes).
    fn random_pieces<'a>(rng: &mut Rng, data: &'a [u8], max_piece: u64) -> Vec<&'a [u8]> {
        let mut pieces = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = (rng.below(max_piece + 1) as usize).min(rest.len());
            let (piece, tail) = rest.split_at(n);
            pieces.push(piece);
            rest = tail;
        }
        pieces
    }

    // ---------------------------------------------------------------- numbers

    #[test]
    fn string2ll_matches_valkey() {
        for (text, value) in [
            (&b"0"[..], 0),
            (b"7", 7),
            (b"-1", -1),
            (b"123", 123),
            (b"9223372036854775807", i64::MAX),
            (b"-9223372036854775808", i64::MIN),
        ] {
            assert_eq!(
                string2ll(text),
                Some(value),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        for text in [
            &b""[..],
            b"-",
            b"+1",
            b"01",
            b"-0",
            b"00",
            b" 1",
            b"1 ",
            b"1a",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"123456789012345678901",
        ] {
            assert_eq!(string2ll(text), None, "{}", String::from_utf8_lossy(text));
        }
    }

    // ---------------------------------------------------------------- requests

    #[test]
    fn multibulk_request() {
        let events = parse_requests(&multibulk(&[b"SET", b"key", b"value"]));
        let [request] = requests(&events)[..] else {
            panic!("{events:?}")
        };
        assert_eq!(argv(request), [&b"SET"[..], b"key", b"value"]);
        assert_eq!(request.argc, 3);
        assert!(!request.inline && !request.lost);
        assert!(request.args.iter().all(|arg| arg.is_complete()));
        assert_eq!(request.args[2].len, 5);
    }

    #[test]
    fn done_ts_is_that_of_the_feed_with_the_last_byte() {
        let mut parser = RequestParser::new(KEEP);
        let mut out = Vec::new();
        parser.feed(b"*1\r\n$4\r\nPI", 10, &mut out);
        parser.feed(b"NG\r", 20, &mut out);
        assert!(out.is_empty());
        parser.feed(b"\n*1\r\n$4\r\nPING\r\nPING", 30, &mut out);
        parser.feed(b"\r\n", 40, &mut out);
        let done: Vec<u64> = requests(&out)
            .iter()
            .map(|request| request.done_ts)
            .collect();
        assert_eq!(done, [30, 30, 40]);
    }

    #[test]
    fn every_split_point_gives_the_same_requests() {
        let mut data = multibulk(&[b"SET", b"k", b"v\r\nx"]);
        data.extend_from_slice(b"GET \"k\"\r\n*0\r\n\n");
        data.extend_from_slice(&multibulk(&[b"", b"PING"]));
        let whole = parse_requests(&data);
        // Three requests and two empty ones (`*0`, the blank line).
        assert_eq!(whole.len(), 5);
        assert_eq!(requests(&whole).len(), 3);
        for first in 0..=data.len() {
            for second in first..=data.len() {
                let mut parser = RequestParser::new(KEEP);
                let mut out = Vec::new();
                parser.feed(&data[..first], 1, &mut out);
                parser.feed(&data[first..second], 1, &mut out);
                parser.feed(&data[second..], 1, &mut out);
                assert_eq!(out, whole, "split at {first}/{second}");
            }
        }
    }

    #[test]
    fn inline_commands_split_like_sdssplitargs() {
        let cases: &[(&[u8], &[&[u8]])] = &[
            (b"PING\r\n", &[b"PING"]),
            (b"PING\n", &[b"PING"]),
            (b"  SET\t key   value  \r\n", &[b"SET", b"key", b"value"]),
            (
                b"SET key \"hello world\"\r\n",
                &[b"SET", b"key", b"hello world"],
            ),
            (
                br#"SET k "a\x41\x4a\n\r\t\b\a\"\\\q""#,
                &[b"SET", b"k", b"aAJ\n\r\t\x08\x07\"\\q"],
            ),
            (br#"SET k "\xzz" "\x4""#, &[b"SET", b"k", b"xzz", b"x4"]),
            (br"SET k 'it\'s \n' ''", &[b"SET", b"k", b"it's \\n", b""]),
            (b"SET k\"ey\" v", &[b"SET", b"key", b"v"]),
            (b"ECHO \"\"", &[b"ECHO", b""]),
            (b"A\x0bB", &[b"A\x0bB"]),
            // Quoted parts join the text around them (Valkey 9.1.2, checked).
            (b"\"FLUSH\"ALL", &[b"FLUSHALL"]),
            (b"SET \"k\"2 v", &[b"SET", b"k2", b"v"]),
            (b"ECHO 'it''s'", &[b"ECHO", b"its"]),
            (b"ECHO ab\"c d\"e", &[b"ECHO", b"abc de"]),
            (b"ECHO \"a\"'b'c", &[b"ECHO", b"abc"]),
            (b"ECHO \"a\"\x0bb", &[b"ECHO", b"a\x0bb"]),
            (b"\x0bECHO \x0cx", &[b"ECHO", b"x"]),
            (br#"ECHO "a\\" \"#, &[b"ECHO", b"a\\", b"\\"]),
            // An escape needs a byte after the escaped one (Valkey 9.1.2, checked; QA R).
            (br#"SET k1 "v\""#, &[b"SET", b"k1", b"v\\"]),
            (br"SET 'k3' 'x\'", &[b"SET", b"k3", b"x\\"]),
            (br#"ECHO "\\\""#, &[b"ECHO", b"\\\\"]),
            (br#"ECHO x"a\""#, &[b"ECHO", b"xa\\"]),
            (br#"ECHO "\""#, &[b"ECHO", b"\\"]),
            (br#"ECHO "a\"""#, &[b"ECHO", b"a\""]),
            (br"ECHO 'a\''", &[b"ECHO", b"a'"]),
            (br#"ECHO "a\x""#, &[b"ECHO", b"ax"]),
            // Every 0xff written is dropped, one from `\xff` kept (Valkey 9.1.2, checked; QA T).
            (b"FLUSH\xffALL", &[b"FLUSHALL"]),
            (
                b"ECHO \"a\xffb\" 'c\xffd' \xff",
                &[b"ECHO", b"ab", b"cd", b""],
            ),
            (b"ECHO \"\\\xff\" '\\\xff'", &[b"ECHO", b"", b"\\"]),
            (br#"ECHO "\xff""#, &[b"ECHO", b"\xff"]),
        ];
        for (line, expected) in cases {
            let mut data = line.to_vec();
            if !data.ends_with(b"\n") {
                data.extend_from_slice(b"\r\n");
            }
            let events = parse_requests(&data);
            let [request] = requests(&events)[..] else {
                panic!("{events:?}")
            };
            assert_eq!(
                argv(request),
                *expected,
                "{}",
                String::from_utf8_lossy(line)
            );
            assert!(request.inline);
            assert_eq!(request.argc, expected.len() as u64);
            assert_eq!(parse_requests_bytewise(&data), events);
        }
    }

    #[test]
    fn blank_lines_star_zero_and_negative_counts_are_not_commands() {
        let mut data = b"\r\n\n   \r\n\t\n*0\r\n*-1\r\n*-42\r\n".to_vec();
        data.extend_from_slice(&multibulk(&[b"PING"]));
        let events = parse_requests(&data);
        assert_eq!(only_argv(&events), [vec![&b"PING"[..]]]);
        assert_eq!(parse_requests_bytewise(&data), events);
    }

    #[test]
    fn inline_quote_errors_desync_then_recover_on_the_next_line() {
        for line in [
            &b"SET k \"abc\r\n"[..],
            b"SET k 'abc\n",
            b"SET k \"abc\"def\"\r\n",
            b"SET k 'a'b'\r\n",
            // `\"` not at the very end is an escaped quote (Valkey 9.1.2 refuses these).
            b"ECHO \"a\\\"  \r\n",
            b"ECHO \"a\\\" b\r\n",
            b"ECHO \"ab\\\r\n",
        ] {
            let mut data = line.to_vec();
            data.extend_from_slice(&multibulk(&[b"PING"]));
            let events = parse_requests(&data);
            assert_eq!(request_desyncs(&events), ["unbalanced quotes in request"]);
            let RequestEvent::Request(request) = &events[1] else {
                panic!("{events:?}")
            };
            assert_eq!(argv(request), [b"PING"]);
            assert_eq!(parse_requests_bytewise(&data), events);
        }
    }

    /// A mix of multibulk and inline commands, some with arguments longer than `KEEP`.
    fn pipeline(count: usize) -> (Vec<u8>, Vec<Vec<Vec<u8>>>) {
        let mut rng = Rng(0x1234_5678);
        let mut data = Vec::new();
        let mut expected = Vec::new();
        for i in 0..count {
            if i % 7 == 3 {
                data.extend_from_slice(format!("INCRBY \"counter {i}\" {i}\r\n").as_bytes());
                expected.push(vec![
                    b"INCRBY".to_vec(),
                    format!("counter {i}").into_bytes(),
                    i.to_string().into_bytes(),
                ]);
                continue;
            }
            if i % 11 == 5 {
                data.extend_from_slice(b"*0\r\n\r\n");
            }
            let value: Vec<u8> = (0..rng.below(400)).map(|_| rng.below(256) as u8).collect();
            let key = format!("key:{i}").into_bytes();
            data.extend_from_slice(&multibulk(&[b"SET", &key, &value]));
            let kept = value[..value.len().min(KEEP)].to_vec();
            expected.push(vec![b"SET".to_vec(), key, kept]);
        }
        (data, expected)
    }

    #[test]
    fn ten_thousand_pipelined_commands_whatever_the_split() {
        let (data, expected) = pipeline(10_000);
        let whole = parse_requests(&data);
        let got: Vec<Vec<Vec<u8>>> = requests(&whole)
            .iter()
            .map(|request| argv(request).iter().map(|arg| arg.to_vec()).collect())
            .collect();
        assert_eq!(got, expected);
        assert_eq!(parse_requests_bytewise(&data), whole);
        let mut rng = Rng(99);
        for max_piece in [2, 17, 1000, 100_000] {
            let mut parser = RequestParser::new(KEEP);
            let mut out = Vec::new();
            for piece in random_pieces(&mut rng, &data, max_piece) {
                parser.feed(piece, 1, &mut out);
            }
            assert_eq!(out, whole, "pieces up to {max_piece}");
        }
    }

    #[test]
    fn huge_bulk_argument_costs_no_more_than_a_small_one() {
        const LEN: usize = 512 * 1024 * 1024;
        let keep = 300;
        let mut parser = RequestParser::new(keep);
        let mut out = Vec::new();
        parser.feed(
            format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${LEN}\r\n").as_bytes(),
            1,
            &mut out,
        );
        let piece = vec![b'x'; 1024 * 1024];
        for i in 0..LEN / piece.len() {
            parser.feed(&piece, 2 + i as u64, &mut out);
            assert!(
                parser.heap_bytes() < 4096,
                "heap {} after piece {i}",
                parser.heap_bytes()
            );
        }
        assert!(out.is_empty());
        parser.feed(b"\r\n", 7, &mut out);
        let [request] = requests(&out)[..] else {
            panic!("{out:?}")
        };
        let value = &request.args[2];
        assert_eq!(value.len, LEN as u64);
        assert_eq!(value.prefix, vec![b'x'; keep]);
        assert!(!value.lost && !value.is_complete());
        assert_eq!(request.done_ts, 7);
        assert!(parser.heap_bytes() < 4096);
    }

    #[test]
    fn bulk_lengths_beyond_proto_max_bulk_len_desync() {
        let ok = parse_requests(b"*1\r\n$536870912\r\n");
        assert!(ok.is_empty());
        for header in [
            &b"*1\r\n$536870913\r\n"[..],
            b"*1\r\n$-1\r\n",
            b"*1\r\n$99999999999999999999999\r\n",
        ] {
            assert_eq!(
                request_desyncs(&parse_requests(header)),
                ["invalid bulk length"]
            );
        }
    }

    #[test]
    fn retention_budget_caps_prefix_bytes_and_entries() {
        let keep = 400_000;
        let big = vec![b'v'; keep];
        let events = feed_requests(
            &mut RequestParser::new(keep),
            &multibulk(&[&big, &big, &big, &big, b"tail"]),
        );
        let [request] = requests(&events)[..] else {
            panic!()
        };
        let kept: Vec<usize> = request.args.iter().map(|arg| arg.prefix.len()).collect();
        assert_eq!(
            kept,
            [keep, keep, MAX_RETAINED_PREFIX_BYTES - 2 * keep, 0, 0]
        );
        assert!(request.args.iter().all(|arg| !arg.lost));
        assert_eq!(request.args[3].len, keep as u64);
        assert_eq!(request.args[4].len, 4);

        let count = MAX_RETAINED_ARGS + 5;
        let mut data = format!("*{count}\r\n").into_bytes();
        for _ in 0..count {
            data.extend_from_slice(b"$1\r\na\r\n");
        }
        let events = parse_requests(&data);
        let [request] = requests(&events)[..] else {
            panic!()
        };
        assert_eq!(request.argc, count as u64);
        assert_eq!(request.args.len(), MAX_RETAINED_ARGS);
    }

    #[test]
    fn keep_limits_each_prefix_and_can_change() {
        let mut parser = RequestParser::new(4);
        let events = feed_requests(&mut parser, &multibulk(&[b"SET", b"key", b"long value"]));
        let [request] = requests(&events)[..] else {
            panic!()
        };
        assert_eq!(argv(request), [&b"SET"[..], b"key", b"long"]);
        assert_eq!(request.args[2].len, 10);
        parser.set_keep(100);
        let events = feed_requests(&mut parser, b"SET key \"long value\"\r\n");
        assert_eq!(
            only_argv(&events),
            [vec![&b"SET"[..], b"key", b"long value"]]
        );
    }

    #[test]
    fn gap_inside_a_bulk_payload_is_absorbed() {
        let mut parser = RequestParser::new(KEEP);
        let mut out = Vec::new();
        parser.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\nab", 1, &mut out);
        assert!(parser.skip(5, &mut out));
        parser.feed(b"cde\r\n", 2, &mut out);
        parser.feed(&multibulk(&[b"PING"]), 3, &mut out);
        let [request, ping] = requests(&out)[..] else {
            panic!("{out:?}")
        };
        assert!(request.lost);
        assert_eq!(
            request.args[2],
            Arg {
                prefix: b"ab".to_vec(),
                len: 10,
                lost: true
            }
        );
        assert!(!request.args[1].lost);
        assert_eq!(request.done_ts, 2);
        assert!(!ping.lost);
        assert_eq!(argv(ping), [b"PING"]);
    }

    #[test]
    fn gap_through_the_end_of_the_last_argument_completes_the_request() {
        let mut parser = RequestParser::new(KEEP);
        let mut out = Vec::new();
        parser.feed(b"*2\r\n$3\r\nGET\r\n$100\r\n0123456789", 5, &mut out);
        // 90 payload bytes and the CRLF were never captured.
        assert!(parser.skip(92, &mut out));
        let [request] = requests(&out)[..] else {
            panic!("{out:?}")
        };
        assert_eq!(
            request.args[1],
            Arg {
                prefix: b"0123456789".to_vec(),
                len: 100,
                lost: true
            }
        );
        assert_eq!(request.done_ts, 5);
        out.clear();
        // A gap ending inside the CRLF, or covering only it.
        parser.feed(b"*1\r\n$4\r\nPING", 6, &mut out);
        assert!(parser.skip(1, &mut out));
        parser.feed(b"\n", 7, &mut out);
        parser.feed(b"*1\r\n$4\r\nPONG", 8, &mut out);
        assert!(parser.skip(2, &mut out));
        let [ping, pong] = requests(&out)[..] else {
            panic!("{out:?}")
        };
        assert!(ping.lost && !ping.args[0].lost && ping.args[0].is_complete());
        assert_eq!((ping.done_ts, pong.done_ts), (7, 8));
    }

    #[test]
    fn gap_across_framing_desyncs_then_recovers() {
        let mut parser = RequestParser::new(KEEP);
        let mut out = Vec::new();
        parser.feed(b"*2\r\n$3\r\nGET\r\n$5\r\nab", 1, &mut out);
        assert!(!parser.skip(10, &mut out));
        assert_eq!(out, [RequestEvent::Desync { reason: GAP_REASON }]);
        out.clear();
        // The tail of some other command, then a clean one.
        parser.feed(b"xyz\r\n", 2, &mut out);
        parser.feed(&multibulk(&[b"DEL", b"k"]), 3, &mut out);
        assert_eq!(only_argv(&out), [vec![&b"DEL"[..], b"k"]]);
        out.clear();
        // The next capture starts exactly at a command.
        assert!(!parser.skip(3, &mut out));
        parser.feed(&multibulk(&[b"PING"]), 4, &mut out);
        assert_eq!(request_desyncs(&out), [GAP_REASON]);
        let RequestEvent::Request(request) = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!(argv(request), [b"PING"]);
    }

    #[test]
    fn gap_at_a_request_boundary_or_in_a_header_desyncs() {
        for prefix in [
            &b""[..],
            b"*1\r\n",
            b"*2\r\n$3\r\nGET\r\n$1",
            b"*1",
            b"GET k",
        ] {
            let mut parser = RequestParser::new(KEEP);
            let mut out = feed_requests(&mut parser, &multibulk(&[b"PING"]));
            parser.feed(prefix, 1, &mut out);
            assert!(!parser.skip(1, &mut out));
            assert_eq!(request_desyncs(&out), [GAP_REASON]);
            // Inline commands are not trusted after a gap: the bytes may be the end of a value.
            parser.feed(b"alue\r\n", 1, &mut out);
            parser.feed(&multibulk(&[b"ECHO", b"hi"]), 1, &mut out);
            assert_eq!(out.len(), 3, "{out:?}");
            let RequestEvent::Request(request) = &out[2] else {
                panic!("{out:?}")
            };
            assert_eq!(argv(request), [&b"ECHO"[..], b"hi"]);
        }
        assert!(RequestParser::new(KEEP).skip(0, &mut Vec::new()));
    }

    #[test]
    fn multibulk_header_at_the_start() {
        for (bytes, want) in [
            (&b"*2\r\n$3\r\nGET"[..], true),
            (b"*1234567890\r\n$", true),
            (b"*12345678901\r\n$", false),
            (b"*0\r\n$", false),
            (b"*2\r\n*", false),
            (b"*2\r\n", false),
            (b"$3\r\nGET", false),
            (b"GET k\r\n", false),
            (b"", false),
        ] {
            assert_eq!(starts_with_multibulk_header(bytes), want, "{bytes:?}");
        }
    }

    #[test]
    fn new_resyncing_starts_mid_command() {
        let mut data = b"5\r\nvalue\r\n$3\r\nabc\r\n".to_vec();
        data.extend_from_slice(&multibulk(&[b"GET", b"k"]));
        let events = feed_requests(&mut RequestParser::new_resyncing(KEEP), &data);
        assert_eq!(only_argv(&events), [vec![&b"GET"[..], b"k"]]);
        // Mid-stream attach exactly at a command boundary.
        let events = feed_requests(
            &mut RequestParser::new_resyncing(KEEP),
            &multibulk(&[b"PING"]),
        );
        assert_eq!(only_argv(&events), [vec![&b"PING"[..]]]);
        // A leading ASCII letter is taken as an inline command (documented heuristic).
        let events = feed_requests(
            &mut RequestParser::new_resyncing(KEEP),
            b"PING\r\nGET k\r\n",
        );
        assert_eq!(only_argv(&events), [vec![&b"PING"[..]], vec![b"GET", b"k"]]);
        // Anything else is dropped until a multibulk start.
        let events = feed_requests(
            &mut RequestParser::new_resyncing(KEEP),
            b" PING\r\nGET k\r\n",
        );
        assert!(events.is_empty());
    }

    #[test]
    fn wrong_resync_guess_is_dropped_silently() {
        // `*1\r\n$3` inside a value looks like a command, but its terminator is wrong.
        let mut data = b"9\r\n*1\r\n$3\r\nabcdef\r\n".to_vec();
        data.extend_from_slice(&multibulk(&[b"PING"]));
        let mut parser = RequestParser::new_resyncing(KEEP);
        let events = feed_requests(&mut parser, &data);
        assert_eq!(only_argv(&events), [vec![&b"PING"[..]]]);
        // Once a request parsed, errors are reported again.
        assert_eq!(
            request_desyncs(&feed_requests(&mut parser, b"*x\r\n")),
            ["invalid multibulk length"]
        );
        let mut bytewise = Vec::new();
        let mut parser = RequestParser::new_resyncing(KEEP);
        for byte in data.chunks(1) {
            parser.feed(byte, 1, &mut bytewise);
        }
        assert_eq!(bytewise, events);
    }

    #[test]
    fn terminators_are_checked_like_valkey() {
        // Valkey 9.1.2 refuses anything but CRLF after a header or a payload ("invalid CRLF in
        // request") and closes the connection.
        for bad in [
            &b"*1\r\n$4\r\nPINGxx"[..],
            b"*1\r\n$4\r\nPING\n*1",
            b"*1\rX$4\r\nPING\r\n",
            b"*1\r\n$4\rXPING\r\n",
            b"*abc\rX",
            b"*1\r\n$x\rX",
        ] {
            let events = parse_requests(bad);
            assert_eq!(
                request_desyncs(&events),
                ["invalid CRLF in request"],
                "{}",
                String::from_utf8_lossy(bad)
            );
            assert_eq!(parse_requests_bytewise(bad), events);
        }
        // The `$` is looked at before the CRLF.
        let events = parse_requests(b"*1\r\n+x\rX");
        assert_eq!(request_desyncs(&events), ["expected '$'"]);
    }

    #[test]
    fn malformed_requests_desync_with_valkeys_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"*abc\r\n", "invalid multibulk length"),
            (b"*\r\n", "invalid multibulk length"),
            (b"*01\r\n", "invalid multibulk length"),
            (b"*+1\r\n", "invalid multibulk length"),
            (b"*2147483648\r\n", "invalid multibulk length"),
            (b"*1\r\n+foo\r\n", "expected '$'"),
            (b"*1\r\n\r\n", "expected '$'"),
            (b"*1\r\n:1\r\n", "expected '$'"),
            (b"*1\r\n$abc\r\n", "invalid bulk length"),
            (b"*1\r\n$\r\n", "invalid bulk length"),
            (b"*1\r\n$01\r\n", "invalid bulk length"),
        ];
        for (input, reason) in cases {
            let mut data = input.to_vec();
            data.extend_from_slice(&multibulk(&[b"PING"]));
            let events = parse_requests(&data);
            assert_eq!(
                request_desyncs(&events),
                [*reason],
                "{}",
                String::from_utf8_lossy(input)
            );
            // After the error the next command (at a line start) is found again.
            assert!(
                matches!(events.last(), Some(RequestEvent::Request(r)) if argv(r) == [b"PING"]),
                "{events:?}"
            );
            assert_eq!(parse_requests_bytewise(&data), events);
        }
        // INT_MAX itself is a valid count: the parser just waits for the arguments.
        assert!(parse_requests(b"*2147483647\r\n$1\r\na\r\n").is_empty());
    }

    #[test]
    fn overlong_lines_desync() {
        let mut count_line = b"*".to_vec();
        count_line.resize(70_000, b'1');
        let mut bulk_line = b"*1\r\n$".to_vec();
        bulk_line.resize(70_000, b'2');
        let inline = vec![b'A'; 70_000];
        let mut inline_with_newline = inline.clone();
        inline_with_newline.extend_from_slice(b"\r\n");
        for (data, reason) in [
            (&count_line, "too big mbulk count string"),
            (&bulk_line, "too big bulk count string"),
            (&inline, "too big inline request"),
        ] {
            let events = parse_requests(data);
            assert_eq!(request_desyncs(&events), [reason]);
            assert_eq!(parse_requests_bytewise(data), events);
        }
        // Valkey refuses an inline line only when more than 64 KiB of it are pending without
        // its end after a read: read in one go, the line is a command; a byte at a time, it is
        // refused at its 65,537th byte.
        let events = parse_requests(&inline_with_newline);
        let [request] = requests(&events)[..] else {
            panic!("{events:?}")
        };
        assert_eq!(request.args[0].len, 70_000);
        let events = parse_requests_bytewise(&inline_with_newline);
        assert_eq!(request_desyncs(&events), ["too big inline request"]);
        // The longest accepted inline line.
        let mut longest = vec![b'A'; PROTO_INLINE_MAX_SIZE];
        longest.push(b'\n');
        let events = parse_requests(&longest);
        let [request] = requests(&events)[..] else {
            panic!()
        };
        assert_eq!(request.args[0].len, PROTO_INLINE_MAX_SIZE as u64);
        assert_eq!(request.args[0].prefix.len(), KEEP);
        assert_eq!(parse_requests_bytewise(&longest), events);
    }

    /// One read comes in pieces (16,000-byte ring chunks): the 64 KiB check of an inline line is
    /// made at the read's end, as the server makes it (QA: a 100,000-byte line the server ran,
    /// read in three reads of 16,386, 49,028 and 34,754 bytes, was refused at a chunk boundary).
    #[test]
    fn the_inline_length_check_is_made_at_the_end_of_a_read() {
        let mut data = b"ECHO ".to_vec();
        data.extend(std::iter::repeat_n(b'y', 100_000));
        data.extend_from_slice(b"\r\nSET k v\r\n");
        let reads = [&data[..16_386], &data[16_386..65_414], &data[65_414..]];
        let mut parser = RequestParser::new(KEEP);
        let mut out = Vec::new();
        for read in reads {
            for piece in read.chunks(16_000) {
                parser.feed_pooled(piece, 1, &mut out, &mut BufPool::default());
            }
            parser.end_read(&mut out);
        }
        assert!(request_desyncs(&out).is_empty(), "{out:?}");
        let names: Vec<_> = requests(&out)
            .iter()
            .map(|r| r.args[0].prefix.clone())
            .collect();
        assert_eq!(names, [b"ECHO".to_vec(), b"SET".to_vec()]);
        // More than 64 KiB pending at the end of a read: refused.
        let mut parser = RequestParser::new(KEEP);
        let mut out = Vec::new();
        for piece in data[..70_000].chunks(16_000) {
            parser.feed_pooled(piece, 1, &mut out, &mut BufPool::default());
        }
        assert!(request_desyncs(&out).is_empty());
        parser.end_read(&mut out);
        assert_eq!(request_desyncs(&out), ["too big inline request"]);
    }

    /// Probed on valkey-server 9.1.2: an inline line holding a NUL is never executed, nor is
    /// anything after it; once more than 64 KiB are pending the server refuses them and closes.
    /// In a multibulk header a NUL makes the number invalid at once.
    #[test]
    fn an_inline_nul_ends_nothing_like_valkey() {
        let stalled = b"PING\r\nSET a\x00b 1\r\nSET k2 v\r\n".to_vec();
        let events = parse_requests(&stalled);
        let names: Vec<_> = requests(&events)
            .iter()
            .map(|r| r.args[0].prefix.clone())
            .collect();
        assert_eq!(names, [b"PING".to_vec()]);
        assert!(request_desyncs(&events).is_empty());
        assert_eq!(parse_requests_bytewise(&stalled), events);
        let mut refused = stalled.clone();
        refused.extend(std::iter::repeat_n(b'x', PROTO_INLINE_MAX_SIZE));
        let events = parse_requests(&refused);
        assert!(matches!(
            &events[..],
            [RequestEvent::Request(_), RequestEvent::Desync { .. }]
        ));
        assert_eq!(request_desyncs(&events), ["too big inline request"]);
        assert_eq!(parse_requests_bytewise(&refused), events);
        for (data, reason) in [
            (&b"*1\x00\r\n$4\r\nPING\r\n"[..], "invalid multibulk length"),
            (&b"*1\r\n$4\x00\r\nPING\r\n"[..], "invalid bulk length"),
        ] {
            assert_eq!(request_desyncs(&parse_requests(data)), [reason]);
        }
    }

    #[test]
    fn a_long_element_error_says_it_was_cut() {
        let long = format!("ERR {}", "e".repeat(700));
        let data = format!("*2\r\n-{long}\r\n-ERR short\r\n");
        let events = parse_replies(data.as_bytes());
        let [ReplyEvent::Reply(reply)] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(
            reply.element_errors[0].1,
            format!("{}...", &long[..512]).into_bytes()
        );
        assert_eq!(reply.element_errors[1].1, b"ERR short".to_vec());
    }

    #[test]
    fn idle_parser_holds_almost_nothing() {
        let mut parser = RequestParser::new(KEEP);
        let mut out = Vec::new();
        let mut line = vec![b'A'; 60_000];
        line.push(b'\n');
        for byte in line.chunks(1000) {
            parser.feed(byte, 1, &mut out);
        }
        parser.feed(&multibulk(&[b"SET", b"k", &[b'v'; 10_000]]), 1, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(parser.heap_bytes(), 0);
    }

    /// Random input biased towards RESP: random bytes, RESP punctuation, or mutated valid traffic.
    fn fuzz_input(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
        const ALPHABET: &[u8] = b"*$+-:_,#(=!%~>|?0123456789\r\n\r\n\r\n ab\"'\\x\0";
        let len = rng.below(300) as usize;
        match rng.below(3) {
            0 => (0..len).map(|_| rng.next() as u8).collect(),
            1 => (0..len).map(|_| *rng.pick(ALPHABET)).collect(),
            _ => {
                let start = rng.below(valid.len() as u64) as usize;
                let mut data = valid[start..(start + len * 4).min(valid.len())].to_vec();
                for _ in 0..rng.below(4) {
                    let at = rng.below(data.len() as u64 + 1) as usize;
                    let byte = *rng.pick(ALPHABET);
                    match rng.below(3) {
                        0 if at < data.len() => data[at] = byte,
                        1 if at < data.len() => {
                            data.remove(at);
                        }
                        _ => data.insert(at, byte),
                    }
                }
                data
            }
        }
    }

    #[test]
    fn fuzz_requests_never_panic_and_ignore_splits() {
        let (valid, _) = pipeline(200);
        let mut rng = Rng(0xdead_beef);
        for round in 0..3000 {
            let data = fuzz_input(&mut rng, &valid);
            let keep = *rng.pick(&[0, 1, 5, KEEP]);
            let resyncing = rng.below(2) == 0;
            let make = || {
                if resyncing {
                    RequestParser::new_resyncing(keep)
                } else {
                    RequestParser::new(keep)
                }
            };
            let mut whole = Vec::new();
            make().feed(&data, 1, &mut whole);
            let mut parser = make();
            let mut split = Vec::new();
            for piece in random_pieces(&mut rng, &data, 8) {
                parser.feed(piece, 1, &mut split);
            }
            assert_eq!(split, whole, "round {round}: {data:?}");
            // With gaps: no panic, bounded memory.
            let mut parser = make();
            let mut out = Vec::new();
            for piece in random_pieces(&mut rng, &data, 40) {
                if rng.below(4) == 0 {
                    parser.skip(rng.below(20), &mut out);
                }
                parser.feed(piece, 1, &mut out);
                assert!(parser.heap_bytes() <= 2 * PROTO_INLINE_MAX_SIZE);
            }
        }
    }

    /// The whole-request fast path and the byte-by-byte state machine agree on mutated traffic
    /// (fed whole, most requests take the fast path; fed byte by byte, none can), and parsing
    /// through a shared, recycled pool changes nothing but allocations.
    #[test]
    fn fast_path_and_pool_agree_with_the_state_machine() {
        let (valid, _) = pipeline(300);
        let mut rng = Rng(0x00dd_ba11);
        let mut pool = BufPool::default();
        for round in 0..2000 {
            let data = if round % 4 == 0 {
                valid.clone()
            } else {
                fuzz_input(&mut rng, &valid)
            };
            let keep = *rng.pick(&[0, 1, 3, 5, 40, KEEP]);
            let resyncing = rng.below(3) == 0;
            let make = || {
                if resyncing {
                    RequestParser::new_resyncing(keep)
                } else {
                    RequestParser::new(keep)
                }
            };
            let mut whole = Vec::new();
            make().feed(&data, 1, &mut whole);
            let mut bytewise = Vec::new();
            let mut parser = make();
            for byte in data.chunks(1) {
                parser.feed(byte, 1, &mut bytewise);
            }
            assert_eq!(bytewise, whole, "round {round}: {data:?}");
            let mut pooled = Vec::new();
            let mut parser = make();
            for piece in random_pieces(&mut rng, &data, 200) {
                let mut events = Vec::new();
                parser.feed_pooled(piece, 1, &mut events, &mut pool);
                for ev in events {
                    pooled.push(ev.clone());
                    if let RequestEvent::Request(req) = ev {
                        pool.put_args(req.args);
                    }
                }
            }
            assert_eq!(pooled, whole, "round {round}: {data:?}");
            assert!(pool.heap_bytes() <= 3 * 1024 * 1024);
        }
    }

    // ---------------------------------------------------------------- replies

    fn parse_replies(data: &[u8]) -> Vec<ReplyEvent> {
        let mut out = Vec::new();
        ReplyParser::new().feed(data, 1, &mut out);
        out
    }

    fn parse_replies_bytewise(data: &[u8]) -> Vec<ReplyEvent> {
        let mut parser = ReplyParser::new();
        let mut out = Vec::new();
        for byte in data.chunks(1) {
            parser.feed(byte, 1, &mut out);
        }
        out
    }

    fn replies(events: &[ReplyEvent]) -> Vec<&Reply> {
        events
            .iter()
            .map(|event| match event {
                ReplyEvent::Reply(reply) => reply,
                ReplyEvent::Desync { reason } => panic!("unexpected desync: {reason}"),
            })
            .collect()
    }

    fn reply_desyncs(events: &[ReplyEvent]) -> Vec<&'static str> {
        events
            .iter()
            .filter_map(|event| match event {
                ReplyEvent::Desync { reason } => Some(*reason),
                ReplyEvent::Reply(_) => None,
            })
            .collect()
    }

    /// Parses exactly one reply, checking byte-by-byte feeding agrees.
    fn one_reply(data: &[u8]) -> Reply {
        let events = parse_replies(data);
        assert_eq!(parse_replies_bytewise(data), events);
        let [reply] = replies(&events)[..] else {
            panic!("{}: {events:?}", String::from_utf8_lossy(data))
        };
        reply.clone()
    }

    fn summary(kind: ReplyKind, text: &[u8], len: i64) -> Reply {
        Reply {
            kind,
            start_ts: 1,
            text: text.to_vec(),
            ..Reply::empty()
        }
        .with_len(len)
    }

    impl Reply {
        fn with_len(mut self, len: i64) -> Self {
            self.len = len;
            self
        }
    }

    #[test]
    fn every_scalar_type() {
        let cases: &[(&[u8], ReplyKind, &[u8], i64)] = &[
            (b"+OK\r\n", ReplyKind::Simple, b"OK", 2),
            (
                b"-ERR unknown command\r\n",
                ReplyKind::Error,
                b"ERR unknown command",
                19,
            ),
            (b":42\r\n", ReplyKind::Integer, b"42", 42),
            (b":-7\r\n", ReplyKind::Integer, b"-7", -7),
            (b"$5\r\nhello\r\n", ReplyKind::Bulk, b"hello", 5),
            (b"$0\r\n\r\n", ReplyKind::Bulk, b"", 0),
            (b"$4\r\na\r\nb\r\n", ReplyKind::Bulk, b"a\r\nb", 4),
            (b"$-1\r\n", ReplyKind::Null, b"", -1),
            (b"*-1\r\n", ReplyKind::Null, b"", -1),
            (b"_\r\n", ReplyKind::Null, b"", -1),
            (b",3.14\r\n", ReplyKind::Double, b"3.14", 4),
            (b",-inf\r\n", ReplyKind::Double, b"-inf", 4),
            (b"#t\r\n", ReplyKind::Boolean, b"t", 1),
            (b"#f\r\n", ReplyKind::Boolean, b"f", 1),
            (
                b"(3492890328409238509324850943850943825024385\r\n",
                ReplyKind::BigNumber,
                b"3492890328409238509324850943850943825024385",
                43,
            ),
            (
                b"=15\r\ntxt:Some string\r\n",
                ReplyKind::Verbatim,
                b"txt:Some string",
                15,
            ),
            (
                b"!21\r\nSYNTAX invalid syntax\r\n",
                ReplyKind::BulkError,
                b"SYNTAX invalid syntax",
                21,
            ),
        ];
        for (data, kind, text, len) in cases {
            assert_eq!(
                one_reply(data),
                summary(*kind, text, *len),
                "{}",
                String::from_utf8_lossy(data)
            );
        }
        assert!(one_reply(b"-ERR x\r\n").is_error());
        assert!(one_reply(b"!1\r\nx\r\n").is_error());
        assert!(!one_reply(b"+OK\r\n").is_error());
    }

    #[test]
    fn long_lines_and_payloads_keep_a_prefix() {
        let long = vec![b'e'; 2000];
        let mut data = b"-".to_vec();
        data.extend_from_slice(&long);
        data.extend_from_slice(b"\r\n");
        assert_eq!(
            one_reply(&data),
            summary(ReplyKind::Error, &long[..REPLY_TEXT_MAX], 2000)
        );
        let mut data = b"$2000\r\n".to_vec();
        data.extend_from_slice(&long);
        data.extend_from_slice(b"\r\n");
        assert_eq!(
            one_reply(&data),
            summary(ReplyKind::Bulk, &long[..REPLY_TEXT_MAX], 2000)
        );
    }

    #[test]
    fn aggregates_count_depth_one_elements() {
        let reply = one_reply(b"*3\r\n$3\r\nfoo\r\n:2\r\n:3\r\n");
        assert_eq!(
            (reply.kind, reply.len, reply.elements),
            (ReplyKind::Array, 3, 3)
        );
        assert_eq!(reply.first.as_deref(), Some(&b"foo"[..]));
        assert_eq!(reply.third_int, Some(3));
        assert!(reply.text.is_empty() && reply.element_errors.is_empty());

        let reply = one_reply(b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n");
        assert_eq!(
            (reply.kind, reply.len, reply.elements),
            (ReplyKind::Map, 2, 4)
        );
        assert_eq!(reply.first.as_deref(), Some(&b"first"[..]));
        assert_eq!(reply.third_int, None);

        let reply = one_reply(b"~2\r\n=7\r\ntxt:abc\r\n#t\r\n");
        assert_eq!(
            (reply.kind, reply.len, reply.elements),
            (ReplyKind::Set, 2, 2)
        );
        assert_eq!(reply.first.as_deref(), Some(&b"txt:abc"[..]));

        for (data, kind) in [
            (&b"*0\r\n"[..], ReplyKind::Array),
            (b"%0\r\n", ReplyKind::Map),
            (b"~0\r\n", ReplyKind::Set),
        ] {
            assert_eq!(one_reply(data), summary(kind, b"", 0));
        }

        // The first element is only reported when it is a string.
        let reply = one_reply(b"*3\r\n:1\r\n$-1\r\n+x\r\n");
        assert_eq!((reply.first, reply.third_int), (None, None));
        let mut long = b"*1\r\n$100\r\n".to_vec();
        long.extend_from_slice(&[b'f'; 100]);
        long.extend_from_slice(b"\r\n");
        assert_eq!(one_reply(&long).first, Some(vec![b'f'; REPLY_FIRST_MAX]));
    }

    #[test]
    fn nested_aggregates() {
        let data = b"*3\r\n*2\r\n:1\r\n*1\r\n-ERR deep\r\n%1\r\n+k\r\n*0\r\n$-1\r\n";
        let reply = one_reply(data);
        assert_eq!(
            (reply.kind, reply.len, reply.elements),
            (ReplyKind::Array, 3, 3)
        );
        // The error is at depth 3, not an EXEC result.
        assert!(reply.element_errors.is_empty());
        assert_eq!((reply.first, reply.third_int), (None, None));

        let mut data = b"*2\r\n*1\r\n*1\r\n+a\r\n:5\r\n".to_vec();
        data.extend_from_slice(b"+after\r\n");
        let events = parse_replies(&data);
        let [outer, after] = replies(&events)[..] else {
            panic!("{events:?}")
        };
        assert_eq!((outer.elements, outer.len), (2, 2));
        assert_eq!(after.text, b"after");
    }

    #[test]
    fn attributes_are_skipped() {
        // The RESP3 spec's example: an attribute before the top-level reply.
        let data = b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n*2\r\n:2039123\r\n:9543892\r\n";
        let reply = one_reply(data);
        assert_eq!(
            (reply.kind, reply.len, reply.elements),
            (ReplyKind::Array, 2, 2)
        );
        assert!(reply.first.is_none());

        // Attributes before elements (and inside attributes) do not count as elements.
        let data = b"*3\r\n|1\r\n+a\r\n|1\r\n+x\r\n+y\r\n+b\r\n+first\r\n:2\r\n|0\r\n:3\r\n";
        let reply = one_reply(data);
        assert_eq!((reply.elements, reply.len), (3, 3));
        assert_eq!(reply.first.as_deref(), Some(&b"first"[..]));
        assert_eq!(reply.third_int, Some(3));

        // Before a scalar reply, whose start_ts is the attribute's.
        let mut parser = ReplyParser::new();
        let mut out = Vec::new();
        parser.feed(b"|1\r\n+a\r\n+b", 10, &mut out);
        parser.feed(b"\r\n+OK\r\n", 20, &mut out);
        let [reply] = replies(&out)[..] else {
            panic!("{out:?}")
        };
        assert_eq!(
            reply,
            &Reply {
                start_ts: 10,
                ..summary(ReplyKind::Simple, b"OK", 2)
            }
        );
    }

    #[test]
    fn pub_sub_first_and_third_int() {
        // RESP2 subscribe confirmation and message.
        let reply = one_reply(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n");
        assert_eq!(reply.first.as_deref(), Some(&b"subscribe"[..]));
        assert_eq!(reply.third_int, Some(1));
        let reply = one_reply(b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n");
        assert_eq!(reply.first.as_deref(), Some(&b"message"[..]));
        assert_eq!(reply.third_int, None);
        // RESP3 push.
        let reply = one_reply(b">3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:0\r\n");
        assert_eq!(
            (reply.kind, reply.len, reply.elements),
            (ReplyKind::Push, 3, 3)
        );
        assert_eq!(reply.first.as_deref(), Some(&b"unsubscribe"[..]));
        assert_eq!(reply.third_int, Some(0));
    }

    #[test]
    fn exec_element_errors() {
        let reply = one_reply(b"*3\r\n+OK\r\n-WRONGTYPE x\r\n:1\r\n");
        assert_eq!(reply.element_errors, [(1, b"WRONGTYPE x".to_vec())]);
        assert_eq!(reply.first.as_deref(), Some(&b"OK"[..]));
        assert_eq!(reply.third_int, Some(1));
        assert_eq!(reply.elements, 3);
        assert!(!reply.is_error());

        let reply = one_reply(b"*2\r\n!10\r\nERR broken\r\n-ERR other\r\n");
        assert_eq!(
            reply.element_errors,
            [(0, b"ERR broken".to_vec()), (1, b"ERR other".to_vec())]
        );
        assert_eq!(reply.first, None);
    }

    #[test]
    fn element_errors_are_capped() {
        let count = MAX_ELEMENT_ERRORS + 100;
        let mut data = format!("*{count}\r\n").into_bytes();
        for _ in 0..count {
            data.extend_from_slice(b"-E\r\n");
        }
        let events = parse_replies(&data);
        let [reply] = replies(&events)[..] else {
            panic!()
        };
        assert_eq!(reply.elements, count as u64);
        assert_eq!(reply.element_errors.len(), MAX_ELEMENT_ERRORS);
        assert_eq!(
            reply.element_errors.last(),
            Some(&(MAX_ELEMENT_ERRORS as u32 - 1, b"E".to_vec()))
        );
    }

    #[test]
    fn huge_aggregate_counts_do_not_allocate() {
        let mut parser = ReplyParser::new();
        let mut out = Vec::new();
        parser.feed(b"*4000000000\r\n%9223372036854775807\r\n", 1, &mut out);
        for _ in 0..1000 {
            parser.feed(b":1\r\n", 1, &mut out);
        }
        assert!(out.is_empty());
        assert!(parser.heap_bytes() < 1024, "{}", parser.heap_bytes());
    }

    #[test]
    fn nesting_deeper_than_the_limit_desyncs() {
        let deepest = |depth: usize| {
            let mut data = b"*1\r\n".repeat(depth);
            data.extend_from_slice(b":1\r\n");
            data
        };
        let reply = one_reply(&deepest(MAX_REPLY_DEPTH));
        assert_eq!((reply.kind, reply.elements), (ReplyKind::Array, 1));
        let events = parse_replies(&deepest(MAX_REPLY_DEPTH + 1));
        assert_eq!(
            events[0],
            ReplyEvent::Desync {
                reason: "nesting too deep"
            }
        );
        // Resync picks up the innermost `:1` (it follows a CRLF): best effort, as documented.
        assert_eq!(
            replies(&events[1..])
                .iter()
                .map(|reply| reply.kind)
                .collect::<Vec<_>>(),
            [ReplyKind::Integer]
        );
    }

    #[test]
    fn malformed_replies_desync_then_recover() {
        let cases: &[(&[u8], &str)] = &[
            (b"*?\r\n", "streamed aggregates are not supported"),
            (b"$?\r\n", "streamed aggregates are not supported"),
            (b"@foo\r\n", "unknown reply type byte"),
            (b"*abc\r\n", "invalid length"),
            (b"*-2\r\n", "invalid length"),
            (b"%-1\r\n", "invalid length"),
            (b"$-2\r\n", "invalid length"),
            (b":abc\r\n", "invalid integer"),
            (b":\r\n", "invalid integer"),
            (b"#x\r\n", "invalid boolean"),
            (b"_x\r\n", "invalid null"),
            (b"$3\r\nabcd\r\n", "missing CRLF after bulk payload"),
            (b"+OK\rX\r\n", "expected LF after CR"),
            (b"*1\rX\r\n", "expected LF after CR"),
        ];
        for (input, reason) in cases {
            let mut data = input.to_vec();
            data.extend_from_slice(b"+NEXT\r\n");
            let events = parse_replies(&data);
            assert_eq!(
                reply_desyncs(&events),
                [*reason],
                "{}",
                String::from_utf8_lossy(input)
            );
            assert!(
                matches!(events.last(), Some(ReplyEvent::Reply(r)) if r.text == b"NEXT"),
                "{events:?}"
            );
            assert_eq!(parse_replies_bytewise(&data), events);
        }
        let mut line = b"*".to_vec();
        line.resize(100, b'1');
        assert_eq!(
            reply_desyncs(&parse_replies(&line)),
            ["length line too long"]
        );
    }

    #[test]
    fn huge_bulk_reply_is_streamed() {
        const LEN: usize = 512 * 1024 * 1024;
        let mut parser = ReplyParser::new();
        let mut out = Vec::new();
        parser.feed(format!("${LEN}\r\n").as_bytes(), 3, &mut out);
        let piece = vec![b'r'; 1024 * 1024];
        for _ in 0..LEN / piece.len() {
            parser.feed(&piece, 4, &mut out);
            assert!(parser.heap_bytes() <= 1024, "{}", parser.heap_bytes());
        }
        parser.feed(b"\r\n", 5, &mut out);
        let [reply] = replies(&out)[..] else { panic!() };
        assert_eq!(
            (reply.kind, reply.len, reply.start_ts),
            (ReplyKind::Bulk, LEN as i64, 3)
        );
        assert_eq!(reply.text, vec![b'r'; REPLY_TEXT_MAX]);
    }

    #[test]
    fn start_ts_is_that_of_the_first_byte() {
        let mut parser = ReplyParser::new();
        let mut out = Vec::new();
        parser.feed(b"+OK\r\n*", 1, &mut out);
        parser.feed(b"2\r\n:1\r\n", 2, &mut out);
        parser.feed(b":2\r\n", 3, &mut out);
        let starts: Vec<u64> = replies(&out).iter().map(|reply| reply.start_ts).collect();
        assert_eq!(starts, [1, 1]);
    }

    #[test]
    fn reply_gap_inside_a_nested_bulk_is_absorbed() {
        let mut parser = ReplyParser::new();
        let mut out = Vec::new();
        parser.feed(b"*2\r\n*1\r\n$10\r\nab", 1, &mut out);
        assert!(parser.skip(8, &mut out));
        parser.feed(b"\r\n:5\r\n", 2, &mut out);
        let [reply] = replies(&out)[..] else {
            panic!("{out:?}")
        };
        assert!(reply.lost);
        assert_eq!(
            (reply.kind, reply.elements, reply.len),
            (ReplyKind::Array, 2, 2)
        );

        // A gap through the end of a top-level bulk completes the reply.
        out.clear();
        parser.feed(b"$100\r\nhello", 3, &mut out);
        assert!(parser.skip(97, &mut out));
        let [reply] = replies(&out)[..] else {
            panic!("{out:?}")
        };
        assert_eq!(
            reply,
            &Reply {
                start_ts: 3,
                lost: true,
                ..summary(ReplyKind::Bulk, b"hello", 100)
            }
        );

        // After a payload gap the terminator is not checked.
        out.clear();
        parser.feed(b"$10\r\nab", 4, &mut out);
        assert!(parser.skip(7, &mut out));
        parser.feed(b"xyz+OK\r\n", 4, &mut out);
        assert_eq!(replies(&out).len(), 2);
    }

    #[test]
    fn reply_gap_outside_a_payload_desyncs_then_recovers() {
        for prefix in [&b""[..], b"*2\r\n:1\r\n", b"+O", b"$5"] {
            let mut parser = ReplyParser::new();
            let mut out = Vec::new();
            parser.feed(prefix, 1, &mut out);
            assert!(!parser.skip(4, &mut out));
            parser.feed(b"K\r\n:2\r\n", 2, &mut out);
            assert_eq!(reply_desyncs(&out), [GAP_REASON]);
            // "K\r\n" is dropped; ":2" follows a CRLF.
            let ReplyEvent::Reply(reply) = &out[1] else {
                panic!("{out:?}")
            };
            assert_eq!(
                reply,
                &Reply {
                    start_ts: 2,
                    ..summary(ReplyKind::Integer, b"2", 2)
                }
            );
            assert_eq!(out.len(), 2);
        }
    }

    #[test]
    fn reply_new_resyncing_starts_mid_reply() {
        let mut out = Vec::new();
        ReplyParser::new_resyncing().feed(b"llo world\r\n$5\r\nhello\r\n", 1, &mut out);
        let [reply] = replies(&out)[..] else {
            panic!("{out:?}")
        };
        assert_eq!(reply.text, b"hello");
        let mut out = Vec::new();
        ReplyParser::new_resyncing().feed(b"+OK\r\n", 1, &mut out);
        assert_eq!(replies(&out)[0].text, b"OK");
        // A wrong guess (`:` starting a line inside a value) is dropped silently.
        let mut out = Vec::new();
        ReplyParser::new_resyncing().feed(b"x\r\n:notanumber\r\n#t\r\n", 1, &mut out);
        let [reply] = replies(&out)[..] else {
            panic!("{out:?}")
        };
        assert_eq!(reply.kind, ReplyKind::Boolean);
    }

    /// A random valid reply, nested up to `depth`.
    fn random_reply(rng: &mut Rng, depth: u32, out: &mut Vec<u8>) {
        let choice = if depth == 0 {
            rng.below(9)
        } else {
            rng.below(14)
        };
        match choice {
            0 => out.extend_from_slice(b"+OK\r\n"),
            1 => out.extend_from_slice(format!("-ERR error {}\r\n", rng.below(100)).as_bytes()),
            2 => out.extend_from_slice(format!(":{}\r\n", rng.next() as i64).as_bytes()),
            3 | 4 => {
                let payload: Vec<u8> = (0..rng.below(700)).map(|_| rng.next() as u8).collect();
                out.extend_from_slice(format!("${}\r\n", payload.len()).as_bytes());
                out.extend_from_slice(&payload);
                out.extend_from_slice(b"\r\n");
            }
            5 => {
                const OTHERS: &[&[u8]] = &[
                    b"$-1\r\n",
                    b"*-1\r\n",
                    b"_\r\n",
                    b"#t\r\n",
                    b",1.5\r\n",
                    b"(12345678901234567890\r\n",
                ];
                let other = *rng.pick(OTHERS);
                out.extend_from_slice(other);
            }
            6 => out.extend_from_slice(b"=8\r\ntxt:abcd\r\n"),
            7 => out.extend_from_slice(b"!5\r\nERR x\r\n"),
            8 => out.extend_from_slice(b"*0\r\n"),
            _ => {
                let count = rng.below(5);
                let (header, values) = match rng.below(5) {
                    0 => ('%', count * 2),
                    1 => ('~', count),
                    2 => ('>', count),
                    3 => {
                        out.extend_from_slice(b"|1\r\n+attr\r\n:1\r\n");
                        ('*', count)
                    }
                    _ => ('*', count),
                };
                out.extend_from_slice(format!("{header}{count}\r\n").as_bytes());
                for _ in 0..values {
                    random_reply(rng, depth - 1, out);
                }
            }
        }
    }

    #[test]
    fn ten_thousand_pipelined_replies_whatever_the_split() {
        let mut rng = Rng(7);
        let mut data = Vec::new();
        for _ in 0..10_000 {
            random_reply(&mut rng, 3, &mut data);
        }
        let whole = parse_replies(&data);
        assert_eq!(replies(&whole).len(), 10_000);
        assert_eq!(parse_replies_bytewise(&data), whole);
        for max_piece in [3, 100, 65_536] {
            let mut parser = ReplyParser::new();
            let mut out = Vec::new();
            for piece in random_pieces(&mut rng, &data, max_piece) {
                parser.feed(piece, 1, &mut out);
            }
            assert_eq!(out, whole, "pieces up to {max_piece}");
        }
    }

    /// The scalar fast path and the state machine agree (see the request version), and so does
    /// parsing through a shared, recycled pool.
    #[test]
    fn reply_fast_path_and_pool_agree_with_the_state_machine() {
        let mut rng = Rng(0xfa57);
        let mut valid = Vec::new();
        for _ in 0..300 {
            random_reply(&mut rng, 2, &mut valid);
        }
        valid.extend_from_slice(
            b"+OK\r\n-ERR x\r\n:12\r\n:-0\r\n:01\r\n$3\r\nabc\r\n$0\r\n\r\n$-1\r\n$2\r\nabc\r\n",
        );
        let mut pool = BufPool::default();
        for round in 0..2000 {
            let data = if round % 4 == 0 {
                valid.clone()
            } else {
                fuzz_input(&mut rng, &valid)
            };
            let resyncing = rng.below(3) == 0;
            let make = || {
                if resyncing {
                    ReplyParser::new_resyncing()
                } else {
                    ReplyParser::new()
                }
            };
            let mut whole = Vec::new();
            make().feed(&data, 1, &mut whole);
            let mut bytewise = Vec::new();
            let mut parser = make();
            for byte in data.chunks(1) {
                parser.feed(byte, 1, &mut bytewise);
            }
            assert_eq!(bytewise, whole, "round {round}: {data:?}");
            let mut pooled = Vec::new();
            let mut parser = make();
            for piece in random_pieces(&mut rng, &data, 200) {
                let mut events = Vec::new();
                parser.feed_pooled(piece, 1, &mut events, &mut pool);
                for ev in events {
                    pooled.push(ev.clone());
                    if let ReplyEvent::Reply(reply) = ev {
                        pool.put_bytes(reply.text);
                    }
                }
            }
            assert_eq!(pooled, whole, "round {round}: {data:?}");
        }
    }

    #[test]
    fn fuzz_replies_never_panic_and_ignore_splits() {
        let mut rng = Rng(0x5eed);
        let mut valid = Vec::new();
        for _ in 0..300 {
            random_reply(&mut rng, 3, &mut valid);
        }
        for round in 0..3000 {
            let data = fuzz_input(&mut rng, &valid);
            let resyncing = rng.below(2) == 0;
            let make = || {
                if resyncing {
                    ReplyParser::new_resyncing()
                } else {
                    ReplyParser::new()
                }
            };
            let mut whole = Vec::new();
            make().feed(&data, 1, &mut whole);
            let mut parser = make();
            let mut split = Vec::new();
            for piece in random_pieces(&mut rng, &data, 8) {
                parser.feed(piece, 1, &mut split);
            }
            assert_eq!(split, whole, "round {round}: {data:?}");
            let mut parser = make();
            let mut out = Vec::new();
            for piece in random_pieces(&mut rng, &data, 40) {
                if rng.below(4) == 0 {
                    parser.skip(rng.below(20), &mut out);
                }
                parser.feed(piece, 1, &mut out);
                assert!(parser.heap_bytes() <= 64 * 1024);
            }
        }
    }
}
