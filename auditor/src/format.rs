//! The three record layouts of the Valkey Audit Module (text, JSON, CSV), written so that one record is
//! always exactly one line and always parses, whatever bytes a client sent.
//!
//! Field order is the module's 13 fields (timestamp, category, command, command_args, result,
//! duration_us, keys_modified, client_id, username, client_ip, client_port, server_hostname, error),
//! then the auditor's own: seq, keys, pid. On clean data the first 13 fields are byte-for-byte what the
//! module writes. Where the module writes client bytes raw (its log-injection and broken-JSON defects),
//! we escape:
//!
//! * **text**: `\n` `\r` `\t`, other control bytes (< 0x20, 0x7f) as `\xHH`, backslash as `\\`, bytes
//!   that are not UTF-8 as `\xHH`. C1 controls (U+0080..U+009F) and U+2028/U+2029 are written as the
//!   `\xHH` of their UTF-8 bytes, because some viewers treat them as line breaks or terminal escapes.
//!   Undoing `\xHH` → byte gives the client's bytes back. In `keys=`, `,` is also escaped (`\,`) so
//!   the list splits unambiguously.
//! * **json**: RFC 8259 (`\"` `\\` `\n` `\r` `\t` `\b` `\f`, other controls, DEL and C1 as `\u00XX`,
//!   U+2028/U+2029 as `\u2028`/`\u2029`). JSON strings cannot hold bytes that are not UTF-8, so such a
//!   byte is written as the four characters `\xHH` (JSON text `\\xHH`): the line stays valid JSON and
//!   the byte stays visible. (A client that sends the literal text `\xff` looks the same; the text and
//!   CSV formats do not have that ambiguity.)
//! * **csv**: RFC 4180 with no header row. A record must be one line, so inside each field the text
//!   escaping above is applied first (CR/LF/controls never reach the file raw); then a field that holds
//!   `,` or `"` is quoted with `"` and its `"` doubled. The keys column is the keys joined with `,`,
//!   each key's own `,` escaped as `\,` (and `\` as `\\`), quoted as a whole.
//!
//! Timestamps are local time `%Y-%m-%d %H:%M:%S`, like the module. Formatting a local time is costly
//! (time-zone rules), so the last formatted second is cached per thread; the cache is keyed by the
//! Unix second, which maps to exactly one local time, so it cannot go stale within a second.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Datelike, Local, Timelike};

use crate::record::{KeyList, Record, ServerInfo};

/// The output format (`audit.format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Csv,
}

/// `audit.format` was not `text`, `json` or `csv`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownFormat(pub String);

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown audit format {:?} (expected text, json or csv)",
            self.0
        )
    }
}

impl std::error::Error for UnknownFormat {}

impl FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("text") {
            Ok(Format::Text)
        } else if s.eq_ignore_ascii_case("json") {
            Ok(Format::Json)
        } else if s.eq_ignore_ascii_case("csv") {
            Ok(Format::Csv)
        } else {
            Err(UnknownFormat(s.to_string()))
        }
    }
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
            Format::Csv => "csv",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Append one record to `out` as exactly one line ending in `\n`. Allocates nothing but the growth of
/// `out`.
pub fn write_record(format: Format, r: &Record, out: &mut Vec<u8>) {
    match format {
        Format::Text => write_text(r, out),
        Format::Json => write_json(r, out, None),
        Format::Csv => write_csv(r, out),
    }
}

/// [`write_record`] with the JSON of the client and server fields kept from one record to the next
/// (`cache`): consecutive records mostly come from one connection, since a ring record holds a
/// pipeline's worth of its commands, so those eight fields are formatted once per run of them.
pub fn write_record_cached(
    format: Format,
    r: &Record,
    out: &mut Vec<u8>,
    cache: &mut JsonFieldCache,
) {
    match format {
        Format::Json => write_json(r, out, Some(cache)),
        _ => write_record(format, r, out),
    }
}

/// The JSON of the last record's client fields (`client_id` to `server_hostname`) and server fields
/// (`pid` on), with what they were made from. The `Arc`s are kept, so a pointer compared equal is the
/// same value, never a freed one's address reused.
#[derive(Default)]
pub struct JsonFieldCache {
    client: Option<ClientKey>,
    client_json: Vec<u8>,
    server: Option<(u32, Arc<ServerInfo>)>,
    server_json: Vec<u8>,
}

struct ClientKey {
    client_id: u64,
    client_port: u16,
    username: Arc<[u8]>,
    client_ip: Arc<str>,
    server: Arc<ServerInfo>,
}

impl ClientKey {
    fn matches(&self, r: &Record) -> bool {
        self.client_id == r.client_id
            && self.client_port == r.client_port
            && Arc::ptr_eq(&self.username, &r.username)
            && Arc::ptr_eq(&self.client_ip, &r.client_ip)
            && Arc::ptr_eq(&self.server, &r.server)
    }
}

fn write_text(r: &Record, out: &mut Vec<u8>) {
    let plain = Plain::TEXT;
    out.push(b'[');
    push_timestamp(out, r.time_unix_us);
    out.extend_from_slice(b"] [");
    escape_plain(out, r.category.as_str().as_bytes(), plain);
    out.extend_from_slice(b"] ");
    escape_plain(out, &r.command, plain);
    out.extend_from_slice(b" result=");
    out.extend_from_slice(r.result.as_str().as_bytes());
    out.extend_from_slice(b" duration_us=");
    push_u64(out, r.duration_us);
    out.extend_from_slice(b" keys_modified=");
    push_u64(out, r.keys_modified);
    out.extend_from_slice(b" client_id=");
    push_u64(out, r.client_id);
    out.extend_from_slice(b" username=");
    escape_plain(out, &r.username, plain);
    out.extend_from_slice(b" client_ip=");
    escape_plain(out, r.client_ip.as_bytes(), plain);
    out.push(b':');
    push_u64(out, u64::from(r.client_port));
    out.extend_from_slice(b" server_hostname=");
    escape_plain(out, r.server.hostname.as_bytes(), plain);
    if !r.command_args.is_empty() {
        out.push(b' ');
        escape_plain(out, &r.command_args, plain);
    }
    if !r.error.is_empty() {
        out.push(b' ');
        escape_plain(out, &r.error, plain);
    }
    out.extend_from_slice(b" seq=");
    push_u64(out, r.seq);
    out.extend_from_slice(b" keys=");
    push_key_list(out, &r.keys, Plain::TEXT_KEY);
    out.extend_from_slice(b" pid=");
    push_u64(out, u64::from(r.pid));
    let srv = &*r.server;
    if srv.port != 0 {
        out.extend_from_slice(b" server_port=");
        push_u64(out, u64::from(srv.port));
    }
    if srv.ns_pid != 0 {
        out.extend_from_slice(b" container_pid=");
        push_u64(out, u64::from(srv.ns_pid));
    }
    for (name, value) in container_fields(srv) {
        if !value.is_empty() {
            out.push(b' ');
            out.extend_from_slice(name.as_bytes());
            out.push(b'=');
            escape_plain(out, value.as_bytes(), plain);
        }
    }
    out.push(b'\n');
}

/// The container identity fields, in output order (written only where they apply, except in CSV).
fn container_fields(srv: &ServerInfo) -> [(&'static str, &str); 4] {
    [
        ("container_id", &srv.container_id),
        ("pod_name", &srv.pod_name),
        ("pod_namespace", &srv.pod_namespace),
        ("node_name", &srv.node_name),
    ]
}

fn write_json(r: &Record, out: &mut Vec<u8>, cache: Option<&mut JsonFieldCache>) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    push_timestamp(out, r.time_unix_us);
    out.extend_from_slice(b"\",\"category\":\"");
    escape_json(out, r.category.as_str().as_bytes());
    out.extend_from_slice(b"\",\"command\":\"");
    escape_json(out, &r.command);
    out.extend_from_slice(b"\",\"command_args\":\"");
    escape_json(out, &r.command_args);
    out.extend_from_slice(b"\",\"result\":\"");
    out.extend_from_slice(r.result.as_str().as_bytes());
    out.extend_from_slice(b"\",\"duration_us\":");
    push_u64(out, r.duration_us);
    out.extend_from_slice(b",\"keys_modified\":");
    push_u64(out, r.keys_modified);
    match cache {
        None => {
            json_client_fields(r, out);
            json_error_to_keys(r, out);
            json_server_fields(r, out);
        }
        Some(c) => {
            if !c.client.as_ref().is_some_and(|k| k.matches(r)) {
                c.client_json.clear();
                json_client_fields(r, &mut c.client_json);
                c.client = Some(ClientKey {
                    client_id: r.client_id,
                    client_port: r.client_port,
                    username: r.username.clone(),
                    client_ip: r.client_ip.clone(),
                    server: r.server.clone(),
                });
            }
            out.extend_from_slice(&c.client_json);
            json_error_to_keys(r, out);
            if !c
                .server
                .as_ref()
                .is_some_and(|(pid, srv)| *pid == r.pid && Arc::ptr_eq(srv, &r.server))
            {
                c.server_json.clear();
                json_server_fields(r, &mut c.server_json);
                c.server = Some((r.pid, r.server.clone()));
            }
            out.extend_from_slice(&c.server_json);
        }
    }
}

/// `,"client_id":...` to the `server_hostname` value.
fn json_client_fields(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(b",\"client_id\":");
    push_u64(out, r.client_id);
    out.extend_from_slice(b",\"username\":\"");
    escape_json(out, &r.username);
    out.extend_from_slice(b"\",\"client_ip\":\"");
    escape_json(out, r.client_ip.as_bytes());
    out.extend_from_slice(b"\",\"client_port\":");
    push_u64(out, u64::from(r.client_port));
    out.extend_from_slice(b",\"server_hostname\":\"");
    escape_json(out, r.server.hostname.as_bytes());
}

/// `","error":...` to the end of the key list.
fn json_error_to_keys(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(b"\",\"error\":\"");
    escape_json(out, &r.error);
    out.extend_from_slice(b"\",\"seq\":");
    push_u64(out, r.seq);
    out.extend_from_slice(b",\"keys\":[");
    for (i, key) in r.keys.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        escape_json(out, key);
        out.push(b'"');
    }
}

/// `],"pid":...` to the end of the line.
fn json_server_fields(r: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(b"],\"pid\":");
    push_u64(out, u64::from(r.pid));
    let srv = &*r.server;
    out.extend_from_slice(b",\"server_port\":");
    push_u64(out, u64::from(srv.port));
    if srv.ns_pid != 0 {
        out.extend_from_slice(b",\"container_pid\":");
        push_u64(out, u64::from(srv.ns_pid));
    }
    for (name, value) in container_fields(srv) {
        if !value.is_empty() {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":\"");
            escape_json(out, value.as_bytes());
            out.push(b'"');
        }
    }
    out.extend_from_slice(b"}\n");
}

fn write_csv(r: &Record, out: &mut Vec<u8>) {
    push_timestamp(out, r.time_unix_us);
    out.push(b',');
    csv_field(out, r.category.as_str().as_bytes());
    out.push(b',');
    csv_field(out, &r.command);
    out.push(b',');
    csv_field(out, &r.command_args);
    out.push(b',');
    out.extend_from_slice(r.result.as_str().as_bytes());
    out.push(b',');
    push_u64(out, r.duration_us);
    out.push(b',');
    push_u64(out, r.keys_modified);
    out.push(b',');
    push_u64(out, r.client_id);
    out.push(b',');
    csv_field(out, &r.username);
    out.push(b',');
    csv_field(out, r.client_ip.as_bytes());
    out.push(b',');
    push_u64(out, u64::from(r.client_port));
    out.push(b',');
    csv_field(out, r.server.hostname.as_bytes());
    out.push(b',');
    csv_field(out, &r.error);
    out.push(b',');
    push_u64(out, r.seq);
    out.push(b',');
    let quote = r.keys.len() > 1 || r.keys.iter().any(needs_csv_quotes);
    if quote {
        out.push(b'"');
    }
    push_key_list(
        out,
        &r.keys,
        if quote {
            Plain::CSV_KEY_QUOTED
        } else {
            Plain::TEXT_KEY
        },
    );
    if quote {
        out.push(b'"');
    }
    out.push(b',');
    push_u64(out, u64::from(r.pid));
    // CSV columns are positional: every server column is always there, empty where it does not apply.
    let srv = &*r.server;
    out.push(b',');
    push_u64(out, u64::from(srv.port));
    out.push(b',');
    if srv.ns_pid != 0 {
        push_u64(out, u64::from(srv.ns_pid));
    }
    for (_, value) in container_fields(srv) {
        out.push(b',');
        csv_field(out, value.as_bytes());
    }
    out.push(b'\n');
}

/// Keys joined with `,`, each escaped with `plain` (which escapes `,`).
fn push_key_list(out: &mut Vec<u8>, keys: &KeyList, plain: Plain) {
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        escape_plain(out, key, plain);
    }
}

fn needs_csv_quotes(s: &[u8]) -> bool {
    s.iter().any(|&b| b == b',' || b == b'"')
}

/// One CSV field: text-escaped, quoted when it holds `,` or `"`. (Escaping never adds or removes `,`
/// or `"`, so the raw bytes decide.)
fn csv_field(out: &mut Vec<u8>, s: &[u8]) {
    if needs_csv_quotes(s) {
        out.push(b'"');
        escape_plain(out, s, Plain::CSV_QUOTED);
        out.push(b'"');
    } else {
        escape_plain(out, s, Plain::TEXT);
    }
}

/// Options of the text/CSV escaper.
#[derive(Clone, Copy)]
struct Plain {
    /// Escape `,` as `\,` (key lists).
    comma: bool,
    /// Double `"` (inside a quoted CSV field).
    double_quote: bool,
}

impl Plain {
    const TEXT: Plain = Plain {
        comma: false,
        double_quote: false,
    };
    const TEXT_KEY: Plain = Plain {
        comma: true,
        double_quote: false,
    };
    const CSV_QUOTED: Plain = Plain {
        comma: false,
        double_quote: true,
    };
    const CSV_KEY_QUOTED: Plain = Plain {
        comma: true,
        double_quote: true,
    };
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex_byte(out: &mut Vec<u8>, b: u8) {
    out.extend_from_slice(&[
        b'\\',
        b'x',
        HEX[usize::from(b >> 4)],
        HEX[usize::from(b & 0xf)],
    ]);
}

/// Per-byte classes of the escapers' fast path. A byte is copied as it is when `CLASS[b] & mask` is
/// 0, with `mask` chosen by the escaper and its options.
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0usize;
    while b < 256 {
        let mut c = 0u8;
        if b < 0x20 || b == 0x7f || b == b'\\' as usize {
            c |= C_SPECIAL;
        }
        if b >= 0x80 {
            c |= C_SPECIAL | C_NON_ASCII;
        }
        if b == b'"' as usize {
            c |= C_QUOTE;
        }
        if b == b',' as usize {
            c |= C_COMMA;
        }
        t[b] = c;
        b += 1;
    }
    t
};
/// Escaped by every escaper: ASCII controls, DEL, backslash, and non-ASCII (handled by the UTF-8 path).
const C_SPECIAL: u8 = 1;
/// Not ASCII: the rest of the string goes through the UTF-8 path.
const C_NON_ASCII: u8 = 2;
/// `"`: escaped in JSON, doubled in quoted CSV fields.
const C_QUOTE: u8 = 4;
/// `,`: escaped in key lists.
const C_COMMA: u8 = 8;

const LOW_BITS: u64 = 0x0101_0101_0101_0101;
const HIGH_BITS: u64 = 0x8080_8080_8080_8080;

/// Non-zero when some byte of `v` is zero (may also flag bytes above a zero byte; never misses).
#[inline(always)]
fn has_zero_byte(v: u64) -> u64 {
    v.wrapping_sub(LOW_BITS) & !v & HIGH_BITS
}

/// Whether any of the 8 bytes of `w` may need escaping under `mask`: non-ASCII, control, DEL,
/// backslash, and `"` / `,` when the mask has them. False positives are allowed (the bytes are then
/// checked one by one); false negatives are not.
#[inline(always)]
fn word_maybe_special(w: u64, mask: u8) -> bool {
    // High bit: non-ASCII. For ASCII bytes, `b - 0x20` borrows into the high bit iff `b < 0x20`.
    let mut m = (w | (w.wrapping_sub(LOW_BITS * 0x20) & !w)) & HIGH_BITS;
    m |= has_zero_byte(w ^ (LOW_BITS * 0x7f));
    m |= has_zero_byte(w ^ (LOW_BITS * u64::from(b'\\')));
    if mask & C_QUOTE != 0 {
        m |= has_zero_byte(w ^ (LOW_BITS * u64::from(b'"')));
    }
    if mask & C_COMMA != 0 {
        m |= has_zero_byte(w ^ (LOW_BITS * u64::from(b',')));
    }
    m != 0
}

/// Length of the leading run of `s` that `mask` lets through unescaped. `mask` always holds
/// `C_SPECIAL`. Sixteen bytes at a time with SSE2 (part of the x86_64 baseline), then eight.
#[inline(always)]
fn plain_run(s: &[u8], mask: u8) -> usize {
    debug_assert!(mask & C_SPECIAL != 0);
    #[cfg(target_arch = "x86_64")]
    {
        let done = plain_run_sse2(s, mask);
        if done + 16 > s.len() {
            return done + plain_run_swar(&s[done..], mask);
        }
        done
    }
    #[cfg(not(target_arch = "x86_64"))]
    plain_run_swar(s, mask)
}

/// The SSE2 part of [`plain_run`] and [`is_plain`]: the offset of the first byte to escape, or of the last partial
/// 16-byte block when none of the full blocks holds one. Payloads of 1 KiB made the eight-byte loop
/// 10% of the auditor's CPU at `-P 16 -d 1024` (perf).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn plain_run_sse2(s: &[u8], mask: u8) -> usize {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_cmplt_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    let mut i = 0;
    // SAFETY: SSE2 is always available on x86_64; every load reads 16 bytes inside `s`
    // (i + 16 <= s.len()) and `_mm_loadu_si128` has no alignment requirement.
    unsafe {
        // Signed compare: bytes 0x00-0x1f and 0x80-0xff (negative as i8) are below 0x20.
        let space = _mm_set1_epi8(0x20);
        let del = _mm_set1_epi8(0x7f);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        let quote = _mm_set1_epi8(b'"' as i8);
        let comma = _mm_set1_epi8(b',' as i8);
        while i + 16 <= s.len() {
            let v = _mm_loadu_si128(s.as_ptr().add(i).cast::<__m128i>());
            let mut m = _mm_or_si128(
                _mm_cmplt_epi8(v, space),
                _mm_or_si128(_mm_cmpeq_epi8(v, del), _mm_cmpeq_epi8(v, backslash)),
            );
            if mask & C_QUOTE != 0 {
                m = _mm_or_si128(m, _mm_cmpeq_epi8(v, quote));
            }
            if mask & C_COMMA != 0 {
                m = _mm_or_si128(m, _mm_cmpeq_epi8(v, comma));
            }
            let bits = _mm_movemask_epi8(m);
            if bits != 0 {
                return i + bits.trailing_zeros() as usize;
            }
            i += 16;
        }
    }
    i
}

/// [`plain_run`] eight bytes at a time.
#[inline(always)]
fn plain_run_swar(s: &[u8], mask: u8) -> usize {
    let special = |b: &u8| CLASS[usize::from(*b)] & mask != 0;
    let mut chunks = s.chunks_exact(8);
    let mut done = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        if word_maybe_special(u64::from_le_bytes(word), mask)
            && let Some(i) = chunk.iter().position(special)
        {
            return done + i;
        }
        done += 8;
    }
    let rest = chunks.remainder();
    done + rest.iter().position(special).unwrap_or(rest.len())
}

/// Whether no byte of `s` needs escaping under `mask`. May say false for a string that needs none
/// (the escaping loop then copies it unchanged), never true for one that needs some.
#[inline(always)]
fn is_plain(s: &[u8], mask: u8) -> bool {
    // Full 16-byte blocks first, as in `plain_run`: a long plain value (the common case) would
    // otherwise take the eight-byte loop alone.
    #[cfg(target_arch = "x86_64")]
    let s = {
        let done = plain_run_sse2(s, mask);
        if done + 16 <= s.len() {
            return false;
        }
        &s[done..]
    };
    let mut chunks = s.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        if word_maybe_special(u64::from_le_bytes(word), mask) {
            return false;
        }
    }
    // No early exit: a short tail is cheaper or'ed whole than tested byte by byte.
    chunks
        .remainder()
        .iter()
        .fold(0u8, |acc, &b| acc | CLASS[usize::from(b)])
        & mask
        == 0
}

/// Appends `s`. Most fields are a few bytes long (a port, a user, a key): for up to 16 bytes, two
/// overlapping loads and stores replace the call to `memcpy`, whose per-call cost made it 13% of
/// the capture thread at `-P 16 -d 3` (perf).
#[inline(always)]
fn push_bytes(out: &mut Vec<u8>, s: &[u8]) {
    let n = s.len();
    if n > 16 {
        out.extend_from_slice(s);
        return;
    }
    out.reserve(16);
    let len = out.len();
    let src = s.as_ptr();
    // SAFETY: `reserve(16)` leaves room for 16 bytes after `len`, and n <= 16; every load reads
    // inside `s` (offsets below n) and every store writes inside the reserved room; unaligned
    // accesses are used throughout. The n bytes after `len` are initialised before `set_len`.
    unsafe {
        let dst = out.as_mut_ptr().add(len);
        if n >= 8 {
            let head = src.cast::<u64>().read_unaligned();
            let tail = src.add(n - 8).cast::<u64>().read_unaligned();
            dst.cast::<u64>().write_unaligned(head);
            dst.add(n - 8).cast::<u64>().write_unaligned(tail);
        } else if n >= 4 {
            let head = src.cast::<u32>().read_unaligned();
            let tail = src.add(n - 4).cast::<u32>().read_unaligned();
            dst.cast::<u32>().write_unaligned(head);
            dst.add(n - 4).cast::<u32>().write_unaligned(tail);
        } else if n > 0 {
            *dst = *src;
            *dst.add(n / 2) = *src.add(n / 2);
            *dst.add(n - 1) = *src.add(n - 1);
        }
        out.set_len(len + n);
    }
}

/// Text/CSV escaping (see the module doc). A plain string is copied in one go.
#[inline(always)]
fn escape_plain(out: &mut Vec<u8>, s: &[u8], opts: Plain) {
    let mask = C_SPECIAL
        | if opts.comma { C_COMMA } else { 0 }
        | if opts.double_quote { C_QUOTE } else { 0 };
    if is_plain(s, mask) {
        push_bytes(out, s);
    } else {
        escape_plain_runs(out, s, opts, mask);
    }
}

/// Text/CSV escaping of a string that may need it: runs of plain ASCII are copied in one go; from
/// the first non-ASCII byte on, `escape_plain_utf8` takes over.
#[inline(never)]
fn escape_plain_runs(out: &mut Vec<u8>, s: &[u8], opts: Plain, mask: u8) {
    out.reserve(s.len());
    let mut rest = s;
    loop {
        let run = plain_run(rest, mask);
        let (plain, tail) = rest.split_at(run);
        out.extend_from_slice(plain);
        let Some((&b, after)) = tail.split_first() else {
            return;
        };
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b',' => out.extend_from_slice(b"\\,"),
            b'"' => out.extend_from_slice(b"\"\""),
            0..=0x1f | 0x7f => push_hex_byte(out, b),
            _ => return escape_plain_utf8(out, tail, opts),
        }
        rest = after;
    }
}

/// JSON string-content escaping (see the module doc). A plain string is copied in one go.
#[inline(always)]
fn escape_json(out: &mut Vec<u8>, s: &[u8]) {
    if is_plain(s, C_SPECIAL | C_QUOTE) {
        push_bytes(out, s);
    } else {
        escape_json_runs(out, s);
    }
}

/// JSON escaping of a string that may need it: runs of plain ASCII are copied in one go; from the
/// first non-ASCII byte on, `escape_json_utf8` takes over.
#[inline(never)]
fn escape_json_runs(out: &mut Vec<u8>, s: &[u8]) {
    out.reserve(s.len());
    let mut rest = s;
    loop {
        let run = plain_run(rest, C_SPECIAL | C_QUOTE);
        let (plain, tail) = rest.split_at(run);
        out.extend_from_slice(plain);
        let Some((&b, after)) = tail.split_first() else {
            return;
        };
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0..=0x1f | 0x7f => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
            _ => return escape_json_utf8(out, tail),
        }
        rest = after;
    }
}

/// Text/CSV escaping of `s` from its first non-ASCII byte on (the general case: UTF-8 chunks, C1
/// controls, U+2028/U+2029, invalid bytes).
fn escape_plain_utf8(out: &mut Vec<u8>, s: &[u8], opts: Plain) {
    for chunk in s.utf8_chunks() {
        let valid = chunk.valid().as_bytes();
        let mut run = 0;
        let mut i = 0;
        while i < valid.len() {
            let b = valid[i];
            let special: Option<&[u8]> = match b {
                b'\\' => Some(b"\\\\"),
                b'\n' => Some(b"\\n"),
                b'\r' => Some(b"\\r"),
                b'\t' => Some(b"\\t"),
                b',' if opts.comma => Some(b"\\,"),
                b'"' if opts.double_quote => Some(b"\"\""),
                0..=0x1f | 0x7f => Some(b""),
                // C1 controls: U+0080..U+009F are C2 80..C2 9F.
                0xc2 if valid.get(i + 1).is_some_and(|&n| n <= 0x9f) => Some(b""),
                // U+2028, U+2029: E2 80 A8, E2 80 A9.
                0xe2 if valid.get(i + 1) == Some(&0x80)
                    && matches!(valid.get(i + 2), Some(0xa8 | 0xa9)) =>
                {
                    Some(b"")
                }
                _ => None,
            };
            match special {
                None => i += 1,
                Some(replacement) => {
                    out.extend_from_slice(&valid[run..i]);
                    if replacement.is_empty() {
                        // \xHH for every byte of this character.
                        let len = match b {
                            0xc2 => 2,
                            0xe2 => 3,
                            _ => 1,
                        };
                        for &byte in &valid[i..i + len] {
                            push_hex_byte(out, byte);
                        }
                        i += len;
                    } else {
                        out.extend_from_slice(replacement);
                        i += 1;
                    }
                    run = i;
                }
            }
        }
        out.extend_from_slice(&valid[run..]);
        for &b in chunk.invalid() {
            push_hex_byte(out, b);
        }
    }
}

/// JSON escaping of `s` from its first non-ASCII byte on (see `escape_plain_utf8`).
fn escape_json_utf8(out: &mut Vec<u8>, s: &[u8]) {
    for chunk in s.utf8_chunks() {
        let valid = chunk.valid().as_bytes();
        let mut run = 0;
        let mut i = 0;
        while i < valid.len() {
            let b = valid[i];
            let (replacement, len): (&[u8], usize) = match b {
                b'"' => (b"\\\"", 1),
                b'\\' => (b"\\\\", 1),
                b'\n' => (b"\\n", 1),
                b'\r' => (b"\\r", 1),
                b'\t' => (b"\\t", 1),
                0x08 => (b"\\b", 1),
                0x0c => (b"\\f", 1),
                0..=0x1f | 0x7f => (b"", 1),
                0xc2 if valid.get(i + 1).is_some_and(|&n| n <= 0x9f) => (b"", 2),
                0xe2 if valid.get(i + 1) == Some(&0x80) && valid.get(i + 2) == Some(&0xa8) => {
                    (b"\\u2028", 3)
                }
                0xe2 if valid.get(i + 1) == Some(&0x80) && valid.get(i + 2) == Some(&0xa9) => {
                    (b"\\u2029", 3)
                }
                _ => {
                    i += 1;
                    continue;
                }
            };
            out.extend_from_slice(&valid[run..i]);
            if replacement.is_empty() {
                // A control character U+00XX: the code point is the byte (or the second byte of C2 XX).
                let cp = if len == 2 { valid[i + 1] } else { b };
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(cp >> 4)]);
                out.push(HEX[usize::from(cp & 0xf)]);
            } else {
                out.extend_from_slice(replacement);
            }
            i += len;
            run = i;
        }
        out.extend_from_slice(&valid[run..]);
        for &b in chunk.invalid() {
            // `\\xHH`: a backslash (escaped) then xHH.
            out.extend_from_slice(&[
                b'\\',
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        }
    }
}

fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `YYYY-MM-DD HH:MM:SS` is 19 bytes.
const TIMESTAMP_LEN: usize = 19;

thread_local! {
    /// The last Unix second formatted on this thread, and its text.
    static TIMESTAMP_CACHE: Cell<Option<(i64, [u8; TIMESTAMP_LEN])>> = const { Cell::new(None) };
}

/// Append the local time of `time_unix_us` as `%Y-%m-%d %H:%M:%S`.
fn push_timestamp(out: &mut Vec<u8>, time_unix_us: i64) {
    let secs = time_unix_us.div_euclid(1_000_000);
    if let Some((cached, text)) = TIMESTAMP_CACHE.get()
        && cached == secs
    {
        out.extend_from_slice(&text);
        return;
    }
    let Some(local) = DateTime::from_timestamp(secs, 0).map(|t| t.with_timezone(&Local)) else {
        // Outside chrono's range (±262,000 years): cannot happen for a real clock.
        out.extend_from_slice(b"0000-00-00 00:00:00");
        return;
    };
    let year = local.year();
    if !(0..=9999).contains(&year) {
        // Not 19 bytes wide: format without caching (never for a real clock).
        use std::io::Write;
        let _ = write!(out, "{}", local.format("%Y-%m-%d %H:%M:%S"));
        return;
    }
    let mut text = [0u8; TIMESTAMP_LEN];
    let two = |dst: &mut [u8], v: u32| {
        dst[0] = b'0' + (v / 10 % 10) as u8;
        dst[1] = b'0' + (v % 10) as u8;
    };
    let year = year as u32;
    two(&mut text[0..2], year / 100);
    two(&mut text[2..4], year % 100);
    text[4] = b'-';
    two(&mut text[5..7], local.month());
    text[7] = b'-';
    two(&mut text[8..10], local.day());
    text[10] = b' ';
    two(&mut text[11..13], local.hour());
    text[13] = b':';
    two(&mut text[14..16], local.minute());
    text[16] = b':';
    two(&mut text[17..19], local.second());
    TIMESTAMP_CACHE.set(Some((secs, text)));
    out.extend_from_slice(&text);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Category, Outcome};
    use chrono::TimeZone;

    /// The local-time microseconds of a wall-clock time, so tests do not depend on the machine's zone.
    fn local_us(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
        Local
            .with_ymd_and_hms(y, mo, d, h, mi, s)
            .earliest()
            .expect("valid local time")
            .timestamp()
            * 1_000_000
            + 123_456
    }

    /// The sample's `set user:1001 hello` record (samples/text.log, S11).
    fn sample_set() -> Record {
        Record {
            time_unix_us: local_us(2026, 11, 22, 14, 12, 51),
            category: Category::KeyOp,
            command: b"set".to_vec().into(),
            command_args: b"key=user:1001 payload=hello".to_vec(),
            result: Outcome::Success,
            duration_us: 8,
            keys_modified: 1,
            client_id: 6,
            username: b"alice"[..].into(),
            client_ip: "127.0.0.1".into(),
            client_port: 42696,
            server: ServerInfo::host("vm"),
            error: Vec::new(),
            seq: 42,
            keys: [b"user:1001".to_vec()].iter().collect(),
            pid: 4242,
        }
    }

    /// The cached client and server fields are those of each record: the same connection with a
    /// new user (AUTH), another connection, another server, a container server, fields to escape.
    #[test]
    fn cached_json_fields_are_each_records_own() {
        let base = sample_set();
        let mut records = vec![base.clone()];
        let mut r = base.clone();
        r.seq = 43;
        r.keys = KeyList::new();
        records.push(r.clone());
        r.username = b"bob"[..].into();
        records.push(r.clone());
        // An equal user name in a new allocation (a second AUTH as the same user).
        r.username = b"bob"[..].into();
        records.push(r.clone());
        r.client_id = 7;
        r.client_port = 1;
        records.push(r.clone());
        r.client_ip = "::1".into();
        records.push(r.clone());
        let mut srv = (*base.server).clone();
        srv.hostname = "host \"two\"".into();
        srv.port = 7000;
        srv.ns_pid = 12;
        srv.pod_name = "pod-a".into();
        r.server = Arc::new(srv);
        records.push(r.clone());
        r.pid = 4243;
        records.push(r.clone());
        records.push(base.clone());
        let mut cache = JsonFieldCache::default();
        for (i, r) in records.iter().enumerate() {
            let (mut cached, mut plain) = (Vec::new(), Vec::new());
            write_record_cached(Format::Json, r, &mut cached, &mut cache);
            write_record(Format::Json, r, &mut plain);
            assert_eq!(
                String::from_utf8_lossy(&cached),
                String::from_utf8_lossy(&plain),
                "record {i}"
            );
            let v: serde_json::Value = serde_json::from_slice(&cached).unwrap();
            assert_eq!(v["client_id"], r.client_id, "record {i}");
            assert_eq!(v["server_port"], r.server.port, "record {i}");
        }
        // Other formats ignore the cache.
        let (mut cached, mut plain) = (Vec::new(), Vec::new());
        write_record_cached(Format::Text, &base, &mut cached, &mut cache);
        write_record(Format::Text, &base, &mut plain);
        assert_eq!(cached, plain);
    }

    /// The sample's unknown-command record (S12), with its error text.
    fn sample_unknown() -> Record {
        Record {
            category: Category::Other,
            command: b"NOSUCHCOMMAND".to_vec().into(),
            command_args: b"arg1=arg".to_vec(),
            result: Outcome::Failure,
            duration_us: 0,
            keys_modified: 0,
            error: b"rejected=unknown command 'NOSUCHCOMMAND', with args beginning with: 'arg' "
                .to_vec(),
            keys: KeyList::new(),
            ..sample_set()
        }
    }

    fn line(format: Format, r: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        write_record(format, r, &mut out);
        out
    }

    fn sample_line(file: &str, needle: &str) -> String {
        let path = format!("/work/shared/reference/samples/{file}");
        match std::fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .find(|l| l.contains(needle))
                .expect("sample line")
                .to_string(),
            // The samples are outside the crate; the expected lines are also spelled out below.
            Err(_) => String::new(),
        }
    }

    #[test]
    fn parse_format() {
        assert_eq!("TEXT".parse::<Format>(), Ok(Format::Text));
        assert_eq!("json".parse::<Format>(), Ok(Format::Json));
        assert_eq!("Csv".parse::<Format>(), Ok(Format::Csv));
        let err = "xml".parse::<Format>().unwrap_err();
        assert_eq!(err, UnknownFormat("xml".to_string()));
        assert!(err.to_string().contains("xml"));
        for f in [Format::Text, Format::Json, Format::Csv] {
            assert_eq!(f.as_str().parse::<Format>(), Ok(f));
        }
    }

    #[test]
    fn text_matches_module_prefix() {
        let expected = "[2026-11-22 14:12:51] [KEY_OP] set result=SUCCESS duration_us=8 keys_modified=1 client_id=6 username=alice client_ip=127.0.0.1:42696 server_hostname=vm key=user:1001 payload=hello";
        let sample = sample_line(
            "text.log",
            "duration_us=8 keys_modified=1 client_id=6 username=alice client_ip=127.0.0.1:42696 server_hostname=vm key=user:1001",
        );
        if !sample.is_empty() {
            assert_eq!(sample, expected);
        }
        let got = String::from_utf8(line(Format::Text, &sample_set())).unwrap();
        assert_eq!(got, format!("{expected} seq=42 keys=user:1001 pid=4242\n"));

        let expected = "[2026-11-22 14:12:51] [OTHER] NOSUCHCOMMAND result=FAILURE duration_us=0 keys_modified=0 client_id=6 username=alice client_ip=127.0.0.1:42696 server_hostname=vm arg1=arg rejected=unknown command 'NOSUCHCOMMAND', with args beginning with: 'arg' ";
        let sample = sample_line("text.log", "[OTHER] NOSUCHCOMMAND");
        if !sample.is_empty() {
            assert_eq!(sample, expected);
        }
        let got = String::from_utf8(line(Format::Text, &sample_unknown())).unwrap();
        assert_eq!(got, format!("{expected} seq=42 keys= pid=4242\n"));
    }

    #[test]
    fn json_matches_module_prefix() {
        let mut r = sample_set();
        r.time_unix_us = local_us(2026, 11, 22, 14, 13, 12);
        r.duration_us = 19;
        r.client_port = 59310;
        let expected = r#"{"timestamp":"2026-11-22 14:13:12","category":"KEY_OP","command":"set","command_args":"key=user:1001 payload=hello","result":"SUCCESS","duration_us":19,"keys_modified":1,"client_id":6,"username":"alice","client_ip":"127.0.0.1","client_port":59310,"server_hostname":"vm","error":"""#;
        let sample = sample_line(
            "json.log",
            r#""command_args":"key=user:1001 payload=hello""#,
        );
        if !sample.is_empty() {
            assert_eq!(sample, format!("{expected}}}"));
        }
        let got = String::from_utf8(line(Format::Json, &r)).unwrap();
        assert_eq!(
            got,
            format!(r#"{expected},"seq":42,"keys":["user:1001"],"pid":4242,"server_port":0}}"#)
                + "\n"
        );
        let v: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(v["keys"][0], "user:1001");

        let mut r = sample_unknown();
        r.time_unix_us = local_us(2026, 11, 22, 14, 13, 12);
        r.client_port = 59310;
        let expected = r#"{"timestamp":"2026-11-22 14:13:12","category":"OTHER","command":"NOSUCHCOMMAND","command_args":"arg1=arg","result":"FAILURE","duration_us":0,"keys_modified":0,"client_id":6,"username":"alice","client_ip":"127.0.0.1","client_port":59310,"server_hostname":"vm","error":"rejected=unknown command 'NOSUCHCOMMAND', with args beginning with: 'arg' ""#;
        let sample = sample_line("json.log", r#""command":"NOSUCHCOMMAND""#);
        if !sample.is_empty() {
            assert_eq!(sample, format!("{expected}}}"));
        }
        let got = String::from_utf8(line(Format::Json, &r)).unwrap();
        assert_eq!(
            got,
            format!(r#"{expected},"seq":42,"keys":[],"pid":4242,"server_port":0}}"#) + "\n"
        );
    }

    #[test]
    fn csv_matches_module_prefix_on_clean_data() {
        let mut r = sample_set();
        r.time_unix_us = local_us(2026, 11, 22, 14, 13, 15);
        r.client_port = 52198;
        let expected = "2026-11-22 14:13:15,KEY_OP,set,key=user:1001 payload=hello,SUCCESS,8,1,6,alice,127.0.0.1,52198,vm,";
        let sample = sample_line("csv.log", ",set,key=user:1001 payload=hello,");
        if !sample.is_empty() {
            assert_eq!(sample, expected);
        }
        let got = String::from_utf8(line(Format::Csv, &r)).unwrap();
        assert_eq!(got, format!("{expected},42,user:1001,4242,0,,,,,\n"));

        // Connection-style record with an empty field in the middle.
        let r = Record {
            category: Category::Connection,
            command: b"connection".to_vec().into(),
            command_args: b"type=normal".to_vec(),
            duration_us: 0,
            keys_modified: 0,
            client_id: 4,
            username: b"default"[..].into(),
            client_port: 52172,
            keys: KeyList::new(),
            time_unix_us: local_us(2026, 11, 22, 14, 13, 14),
            ..sample_set()
        };
        let expected = "2026-11-22 14:13:14,CONNECTION,connection,type=normal,SUCCESS,0,0,4,default,127.0.0.1,52172,vm,";
        let sample = sample_line(
            "csv.log",
            "14:13:14,CONNECTION,connection,type=normal,SUCCESS,0,0,4,",
        );
        if !sample.is_empty() {
            assert_eq!(sample, expected);
        }
        assert_eq!(
            String::from_utf8(line(Format::Csv, &r)).unwrap(),
            format!("{expected},42,,4242,0,,,,,\n")
        );
    }

    /// Nasty byte strings: quotes, backslashes, newlines, NUL, invalid UTF-8, U+2028, C1, commas.
    fn nasty() -> Vec<Vec<u8>> {
        vec![
            b"va\"l,ue\\x\nline2 sp".to_vec(),
            b"a\r\nb\tc\0d\x7f\x1b[31m".to_vec(),
            vec![0xff, 0xfe],
            b"x\xc3(\xe2\x82".to_vec(),
            "line\u{2028}sep\u{2029}end\u{85}nel\u{9b}csi"
                .as_bytes()
                .to_vec(),
            "héllo, wörld \"q\" \\".as_bytes().to_vec(),
            b"\x08\x0c\"\"".to_vec(),
            Vec::new(),
            b",".to_vec(),
            b"\\,".to_vec(),
        ]
    }

    fn nasty_record(v: &[u8]) -> Record {
        Record {
            category: Category::Custom(String::from_utf8_lossy(v).into_owned()),
            command: v.to_vec().into(),
            command_args: v.to_vec(),
            username: v.into(),
            error: v.to_vec(),
            client_ip: String::from_utf8_lossy(v).into(),
            server: std::sync::Arc::new(ServerInfo {
                hostname: String::from_utf8_lossy(v).into_owned(),
                container_id: String::from_utf8_lossy(v).into_owned(),
                pod_name: String::from_utf8_lossy(v).into_owned(),
                ..ServerInfo::default()
            }),
            keys: [v.to_vec(), b"k,2".to_vec(), v.to_vec()].iter().collect(),
            ..sample_set()
        }
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    fn assert_one_line(out: &[u8]) {
        assert_eq!(out.last(), Some(&b'\n'));
        assert!(
            !out[..out.len() - 1]
                .iter()
                .any(|&b| b == b'\n' || b == b'\r'),
            "{:?}",
            String::from_utf8_lossy(out)
        );
        let text = std::str::from_utf8(out).expect("output is always UTF-8");
        let body = &text[..text.len() - 1];
        assert!(
            !body
                .chars()
                .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}'),
            "{body:?}"
        );
    }

    #[test]
    fn json_always_valid() {
        for v in nasty() {
            let out = line(Format::Json, &nasty_record(&v));
            assert_one_line(&out);
            let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
                panic!(
                    "invalid JSON for {v:?}: {e}: {}",
                    String::from_utf8_lossy(&out)
                )
            });
            let expected_text = match std::str::from_utf8(&v) {
                Ok(s) => s.to_string(),
                Err(_) => {
                    // Invalid bytes become the four characters \xHH.
                    let mut s = String::new();
                    for chunk in v.utf8_chunks() {
                        s.push_str(chunk.valid());
                        for b in chunk.invalid() {
                            s.push_str(&format!("\\x{b:02x}"));
                        }
                    }
                    s
                }
            };
            assert_eq!(parsed["command_args"], expected_text.as_str());
            assert_eq!(parsed["error"], expected_text.as_str());
            assert_eq!(parsed["keys"][1], "k,2");
            assert_eq!(parsed["keys"].as_array().unwrap().len(), 3);
            assert_eq!(parsed["seq"], 42);
        }
        let out = line(Format::Json, &nasty_record(&[0xff, 0xfe]));
        assert!(contains(&out, br"\\xff\\xfe"));
        let out = line(Format::Json, &nasty_record("a\u{2028}b".as_bytes()));
        assert!(contains(&out, br"\u2028"));
        let out = line(Format::Json, &nasty_record(b"\0\x08\x0c\x7f"));
        assert!(
            contains(&out, br"\u0000\b\f\u007f"),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    /// Undo the text/CSV field escaping.
    fn unescape(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\' && i + 1 < b.len() {
                match b[i + 1] {
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'\\' => out.push(b'\\'),
                    b',' => out.push(b','),
                    b'x' => {
                        out.push(u8::from_str_radix(&s[i + 2..i + 4], 16).unwrap());
                        i += 2;
                    }
                    other => panic!("unknown escape {other}"),
                }
                i += 2;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    /// Minimal RFC 4180 reader for one line (no embedded line breaks, which we never write).
    fn read_csv_line(line: &str) -> Vec<String> {
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut chars = line.chars().peekable();
        let mut quoted = false;
        let mut at_start = true;
        while let Some(c) = chars.next() {
            if quoted {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        field.push('"');
                    } else {
                        quoted = false;
                    }
                } else {
                    field.push(c);
                }
            } else if c == '"' && at_start {
                quoted = true;
                at_start = false;
            } else if c == ',' {
                fields.push(std::mem::take(&mut field));
                at_start = true;
            } else {
                assert_ne!(c, '"', "bare quote in unquoted field: {line}");
                field.push(c);
                at_start = false;
            }
        }
        assert!(!quoted, "unterminated quote: {line}");
        fields.push(field);
        fields
    }

    /// Split a keys column on unescaped commas.
    fn split_keys(field: &str) -> Vec<Vec<u8>> {
        if field.is_empty() {
            return Vec::new();
        }
        let mut keys = Vec::new();
        let mut cur = String::new();
        let mut escaped = false;
        for c in field.chars() {
            if escaped {
                cur.push('\\');
                cur.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == ',' {
                keys.push(unescape(&std::mem::take(&mut cur)));
            } else {
                cur.push(c);
            }
        }
        keys.push(unescape(&cur));
        keys
    }

    #[test]
    fn csv_one_line_and_round_trip() {
        for v in nasty() {
            let r = nasty_record(&v);
            let out = line(Format::Csv, &r);
            assert_one_line(&out);
            let text = std::str::from_utf8(&out[..out.len() - 1]).unwrap();
            let fields = read_csv_line(text);
            assert_eq!(fields.len(), 22, "{text}");
            assert_eq!(unescape(&fields[1]), r.category.as_str().as_bytes());
            assert_eq!(unescape(&fields[2]), v, "{text}");
            assert_eq!(unescape(&fields[3]), v);
            assert_eq!(fields[4], "SUCCESS");
            assert_eq!(unescape(&fields[8]), v);
            assert_eq!(unescape(&fields[12]), v);
            assert_eq!(fields[13], "42");
            assert_eq!(
                split_keys(&fields[14]),
                r.keys.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(),
                "{text}"
            );
            assert_eq!(fields[15], "4242");
        }
        let r = Record {
            keys: [b"a,b".to_vec(), b"c".to_vec()].iter().collect(),
            ..sample_set()
        };
        let out = String::from_utf8(line(Format::Csv, &r)).unwrap();
        assert!(out.ends_with(",42,\"a\\,b,c\",4242,0,,,,,\n"), "{out}");
        let r = Record {
            command_args: b"say \"hi\", ok".to_vec(),
            ..sample_set()
        };
        let out = String::from_utf8(line(Format::Csv, &r)).unwrap();
        assert!(
            out.contains(",set,\"say \"\"hi\"\", ok\",SUCCESS,"),
            "{out}"
        );
    }

    /// A server in a Kubernetes pod: port, pid in its namespace and pod identity, in each format.
    #[test]
    fn server_and_container_fields() {
        let r = Record {
            server: std::sync::Arc::new(ServerInfo {
                hostname: "node-1".into(),
                pid: 4242,
                ns_pid: 1,
                port: 6379,
                container_id: "c0ffee".into(),
                pod_name: "valkey-0".into(),
                pod_namespace: "prod".into(),
                node_name: "node-1".into(),
                ..ServerInfo::default()
            }),
            ..sample_set()
        };
        let text = String::from_utf8(line(Format::Text, &r)).unwrap();
        assert!(
            text.ends_with(" pid=4242 server_port=6379 container_pid=1 container_id=c0ffee pod_name=valkey-0 pod_namespace=prod node_name=node-1\n"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&line(Format::Json, &r)).expect("valid JSON");
        assert_eq!(json["server_port"], 6379);
        assert_eq!(json["container_pid"], 1);
        assert_eq!(json["container_id"], "c0ffee");
        assert_eq!(json["pod_name"], "valkey-0");
        assert_eq!(json["pod_namespace"], "prod");
        assert_eq!(json["node_name"], "node-1");
        let csv = String::from_utf8(line(Format::Csv, &r)).unwrap();
        assert!(
            csv.ends_with(",4242,6379,1,c0ffee,valkey-0,prod,node-1\n"),
            "{csv}"
        );
        // Not in a container: text and JSON leave the fields out, CSV keeps empty columns.
        let plain = sample_set();
        let text = String::from_utf8(line(Format::Text, &plain)).unwrap();
        assert!(
            !text.contains("container_") && !text.contains("pod_"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_slice(&line(Format::Json, &plain)).unwrap();
        assert!(json.get("container_pid").is_none() && json.get("pod_name").is_none());
    }

    #[test]
    fn text_one_line_and_escapes() {
        for v in nasty() {
            let out = line(Format::Text, &nasty_record(&v));
            assert_one_line(&out);
        }
        let r = Record {
            command_args: b"key=k,comma payload=va\"l,ue\\x\nline2 sp".to_vec(),
            keys: [b"k,comma".to_vec(), b"x\\y".to_vec()].iter().collect(),
            username: [0xff, b'a', 0x00][..].into(),
            ..sample_set()
        };
        let out = String::from_utf8(line(Format::Text, &r)).unwrap();
        assert!(out.contains(" username=\\xffa\\x00 "), "{out}");
        assert!(out.contains(" key=k,comma payload=va\"l,ue\\\\x\\nline2 sp seq=42 keys=k\\,comma,x\\\\y pid=4242\n"), "{out}");
        let r = Record {
            command_args: "a\u{2028}b\u{85}c\té".as_bytes().to_vec(),
            ..sample_set()
        };
        let out = String::from_utf8(line(Format::Text, &r)).unwrap();
        assert!(
            out.contains(" a\\xe2\\x80\\xa8b\\xc2\\x85c\\té seq="),
            "{out}"
        );
    }

    #[test]
    fn timestamp_cache_stays_correct() {
        let a = local_us(2026, 1, 2, 3, 4, 5);
        let b = a + 1_000_000;
        let mut out = Vec::new();
        for t in [a, a + 999_999 - 123_456, b, a, b - 1] {
            out.clear();
            push_timestamp(&mut out, t);
            let secs = t.div_euclid(1_000_000);
            let want = Local
                .timestamp_opt(secs, 0)
                .unwrap()
                .format("%Y-%m-%d %H:%M:%S")
                .to_string();
            assert_eq!(String::from_utf8(out.clone()).unwrap(), want);
        }
        out.clear();
        push_timestamp(&mut out, -1);
        assert_eq!(out.len(), TIMESTAMP_LEN);
        out.clear();
        push_timestamp(&mut out, i64::MAX);
        assert!(!out.is_empty());
        out.clear();
        push_timestamp(&mut out, i64::MIN);
        assert!(!out.is_empty());
    }

    #[test]
    fn reuses_buffer_and_appends() {
        let mut out = b"prev\n".to_vec();
        write_record(Format::Json, &sample_set(), &mut out);
        write_record(Format::Text, &sample_set(), &mut out);
        assert!(out.starts_with(b"prev\n{"));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 3);
    }

    #[test]
    fn push_bytes_copies_every_length_exactly() {
        let src: Vec<u8> = (0u8..40).collect();
        for n in 0..=src.len() {
            for prefix in [0usize, 1, 7, 15] {
                let mut out = vec![0xee; prefix];
                push_bytes(&mut out, &src[..n]);
                assert_eq!(out.len(), prefix + n);
                assert!(out[..prefix].iter().all(|&b| b == 0xee), "n={n}");
                assert_eq!(&out[prefix..], &src[..n], "n={n} prefix={prefix}");
            }
        }
    }

    #[test]
    fn numbers() {
        let r = Record {
            duration_us: u64::MAX,
            keys_modified: 0,
            client_id: 1_000_000,
            client_port: u16::MAX,
            pid: u32::MAX,
            seq: 10,
            ..sample_set()
        };
        let out = String::from_utf8(line(Format::Text, &r)).unwrap();
        assert!(out.contains("duration_us=18446744073709551615 keys_modified=0 client_id=1000000"));
        assert!(out.contains(":65535 ") && out.ends_with("pid=4294967295\n"));
        let v: serde_json::Value = serde_json::from_slice(&line(Format::Json, &r)).unwrap();
        assert_eq!(v["duration_us"], u64::MAX);
    }

    /// The ASCII fast paths of the escapers write exactly what the general UTF-8 paths write.
    #[test]
    fn fast_escapers_match_the_general_ones() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pieces: &[&[u8]] = &[
            b"a",
            b"key:1",
            b" ",
            b"\"",
            b"\\",
            b",",
            b"\n",
            b"\r",
            b"\t",
            b"\x08",
            b"\x0c",
            b"\x00",
            b"\x1f",
            b"\x7f",
            b"\xc2\x85",
            b"\xc2\xa0",
            b"\xe2\x80\xa8",
            b"\xe2\x80\xa9",
            b"\xe2\x80",
            b"\xff",
            b"\xc3\xa9",
            b"\xf0\x9f\x98\x80",
            b"\xf0\x9f",
        ];
        let all_plain = [
            Plain::TEXT,
            Plain::TEXT_KEY,
            Plain::CSV_QUOTED,
            Plain::CSV_KEY_QUOTED,
        ];
        for _ in 0..20_000 {
            let mut v = Vec::new();
            for _ in 0..next() % 12 {
                v.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
            }
            let (mut fast, mut runs, mut slow) = (b"<".to_vec(), b"<".to_vec(), b"<".to_vec());
            escape_json(&mut fast, &v);
            escape_json_runs(&mut runs, &v);
            escape_json_utf8(&mut slow, &v);
            assert_eq!(fast, slow, "json {v:?}");
            assert_eq!(runs, slow, "json {v:?}");
            for opts in all_plain {
                let (mut fast, mut slow) = (Vec::new(), Vec::new());
                escape_plain(&mut fast, &v, opts);
                escape_plain_utf8(&mut slow, &v, opts);
                assert_eq!(fast, slow, "plain {v:?}");
            }
        }
    }

    /// The 8-byte screen never lets a byte that needs escaping through, wherever it sits.
    #[test]
    fn word_screen_has_no_false_negatives() {
        for mask in [
            C_SPECIAL | C_QUOTE,
            C_SPECIAL,
            C_SPECIAL | C_COMMA,
            C_SPECIAL | C_QUOTE | C_COMMA,
        ] {
            for filler in [b'a', b' ', b'~', b'0', b'!'] {
                assert!(!word_maybe_special(u64::from_le_bytes([filler; 8]), mask));
                for b in 0..=255u8 {
                    for at in 0..8 {
                        let mut word = [filler; 8];
                        word[at] = b;
                        if CLASS[usize::from(b)] & mask != 0 {
                            assert!(word_maybe_special(u64::from_le_bytes(word), mask));
                        }
                        let mut long = b"0123456789abcdef".to_vec();
                        long.extend_from_slice(&word);
                        let expected = long
                            .iter()
                            .position(|&c| CLASS[usize::from(c)] & mask != 0)
                            .unwrap_or(long.len());
                        assert_eq!(plain_run(&long, mask), expected);
                        // The byte inside a full 16-byte block, and in the second block.
                        for lead in [0usize, 5, 16, 21] {
                            let mut v = vec![filler; lead];
                            v.extend_from_slice(&word);
                            v.extend_from_slice(&[filler; 32]);
                            let expected = v
                                .iter()
                                .position(|&c| CLASS[usize::from(c)] & mask != 0)
                                .unwrap_or(v.len());
                            assert_eq!(plain_run(&v, mask), expected);
                            if expected < v.len() {
                                assert!(!is_plain(&v, mask));
                            }
                        }
                        for s in [&long[..], &word[..], &word[at..]] {
                            if !is_plain(s, mask) {
                                continue;
                            }
                            assert!(s.iter().all(|&c| CLASS[usize::from(c)] & mask == 0));
                        }
                        assert_eq!(is_plain(&[b], mask), CLASS[usize::from(b)] & mask == 0);
                    }
                }
            }
        }
    }

    #[test]
    fn push_u64_is_decimal() {
        let mut values = vec![
            0,
            1,
            9,
            10,
            11,
            99,
            100,
            101,
            999,
            1000,
            u64::MAX,
            u64::MAX - 1,
        ];
        let mut p = 1u64;
        while let Some(q) = p.checked_mul(10) {
            values.extend([p - 1, p, p + 1, q / 2]);
            p = q;
        }
        for n in values {
            let mut out = b"x".to_vec();
            push_u64(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
        }
    }
}
