//! Per-connection reassembly and request/reply correlation: the pure core between the capture edge
//! (decoded ring-buffer events) and the writer (records).
//!
//! Each connection keeps one ordered byte stream per direction. The kernel stamps every data event with
//! the stream position of its first byte, so a jump is an exact count of bytes never seen: it is handed
//! to the RESP parser as a gap (skipped inside a bulk payload, a resync and a loss record otherwise).
//! Requests wait in a FIFO until their reply arrives; replies that are not answers (pub/sub messages,
//! RESP3 pushes, MONITOR lines) are recognised and passed over. Records are produced after the reply,
//! or when the connection closes without one.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use auditor_common::SEGMENT_HDR_LEN;

use crate::argv::Arg;
use crate::commands::{
    ChangeReply, CommandTable, Described, FxBuildHasher, command_args_into, command_args_on_success,
};
use crate::filter;
use crate::record::{Category, CommandName, KeyList, Outcome, Record, ServerInfo};
use crate::resp::{
    BufPool, GAP_REASON, Reply, ReplyEvent, ReplyKind, ReplyParser, Request, RequestEvent,
    RequestParser,
};
use crate::settings::Settings;

/// Requests waiting for a reply on one connection, at most. Valkey answers in order, so this is only
/// reached by a client that pipelines without reading; past it the oldest is written as UNKNOWN.
const MAX_PENDING: usize = 100_000;
/// Heap bytes the records of the commands awaiting replies of one connection may hold, at most,
/// and as many those queued in its MULTI: a record keeps every key (up to 1 MiB of them), so a
/// client that sends big commands without reading its replies could otherwise make the auditor
/// hold gigabytes. Past it, the oldest awaiting a reply is written as UNKNOWN at once and stays in
/// the FIFO as a stub (its reply still changes the connection's state: MULTI, AUTH, SUBSCRIBE...);
/// in MULTI, the commands queued from there on are written at once, their outcome untold.
const MAX_HELD_BYTES: usize = 32 << 20;
/// Bytes all connections' records awaiting replies (and queued in MULTI) may hold together, FIFO
/// entries included. Per-connection bounds alone let every client that pipelines without reading
/// add ~35 MB (QA: 7 such clients took the auditor past a 256 MiB pod limit). Past it, the
/// connection adding a command, if it holds more than `SHED_FLOOR`, sheds half of what it holds
/// (written UNKNOWN at once, as past `MAX_HELD_BYTES`); its MULTI queue stops being tracked.
const GLOBAL_HELD_BYTES: usize = 96 << 20;
/// A connection holding less than this never sheds for the global bound (an ordinary client).
const SHED_FLOOR: usize = 64 << 10;
/// What one command awaiting its reply holds besides its heap: its FIFO or queue entry.
const ENTRY_BYTES: usize = size_of::<Pending>();
/// `seq` of a record the session already wrote (a stub, see `MAX_HELD_BYTES`): the writer gives
/// every record its `seq`, so no record the session hands over carries this one.
const WRITTEN_EARLY: u64 = u64::MAX;
/// The error of a command queued in MULTI past its bounds (`MAX_PENDING`, `MAX_HELD_BYTES`).
const QUEUE_FULL: &str = "outcome not tracked (over 100000 queued or 32 MiB of them)";
/// How long an unanswered CLIENT REPLY OFF/SKIP waits before it is taken as having worked (see
/// `Session::settle_quiet`): Valkey answers a refusal in the same event-loop pass.
pub const QUIET_NS: u64 = 100_000_000;
/// How long REPLCONF records wait for the SYNC/PSYNC that would show a replica's handshake (see
/// `Conn::held`); a replica sends it within a round trip or two.
const HANDSHAKE_WAIT_NS: u64 = 2_000_000_000;
/// REPLCONF records held at most per connection (a replica's handshake sends a few).
const MAX_HELD_HANDSHAKE: usize = 16;
/// The error of a command whose reply cannot be told apart from those of commands lost in a
/// request-side capture gap before it.
const REPLY_UNCERTAIN: &str = "reply uncertain (capture gap)";
/// A transaction with pub/sub in it: Valkey counts one EXEC element per command, but writes one
/// confirmation per channel (and, in RESP3, messages to the connection itself), so from the
/// first such command on, EXEC's elements no longer line up with the commands, nor do the
/// replies after it until the client has had all of them.
const REPLY_UNCERTAIN_PUBSUB: &str = "reply uncertain (pub/sub inside MULTI)";
/// A transaction with REPLCONF ACK/GETACK in it: EXEC's array counts it, but it adds no element,
/// so the array takes the reply of the command after EXEC for its last.
const REPLY_UNCERTAIN_REPLCONF: &str = "reply uncertain (REPLCONF ACK inside MULTI)";
/// A command on a replica's link, where the server sends no replies.
const NO_REPLY_REPLICA_LINK: &str = "no reply on a replica link";
/// A command on a slot migration's link, where the server sends only the migration's messages.
const NO_REPLY_SLOT_MIGRATION_LINK: &str = "no reply on a slot migration link";
/// A REPLCONF whose option before ACK may fail on the server's state, and an error such an
/// option gives: it may as well be the next command's.
const REPLY_UNCERTAIN_REPLCONF_OPTION: &str = "reply uncertain (REPLCONF option before ACK)";
/// A connection open at attach, whose subscriptions were not seen, got an array that is a
/// message or a command's reply.
const REPLY_UNCERTAIN_SUBSCRIBED_AT_ATTACH: &str =
    "reply uncertain (a message or a reply: subscribed before attach?)";
/// EXEC elements past the last error the reply parser keeps (`resp::MAX_ELEMENT_ERRORS`).
const REPLY_UNCERTAIN_ERRORS: &str = "reply uncertain (over 4096 errors in EXEC)";
/// A connection open before attach was inside MULTI already: EXEC's reply holds the results of
/// commands queued before attach too, which may not be one element each.
const REPLY_UNCERTAIN_ATTACH: &str = "reply uncertain (MULTI began before attach)";
/// The `error` of results after a HELLO AUTH that CLIENT REPLY OFF/SKIP silenced and that would
/// change the protocol: whether it worked (and pub/sub confirmations come as pushes or arrays)
/// cannot be told.
const REPLY_UNCERTAIN_HELLO: &str = "reply uncertain (silenced HELLO AUTH)";
/// Smallest prefix kept of each argument (command names, subcommands, keys): one byte more than
/// a key shows at least, so that a longer one is known to be cut.
const MIN_KEEP: usize = crate::commands::KEY_MIN_SHOWN + 1;

/// A socket event as decoded from the ring buffer.
#[derive(Clone, Debug)]
pub enum CaptureEvent<'a> {
    Accept {
        tgid: u32,
        fd: u32,
        /// The listening socket it came from (names unix-socket peers), or
        /// `LISTEN_FD_UNKNOWN` when the socket was first seen at a read or write.
        listen_fd: u32,
        /// The socket's local TCP port when first seen at a read or write, else 0.
        local_port: u16,
        /// The socket's inode number, 0 if unknown.
        ino: u64,
        ts_ns: u64,
        peer: Peer,
    },
    Data {
        tgid: u32,
        fd: u32,
        ts_ns: u64,
        inbound: bool,
        stream_pos: u64,
        total_len: u32,
        chunk_off: u32,
        captured_len: u32,
        bytes: &'a [u8],
    },
    /// Part of a server write whose reply stream the kernel scanned: `body` is a list of segments
    /// (`SegmentHdr` + bytes, at offsets of the syscall); what lies between them is inside bulk
    /// payloads the kernel left out. `tail`: the syscall's bytes from `captured_len` on were not
    /// looked at.
    Segments {
        tgid: u32,
        fd: u32,
        ts_ns: u64,
        stream_pos: u64,
        total_len: u32,
        captured_len: u32,
        tail: bool,
        body: &'a [u8],
    },
    Close {
        tgid: u32,
        fd: u32,
        ts_ns: u64,
    },
    /// A target's lifecycle (exec of a watched name, fork, exit). The daemon manages targets on
    /// these; the session only closes an exited target's connections.
    Process {
        kind: ProcessEvent,
        tgid: u32,
        /// The child's pid for `Fork`.
        child: u32,
        ts_ns: u64,
        comm: [u8; 16],
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessEvent {
    Exec,
    Fork,
    Exit,
}

/// The client side of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub ip: String,
    pub port: u16,
}

impl Peer {
    pub fn from_v4(addr: [u8; 4], port: u16) -> Self {
        Peer {
            ip: Ipv4Addr::from(addr).to_string(),
            port,
        }
    }
    pub fn from_v6(addr: [u8; 16], port: u16) -> Self {
        let v6 = Ipv6Addr::from(addr);
        // IPv4 clients of a dual-stack listener: show them as IPv4, as operators expect.
        let ip = match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        };
        Peer { ip, port }
    }
    /// A unix-socket peer (its "ip" is the socket's path, or `unix`), not a TCP one.
    pub fn is_unix(&self) -> bool {
        self.port == 0 && self.ip.parse::<std::net::IpAddr>().is_err()
    }

    pub fn unix(path: &str) -> Self {
        Peer {
            ip: if path.is_empty() {
                "unix".into()
            } else {
                path.into()
            },
            port: 0,
        }
    }
}

/// Where the session hands each record that passed the filter stage. Records are lent, not given:
/// a command's record is completed where it waited, at the head of its connection's FIFO, and
/// formatted from there. (Moving each record, ~300 bytes with its FIFO entry, from the FIFO through
/// a vector to the formatter was 7% of the pipeline.)
pub trait RecordOut {
    /// Take what is needed of `rec`; it is dropped afterwards, so parts of it may be taken.
    fn put(&mut self, rec: &mut Record);
}

/// Collects copies: for tests and the daemon's rare paths (closes, exits, kernel losses).
impl RecordOut for Vec<Record> {
    fn put(&mut self, rec: &mut Record) {
        self.push(rec.clone());
    }
}

/// Why bytes or records were lost; written in AUDIT_LOSS records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossCause {
    /// Framing broke in the client->server stream; requests in flight were lost.
    RequestResync,
    /// Framing broke in the server->client stream; pending requests were written as UNKNOWN.
    ReplyResync,
    /// The kernel could not write to the ring buffer.
    RingBufferFull,
    /// Commands a request-side gap held whole, counted by their replies.
    CommandsNotCaptured,
    /// A TLS connection: none of its commands can be read (an unknown number, `count=0`).
    Tls,
}

impl LossCause {
    pub fn as_str(self) -> &'static str {
        match self {
            LossCause::RequestResync => "parser_resync_request",
            LossCause::ReplyResync => "parser_resync_reply",
            LossCause::RingBufferFull => "ring_buffer_full",
            LossCause::CommandsNotCaptured => "commands_not_captured",
            LossCause::Tls => "tls_connection",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    /// The next command gets no reply.
    SkipNext,
}

/// What a command does to the reply mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModeChange {
    None,
    /// CLIENT REPLY ON / OFF / SKIP.
    On,
    Off,
    Skip,
    /// RESET turns replies back on.
    Reset,
}

/// One command's effect on the reply mode: whether it gets a reply, and whether it is a CLIENT
/// REPLY OFF/SKIP sent with replies on, which the server may refuse (a refusal is a reply too, so
/// only with replies on can one come).
fn reply_mode_step(mode: &mut ReplyMode, change: ModeChange) -> (bool, bool) {
    let before = *mode;
    let replies_on = before == ReplyMode::On;
    let mut expects_reply = match before {
        ReplyMode::On => true,
        ReplyMode::Off => false,
        ReplyMode::SkipNext => {
            *mode = ReplyMode::On;
            false
        }
    };
    let mut refusable = false;
    // CLIENT REPLY changes what the server answers from this very command on.
    match change {
        ModeChange::None => {}
        ModeChange::On => {
            *mode = ReplyMode::On;
            expects_reply = true;
        }
        ModeChange::Off => {
            refusable = replies_on;
            *mode = ReplyMode::Off;
            expects_reply = false;
        }
        ModeChange::Skip => {
            refusable = replies_on;
            if *mode == ReplyMode::On {
                *mode = ReplyMode::SkipNext;
            }
            expects_reply = false;
        }
        ModeChange::Reset => {
            // After OFF it answers; as the command a SKIP covers it does not (Valkey 9.1.2,
            // checked).
            *mode = ReplyMode::On;
            expects_reply = before != ReplyMode::SkipNext;
        }
    }
    (expects_reply, refusable)
}

/// `+QUEUED`: inside MULTI, a command accepted for EXEC.
fn is_queued(reply: &Reply) -> bool {
    reply.kind == ReplyKind::Simple && reply.text == b"QUEUED"
}

/// An AUTH or HELLO AUTH whose outcome is not known leaves the connection's user unknown too,
/// never the one it asked for.
fn forget_user_if_auth(conn: &mut Conn, effect: &Effect) {
    if is_auth(effect) {
        forget_user(conn);
    }
}

/// The user name ACL WHOAMI answered, when the reply holds all of it.
fn whoami_user(reply: &Reply) -> Option<&[u8]> {
    (reply.kind == ReplyKind::Bulk
        && !reply.lost
        && usize::try_from(reply.len).is_ok_and(|n| n == reply.text.len()))
    .then_some(reply.text.as_slice())
}

/// An AUTH or HELLO AUTH: it changes the connection's user when it works.
fn is_auth(effect: &Effect) -> bool {
    matches!(effect, Effect::Auth(_) | Effect::HelloAuth(..))
}

fn forget_user(conn: &mut Conn) {
    conn.username = unknown_user();
}

/// The one `unknown` of users not known. Known by its address, not its name: an ACL user may be
/// named `unknown`, and an exclusion rule for that user must not cover everyone whose user is
/// not known (any client could become one, by silencing an AUTH).
static UNKNOWN_USER: std::sync::LazyLock<Arc<[u8]>> =
    std::sync::LazyLock::new(|| Arc::from(&b"unknown"[..]));

fn unknown_user() -> Arc<[u8]> {
    UNKNOWN_USER.clone()
}

/// A connection's subscriptions, from the counts its confirmations carry (Valkey's: channels
/// and patterns together for the plain and pattern kinds, shard channels apart).
#[derive(Clone, Copy, Debug)]
struct PubsubCounts {
    /// False where they cannot be told (a connection open at attach, or after what hid some):
    /// then only "subscribed or not" is followed, from the last count.
    known: bool,
    channels: u64,
    patterns: u64,
    shard: u64,
    /// Where the counts are not known: whether the last count said subscribed.
    last_subscribed: bool,
}

impl PubsubCounts {
    const NONE: PubsubCounts = PubsubCounts {
        known: true,
        channels: 0,
        patterns: 0,
        shard: 0,
        last_subscribed: false,
    };
    const UNKNOWN: PubsubCounts = PubsubCounts {
        known: false,
        ..PubsubCounts::NONE
    };

    /// Whether the connection is in the subscribed context.
    #[inline]
    fn subscribed(&self) -> bool {
        if self.known {
            self.channels + self.patterns + self.shard > 0
        } else {
            self.last_subscribed
        }
    }

    /// Something may have hidden confirmations: only whether it is subscribed is kept.
    fn forget(&mut self) {
        *self = PubsubCounts {
            last_subscribed: self.subscribed(),
            ..PubsubCounts::UNKNOWN
        };
    }

    /// A confirmation of `kind` said `count`.
    fn confirm(&mut self, kind: &[u8], count: u64) {
        if !self.known {
            self.last_subscribed = count > 0;
            return;
        }
        match kind {
            b"subscribe" | b"unsubscribe" => self.channels = count.saturating_sub(self.patterns),
            b"psubscribe" | b"punsubscribe" => self.patterns = count.saturating_sub(self.channels),
            _ => self.shard = count,
        }
    }

    /// Subscriptions an UNSUBSCRIBE of `kind` without arguments still has to end.
    fn of_kind(&self, kind: &[u8]) -> u64 {
        match kind {
            b"unsubscribe" => self.channels,
            b"punsubscribe" => self.patterns,
            _ => self.shard,
        }
    }
}

/// A confirmation of `kind` with subscription count `count`: the connection's subscriptions.
fn note_confirmation(conn: &mut Conn, kind: &[u8], count: Option<i64>) {
    let count = count.and_then(|c| u64::try_from(c).ok()).unwrap_or(1);
    conn.pubsub.confirm(kind, count);
}

/// A subscribe-family confirmation of `kind` (for `channel`): the head entry it completes. It
/// is the first such command of the kind in the FIFO that still awaits one, if only commands
/// that get no reply come before it; for one sent with replies off, if the channel is its
/// next one (otherwise that one failed, and the confirmation is a later command's).
fn confirmation_target(conn: &Conn, kind: &[u8], channel: Option<&[u8]>) -> Option<usize> {
    for (i, p) in conn.pending.iter().enumerate() {
        if let Effect::Subscribe(k, _, channels) = &p.effect
            && p.awaiting
            && k.as_bytes() == kind
        {
            let next = channels
                .as_deref()
                .and_then(|c| c.get(usize::try_from(p.confirmations).ok()?));
            let same = match (next, channel) {
                // (The reply keeps a prefix of a long name.)
                (Some(want), Some(got)) if got.len() >= crate::resp::REPLY_TEXT_MAX => {
                    want.starts_with(got)
                }
                (Some(want), Some(got)) => want == got,
                _ => true,
            };
            if same || p.expects_reply {
                return Some(i);
            }
        }
        if p.expects_reply && !p.refusable {
            return None;
        }
    }
    None
}

/// The channels (or patterns) a subscribe-family command names.
fn channel_count(args: &[Arg]) -> u32 {
    u32::try_from(args.len().saturating_sub(1)).unwrap_or(u32::MAX)
}

/// Whether a command's reply could be an array of the client's choosing (a script's, a list's),
/// so also one shaped like a pub/sub confirmation. Only the commonest that cannot are known.
fn may_answer_with_any_array(p: &Pending) -> bool {
    let known_shape = p.mode_change != ModeChange::None
        || matches!(
            p.effect,
            Effect::Auth(_)
                | Effect::Hello(_)
                | Effect::HelloAuth(..)
                | Effect::Multi
                | Effect::Discard
                | Effect::Quit
                | Effect::Reset
                | Effect::Subscribe(..)
        )
        || matches!(
            &*p.record.command,
            b"ping"
                | b"echo"
                | b"get"
                | b"set"
                | b"del"
                | b"unlink"
                | b"exists"
                | b"incr"
                | b"incrby"
                | b"decr"
                | b"decrby"
                | b"append"
                | b"strlen"
                | b"setnx"
                | b"setex"
                | b"mset"
                | b"expire"
                | b"pexpire"
                | b"ttl"
                | b"pttl"
                | b"type"
                | b"lpush"
                | b"rpush"
                | b"llen"
                | b"sadd"
                | b"scard"
                | b"hset"
                | b"hlen"
                | b"zadd"
                | b"zcard"
                | b"publish"
                | b"select"
                | b"dbsize"
                | b"flushall"
                | b"flushdb"
        );
    !known_shape
}

/// What RESET does to a connection's state.
fn reset_connection(conn: &mut Conn) {
    conn.username = Arc::from(&b"default"[..]);
    conn.resp3 = false;
    conn.pubsub = PubsubCounts::NONE;
    conn.monitor = false;
    conn.in_multi = false;
    conn.queued.clear();
    conn.queued_untracked = 0;
    conn.reply_mode = ReplyMode::On;
}

/// What a command expects, `(expects_reply, refusable)`, in reply mode `mode` (which it may
/// change): see `reply_mode_step` and `silent_when_run`.
fn expectation(mode: &mut ReplyMode, p: &Pending) -> (bool, bool) {
    silent_when_run(
        reply_mode_step(mode, p.mode_change),
        matches!(p.effect, Effect::OffsetReport(_)),
    )
}

/// `p`'s expectation worked out again in `mode`, once a reply showed the mode it was read in to
/// be another, and whether replies were off when it was sent with it (QA: a CLIENT REPLY ON
/// after a refused OFF kept "sent with replies off", was taken for refused unseen on a
/// subscribed connection, and every result after it was written unknown).
fn reexpect(mode: &mut ReplyMode, p: &mut Pending) {
    p.sent_replies_off = *mode == ReplyMode::Off;
    (p.expects_reply, p.refusable) = expectation(mode, p);
}

/// The head's reply showed the reply mode after it to be `mode`: what the commands after it
/// expect, and the connection's mode, worked out again from there (mode changes among them
/// included: a SKIP after a refused OFF is a SKIP with replies on).
fn reexpect_after_head(conn: &mut Conn, mut mode: ReplyMode) {
    for p in conn.pending.iter_mut().skip(1) {
        reexpect(&mut mode, p);
    }
    conn.reply_mode = mode;
}

/// How Valkey's `replconfCommand` answers a REPLCONF: an even argument count is a syntax error;
/// then it works through the option/value pairs in order, answers an invalid one with an error,
/// returns without a word at ACK or GETACK, and says +OK at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReplconfRun {
    /// +OK or an error, like any command.
    Answered,
    /// It reaches ACK/GETACK: only a refusal of the whole command (ACL, NOAUTH) answers it.
    Silent,
    /// It reaches ACK/GETACK unless an option before it fails on the server's state (an RDB
    /// client id, a cluster node, a filter, a version): that option's error then.
    SilentUnlessOptionFails,
}

/// `ReplconfRun` for REPLCONF's arguments (`args[0]` is the command); the checks that depend
/// only on the arguments are made here as the server makes them.
fn replconf_run(args: &[Arg], argc: u64) -> ReplconfRun {
    // (NET_HOST_STR_LEN: a longer ip-address is refused.)
    const MAX_IP_ADDRESS: u64 = 255;
    let integer = |a: &Arg| {
        if a.is_complete() {
            crate::commands::string2ll(&a.prefix)
        } else {
            None
        }
    };
    if argc.is_multiple_of(2) {
        return ReplconfRun::Answered;
    }
    let mut on_state = false;
    for pair in args.get(1..).unwrap_or_default().chunks_exact(2) {
        let (option, value) = (&pair[0], &pair[1]);
        let is = |name: &str| option.eq_ignore_case(name);
        let valid = if is("ack") || is("getack") {
            return if on_state {
                ReplconfRun::SilentUnlessOptionFails
            } else {
                ReplconfRun::Silent
            };
        } else if is("listening-port") {
            integer(value).is_some()
        } else if is("ip-address") {
            value.len <= MAX_IP_ADDRESS
        } else if is("capa") {
            true
        } else if is("rdb-only") || is("rdb-channel") {
            matches!(integer(value), Some(0 | 1))
        } else if is("set-rdb-client-id") {
            on_state = true;
            integer(value).is_some()
        } else if is("rdb-filter-only") || is("version") || is("set-cluster-node-id") {
            on_state = true;
            true
        } else {
            false
        };
        if !valid {
            return ReplconfRun::Answered;
        }
    }
    ReplconfRun::Answered
}

/// Whether `text` is the error of a REPLCONF option that fails on the server's state
/// (`ReplconfRun::SilentUnlessOptionFails`), or of an option this server does not know.
fn is_replconf_option_error(text: &[u8]) -> bool {
    let text = text.strip_prefix(b"ERR ").unwrap_or(text);
    [
        &b"Unrecognized REPLCONF option"[..],
        b"Unrecognized RDB client id",
        b"Missing rdb-filter-only values",
        b"Unsupported rdb-filter-only option",
        b"Unrecognized version format",
        b"This instance has cluster support disabled",
        b"Unknown node",
    ]
    .iter()
    .any(|t| text.starts_with(t))
}

/// Replies from here on may not be the commands' they seem to answer (for `why`, not a capture
/// gap): the pending commands' results, and those of commands read before the client has had
/// every reply, are written unknown.
fn doubt_replies(conn: &mut Conn, why: &'static str) {
    for pending in conn.pending.iter_mut() {
        pending.after_gap = true;
    }
    conn.uncertain_since = Some(conn.reads);
    conn.uncertain_not_from_gap = true;
    conn.uncertain_why = why;
}

/// A refusable command whose refusal did not come before the next reply: it took effect.
fn settle_as_run(p: &mut Pending) {
    p.refusable = false;
    p.ran_silently = matches!(p.effect, Effect::OffsetReport(_));
}

/// Valkey's refusal of a command in a RESP2 connection's subscribed context ("ERR Can't execute
/// '<cmd>': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this
/// context").
fn is_subscribed_context_refusal(text: &[u8]) -> bool {
    text.starts_with(b"ERR Can't execute") && text.ends_with(b"are allowed in this context")
}

/// An ACL denial naming a user other than the connection's that a later AUTH or HELLO AUTH in
/// the FIFO asks for: that command's refusal after the login (silenced) worked, not the head's.
fn denial_of_a_later_login(conn: &Conn, text: &[u8]) -> bool {
    // (A user not known may be the one named: then nothing is ruled out.)
    !Arc::ptr_eq(&conn.username, &UNKNOWN_USER)
        && text
            .strip_prefix(b"NOPERM User ")
            .and_then(|rest| rest.split(|&b| b == b' ').next())
            .is_some_and(|name| {
                name != &conn.username[..]
                    && conn.pending.iter().skip(1).any(|p| match &p.effect {
                        Effect::Auth(user) | Effect::HelloAuth(_, user) => user == name,
                        _ => false,
                    })
            })
}

/// A command the server answers only to refuse it (REPLCONF ACK/GETACK) is, where replies are
/// on, refusable like CLIENT REPLY OFF: a refusal is its only reply.
fn silent_when_run((expects_reply, refusable): (bool, bool), silent: bool) -> (bool, bool) {
    if silent {
        (false, expects_reply)
    } else {
        (expects_reply, refusable)
    }
}

/// Whether an error reply to a command silent when it works (CLIENT REPLY OFF/SKIP, REPLCONF
/// ACK/GETACK) is that command's refusal: an ACL denial or a MULTI / subscribed-context
/// rejection names it (`'<command>'`); NOAUTH and LOADING refuse every command. (Anything else is
/// the reply of a later command, which it did not silence: an arity error naming the command too,
/// since a CLIENT REPLY of the wrong arity is never refusable, changing no mode. QA: `CLIENT REPLY
/// OFF x` behind a SKIP gave the SKIP its arity error, and every reply after went one late.)
fn is_refusal_of(command: &[u8], text: &[u8]) -> bool {
    text.starts_with(b"NOAUTH")
        || text.starts_with(b"LOADING")
        || (!text.starts_with(b"ERR wrong number of arguments")
            && text
                .windows(command.len() + 2)
                .any(|w| w[0] == b'\'' && w[w.len() - 1] == b'\'' && &w[1..w.len() - 1] == command))
}

/// The inode of a connection whose socket was already closed when its accept was handled (a client
/// killed within the same few milliseconds): no fd holds it, so the next check of open sockets
/// ends the connection, after the ring's events of it.
pub const GONE_WHEN_SEEN: u64 = u64::MAX;

/// What a request does to the connection's state once its reply says it succeeded.
// A boxed `Vec` is a thin pointer: `Effect` is in every FIFO entry, and a fat one (a boxed
// slice) made entries larger.
#[allow(clippy::box_collection)]
#[derive(Clone, Debug, PartialEq, Eq)]
enum Effect {
    None,
    /// AUTH/HELLO AUTH: the user the connection becomes on success.
    Auth(Vec<u8>),
    /// HELLO without AUTH: protocol version.
    Hello(Option<u8>),
    HelloAuth(Option<u8>, Vec<u8>),
    Multi,
    Exec,
    Discard,
    /// (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE: confirmation kind, how many confirmations answer it (0:
    /// an UNSUBSCRIBE without arguments, one per subscription of its kind, at least one), and,
    /// for one sent with replies off, its channels (see `confirmation_target`).
    Subscribe(&'static str, u32, Option<Box<Vec<Vec<u8>>>>),
    Monitor,
    Reset,
    /// CONFIG SET of `port`, `tls-port` or `bind`: the server listens elsewhere once it succeeds,
    /// so what is known of it (its port, `server_port` in records) must be read again. The new
    /// `port`, when one is given, applies at once: to the commands answered in the same write too.
    ListenersChanged(Option<u16>),
    /// Bytes the client sent that are not RESP (`protocol_error`): the server answers with its
    /// protocol error and closes the connection.
    ProtocolError,
    /// QUIT: the server answers +OK and closes, never reading further (in MULTI too: QUIT is
    /// not queued, and the transaction is discarded).
    Quit,
    /// ACL WHOAMI: its reply is the connection's user, from the server itself (an `unknown` user
    /// after an AUTH a CLIENT REPLY OFF/SKIP silenced becomes known), where replies are known to
    /// be in step with requests (`reply_doubt`).
    WhoAmI,
    /// SYNC/PSYNC: once the server accepts it (any reply but an error) the link is a replica's,
    /// and what the server sends on it is the replication stream.
    Sync,
    /// REPLCONF (but ACK) while internal clients are ignored: a replica's handshake, or any
    /// client's (it is not refused to them). Its record waits in `Conn::held` for what follows.
    Handshake,
    /// REPLCONF that reaches ACK/GETACK (`ReplconfRun`): silent once it runs (refusable, like
    /// CLIENT REPLY OFF); not written then while internal clients are ignored (Valkey ignores an
    /// ACK from anyone but a replica). A refusal is written like any command's. `true`: an option
    /// before it may fail on the server's state, and its error is a refusal too.
    OffsetReport(bool),
    /// CLUSTER SYNCSLOTS ESTABLISH while internal clients are ignored: another node starting an
    /// atomic slot migration into this one. Once the server accepts it, the link streams the
    /// slots' keys as commands (SELECT, SET, ...): server-internal traffic, like a primary's.
    SlotImport,
}

/// What the record of a command that can carry secrets may show, decided by its reply.
#[derive(Debug)]
struct SecretsShown {
    /// Its arguments that are not secrets, the only words its error reply may quote unredacted
    /// (`ACL SETUSER ... '<pw'` fails with a text quoting `'<pw'`, cut and with CR/LF made spaces).
    quotable: Vec<Arg>,
    /// `command_args` once it succeeded, if that shows more (`Described::shown_on_success`).
    args_on_success: Option<Vec<u8>>,
}

impl Pending {
    /// Heap bytes its record and secrets hold (what `MAX_HELD_BYTES` bounds).
    fn heap_bytes(&self) -> usize {
        let r = &self.record;
        let command = match &r.command {
            CommandName::Owned(name) => name.capacity(),
            CommandName::Borrowed(_) => 0,
        };
        let secrets = self.secrets.as_deref().map_or(0, SecretsShown::heap_bytes);
        r.command_args.capacity() + r.keys.heap_bytes() + r.error.capacity() + command + secrets
    }

    /// All it holds: its heap and its entry.
    fn held(&self) -> usize {
        self.heap_bytes() + ENTRY_BYTES
    }
}

impl SecretsShown {
    fn heap_bytes(&self) -> usize {
        size_of::<Self>()
            + self.quotable.capacity() * size_of::<Arg>()
            + self
                .quotable
                .iter()
                .map(|a| a.prefix.capacity())
                .sum::<usize>()
            + self.args_on_success.as_ref().map_or(0, Vec::capacity)
    }
}

#[derive(Debug)]
struct Pending {
    record: Record,
    /// The settings in force when the command was read: they decide its record.
    settings: Arc<Settings>,
    done_ts: u64,
    expects_reply: bool,
    effect: Effect,
    write_keys: u64,
    /// What a success reply says about how many of `write_keys` changed.
    change_reply: ChangeReply,
    /// Subscribe-family confirmations seen so far.
    confirmations: u64,
    /// A subscribe-family command whose confirmations may still come: Valkey pushes them even
    /// with replies off, so one sent then stays in the FIFO until they come or a later reply
    /// shows that they will not (it failed, its error silenced).
    awaiting: bool,
    /// For a command that can carry secrets (`Described::may_quote_secrets`): what its record
    /// needs to show no more than it may. `None`, with no allocation, for almost every command.
    secrets: Option<Box<SecretsShown>>,
    /// The command is in the table (at least its parent): a WRONGPASS from it is no renamed AUTH.
    known: bool,
    /// Read after a request-side gap, before the client had all its replies: the reply matched
    /// to it may belong to a command lost in the gap (see `Conn::uncertain_since`).
    after_gap: bool,
    /// CLIENT REPLY OFF/SKIP sent while replies were on: silent when it succeeds, so its only
    /// possible reply is a refusal (ACL, MULTI, NOAUTH). Until that is settled it holds the FIFO.
    /// If the server refused it, it changed nothing, and the reply modes of the commands after it
    /// are worked out again (`settle_refusable`).
    refusable: bool,
    /// CLIENT REPLY or RESET: sets the reply mode of the commands after it.
    mode_change: ModeChange,
    /// Read while replies were off: a refusal of it is silent too.
    sent_replies_off: bool,
    /// A REPLCONF ACK/GETACK whose refusal did not come: it ran (`settle_as_run`).
    ran_silently: bool,
    /// `Conn::reads` when it was read.
    read: u64,
    /// Its argument count passed the command's arity (see `Described::arity_ok`).
    arity_ok: bool,
}

struct Conn {
    client_id: u64,
    tgid: u32,
    /// The socket's inode number (0: unknown): whether its fd still holds it tells a close
    /// the kernel did not see (`--capture sockets`).
    ino: u64,
    /// The client's address, shared by the connection's records, and its port.
    ip: Arc<str>,
    port: u16,
    /// The server this connection belongs to (shared by its records).
    server: Arc<ServerInfo>,
    username: Arc<[u8]>,
    in_expected: u64,
    out_expected: u64,
    requests: RequestParser,
    replies: ReplyParser,
    pending: VecDeque<Pending>,
    queued: Vec<Pending>,
    /// Commands queued past `MAX_PENDING` in this MULTI: written at once as unknown, they still
    /// count in EXEC's reply.
    queued_untracked: u64,
    /// Heap bytes `pending` holds, at most (only added to; counted again exactly when it passes
    /// `MAX_HELD_BYTES`, see `make_room`).
    held_bytes: usize,
    /// Heap bytes `queued` holds (reset when a command is queued into an empty queue).
    queued_bytes: usize,
    /// The server reads nothing more from this client (after QUIT, or bytes it refused while
    /// replies were off): requests parsed from here were never run.
    read_closed: bool,
    /// Replies still to come for commands written unknown when more than `MAX_PENDING` awaited
    /// theirs: passed over as they come, in order, before any reply is paired again.
    replies_to_pass: u64,
    in_multi: bool,
    /// Whether the connection is inside MULTI is known (it is unless it was open before attach
    /// and has not yet begun or ended a transaction since).
    multi_known: bool,
    /// The MULTI the connection is in began before attach (found by a +QUEUED reply).
    multi_before_attach: bool,
    reply_mode: ReplyMode,
    /// Its subscriptions, as the confirmations' counts tell them.
    pubsub: PubsubCounts,
    monitor: bool,
    resp3: bool,
    /// Found already open at attach: replies to requests sent before attach are passed over.
    preexisting: bool,
    /// Open at attach, or a request-side gap since: the reply mode may have changed unseen (a
    /// CLIENT REPLY OFF or SKIP before attach or in the gap), so a reply is not trusted to name
    /// the user (ACL WHOAMI).
    reply_doubt: bool,
    /// Open at attach, and a reply has answered a request read since: every reply to what was
    /// sent before attach has come, so one that answers nothing answers a command lost in a
    /// capture gap, as on a connection accepted since.
    answered_since_attach: bool,
    /// A replica's link (after SYNC/PSYNC): what the server sends is the replication stream, not
    /// replies, and the link is server-internal traffic.
    replica: bool,
    /// `replica` was concluded from a REPLCONF ACK on a link open at attach: the first command a
    /// replica never sends shows it was a client's (`on_described`).
    replica_guessed: bool,
    /// The server accepted `CLUSTER SYNCSLOTS ESTABLISH` on this link (internal clients
    /// ignored): another node streams the migrated slots' keys here (`is_migration_stream`); it
    /// gets no replies.
    slot_import: bool,
    /// Records of REPLCONF commands (`Effect::Handshake`), with the settings they were read
    /// under: a replica's handshake is not audited while internal clients are ignored, but the
    /// server does not refuse REPLCONF to any client. Dropped when a SYNC/PSYNC after them is
    /// accepted; written when anything else follows, or at close.
    held: Vec<(Arc<Settings>, Record)>,
    /// When the first of `held` was read (they are written after `HANDSHAKE_WAIT_NS` of quiet).
    held_since: u64,
    /// Another cluster node's bus link, accepted on the cluster-bus port: its binary messages
    /// (each starting `RCmb`) are neither commands nor replies, so nothing of it is parsed. Known
    /// by the server's first bytes on a link accepted since attach: a reply starts with a RESP
    /// type byte, never `R`, so a client cannot pass itself off as a bus link.
    cluster_bus: bool,
    /// A TLS connection (the server's first bytes on a link accepted since attach are a TLS
    /// handshake record, `16 03`, where a reply starts with a RESP type byte): its commands are
    /// encrypted on the socket, so nothing of it is parsed, and one loss record says so.
    tls: bool,
    /// Reads (inbound data events) seen on the connection.
    reads: u64,
    /// Set at a request-side gap to the read it happened in: the gap may have held whole
    /// commands, whose replies come first and would be taken as the replies of the commands read
    /// after it. Until the client has had every reply (nothing pending when a later read comes),
    /// those commands' results are written as unknown rather than guessed.
    uncertain_since: Option<u64>,
    /// `uncertain_since` was set by `doubt_replies`, not by a capture gap (pub/sub or REPLCONF
    /// ACK in EXEC, a REPLCONF option's error, a message-shaped array): the replies left over
    /// answer seen commands, not commands a gap held, so none is counted lost.
    uncertain_not_from_gap: bool,
    /// The reason written while `uncertain_not_from_gap`.
    uncertain_why: &'static str,
    /// Guesses `drop_unanswered_guesses` counted that may still get their replies (a real command
    /// held by CLIENT PAUSE): such a reply is not a command the gap held, counted again.
    guesses_owed: u64,
    /// A request-side gap lost bytes of this connection since it opened: a reply no request
    /// awaits answers a command it held, even after the doubt ended (`uncertain_since`): Valkey
    /// goes on reading a client whose replies it could not all write yet (a slow reader), so the
    /// read that ended the doubt may have come with replies still owed (QA: thousands of
    /// pipelined SETs lost in ring gaps went uncounted).
    request_gap_seen: bool,
    /// Commands a reply-side gap made written as unknown whose replies may still come after it:
    /// such a reply is theirs, not a lost command's.
    replies_for_written: u64,
    /// Replies that answered no request while no request-side gap was known: the ring drops a
    /// read and lets the replies to its commands through, so the gap shows only at the next read
    /// (its position jumps), after them. If that read shows one, they answer commands it held.
    replies_before_gap: u64,
    /// Replies that came after a request-side gap with no request pending: each answers a command
    /// the gap held. Reported as one `commands_not_captured` loss record at the next read or at
    /// close.
    lost_commands: u64,
}

/// Stream positions advance over a record's bytes, which are not parsed (a replica's replication
/// stream, a cluster-bus link).
fn advance_unparsed(expected: &mut u64, pieces: Pieces, uncaptured_tail: u64) {
    for (pos, bytes) in pieces {
        *expected = pos.max(*expected) + bytes.len() as u64;
    }
    *expected += uncaptured_tail;
}

/// The first bytes of every cluster-bus message (`clusterMsg.sig`, Valkey's cluster_legacy.h).
const CLUSTER_BUS_SIGNATURE: &[u8] = b"RCmb";
/// A TLS handshake record (content type 22, version 3.x): a TLS server's first bytes.
const TLS_HANDSHAKE_SIGNATURE: &[u8] = &[0x16, 0x03];

/// The bytes of one ring record at their stream positions: one run of a syscall, or the segments
/// of a scanned server write (`SegmentHdr` + bytes each), then, if the scan stopped early, an empty
/// piece where it stopped (the uncaptured tail follows it).
struct Pieces<'a> {
    /// The next single run, if any.
    one: Option<(u64, &'a [u8])>,
    /// Segments of a scanned write: a jump in position between them is a reply payload the kernel
    /// left out, not bytes lost.
    elided_gaps: bool,
    stream_pos: u64,
    segments: &'a [u8],
    tail_at: Option<u64>,
}

impl<'a> Pieces<'a> {
    fn one(pos: u64, bytes: &'a [u8]) -> Self {
        Pieces {
            one: Some((pos, bytes)),
            elided_gaps: false,
            stream_pos: 0,
            segments: &[],
            tail_at: None,
        }
    }

    fn segments(stream_pos: u64, body: &'a [u8], tail_at: Option<u64>) -> Self {
        Pieces {
            one: None,
            elided_gaps: true,
            stream_pos,
            segments: body,
            tail_at,
        }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = (u64, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(one) = self.one.take() {
            return Some(one);
        }
        if let Some((hdr, after)) = self.segments.split_first_chunk::<SEGMENT_HDR_LEN>() {
            let off = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            let len = u32::from_ne_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
            if let Some((bytes, next)) = after.split_at_checked(len) {
                self.segments = next;
                return Some((self.stream_pos + u64::from(off), bytes));
            }
            // A cut record: what is left cannot be placed.
            self.segments = &[];
        }
        self.tail_at.take().map(|at| (at, &[][..]))
    }
}

/// Counters the daemon reports (INFO audit, loss records).
#[derive(Clone, Debug, Default)]
pub struct SessionStats {
    pub connections_seen: u64,
    pub requests: u64,
    pub replies_unmatched: u64,
    pub request_resyncs: u64,
    /// Malformed requests from clients (every byte seen; the server refuses them too): written as
    /// `protocol_error` records, not as losses.
    pub protocol_errors: u64,
    pub reply_resyncs: u64,
    /// Commands whose replies those resyncs lost (the `count` of their loss records).
    pub reply_resync_commands: u64,
    pub bytes_skipped: u64,
    /// Reply payload bytes the kernel left out on purpose (see `reply_scan` in auditor-ebpf).
    pub bytes_elided: u64,
    /// Records the filter stage did not write (exclusions, events, result mode).
    pub filtered: u64,
    /// Requests (and further malformed requests) parsed after bytes the server refused as a
    /// protocol error: it closed the connection without reading them, so they have no record.
    pub requests_never_read: u64,
    pub protocol_errors_never_read: u64,
    /// Commands a request-side gap held whole, counted by their replies.
    pub commands_not_captured: u64,
    /// Requests parsed after a gap that got no reply before the next read (`drop_unanswered_guesses`).
    pub guesses_dropped: u64,
    /// TLS connections, whose commands cannot be read (one `tls_connection` loss record each).
    pub tls_connections: u64,
    /// The filter stage's prefix-filter and custom-category lookups (the module's INFO counters).
    pub filter_lookups: filter::LookupCounts,
}

/// All audited connections of all targets, and the settings and tables the records need.
pub struct Session {
    /// Boxed: a connection is taken out of the map for every data event, and a box moves cheaply.
    conns: HashMap<(u32, u32), Box<Conn>, FxBuildHasher>,
    next_client_id: u64,
    table: CommandTable,
    /// The latest settings.
    settings: Arc<Settings>,
    /// Settings changes with the kernel-clock time each took effect, oldest first: a command uses
    /// the settings in force when it was read, however late the pipeline processes it.
    timeline: Vec<(u64, Arc<Settings>)>,
    /// For records of no known server (the auditor's own loss records) and unknown targets.
    default_server: Arc<ServerInfo>,
    /// What is known of each target (by TGID): port, pids, container identity.
    servers: HashMap<u32, Arc<ServerInfo>, FxBuildHasher>,
    /// Wall clock minus the kernel's monotonic clock, in ns: converts event stamps to wall time.
    wall_offset_ns: i64,
    capture_cap: u64,
    pub stats: SessionStats,
    /// Connections that are the auditor's own (CLIENT LIST queries): never audited.
    ignored_peers: Vec<Peer>,
    scratch_req: Vec<RequestEvent>,
    scratch_rep: Vec<ReplyEvent>,
    /// Buffers of handled requests and replies, reused by every connection's parsers.
    pool: BufPool,
    /// Reused for each request's classification (boxed: taken out and put back per request).
    scratch_desc: Option<Box<Described>>,
    /// Length of the previous request's `command_args` text: the next one's initial capacity.
    args_len_hint: usize,
    /// Targets whose listeners a successful CONFIG SET changed, for the caller to describe again.
    listeners_changed: Vec<u32>,
    /// What all connections' `held_bytes` and `queued_bytes` add up to, at most (only added to
    /// between exact counts, see `over_global_bound`).
    held_total: usize,
    /// `held_total` at which the next exact count is made.
    recount_at: usize,
    /// What the last exact count found: over `GLOBAL_HELD_BYTES`. Trusted until `recount_at`.
    global_over: bool,
}

impl Session {
    pub fn new(
        table: CommandTable,
        settings: Settings,
        hostname: String,
        wall_offset_ns: i64,
        capture_cap: u64,
    ) -> Self {
        Session {
            conns: HashMap::default(),
            next_client_id: 1,
            table,
            settings: Arc::new(settings.clone()),
            timeline: vec![(0, Arc::new(settings))],
            default_server: ServerInfo::host(&hostname),
            servers: HashMap::default(),
            wall_offset_ns,
            capture_cap,
            stats: SessionStats::default(),
            ignored_peers: Vec::new(),
            scratch_req: Vec::new(),
            scratch_rep: Vec::new(),
            pool: BufPool::default(),
            scratch_desc: None,
            args_len_hint: 0,
            listeners_changed: Vec::new(),
            held_total: 0,
            recount_at: GLOBAL_HELD_BYTES,
            global_over: false,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Replace the settings from now on (tests and simple callers).
    pub fn set_settings(&mut self, settings: Settings) {
        self.set_timeline(vec![(0, Arc::new(settings))]);
    }

    /// The settings history: `(monotonic ns when it took effect, settings)`, oldest first.
    pub fn set_timeline(&mut self, timeline: Vec<(u64, Arc<Settings>)>) {
        let Some((_, latest)) = timeline.last() else {
            return;
        };
        self.settings = latest.clone();
        self.timeline = timeline;
        let keep = self.keep();
        for c in self.conns.values_mut() {
            c.requests.set_keep(keep);
        }
    }

    /// The settings in force at kernel time `ts`.
    fn settings_at(&self, ts: u64) -> Arc<Settings> {
        let i = self.timeline.partition_point(|(at, _)| *at <= ts);
        match i.checked_sub(1).and_then(|i| self.timeline.get(i)) {
            Some((_, s)) => s.clone(),
            None => self
                .timeline
                .first()
                .map(|(_, s)| s.clone())
                .unwrap_or_else(|| self.settings.clone()),
        }
    }

    /// Bytes of each argument the request parsers keep: enough for the largest
    /// `payload_maxsize` of the timeline, not only the latest. Requests still in the ring when it
    /// is lowered were sent under an earlier value and are cut by that one (they were cut to 256
    /// bytes, the floor, before).
    fn keep(&self) -> usize {
        self.timeline
            .iter()
            .map(|(_, s)| s.payload_maxsize)
            .chain([self.settings.payload_maxsize])
            .max()
            .unwrap_or(0)
            .saturating_add(1)
            .max(MIN_KEEP)
    }

    /// Describe a target: its later records (and those of its open connections) carry `info`.
    pub fn set_server(&mut self, tgid: u32, info: Arc<ServerInfo>) {
        for (_, conn) in self.conns.iter_mut().filter(|((t, _), _)| *t == tgid) {
            conn.server = info.clone();
        }
        self.servers.insert(tgid, info);
    }

    /// Set the wall clock minus the kernel's monotonic clock (ns) that turns the stamps of the
    /// events from now on into wall time; the caller reads it afresh so records follow steps of
    /// the wall clock.
    pub fn set_wall_offset(&mut self, wall_offset_ns: i64) {
        self.wall_offset_ns = wall_offset_ns;
    }

    /// Targets (TGIDs) whose listening ports a successful CONFIG SET changed since the last call,
    /// if any (asked after every event: nothing is moved when none changed).
    #[inline]
    pub fn take_listener_changes(&mut self) -> Option<Vec<u32>> {
        (!self.listeners_changed.is_empty()).then(|| std::mem::take(&mut self.listeners_changed))
    }

    /// Forget a target that exited (after `close_all`).
    pub fn remove_server(&mut self, tgid: u32) {
        self.servers.remove(&tgid);
    }

    fn server_of(&self, tgid: u32) -> Arc<ServerInfo> {
        self.servers
            .get(&tgid)
            .cloned()
            .unwrap_or_else(|| self.default_server.clone())
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Never audit the connection from `peer` (the auditor's own connection to the server).
    pub fn ignore_peer(&mut self, peer: Peer) {
        self.ignored_peers.push(peer);
    }

    pub fn is_ignored(&self, peer: &Peer) -> bool {
        self.ignored_peers.contains(peer)
    }

    /// Whether the connection open at `tgid`'s `fd` is socket `ino` (or one whose inode is not
    /// known).
    pub fn knows_socket(&self, tgid: u32, fd: u32, ino: u64) -> bool {
        self.conns
            .get(&(tgid, fd))
            .is_some_and(|c| c.ino == ino || c.ino == 0)
    }

    /// A connection whose start the auditor did not see although it was accepted since attach (its
    /// accept report was dropped by the full ring): audited like one open at attach, from its next
    /// command, its user unknown. A connection still open on its fd has ended (the fd was reused).
    pub fn add_unseen(
        &mut self,
        tgid: u32,
        fd: u32,
        ino: u64,
        peer: Peer,
        now_ns: u64,
        out: &mut impl RecordOut,
    ) {
        if self.conns.contains_key(&(tgid, fd)) {
            self.close(tgid, fd, now_ns, out);
        }
        self.add_existing(tgid, fd, ino, peer, None, now_ns, out);
    }

    /// A connection that was open before the auditor attached. Its user is unknown unless given.
    #[allow(clippy::too_many_arguments)]
    pub fn add_existing(
        &mut self,
        tgid: u32,
        fd: u32,
        ino: u64,
        peer: Peer,
        username: Option<Vec<u8>>,
        now_ns: u64,
        out: &mut impl RecordOut,
    ) {
        let keep = self.keep();
        let conn = Conn {
            client_id: self.alloc_id(),
            tgid,
            ino,
            server: self.server_of(tgid),
            ip: Arc::from(peer.ip.as_str()),
            port: peer.port,
            username: username.map_or_else(unknown_user, |u| Arc::from(u.as_slice())),
            in_expected: 0,
            out_expected: 0,
            requests: RequestParser::new_resyncing(keep),
            replies: ReplyParser::new_resyncing(),
            pending: VecDeque::new(),
            queued: Vec::new(),
            queued_untracked: 0,
            held_bytes: 0,
            queued_bytes: 0,
            replies_to_pass: 0,
            read_closed: false,
            multi_known: false,
            multi_before_attach: false,
            in_multi: false,
            reply_mode: ReplyMode::On,
            pubsub: PubsubCounts::UNKNOWN,
            monitor: false,
            resp3: false,
            preexisting: true,
            reply_doubt: true,
            answered_since_attach: false,
            cluster_bus: false,
            tls: false,
            replica: false,
            replica_guessed: false,
            slot_import: false,
            held: Vec::new(),
            held_since: 0,
            reads: 0,
            uncertain_since: None,
            uncertain_not_from_gap: false,
            uncertain_why: REPLY_UNCERTAIN_PUBSUB,
            lost_commands: 0,
            guesses_owed: 0,
            request_gap_seen: false,
            replies_for_written: 0,
            replies_before_gap: 0,
        };
        self.stats.connections_seen += 1;
        let rec = self.connection_record(
            &conn,
            b"connection",
            b"type=normal attached=existing",
            now_ns,
        );
        self.push(rec, now_ns, out);
        self.conns.insert((tgid, fd), Box::new(conn));
    }

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_client_id;
        self.next_client_id += 1;
        id
    }

    /// Process one capture event, appending the records it completes to `out`.
    pub fn handle(&mut self, ev: CaptureEvent<'_>, out: &mut impl RecordOut) {
        match ev {
            CaptureEvent::Accept {
                tgid,
                fd,
                ts_ns,
                peer,
                ino,
                ..
            } => {
                // An fd number reused without us seeing the close: finish the old connection first.
                if self.conns.contains_key(&(tgid, fd)) {
                    self.close(tgid, fd, ts_ns, out);
                }
                if self.is_ignored(&peer) {
                    return;
                }
                let keep = self.keep();
                let conn = Conn {
                    client_id: self.alloc_id(),
                    tgid,
                    ino,
                    server: self.server_of(tgid),
                    ip: Arc::from(peer.ip.as_str()),
                    port: peer.port,
                    username: Arc::from(&b"default"[..]),
                    in_expected: 0,
                    out_expected: 0,
                    requests: RequestParser::new(keep),
                    replies: ReplyParser::new(),
                    pending: VecDeque::new(),
                    queued: Vec::new(),
                    queued_untracked: 0,
                    held_bytes: 0,
                    queued_bytes: 0,
                    replies_to_pass: 0,
                    read_closed: false,
                    multi_known: false,
                    multi_before_attach: false,
                    in_multi: false,
                    reply_mode: ReplyMode::On,
                    pubsub: PubsubCounts::NONE,
                    monitor: false,
                    resp3: false,
                    preexisting: false,
                    reply_doubt: false,
                    answered_since_attach: false,
                    cluster_bus: false,
                    tls: false,
                    replica: false,
                    replica_guessed: false,
                    slot_import: false,
                    held: Vec::new(),
                    held_since: 0,
                    reads: 0,
                    uncertain_since: None,
                    uncertain_not_from_gap: false,
                    uncertain_why: REPLY_UNCERTAIN_PUBSUB,
                    lost_commands: 0,
                    guesses_owed: 0,
                    request_gap_seen: false,
                    replies_for_written: 0,
                    replies_before_gap: 0,
                };
                self.stats.connections_seen += 1;
                let rec = self.connection_record(&conn, b"connection", b"type=normal", ts_ns);
                self.push(rec, ts_ns, out);
                self.conns.insert((tgid, fd), Box::new(conn));
            }
            CaptureEvent::Close { tgid, fd, ts_ns } => self.close(tgid, fd, ts_ns, out),
            CaptureEvent::Process {
                kind: ProcessEvent::Exit,
                tgid,
                ts_ns,
                ..
            } => {
                self.close_all(tgid, ts_ns, out);
                self.remove_server(tgid);
            }
            CaptureEvent::Process { .. } => {}
            CaptureEvent::Data {
                tgid,
                fd,
                ts_ns,
                inbound,
                stream_pos,
                total_len,
                chunk_off,
                captured_len,
                bytes,
            } => self.data(
                tgid,
                fd,
                ts_ns,
                inbound,
                Pieces::one(stream_pos + chunk_off as u64, bytes),
                chunk_off == 0,
                // Bytes of this syscall past the capture cap: known once its last captured chunk is in.
                (chunk_off as u64 + bytes.len() as u64 >= captured_len as u64)
                    .then(|| (total_len as u64).saturating_sub(captured_len as u64)),
                out,
            ),
            CaptureEvent::Segments {
                tgid,
                fd,
                ts_ns,
                stream_pos,
                total_len,
                captured_len,
                tail,
                body,
            } => self.data(
                tgid,
                fd,
                ts_ns,
                false,
                Pieces::segments(
                    stream_pos,
                    body,
                    tail.then_some(stream_pos + u64::from(captured_len)),
                ),
                true,
                // (One record holds a whole write.)
                Some(if tail {
                    u64::from(total_len.saturating_sub(captured_len))
                } else {
                    0
                }),
                out,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn data(
        &mut self,
        tgid: u32,
        fd: u32,
        ts_ns: u64,
        inbound: bool,
        pieces: Pieces,
        // The first chunk of a syscall (a read is counted once, however many chunks it takes).
        syscall_start: bool,
        // `Some` for the last captured chunk of a syscall: its bytes past the capture cap.
        syscall_end: Option<u64>,
        out: &mut impl RecordOut,
    ) {
        let uncaptured_tail = syscall_end.unwrap_or(0);
        let Some(mut conn) = self.conns.remove(&(tgid, fd)) else {
            return;
        };
        // Bytes of this stream never seen, this call: a resync's loss record says how many.
        let mut unseen = uncaptured_tail;
        // The server's very first bytes on a link accepted since attach. Of a link open at attach
        // (or whose first write was lost) the bytes seen first may be inside a reply's value, which
        // a client can fill with `RCmb`: such a link stays parsed.
        let first_bytes = (!inbound && conn.out_expected == 0 && !conn.preexisting)
            .then_some(pieces.one)
            .flatten()
            .filter(|&(pos, _)| pos == 0)
            .map(|(_, bytes)| bytes);
        if let Some(first) = first_bytes {
            let bus = first.starts_with(CLUSTER_BUS_SIGNATURE);
            let tls = first.starts_with(TLS_HANDSHAKE_SIGNATURE);
            if bus || tls {
                conn.cluster_bus = bus;
                conn.tls = tls;
                // What the link's first message looked like to the request parser is no command.
                conn.pending.clear();
                conn.queued.clear();
                conn.lost_commands = 0;
            }
            if tls {
                self.stats.tls_connections += 1;
                let rec = self.loss_record(
                    &conn,
                    LossCause::Tls,
                    "a TLS connection: its commands are encrypted on the socket, none is audited",
                    0,
                    0,
                    ts_ns,
                );
                self.push(rec, ts_ns, out);
            }
        }
        if conn.cluster_bus || conn.tls {
            let expected = if inbound {
                &mut conn.in_expected
            } else {
                &mut conn.out_expected
            };
            advance_unparsed(expected, pieces, uncaptured_tail);
            self.conns.insert((tgid, fd), conn);
            return;
        }
        if inbound {
            self.report_lost_commands(&mut conn, ts_ns, out);
            // (Per read, not per 16,000-byte chunk: "read again since" must mean the server's
            // next read. Review: a CLIENT REPLY ON that worked, in the first chunk of a 16 KiB
            // read, was taken for refused at the second.)
            conn.reads += u64::from(syscall_start);
            // Replies that answered nothing since the last read answer commands of a gap this
            // read shows before its bytes (QA: hundreds of pipelined SETs per connection, whose
            // reads the full ring dropped, were neither written nor counted).
            let mut replies_before_gap = std::mem::take(&mut conn.replies_before_gap);
            if pieces.one.is_none_or(|(pos, _)| pos <= conn.in_expected) {
                replies_before_gap = 0;
            }
            let dropped = if conn.uncertain_since.is_some() && !conn.uncertain_not_from_gap {
                self.drop_unanswered_guesses(&mut conn, ts_ns, out)
            } else {
                0
            };
            // A read after the client had every reply: whatever the gap held is answered, and
            // replies line up with requests again. Not while the parser is still looking for a
            // command's start, unless this read begins with one: the previous read may have
            // ended inside a command the gap began, whose rest this read would begin with, and
            // which the server answers only after it, first. Nor when guesses were just dropped
            // for want of a reply: a real one's reply may yet come (its write lost or late), and
            // would be taken for the next command's.
            if conn.uncertain_since.is_some_and(|read| {
                read < conn.reads
                    && conn.pending.is_empty()
                    && dropped == 0
                    && (!conn.requests.resyncing()
                        || pieces.one.is_some_and(|(pos, bytes)| {
                            pos == conn.in_expected
                                && crate::resp::starts_with_multibulk_header(bytes)
                        }))
            }) {
                conn.uncertain_since = None;
                conn.uncertain_not_from_gap = false;
            }
            // Valkey answers everything it read before it reads the client again: a CLIENT
            // REPLY OFF/SKIP read earlier and still unanswered was not refused.
            if conn
                .pending
                .front()
                .is_some_and(|p| p.refusable && p.read < conn.reads)
            {
                self.settle_refusable(&mut conn, None, out);
            }
            let mut events = std::mem::take(&mut self.scratch_req);
            for (pos, bytes) in pieces {
                if pos > conn.in_expected {
                    let gap = pos - conn.in_expected;
                    self.stats.bytes_skipped += gap;
                    unseen += gap;
                    conn.requests.skip(gap, &mut events);
                }
                conn.requests
                    .feed_pooled(bytes, ts_ns, &mut events, &mut self.pool);
                conn.in_expected = pos.max(conn.in_expected) + bytes.len() as u64;
            }
            if uncaptured_tail > 0 {
                self.stats.bytes_skipped += uncaptured_tail;
                conn.requests.skip(uncaptured_tail, &mut events);
                conn.in_expected += uncaptured_tail;
            }
            if syscall_end.is_some() {
                conn.requests.end_read(&mut events);
            }
            for ev in events.drain(..) {
                match ev {
                    RequestEvent::Request(req) => {
                        self.on_request(&mut conn, &req, out);
                        self.pool.put_args(req.args);
                    }
                    RequestEvent::Empty => {
                        // Valkey resets the client as after a command: a pending SKIP is used
                        // up (QA: the replies after it were taken one command late, and an ACL
                        // WHOAMI took another command's reply for the user's name).
                        if conn.reply_mode == ReplyMode::SkipNext {
                            conn.reply_mode = ReplyMode::On;
                        }
                    }
                    RequestEvent::Desync { reason } if reason != GAP_REASON => {
                        self.on_protocol_error(&mut conn, reason, ts_ns, out);
                    }
                    RequestEvent::Desync { reason } => {
                        self.stats.request_resyncs += 1;
                        conn.uncertain_since = Some(conn.reads);
                        conn.request_gap_seen = true;
                        conn.lost_commands += std::mem::take(&mut replies_before_gap);
                        let rec = self.loss_record(
                            &conn,
                            LossCause::RequestResync,
                            reason,
                            1,
                            unseen,
                            ts_ns,
                        );
                        self.push(rec, ts_ns, out);
                        // Whole commands may have been in the gap, an AUTH among them (QA): the
                        // user is not known until a reply shows it again.
                        forget_user(&mut conn);
                        conn.reply_doubt = true;
                    }
                }
            }
            self.scratch_req = events;
        } else if !conn.replica && self.sync_accepted_by(&conn, &pieces) {
            // The server accepted a SYNC/PSYNC: from its first byte, what follows is the
            // replication stream (a SYNC's dataset comes as `$<len>` and its bytes, with no CRLF
            // after them: waiting for a whole reply would wait forever).
            let p = conn.pending.pop_front().expect("a SYNC/PSYNC at the head");
            let accepted = Reply::bare(ReplyKind::Simple, ts_ns);
            self.finish_replication(&mut conn, p, &accepted, out);
            advance_unparsed(&mut conn.out_expected, pieces, uncaptured_tail);
        } else if conn.replica || conn.slot_import {
            // The replication stream (or the slot migration's messages to its source).
            advance_unparsed(&mut conn.out_expected, pieces, uncaptured_tail);
        } else {
            // All pieces of the record are fed before any reply is acted on, as for one raw
            // write: the scanned writes of `-P 16` replies carry two segments per elided value.
            let mut events = std::mem::take(&mut self.scratch_rep);
            let elided_gaps = pieces.elided_gaps;
            for (pos, bytes) in pieces {
                if pos > conn.out_expected {
                    let gap = pos - conn.out_expected;
                    if elided_gaps {
                        self.stats.bytes_elided += gap;
                    } else {
                        self.stats.bytes_skipped += gap;
                        unseen += gap;
                        // (It may have held confirmations.)
                        conn.pubsub.forget();
                    }
                    conn.replies.skip(gap, &mut events);
                }
                conn.replies
                    .feed_pooled(bytes, ts_ns, &mut events, &mut self.pool);
                conn.out_expected = pos.max(conn.out_expected) + bytes.len() as u64;
            }
            if uncaptured_tail > 0 {
                self.stats.bytes_skipped += uncaptured_tail;
                conn.pubsub.forget();
                conn.replies.skip(uncaptured_tail, &mut events);
                conn.out_expected += uncaptured_tail;
            }
            for ev in events.drain(..) {
                if conn.replica {
                    // A SYNC/PSYNC was accepted: the rest is the replication stream.
                    break;
                }
                match ev {
                    ReplyEvent::Reply(reply) => {
                        self.on_reply(&mut conn, &reply, out);
                        self.pool.put_bytes(reply.text);
                    }
                    ReplyEvent::Desync { .. }
                        if !conn.in_multi
                            && conn
                                .pending
                                .front()
                                .is_some_and(|p| matches!(p.effect, Effect::Sync)) =>
                    {
                        // What a server sends a SYNC/PSYNC it accepts need not be RESP (a
                        // dual-channel replica's `$ENDOFF:` line); an error would have been.
                        let p = conn.pending.pop_front().expect("front exists");
                        let accepted = Reply::bare(ReplyKind::Simple, ts_ns);
                        self.finish_replication(&mut conn, p, &accepted, out);
                    }
                    ReplyEvent::Desync { reason } => {
                        self.stats.reply_resyncs += 1;
                        let n = conn.pending.len() as u64;
                        self.stats.reply_resync_commands += n;
                        conn.replies_for_written += n;
                        let rec = self.loss_record(
                            &conn,
                            LossCause::ReplyResync,
                            reason,
                            n,
                            unseen,
                            ts_ns,
                        );
                        self.push(rec, ts_ns, out);
                        // The replies of everything in flight are gone: say so rather than guess.
                        conn.replies_to_pass = 0;
                        while let Some(p) = conn.pending.pop_front() {
                            match p.effect {
                                // Its reply is lost, but a MULTI fails only inside a transaction.
                                Effect::Multi => conn.in_multi = true,
                                // The transaction ended on the server, with outcomes unknown: its
                                // queued commands are written (before it, as EXEC writes them),
                                // not left for the next MULTI to clear.
                                Effect::Exec | Effect::Discard | Effect::Reset => {
                                    self.end_transaction_unseen(
                                        &mut conn,
                                        false,
                                        "reply lost (capture gap)",
                                        ts_ns,
                                        out,
                                    );
                                }
                                _ => {}
                            }
                            self.finish_unknown(
                                &mut conn,
                                p,
                                "reply lost (capture gap)",
                                ts_ns,
                                out,
                            );
                        }
                    }
                }
            }
            self.scratch_rep = events;
        }
        self.conns.insert((tgid, fd), conn);
    }

    fn on_request(&mut self, conn: &mut Conn, req: &Request, out: &mut impl RecordOut) {
        if conn.read_closed {
            // After QUIT, or bytes the server refused with replies off: never read, never run.
            self.stats.requests += 1;
            self.stats.requests_never_read += 1;
            return;
        }
        let mut d = self.scratch_desc.take().unwrap_or_default();
        self.table.describe_into(&req.args, req.argc, &mut d);
        self.on_described(conn, req, &mut d, out);
        self.scratch_desc = Some(d);
    }

    /// `on_request` with the request classified in `d` (whose buffers may be taken).
    fn on_described(
        &mut self,
        conn: &mut Conn,
        req: &Request,
        d: &mut Described,
        out: &mut impl RecordOut,
    ) {
        self.stats.requests += 1;
        let settings = self.settings_at(req.done_ts);
        // Only what the server does tells a replica: any client may send REPLCONF, SYNC or
        // PSYNC (QA: taking one REPLCONF for a replica's hid everything after it, wrong
        // passwords and FLUSHALL included).
        let replconf = *d.command == *b"replconf" || d.command.starts_with(b"replconf|");
        // REPLCONF ACK/GETACK: Valkey answers nothing once it runs (it ignores an ACK from
        // anyone but a replica), but it refuses it like any command (NOPERM, NOAUTH) and a wrong
        // number of arguments is a syntax error (QA: taken for silent, those errors were paired
        // with the next commands: a denied REPLCONF made a SET read as denied).
        // Valkey works through the options in order and returns at ACK/GETACK wherever it is
        // (QA: `REPLCONF listening-port 1 ACK 5` was taken for answered, and every result after
        // it shifted by one: a wrong password read as a good one).
        // (Inside MULTI it is queued: a +QUEUED at the head is its reply, `settle_refusable`.)
        let run = if replconf {
            replconf_run(&req.args, req.argc)
        } else {
            ReplconfRun::Answered
        };
        let silent_report = run != ReplconfRun::Answered;
        if silent_report && req.args[1].eq_ignore_case("ack") {
            // (Its first read since attach: a replica sends nothing else, and a client's CLIENT
            // REPLY SKIP before it was its own, QA.)
            if conn.preexisting && !conn.replica && conn.pending.is_empty() && conn.reads == 1 {
                // A replica's offset report on a link open at attach: what the server sends on
                // it is the replication stream (a client's commands after it are still audited).
                conn.replica = true;
                conn.replica_guessed = true;
            }
            if conn.replica && settings.ignore_internal_clients {
                return;
            }
        } else if conn.replica_guessed && !replconf {
            // A replica sends nothing but REPLCONF ACK: a client's REPLCONF ACK, which Valkey
            // ignores (QA: one made a client open at attach a replica, and its FLUSHALL and
            // the rest went without results). The server wrote nothing to it meanwhile.
            conn.replica = false;
            conn.replica_guessed = false;
        } else if conn.replica
            && settings.ignore_internal_clients
            && (replconf || matches!(&*d.command, b"sync" | b"psync"))
        {
            // A replica's own traffic (Valkey ignores SYNC/PSYNC from a replica).
            return;
        } else if conn.slot_import
            && settings.ignore_internal_clients
            && is_migration_stream(&d.command, d.write_keys as u64)
        {
            return;
        } else if !conn.held.is_empty() && !replconf && !matches!(&*d.command, b"sync" | b"psync") {
            // Not a replica's handshake: what it held is written first.
            self.release_held(conn, out);
        }
        // (Read with replies off it is silent either way, but an OffsetReport still: should a
        // refusal of the CLIENT REPLY OFF turn them back on, it is refusable, not answered.)
        let mut effect = if silent_report {
            Effect::OffsetReport(run == ReplconfRun::SilentUnlessOptionFails)
        } else if replconf && settings.ignore_internal_clients {
            Effect::Handshake
        } else if settings.ignore_internal_clients
            && *d.command == *b"cluster|syncslots"
            && req
                .args
                .get(2)
                .is_some_and(|a| a.eq_ignore_case("establish"))
        {
            Effect::SlotImport
        } else {
            effect_of(d, &req.args)
        };
        // (`CLIENT REPLY OFF x` is refused for its arity, silently behind a SKIP: QA found it
        // taken for an OFF that worked, every later result unknown.)
        let mode_change = if *d.command == *b"client|reply" && d.arity_ok {
            match req.args.get(2).map(|a| a.lower()).as_deref() {
                Some("on") => ModeChange::On,
                Some("off") => ModeChange::Off,
                Some("skip") => ModeChange::Skip,
                _ => ModeChange::None,
            }
        } else if matches!(effect, Effect::Reset) {
            ModeChange::Reset
        } else {
            ModeChange::None
        };
        let sent_replies_off = conn.reply_mode == ReplyMode::Off;
        let (expects_reply, refusable) = silent_when_run(
            reply_mode_step(&mut conn.reply_mode, mode_change),
            silent_report,
        );
        // Queued, its confirmations come as EXEC's elements. (`in_multi` follows the replies: a
        // command read after an EXEC, DISCARD or RESET still unanswered is not queued, one read
        // after a MULTI still unanswered is. QA: a SUBSCRIBE pipelined after EXEC took the next
        // command's reply for its own, its RESP3 confirmation skipped as a push, and every
        // result after it shifted by one.)
        let queued = || {
            // The last transaction command still unanswered says, else the replies so far.
            conn.pending
                .iter()
                .rev()
                .find_map(|p| match p.effect {
                    Effect::Multi => Some(true),
                    Effect::Exec | Effect::Discard | Effect::Reset => Some(false),
                    _ => None,
                })
                .unwrap_or(conn.in_multi)
        };
        let awaiting = matches!(effect, Effect::Subscribe(..)) && d.arity_ok && !queued();
        if awaiting
            && !expects_reply
            && let Effect::Subscribe(_, n, channels) = &mut effect
            && *n > 0
        {
            // Which confirmations are its own: a later command's may come instead.
            let names = req.args.iter().skip(1).map(|a| a.prefix.clone());
            *channels = Some(Box::new(names.collect()));
        }
        if matches!(effect, Effect::Quit) && !expects_reply {
            // The server reads nothing after QUIT (in MULTI too); with replies on, its +OK says
            // so (`on_reply`), and without, nothing will.
            conn.read_closed = true;
        }
        // Written straight into the record's buffer, sized like the previous command's: with
        // steady traffic that is exact, and no scratch buffer has to be copied out.
        let mut args_text = Vec::with_capacity(self.args_len_hint);
        command_args_into(
            d,
            &req.args,
            settings.payload_disable,
            settings.payload_maxsize,
            &mut args_text,
        );
        self.args_len_hint = args_text.len();
        if args_text.capacity() > 2 * args_text.len() + 64 {
            // A short text after a long one: the queue counts lengths, so keep slack small.
            args_text.shrink_to_fit();
        }
        let secrets = d.may_quote_secrets.then(|| {
            Box::new(SecretsShown {
                quotable: quotable_args(&req.args, &d.secrets),
                args_on_success: command_args_on_success(
                    d,
                    &req.args,
                    settings.payload_disable,
                    settings.payload_maxsize,
                ),
            })
        });
        let maxsize = crate::commands::key_maxsize(settings.payload_maxsize);
        fn key_of(a: &crate::argv::Arg, maxsize: usize) -> &[u8] {
            // Cut as `command_args` cuts it: a UTF-8 key stays text.
            &a.prefix[..crate::commands::utf8_cut(&a.prefix, maxsize)]
        }
        let mut keys = KeyList::with_capacity(
            d.keys.len(),
            d.keys
                .iter()
                .filter_map(|&i| req.args.get(i))
                .map(|a| key_of(a, maxsize).len())
                .sum(),
        );
        for a in d.keys.iter().filter_map(|&i| req.args.get(i)) {
            keys.push(key_of(a, maxsize));
        }
        let cost = args_text.capacity()
            + keys.heap_bytes()
            + secrets.as_deref().map_or(0, SecretsShown::heap_bytes)
            + ENTRY_BYTES;
        if !make_room(conn, cost) {
            // (`held_bytes` is exact now: leave a quarter of the bound free.)
            self.write_oldest_early(conn, cost, MAX_HELD_BYTES / 4 * 3, out);
        }
        if self.over_global_bound(conn, cost) {
            self.shed_for_global_bound(conn, cost, out);
        }
        if conn.pending.len() >= MAX_PENDING {
            self.write_oldest_unknown(conn, out);
        }
        conn.held_bytes += cost;
        self.held_total += cost;
        // Built in its FIFO slot: the record is completed and formatted there, never moved.
        conn.pending.push_back(Pending {
            record: Record {
                time_unix_us: 0,
                category: d.category.clone(),
                // The description is not needed past this point: its name buffer becomes the
                // record's.
                command: std::mem::replace(&mut d.command, CommandName::Borrowed(b"")),
                command_args: args_text,
                result: Outcome::Unknown,
                duration_us: 0,
                keys_modified: 0,
                client_id: conn.client_id,
                // Replaced when the record is finished if the command changed the user.
                username: conn.username.clone(),
                client_ip: conn.ip.clone(),
                client_port: conn.port,
                server: conn.server.clone(),
                error: Vec::new(),
                seq: 0,
                keys,
                pid: conn.tgid,
            },
            settings,
            done_ts: req.done_ts,
            expects_reply,
            effect,
            write_keys: d.write_keys as u64,
            change_reply: d.change_reply,
            confirmations: 0,
            awaiting,
            secrets,
            known: d.known,
            after_gap: conn.uncertain_since.is_some(),
            refusable,
            mode_change,
            sent_replies_off,
            ran_silently: false,
            read: conn.reads,
            arity_ok: d.arity_ok,
        });
        if conn.replica || conn.slot_import {
            // On a replica's link the server sends the replication stream, never a reply (one
            // that would reply has the link dropped after it ran), and on a slot migration's
            // only its own messages: written at once, its outcome unknown (QA: a client whose
            // SYNC was accepted ran ACL SETUSER and CONFIG SET, under CLIENT REPLY OFF too, and
            // none of it was written).
            let why = if conn.replica {
                NO_REPLY_REPLICA_LINK
            } else {
                NO_REPLY_SLOT_MIGRATION_LINK
            };
            if let Some(p) = conn.pending.pop_back() {
                let ts = p.done_ts;
                self.finish_unknown(conn, p, why, ts, out);
            }
            return;
        }
        // A command that gets no reply, with nothing before it: its record is complete now
        // (unless the server may still refuse it).
        if !expects_reply && conn.pending.len() == 1 {
            self.drain_unreplied(conn, out);
        }
    }

    /// The client sent bytes that are not RESP. Nothing was lost: every byte was seen, and the
    /// server refuses them too, answering "-ERR Protocol error: ..." (then it closes the
    /// connection). So this is a `protocol_error` request in the FIFO, completed by that reply
    /// like any command and written in its place, not an AUDIT_LOSS record.
    fn on_protocol_error(
        &mut self,
        conn: &mut Conn,
        reason: &str,
        ts_ns: u64,
        out: &mut impl RecordOut,
    ) {
        self.stats.protocol_errors += 1;
        if conn.read_closed {
            self.stats.protocol_errors_never_read += 1;
            return;
        }
        let mut record = self.connection_record(conn, b"protocol_error", b"", ts_ns);
        record.category = Category::Other;
        record.result = Outcome::Unknown;
        record.command_args = format!("reason={reason}").into_bytes();
        // No reply comes while replies are off.
        let expects_reply = conn.reply_mode == ReplyMode::On;
        if !expects_reply {
            // Nor the server's refusal, which would drop what follows (`on_reply`): the server
            // reads nothing more.
            conn.read_closed = true;
        }
        let p = Pending {
            record,
            settings: self.settings_at(ts_ns),
            done_ts: ts_ns,
            expects_reply,
            effect: Effect::ProtocolError,
            write_keys: 0,
            change_reply: ChangeReply::Unknown,
            confirmations: 0,
            awaiting: false,
            secrets: None,
            known: false,
            after_gap: conn.uncertain_since.is_some(),
            refusable: false,
            mode_change: ModeChange::None,
            sent_replies_off: false,
            ran_silently: false,
            read: conn.reads,
            arity_ok: true,
        };
        if !expects_reply && conn.pending.is_empty() {
            self.finish_unknown(conn, p, "", ts_ns, out);
        } else {
            conn.pending.push_back(p);
        }
    }

    fn on_reply(&mut self, conn: &mut Conn, reply: &Reply, out: &mut impl RecordOut) {
        if reply.kind == ReplyKind::Push {
            // Only a RESP3 connection gets pushes (QA: one open at attach, its HELLO 3 unseen,
            // took a client's LRANGE of a list beginning with "message" for a message).
            conn.resp3 = true;
        }
        // Out-of-band data first: it answers no request.
        let first = reply.first.as_deref().map(|f| f.to_ascii_lowercase());
        let is_pubsub_kind = matches!(
            first.as_deref(),
            Some(
                b"message"
                    | b"pmessage"
                    | b"smessage"
                    | b"subscribe"
                    | b"psubscribe"
                    | b"ssubscribe"
                    | b"unsubscribe"
                    | b"punsubscribe"
                    | b"sunsubscribe"
            )
        );
        let confirmation =
            is_pubsub_kind && first.as_deref().is_some_and(|f| f.ends_with(b"subscribe"));
        if conn.pending.front().is_some_and(|p| p.refusable)
            && !conn.monitor
            && conn.replies_to_pass == 0
            && reply.kind != ReplyKind::Push
            && !reply.is_error()
            && (confirmation || !is_pubsub_kind)
        {
            // A reply in order (no message, no push) that is no refusal: the CLIENT REPLY
            // OFF/SKIP at the head took effect, and what it silenced ran before this reply was
            // sent, a HELLO's protocol change included, which decides how to read it (QA: the
            // RESP2 confirmations of a SUBSCRIBE after a silenced HELLO 2 taken for replies).
            self.settle_refusable(conn, Some(reply), out);
        }
        // In RESP3 every pub/sub frame is a push: an array there is some command's reply (an
        // LRANGE of a list that begins with "message" is not a message).
        let frame =
            reply.kind == ReplyKind::Push || (reply.kind == ReplyKind::Array && !conn.resp3);
        if confirmation && frame {
            let kind = first.as_deref().unwrap_or_default();
            while self.settle_refused_reply_on(conn, reply, out) {}
            if let Some(at) = confirmation_target(conn, kind, Some(&reply.text)) {
                // In RESP2, before the connection is subscribed, any command may answer with an
                // array like this (a script's): if the silenced command it seems to confirm
                // failed, it is a later command's reply. The replies after it are uncertain then,
                // until the client has had all of them (as after EXEC with pub/sub in it).
                // (An UNSUBSCRIBE is refused no channel: only a subscribe can have failed.)
                let ambiguous = reply.kind == ReplyKind::Array
                    && !conn.pubsub.subscribed()
                    && !kind.ends_with(b"unsubscribe")
                    && conn.pending.get(at).is_some_and(|p| !p.expects_reply)
                    && conn
                        .pending
                        .iter()
                        .skip(at + 1)
                        .find(|p| p.expects_reply)
                        .is_some_and(may_answer_with_any_array);
                // Everything before it was silent: CLIENT REPLY OFF/SKIP that took effect (a
                // refusal would have come first), commands they silenced, and silenced
                // subscribe-family commands that got no confirmation (they failed).
                for p in conn.pending.iter_mut().take(at) {
                    if p.refusable {
                        settle_as_run(p);
                    }
                    p.awaiting = false;
                }
                self.drain_unreplied(conn, out);
                if ambiguous && let Some(head) = conn.pending.front_mut() {
                    // (Its own outcome is as uncertain.)
                    head.after_gap = true;
                }
                self.confirm_head(conn, kind, reply, out);
                if ambiguous {
                    doubt_replies(conn, REPLY_UNCERTAIN_PUBSUB);
                }
                return;
            }
            if reply.kind == ReplyKind::Push || conn.pubsub.subscribed() {
                // A confirmation no command in the FIFO waits for (a connection open at attach).
                note_confirmation(conn, kind, reply.third_int);
                return;
            }
            // Not subscribed and nothing to confirm: some command's array reply.
        } else if frame
            && (reply.kind == ReplyKind::Push || (is_pubsub_kind && conn.pubsub.subscribed()))
        {
            // A message, or another push (RESP3 invalidations): out of band.
            return;
        } else if frame && is_pubsub_kind && !conn.pubsub.known {
            // A RESP2 connection open at attach, subscribed or not, unseen: a message, or the
            // reply of a command that may answer with any array (QA: a message to a connection
            // subscribed before attach was taken for FLUSHALL's reply, and every result after it
            // went one command late, the refused FLUSHALL written SUCCESS). With nothing pending
            // it is a message (not a lost command's reply, to be counted).
            if conn
                .pending
                .front()
                .is_none_or(|head| !may_answer_with_any_array(head))
            {
                conn.pubsub.last_subscribed = true;
                return;
            }
            doubt_replies(conn, REPLY_UNCERTAIN_SUBSCRIBED_AT_ATTACH);
        }
        if !conn.pubsub.known && reply.is_error() && is_subscribed_context_refusal(&reply.text) {
            // Only a RESP2 connection in the subscribed context is refused so.
            conn.pubsub.last_subscribed = true;
        }
        if conn.monitor
            && reply.kind == ReplyKind::Simple
            && reply.text.first().is_some_and(u8::is_ascii_digit)
        {
            return;
        }
        if conn.replies_to_pass > 0 {
            conn.replies_to_pass -= 1;
            return;
        }
        if reply.is_error()
            && reply.text.starts_with(b"ERR Protocol error")
            && conn.pending.front().is_none_or(|p| {
                !matches!(p.effect, Effect::ProtocolError)
                    // Only the server says this, before running anything: a script or a
                    // module's command may return any text, and must not hide what follows.
                    && matches!(p.record.command, std::borrow::Cow::Borrowed(_))
                    && !runs_a_script(&p.record.command)
            })
        {
            // The server refused bytes this parser took for a request, or that it has not
            // finished yet, by limits the parser does not know (an unauthenticated client's 10
            // arguments and 16 KiB bulks, `proto-max-bulk-len`): it closes the connection
            // having run nothing from there on. The refused bytes become the protocol error
            // at the head, which the reply completes below as any other.
            self.drop_never_read(conn);
            let text = String::from_utf8_lossy(&reply.text);
            let reason = text
                .strip_prefix("ERR Protocol error: ")
                .unwrap_or("protocol error")
                .to_string();
            self.on_protocol_error(conn, &reason, reply.start_ts, out);
        }
        if conn.pending.front().is_some_and(|p| p.refusable)
            && self.settle_refusable(conn, Some(reply), out)
        {
            return;
        }
        // (Checked here first: the common head has nothing to settle.)
        while conn.pending.front().is_some_and(|p| {
            (p.awaiting && !p.expects_reply) || (p.sent_replies_off && p.expects_reply)
        }) && self.settle_silent_head(conn, reply, out)
        {}

        if conn.pending.is_empty() {
            if conn.reads == 0
                && !conn.preexisting
                && reply.is_error()
                && reply.text.starts_with(b"ERR max number of clients reached")
            {
                // The server turned the connection away at `maxclients` (it writes this and
                // closes without reading): the accepted connection's record said SUCCESS, so
                // this says it was refused.
                let mut rec = self.connection_record(
                    conn,
                    b"connection",
                    b"type=normal refused=maxclients",
                    reply.start_ts,
                );
                rec.result = Outcome::Failure;
                rec.error = reply.text.to_vec();
                self.push(rec, reply.start_ts, out);
                return;
            }
            // (A connection open at attach gets the replies to what it sent before attach first.)
            if !conn.preexisting || conn.answered_since_attach {
                self.stats.replies_unmatched += 1;
                if !conn.uncertain_not_from_gap {
                    if conn.replies_for_written > 0 {
                        // A command written unknown at a reply gap got its reply after all.
                        conn.replies_for_written -= 1;
                    } else if conn.guesses_owed > 0 {
                        // A counted guess was a real command after all: counted once.
                        conn.guesses_owed -= 1;
                    } else if conn.uncertain_since.is_some() || conn.request_gap_seen {
                        // The command it answers was in the capture gap: it ran, unseen.
                        conn.lost_commands += 1;
                    } else {
                        // Perhaps in a gap the next read shows.
                        conn.replies_before_gap += 1;
                    }
                }
            } else if conn.preexisting && conn.reads > 0 && conn.requests.resyncing() {
                // Of a connection caught mid-command at attach, the parser has not framed what
                // was read since: the reply answers a command those bytes held, which ran unseen
                // (before any read, it answers one sent before attach).
                self.stats.replies_unmatched += 1;
                conn.lost_commands += 1;
            }
            return;
        }
        conn.answered_since_attach = true;
        // The server refused bytes the client sent and closes the connection: it never reads
        // what came after them, so the requests parsed from there were never run.
        // (`Some(quit)`: the server closes after this reply.)
        let closes = conn.pending.front().and_then(|p| match p.effect {
            Effect::ProtocolError
                if reply.is_error() && reply.text.starts_with(b"ERR Protocol error") =>
            {
                Some(false)
            }
            Effect::Quit if !reply.is_error() => Some(true),
            _ => None,
        });
        self.finish_front(conn, reply, out);
        if let Some(quit) = closes {
            self.drop_never_read(conn);
            if quit {
                // QUIT inside MULTI: the queued commands will never run.
                for q in std::mem::take(&mut conn.queued) {
                    self.finish_discarded(conn, q, b"discarded by QUIT", out);
                }
                conn.in_multi = false;
            }
        }
        self.drain_unreplied(conn, out);
    }

    /// Past `MAX_HELD_BYTES`: write the oldest commands awaiting replies as UNKNOWN now, and keep
    /// each in the FIFO as a stub holding no heap (`WRITTEN_EARLY`), whose reply, when it comes,
    /// is paired and applied (MULTI, AUTH, SUBSCRIBE change the connection) but writes nothing,
    /// until `cost` more bytes fit in three quarters of the bound.
    fn write_oldest_early(
        &mut self,
        conn: &mut Conn,
        cost: usize,
        limit: usize,
        out: &mut impl RecordOut,
    ) {
        for p in conn.pending.iter_mut() {
            if conn.held_bytes.saturating_add(cost) <= limit {
                break;
            }
            if p.record.seq == WRITTEN_EARLY {
                continue;
            }
            let freed = p.heap_bytes();
            set_user(&mut p.record, &conn.username);
            p.record.time_unix_us = self.wall_us(p.done_ts);
            p.record.result = Outcome::Unknown;
            p.record.error = b"too many requests awaiting replies".to_vec();
            self.push_with(&p.settings, &mut p.record, out);
            p.record.seq = WRITTEN_EARLY;
            p.record.command_args = Vec::new();
            p.record.keys = KeyList::new();
            p.record.error = Vec::new();
            p.secrets = None;
            conn.held_bytes = conn.held_bytes.saturating_sub(freed);
        }
        // Stubs still hold their entries: past the bound, the oldest go too (their replies are
        // passed over as they come, as past `MAX_PENDING`).
        while conn.held_bytes.saturating_add(cost) > limit
            && conn
                .pending
                .front()
                .is_some_and(|p| p.record.seq == WRITTEN_EARLY)
        {
            let stub = conn.pending.pop_front().expect("front exists");
            if stub.expects_reply {
                conn.replies_to_pass += 1;
            }
            forget_user_if_auth(conn, &stub.effect);
            conn.held_bytes = conn.held_bytes.saturating_sub(ENTRY_BYTES);
        }
        // The FIFO's own room is memory too (a VecDeque never shrinks by itself).
        if conn.pending.capacity() > 4 * conn.pending.len() + 1024 {
            conn.pending.shrink_to(2 * conn.pending.len() + 1024);
        }
    }

    /// Past `GLOBAL_HELD_BYTES`: `conn`, adding a command, writes the older half of what it holds
    /// early if that is over `SHED_FLOOR`. Its own count is made exact first: it may be stale
    /// high, and an ordinary client must not shed for it.
    fn shed_for_global_bound(&mut self, conn: &mut Conn, cost: usize, out: &mut impl RecordOut) {
        let counted = conn.held_bytes;
        conn.held_bytes = conn.pending.iter().map(Pending::held).sum();
        let exact = conn.held_bytes;
        if exact > SHED_FLOOR {
            self.write_oldest_early(conn, cost, exact / 2, out);
        }
        self.held_total = self
            .held_total
            .saturating_sub(counted - conn.held_bytes.min(counted));
    }

    /// Whether all connections together hold more than `GLOBAL_HELD_BYTES` with `cost` more for
    /// `current` (taken out of the map while it is handled). The running total only grows between
    /// exact counts (replies do not lower it), so it is an upper bound: under the bound, nothing
    /// is counted. Past it, an exact count decides, and its verdict holds until the total has
    /// grown by 1/64 of the bound, so idle connections holding nearly the bound cannot make every
    /// command recount; the bound is then exceeded by that much at most. (The verdict of a stale
    /// total alone shed ordinary clients long after the replies had freed everything: QA.)
    fn over_global_bound(&mut self, current: &mut Conn, cost: usize) -> bool {
        if self.held_total + cost <= GLOBAL_HELD_BYTES {
            return false;
        }
        if self.held_total + cost <= self.recount_at {
            return self.global_over;
        }
        let mut total = exact_held(current);
        for c in self.conns.values_mut() {
            total += exact_held(c);
        }
        self.held_total = total;
        self.recount_at = GLOBAL_HELD_BYTES.max(total + GLOBAL_HELD_BYTES / 64);
        self.global_over = total + cost > GLOBAL_HELD_BYTES;
        self.global_over
    }

    /// Past `MAX_PENDING`: write the oldest command awaiting its reply as UNKNOWN and drop it
    /// (its reply, when it comes, is passed over).
    fn write_oldest_unknown(&mut self, conn: &mut Conn, out: &mut impl RecordOut) {
        while conn.pending.len() >= MAX_PENDING {
            let Some(old) = conn.pending.pop_front() else {
                break;
            };
            let ts = old.done_ts;
            if old.expects_reply {
                // Its reply still comes, first: it must not be taken for the next command's.
                conn.replies_to_pass += 1;
            }
            self.finish_unknown(conn, old, "too many requests awaiting replies", ts, out);
        }
    }

    /// Valkey answers everything it read before it reads the client again. A request parsed after
    /// a request-side gap that had no reply by the next read was most likely no command: bytes of
    /// a value that looked like one (the resync takes `*<n>\r\n$` at any line start, and a value
    /// may hold RESP text). Its record would name a command nobody sent, so it is counted in a
    /// loss record instead, where a real one (its reply held up by a slow reader) is not hidden
    /// either. Blocking commands answer later, and without replies on nothing can be judged.
    /// Returns how many were dropped.
    fn drop_unanswered_guesses(
        &mut self,
        conn: &mut Conn,
        ts_ns: u64,
        out: &mut impl RecordOut,
    ) -> u64 {
        if conn.reply_mode != ReplyMode::On || conn.pubsub.subscribed() || conn.monitor {
            return 0;
        }
        // A client blocked by a command still unanswered (BLPOP ...) is read but not served: the
        // commands behind it get no reply until it is unblocked, guesses or not (QA: 97% of a
        // blocked client's pipelined SETs were counted as guesses and not written).
        if conn
            .pending
            .iter()
            .any(|p| p.expects_reply && may_block(&p.record.command))
        {
            return 0;
        }
        let reads = conn.reads;
        let before = conn.pending.len();
        conn.pending.retain(|p| {
            !(p.after_gap
                && p.expects_reply
                && p.read < reads
                && !matches!(p.effect, Effect::ProtocolError)
                && !may_block(&p.record.command))
        });
        let dropped = (before - conn.pending.len()) as u64;
        if dropped > 0 {
            self.stats.guesses_dropped += dropped;
            conn.guesses_owed += dropped;
            let rec = self.loss_record(
                conn,
                LossCause::RequestResync,
                "requests guessed after a gap got no reply",
                dropped,
                0,
                ts_ns,
            );
            self.push(rec, ts_ns, out);
        }
        dropped
    }

    /// The commands a request-side gap held, known by their replies (`Conn::lost_commands`).
    fn report_lost_commands(&mut self, conn: &mut Conn, ts_ns: u64, out: &mut impl RecordOut) {
        if conn.lost_commands == 0 {
            return;
        }
        let count = std::mem::take(&mut conn.lost_commands);
        self.stats.commands_not_captured += count;
        let rec = self.loss_record(
            conn,
            LossCause::CommandsNotCaptured,
            "replies to commands in a capture gap",
            count,
            0,
            ts_ns,
        );
        self.push(rec, ts_ns, out);
    }

    /// The server refused the client's bytes and closes the connection without reading on: the
    /// requests parsed after them (all that is pending now) were never run and get no record.
    fn drop_never_read(&mut self, conn: &mut Conn) {
        for p in conn.pending.drain(..) {
            if matches!(p.effect, Effect::ProtocolError) {
                self.stats.protocol_errors_never_read += 1;
            } else {
                self.stats.requests_never_read += 1;
            }
        }
    }

    /// Settle the CLIENT REPLY OFF/SKIP commands at the head of the FIFO, given the next reply
    /// (`None`: the client was read again first, so nothing refused them). A refusal is that
    /// command's reply: it is written with it, and the commands after it, which it would have
    /// silenced, expect their replies again. Anything else means it took effect: it is written
    /// without a reply and the reply goes on to the next command. Returns whether `reply` was
    /// taken.
    fn settle_refusable(
        &mut self,
        conn: &mut Conn,
        reply: Option<&Reply>,
        out: &mut impl RecordOut,
    ) -> bool {
        while !conn.pending.is_empty() {
            let later_login =
                reply.is_some_and(|r| r.is_error() && denial_of_a_later_login(conn, &r.text));
            let head = conn.pending.front_mut().expect("not empty");
            if !head.refusable {
                return false;
            }
            // Most likely the error of an option before ACK, but the command after it may have
            // failed alike (an unknown node): taken for the REPLCONF's, and then its result and
            // those of the commands after it, until the client has had every reply, are
            // written unknown, never another command's.
            let option_error = reply.is_some_and(|reply| {
                reply.is_error()
                    && matches!(head.effect, Effect::OffsetReport(true))
                    && is_replconf_option_error(&reply.text)
            });
            // (An ACL denial names the user: one naming another than the head ran as is a later
            // command's, run after a silenced AUTH. QA: a SKIP of `default` took the denial of
            // bob's SKIP after `AUTH bob` for its own, and bob's login was written a failure.)
            if let Some(reply) = reply
                && reply.is_error()
                && (option_error
                    || (is_refusal_of(&head.record.command, &reply.text)
                        // (Only a RESP2 connection is refused for its subscribed context: QA
                        // found a later SKIP's such refusal taken for a RESP3 one's.)
                        && !(conn.resp3 && is_subscribed_context_refusal(&reply.text))
                        && !later_login))
            {
                if option_error {
                    doubt_replies(conn, REPLY_UNCERTAIN_REPLCONF_OPTION);
                }
                // It changed nothing: replies stayed on. What the commands after it expect is
                // worked out again from there, mode changes among them included (a SKIP after a
                // refused OFF is a SKIP with replies on: refusable, and the next command silent).
                reexpect_after_head(conn, ReplyMode::On);
                self.finish_front(conn, reply, out);
                self.drain_unreplied(conn, out);
                return true;
            }
            if let Some(reply) = reply
                && matches!(head.effect, Effect::OffsetReport(_))
                && is_queued(reply)
            {
                // Inside MULTI: queued, and this is its reply.
                head.refusable = false;
                head.expects_reply = true;
                return false;
            }
            // It took effect: an unanswered command like those it silenced.
            settle_as_run(head);
            self.drain_unreplied(conn, out);
        }
        false
    }

    /// Before a reply that is not a pub/sub frame: commands at the head that it shows got no
    /// reply are written. Returns whether one was.
    fn settle_silent_head(
        &mut self,
        conn: &mut Conn,
        reply: &Reply,
        out: &mut impl RecordOut,
    ) -> bool {
        let Some(head) = conn.pending.front() else {
            return false;
        };
        if head.awaiting && !head.expects_reply {
            // A reply to a later command: the silenced subscribe-family commands before it got
            // no confirmation, and will not (they failed, their errors silenced).
            for p in conn.pending.iter_mut() {
                if p.expects_reply {
                    break;
                }
                p.awaiting = false;
            }
            self.drain_unreplied(conn, out);
            return true;
        }
        self.settle_refused_reply_on(conn, reply, out)
    }

    /// A CLIENT REPLY ON at the head, sent with replies off, refused without a word (replies
    /// were off), so replies stay off for the commands after it: on a RESP2 connection subscribed
    /// by then (Valkey refuses every command but (P|S)(UN)SUBSCRIBE, PING, QUIT and RESET in that
    /// context), or when the reply at hand is not its +OK (QA: an ACL-refused ON took an
    /// UNSUBSCRIBE's confirmation for its +OK, and every reply after went one command early, a
    /// wrong AUTH written SUCCESS). Returns whether there was one.
    fn settle_refused_reply_on(
        &mut self,
        conn: &mut Conn,
        reply: &Reply,
        out: &mut impl RecordOut,
    ) -> bool {
        let refused = conn.pending.front().is_some_and(|head| {
            head.mode_change == ModeChange::On && head.sent_replies_off && head.expects_reply
        }) && ((!conn.resp3 && conn.pubsub.subscribed())
            || !(reply.kind == ReplyKind::Simple && reply.text == b"OK"));
        if refused {
            if let Some(head) = conn.pending.front_mut() {
                head.expects_reply = false;
            }
            reexpect_after_head(conn, ReplyMode::Off);
            self.drain_unreplied(conn, out);
        }
        refused
    }

    /// A confirmation for the subscribe-family command at the head: complete once all came.
    fn confirm_head(
        &mut self,
        conn: &mut Conn,
        kind: &[u8],
        reply: &Reply,
        out: &mut impl RecordOut,
    ) {
        note_confirmation(conn, kind, reply.third_int);
        let Some(head) = conn.pending.front_mut() else {
            return;
        };
        head.confirmations += 1;
        let done = match head.effect {
            Effect::Subscribe(_, 0, _) if conn.pubsub.known => conn.pubsub.of_kind(kind) == 0,
            Effect::Subscribe(_, n, _) => head.confirmations >= u64::from(n.max(1)),
            _ => true,
        };
        if done {
            head.awaiting = false;
            self.finish_front(conn, reply, out);
            self.drain_unreplied(conn, out);
        }
    }

    /// Requests that get no reply (CLIENT REPLY OFF/SKIP) are written once everything before them is.
    fn drain_unreplied(&mut self, conn: &mut Conn, out: &mut impl RecordOut) {
        while conn
            .pending
            .front()
            .is_some_and(|p| !p.expects_reply && !p.refusable && !p.awaiting)
        {
            let p = conn.pending.pop_front().expect("front exists");
            // A silenced HELLO still ran: the replies after it come in its protocol (QA: HELLO 2
            // behind a SKIP on a RESP3 connection, the RESP2 confirmations of a SUBSCRIBE after
            // it taken for replies, a wrong AUTH written SUCCESS). With AUTH it may have failed.
            match p.effect {
                // (A HELLO 4 is refused: NOPROTO.)
                Effect::Hello(Some(v @ (2 | 3))) => conn.resp3 = v == 3,
                Effect::HelloAuth(Some(v @ (2 | 3)), _) if conn.resp3 != (v == 3) => {
                    // Taken for worked (the user is unknown); where pub/sub frames may come,
                    // whose form it decides, the replies till the client has had them all are
                    // unknown.
                    conn.resp3 = v == 3;
                    if conn.pubsub.subscribed()
                        || conn
                            .pending
                            .iter()
                            .any(|p| matches!(p.effect, Effect::Subscribe(..)))
                    {
                        doubt_replies(conn, REPLY_UNCERTAIN_HELLO);
                    }
                }
                // A silenced MULTI ran too (QA: behind a SKIP, the +QUEUED of the commands after
                // it were taken for their results, a queued wrong AUTH for a login).
                Effect::Multi if !conn.in_multi => {
                    conn.multi_known = true;
                    self.apply_effect(conn, &p.effect);
                }
                // A silenced EXEC or DISCARD ended the transaction: what it ran, if anything,
                // is not known.
                Effect::Exec if conn.in_multi => {
                    self.end_transaction_unseen(
                        conn,
                        false,
                        "reply unknown (EXEC silenced)",
                        p.done_ts,
                        out,
                    );
                }
                Effect::Discard if conn.in_multi => {
                    self.end_transaction_unseen(conn, true, "discarded", p.done_ts, out);
                }
                _ => {}
            }
            if p.ran_silently && p.settings.ignore_internal_clients {
                // A REPLCONF ACK that ran: nothing a client's audit shows. (One silenced by
                // CLIENT REPLY may have been refused unseen: written, its outcome unknown.)
                continue;
            }
            let done = p.done_ts;
            let reset = matches!(p.effect, Effect::Reset);
            // (An AUTH silenced by CLIENT REPLY OFF/SKIP may have worked: `finish_unknown`
            // leaves the user unknown.)
            self.finish_unknown(conn, p, "", done, out);
            if reset {
                // A RESET a SKIP silenced still ran: it cannot fail.
                reset_connection(conn);
            }
        }
    }

    /// The reply `reply` answers the head of the FIFO: complete its record. The common case (no
    /// MULTI, no EXEC or DISCARD) completes the record in its slot, hands it to `out` from there
    /// and drops it in place; the rest goes to `finish_general`.
    #[inline]
    fn finish_front(&mut self, conn: &mut Conn, reply: &Reply, out: &mut impl RecordOut) {
        // A +QUEUED on a connection open at attach: inside a MULTI begun before attach, unless a
        // script's or an unknown command's, which may be its own status.
        let attach_queued = conn.preexisting && !conn.multi_known && is_queued(reply);
        let general = conn.in_multi
            || conn.pending.front().is_some_and(|p| {
                matches!(
                    p.effect,
                    Effect::Exec
                        | Effect::Discard
                        | Effect::Sync
                        | Effect::Handshake
                        | Effect::SlotImport
                )
            })
            || (attach_queued && conn.pending.front().is_some_and(|p| !returns_any_status(p)));
        if general {
            if let Some(p) = conn.pending.pop_front() {
                self.finish_general(conn, p, reply, out);
            }
            return;
        }
        // Out of `conn` while its head is completed (that may change the connection's state).
        let mut pending = std::mem::take(&mut conn.pending);
        if let Some(p) = pending.front_mut() {
            self.complete(conn, p, reply);
            if attach_queued {
                // A script's (or a module command's): its own status, or queued in a MULTI
                // begun before attach, whose EXEC or DISCARD will say what became of it (QA:
                // written SUCCESS, it had failed).
                p.record.result = Outcome::Unknown;
                p.record.error = REPLY_UNCERTAIN_ATTACH.as_bytes().to_vec();
            }
            self.push_with(&p.settings, &mut p.record, out);
            pending.drain(..1);
        }
        conn.pending = pending;
    }

    /// Fill in what the reply tells about `p`'s command and apply its effect on the connection.
    #[inline]
    fn complete(&mut self, conn: &mut Conn, p: &mut Pending, reply: &Reply) {
        p.record.time_unix_us = self.wall_us(reply.start_ts);
        p.record.duration_us = reply.start_ts.saturating_sub(p.done_ts) / 1000;
        // The user the command ran as: every earlier command on the connection (a pipelined AUTH
        // included) has completed by now, and this one's own effect is applied only below. So
        // has a pipelined CONFIG SET port: the server it ran on is the one known now.
        set_user(&mut p.record, &conn.username);
        set_server(&mut p.record, &conn.server);
        if !reply.is_error() {
            p.record.result = Outcome::Success;
            p.record.keys_modified = keys_changed(p.write_keys, p.change_reply, reply);
            if !p.after_gap {
                show_on_success(p);
            }
            self.apply_effect(conn, &p.effect);
            if matches!(p.effect, Effect::WhoAmI)
                && !p.after_gap
                && !conn.reply_doubt
                && let Some(user) = whoami_user(reply)
            {
                conn.username = Arc::from(user);
                set_user(&mut p.record, &conn.username);
            }
        } else if !p.after_gap {
            p.record.result = Outcome::Failure;
            fill_refusal(p, &reply.text, p.arity_ok);
            if usize::try_from(reply.len).is_ok_and(|n| n > reply.text.len()) {
                // Only the first 512 bytes of an error are kept: say that there was more.
                p.record.error.extend_from_slice(b"...");
            }
        }
        if p.after_gap {
            // The connection's state follows the reply (the best guess there is), but the record
            // claims no outcome it cannot know; nor is a user guessed from a reply that may be
            // another command's.
            p.record.result = Outcome::Unknown;
            p.record.error = if conn.uncertain_not_from_gap {
                conn.uncertain_why
            } else {
                REPLY_UNCERTAIN
            }
            .as_bytes()
            .to_vec();
            p.record.keys_modified = 0;
            forget_user_if_auth(conn, &p.effect);
        }
    }

    /// `finish` for every case, MULTI/EXEC/DISCARD included.
    #[inline(never)]
    /// A REPLCONF's (held) or a SYNC/PSYNC's reply. The server accepting a SYNC/PSYNC makes the
    /// link a replica's: from there on it sends the replication stream, never parsed as replies,
    /// and what the link held is dropped while internal clients are ignored.
    fn finish_replication(
        &mut self,
        conn: &mut Conn,
        mut p: Pending,
        reply: &Reply,
        out: &mut impl RecordOut,
    ) {
        self.complete(conn, &mut p, reply);
        // A command other than a replica's pipelined after it: no handshake, written in order.
        let handshake = !conn
            .pending
            .iter()
            .any(|q| !matches!(q.effect, Effect::Handshake | Effect::Sync));
        let hold = handshake && !reply.is_error();
        // A dual-channel replica's PSYNC: the server will sync it on another link, and this one
        // sends PSYNC again once it has (`syncCommand` writes +DUALCHANNELSYNC and returns):
        // a step of the handshake, not the acceptance.
        let dual_channel_step =
            matches!(p.effect, Effect::Sync) && reply.text == b"DUALCHANNELSYNC";
        if (matches!(p.effect, Effect::Handshake)
            || (dual_channel_step && p.settings.ignore_internal_clients))
            && hold
        {
            if conn.held.len() >= MAX_HELD_HANDSHAKE {
                // More than a replica sends: bounded memory, written all the same.
                self.release_held(conn, out);
            }
            if conn.held.is_empty() {
                conn.held_since = p.done_ts;
            }
            conn.held.push((p.settings, p.record));
            return;
        }
        if reply.is_error() || matches!(p.effect, Effect::Handshake) || dual_channel_step {
            self.release_held(conn, out);
            self.push_with(&p.settings, &mut p.record, out);
            return;
        }
        if matches!(p.effect, Effect::SlotImport) {
            // The keys it streams are the other node's, not a client's (QA: every migrated key
            // was written as a SET by `default`, some with another command's reply). Anything
            // else is written (QA: any client could run CONFIG SET and ACL SETUSER unseen after
            // an ESTABLISH the server accepted).
            conn.slot_import = true;
            for q in std::mem::take(&mut conn.pending) {
                if !is_migration_stream(&q.record.command, q.write_keys) {
                    let ts = q.done_ts;
                    self.finish_unknown(conn, q, NO_REPLY_SLOT_MIGRATION_LINK, ts, out);
                }
            }
            return;
        }
        self.become_replica(conn, out);
        if p.settings.ignore_internal_clients {
            // The handshake is the replica's; what else the link sends is written (`on_described`).
            conn.held.clear();
        } else {
            self.release_held(conn, out);
            self.push_with(&p.settings, &mut p.record, out);
        }
    }

    /// Whether this write of the server begins its acceptance of the SYNC/PSYNC at the head: a
    /// `+FULLRESYNC`/`+CONTINUE` line or a dataset's `$` (an error begins with `-`).
    fn sync_accepted_by(&self, conn: &Conn, pieces: &Pieces) -> bool {
        !conn.in_multi
            && conn
                .pending
                .front()
                .is_some_and(|p| matches!(p.effect, Effect::Sync))
            && conn.replies.idle()
            && pieces.one.is_some_and(|(pos, bytes)| {
                pos == conn.out_expected
                    && matches!(bytes.first(), Some(b'+' | b'$'))
                    && !bytes.starts_with(b"+DUALCHANNELSYNC\r")
            })
    }

    /// The server accepted a SYNC/PSYNC: what it sends from here on is the replication stream.
    /// Commands pipelined after it get no reply the auditor can read.
    fn become_replica(&mut self, conn: &mut Conn, out: &mut impl RecordOut) {
        conn.replica = true;
        for p in std::mem::take(&mut conn.pending) {
            let ts = p.done_ts;
            self.finish_unknown(conn, p, "", ts, out);
        }
    }

    /// Write the records a possible replica handshake held (`Conn::held`), in order.
    fn release_held(&mut self, conn: &mut Conn, out: &mut impl RecordOut) {
        for (settings, mut record) in std::mem::take(&mut conn.held) {
            self.push_with(&settings, &mut record, out);
        }
    }

    fn finish_general(
        &mut self,
        conn: &mut Conn,
        mut p: Pending,
        reply: &Reply,
        out: &mut impl RecordOut,
    ) {
        let failed = reply.is_error();
        if !conn.in_multi
            && matches!(
                p.effect,
                Effect::Sync | Effect::Handshake | Effect::SlotImport
            )
        {
            self.finish_replication(conn, p, reply, out);
            return;
        }
        if matches!(
            p.effect,
            Effect::Multi | Effect::Exec | Effect::Discard | Effect::Reset
        ) {
            conn.multi_known = true;
        }
        let queued_reply = is_queued(reply);
        if queued_reply
            && !conn.in_multi
            && conn.preexisting
            && !conn.multi_known
            && !returns_any_status(&p)
        {
            // Open before attach and inside MULTI already: this command was queued.
            conn.in_multi = true;
            conn.multi_known = true;
            conn.multi_before_attach = true;
        }
        // Inside MULTI a +QUEUED answer only means "accepted for later".
        if conn.in_multi && queued_reply {
            p.record.time_unix_us = self.wall_us(reply.start_ts);
            p.record.duration_us = reply.start_ts.saturating_sub(p.done_ts) / 1000;
            let cost = p.held();
            if conn.queued.is_empty() {
                conn.queued_bytes = 0;
            }
            // Once one is written so, so are the rest: EXEC's elements are paired with the
            // queue in order.
            if conn.queued_untracked > 0
                || conn.queued.len() >= MAX_PENDING
                || conn.queued_bytes + cost > MAX_HELD_BYTES
                || (conn.queued_bytes + cost > SHED_FLOOR && self.over_global_bound(conn, cost))
            {
                // Memory per connection stays bounded: past this, queued commands are written
                // now, their outcome untold.
                conn.queued_untracked += 1;
                // (Whether an AUTH will succeed at EXEC is not known either.)
                let ts = reply.start_ts;
                self.finish_unknown(conn, p, QUEUE_FULL, ts, out);
            } else {
                conn.queued_bytes += cost;
                self.held_total += cost;
                conn.queued.push(p);
            }
            return;
        }
        // RESET inside MULTI discards the transaction as DISCARD does (and its effect clears the
        // queue, so the queued commands are taken first).
        let ends_multi = match p.effect {
            Effect::Exec | Effect::Discard => true,
            Effect::Reset => !failed,
            _ => false,
        };
        let (queued, untracked) = if ends_multi {
            (
                std::mem::take(&mut conn.queued),
                std::mem::take(&mut conn.queued_untracked),
            )
        } else {
            (Vec::new(), 0)
        };
        // The user the transaction was queued as: RESET changes it before its queue is written.
        let queued_as = conn.username.clone();
        self.complete(conn, &mut p, reply);
        if ends_multi {
            conn.in_multi = false;
            let mut total_modified = 0;
            let before_attach = std::mem::take(&mut conn.multi_before_attach);
            let seen = queued.len() as u64 + untracked;
            let exec_ran = matches!(p.effect, Effect::Exec)
                && !failed
                && reply.kind == ReplyKind::Array
                && reply.len >= 0;
            let exec_ok =
                exec_ran && (reply.elements == seen || (before_attach && reply.elements > seen));
            // EXEC ran, but not the queue seen: commands were queued in a capture gap (or those
            // seen were not all queued). Which result is whose cannot be told; nothing was
            // aborted, which only a null reply says.
            let count_mismatch = exec_ran && !exec_ok;
            // From which command on EXEC's elements say nothing sure, and why.
            // (Messages and other pushes to a subscribed RESP3 connection, its own PUBLISH and
            // keyspace events inside the transaction included, come after EXEC's reply: QA
            // found every result of such a client's transactions written unknown for nothing.)
            let pubsub_from = queued
                .iter()
                .position(|q| matches!(q.effect, Effect::Subscribe(..) | Effect::OffsetReport(_)));
            let pubsub_why = match pubsub_from.and_then(|i| queued.get(i)) {
                Some(q) if matches!(q.effect, Effect::OffsetReport(_)) => REPLY_UNCERTAIN_REPLCONF,
                _ => REPLY_UNCERTAIN_PUBSUB,
            };
            let errors_from =
                (reply.element_errors.len() >= crate::resp::MAX_ELEMENT_ERRORS).then(|| {
                    reply
                        .element_errors
                        .last()
                        .map_or(0, |(i, _)| *i as usize + 1)
                });
            let uncertain = match (pubsub_from, errors_from) {
                _ if before_attach => Some((0, REPLY_UNCERTAIN_ATTACH)),
                (Some(a), Some(b)) if b < a => Some((b, REPLY_UNCERTAIN_ERRORS)),
                (Some(a), _) => Some((a, pubsub_why)),
                (None, Some(b)) => Some((b, REPLY_UNCERTAIN_ERRORS)),
                (None, None) => None,
            };
            if exec_ok && pubsub_from.is_some() {
                // The replies after EXEC's may be its leftovers: what is pending now, and what
                // is read before the client has had every reply, is written as unknown.
                doubt_replies(conn, pubsub_why);
            }
            for (i, mut q) in queued.into_iter().enumerate() {
                if matches!(p.effect, Effect::Reset) {
                    set_user(&mut q.record, &queued_as);
                } else {
                    set_user(&mut q.record, &conn.username);
                }
                // Results that cannot be told: past what EXEC's reply says surely, or all of
                // them when its count is not the queue's.
                let unsure = if count_mismatch {
                    Some(REPLY_UNCERTAIN)
                } else {
                    uncertain
                        .filter(|&(from, _)| exec_ok && i >= from)
                        .map(|(_, why)| why)
                };
                if let Some(why) = unsure {
                    q.record.time_unix_us = p.record.time_unix_us;
                    q.record.result = Outcome::Unknown;
                    q.record.error = why.as_bytes().to_vec();
                    forget_user_if_auth(conn, &q.effect);
                    if matches!(q.effect, Effect::Subscribe(..)) {
                        // (Its confirmations were EXEC's elements, unread.)
                        conn.pubsub = PubsubCounts {
                            last_subscribed: true,
                            ..PubsubCounts::UNKNOWN
                        };
                    }
                } else if exec_ok {
                    q.record.time_unix_us = p.record.time_unix_us;
                    if let Some((_, text)) = reply
                        .element_errors
                        .iter()
                        .find(|(idx, _)| *idx as usize == i)
                    {
                        q.record.result = Outcome::Failure;
                        // (Queued, so it passed the arity check.)
                        fill_refusal(&mut q, text, true);
                    } else {
                        q.record.result = Outcome::Success;
                        show_on_success(&mut q);
                        q.record.keys_modified = q.write_keys;
                        total_modified += q.write_keys;
                        // State changes queued in MULTI (e.g. AUTH) take effect at EXEC.
                        self.apply_effect(conn, &q.effect);
                    }
                } else {
                    q.record.result = Outcome::Failure;
                    q.record.error = if matches!(p.effect, Effect::Discard) {
                        b"discarded".to_vec()
                    } else if matches!(p.effect, Effect::Reset) {
                        b"discarded by RESET".to_vec()
                    } else if failed {
                        b"not executed: transaction aborted".to_vec()
                    } else {
                        b"not executed: WATCHed key changed".to_vec()
                    };
                }
                self.push_with(&q.settings, &mut q.record, out);
            }
            if exec_ok {
                p.record.keys_modified = total_modified;
            }
        }
        self.push_with(&p.settings, &mut p.record, out);
    }

    fn apply_effect(&mut self, conn: &mut Conn, effect: &Effect) {
        match effect {
            Effect::None
            | Effect::Exec
            | Effect::Discard
            | Effect::ProtocolError
            | Effect::Quit
            | Effect::WhoAmI => {}
            Effect::Auth(user) => conn.username = Arc::from(user.as_slice()),
            Effect::Hello(v) => {
                if let Some(v) = v {
                    conn.resp3 = *v == 3;
                }
            }
            Effect::HelloAuth(v, user) => {
                if let Some(v) = v {
                    conn.resp3 = *v == 3;
                }
                conn.username = Arc::from(user.as_slice());
            }
            Effect::Multi => {
                conn.in_multi = true;
                conn.queued.clear();
            }
            // (The subscriptions follow the confirmations: `note_confirmation`.)
            Effect::Subscribe(..) => {}
            Effect::Monitor => conn.monitor = true,
            // (Their replies decide: `finish_replication`.)
            Effect::Sync | Effect::Handshake | Effect::SlotImport | Effect::OffsetReport(_) => {}
            Effect::Reset => reset_connection(conn),
            Effect::ListenersChanged(port) => {
                if let Some(port) = *port
                    && let Some(info) = self.servers.get(&conn.tgid)
                    && info.port != port
                {
                    let info = Arc::new(ServerInfo {
                        port,
                        ..ServerInfo::clone(info)
                    });
                    // (`conn` is out of the map while it is handled.)
                    conn.server = info.clone();
                    self.set_server(conn.tgid, info);
                }
                if !self.listeners_changed.contains(&conn.tgid) {
                    self.listeners_changed.push(conn.tgid);
                }
            }
        }
    }

    /// Write `p` with its outcome unknown. Its record names the user who sent it; an AUTH or
    /// HELLO AUTH among such leaves the connection's user unknown from here on, never the one it
    /// asked for (nor the one before, which would let a client hide behind an excluded user).
    fn finish_unknown(
        &mut self,
        conn: &mut Conn,
        mut p: Pending,
        why: &str,
        ts: u64,
        out: &mut impl RecordOut,
    ) {
        set_user(&mut p.record, &conn.username);
        set_server(&mut p.record, &conn.server);
        forget_user_if_auth(conn, &p.effect);
        p.record.time_unix_us = self.wall_us(ts);
        p.record.result = Outcome::Unknown;
        p.record.error = why.as_bytes().to_vec();
        self.push_with(&p.settings, &mut p.record, out);
    }

    /// A transaction ended by a command whose reply was not seen (lost in a capture gap, or
    /// silenced): its queued commands are written, `discarded` (a DISCARD: FAILURE) or with
    /// outcomes unknown, before it as EXEC writes them, and its bookkeeping ends (a leftover
    /// untracked count would have written every later transaction's commands untracked).
    fn end_transaction_unseen(
        &mut self,
        conn: &mut Conn,
        discarded: bool,
        why: &str,
        ts: u64,
        out: &mut impl RecordOut,
    ) {
        conn.in_multi = false;
        conn.multi_known = true;
        conn.multi_before_attach = false;
        conn.queued_untracked = 0;
        for q in std::mem::take(&mut conn.queued) {
            if discarded {
                self.finish_discarded(conn, q, why.as_bytes(), out);
            } else {
                self.finish_unknown(conn, q, why, ts, out);
            }
        }
    }

    /// Write a queued command whose transaction the server discarded without running it.
    fn finish_discarded(
        &mut self,
        conn: &Conn,
        mut q: Pending,
        why: &[u8],
        out: &mut impl RecordOut,
    ) {
        set_user(&mut q.record, &conn.username);
        q.record.result = Outcome::Failure;
        q.record.error = why.to_vec();
        self.push_with(&q.settings, &mut q.record, out);
    }

    fn close(&mut self, tgid: u32, fd: u32, ts_ns: u64, out: &mut impl RecordOut) {
        let Some(mut conn) = self.conns.remove(&(tgid, fd)) else {
            return;
        };
        self.report_lost_commands(&mut conn, ts_ns, out);
        self.release_held(&mut conn, out);
        let queued = std::mem::take(&mut conn.queued);
        // A transaction whose client leaves before EXEC is discarded by the server; once EXEC
        // was sent (its reply unseen) it may have run.
        let may_have_run = conn
            .pending
            .iter()
            .any(|p| matches!(p.effect, Effect::Exec | Effect::Discard | Effect::Reset));
        for q in queued {
            if may_have_run {
                self.finish_unknown(&mut conn, q, "connection closed inside MULTI", ts_ns, out);
            } else {
                let why = b"discarded: connection closed inside MULTI";
                self.finish_discarded(&conn, q, why, out);
            }
        }
        while let Some(p) = conn.pending.pop_front() {
            let why = if p.expects_reply {
                "connection closed before reply"
            } else {
                ""
            };
            // What follows bytes the server refused, or a QUIT, was never read (see `on_reply`).
            let last_read = matches!(p.effect, Effect::ProtocolError | Effect::Quit);
            self.finish_unknown(&mut conn, p, why, ts_ns, out);
            if last_read {
                self.drop_never_read(&mut conn);
            }
        }
        // Written for internal links too: their connection record was written at accept, before
        // REPLCONF/SYNC showed what they are, and a connection must not look open forever.
        let kind: &[u8] = if conn.replica {
            b"type=replica"
        } else if conn.cluster_bus {
            b"type=cluster-bus"
        } else if conn.tls {
            b"type=tls"
        } else {
            b"type=normal"
        };
        let rec = self.connection_record(&conn, b"disconnection", kind, ts_ns);
        self.push(rec, ts_ns, out);
    }

    /// Open connections whose socket inode is known: `(tgid, fd, inode)` (`GONE_WHEN_SEEN` for a
    /// socket that was closed before its accept was handled).
    pub fn open_sockets(&self) -> Vec<(u32, u32, u64)> {
        self.conns
            .iter()
            .filter(|(_, c)| c.ino != 0)
            .map(|(&(tgid, fd), c)| (tgid, fd, c.ino))
            .collect()
    }

    /// The connection at `fd` ended unseen (its fd no longer holds socket `ino`): close it, unless
    /// that fd is another connection's by now.
    pub fn close_ended(
        &mut self,
        tgid: u32,
        fd: u32,
        ino: u64,
        now_ns: u64,
        out: &mut impl RecordOut,
    ) {
        if self.conns.get(&(tgid, fd)).is_some_and(|c| c.ino == ino) {
            self.close(tgid, fd, now_ns, out);
        }
    }

    /// The target process is gone: its connections closed with it (no close syscalls were made).
    pub fn close_all(&mut self, tgid: u32, now_ns: u64, out: &mut impl RecordOut) {
        let mut fds: Vec<u32> = self
            .conns
            .keys()
            .filter(|(t, _)| *t == tgid)
            .map(|(_, fd)| *fd)
            .collect();
        fds.sort_unstable();
        for fd in fds {
            self.close(tgid, fd, now_ns, out);
        }
    }

    /// Settle CLIENT REPLY OFF/SKIP commands left unanswered for `QUIET_NS`: a refusal would have
    /// come at once, so they took effect, and the records held behind them (a fire-and-forget
    /// client that went quiet) are written. The caller has processed every event up to `now_ns`.
    pub fn settle_quiet(&mut self, now_ns: u64, out: &mut impl RecordOut) {
        let quiet: Vec<(u32, u32)> =
            self.conns
                .iter()
                .filter(|(_, c)| {
                    c.pending.front().is_some_and(|p| {
                        p.refusable && now_ns.saturating_sub(p.done_ts) >= QUIET_NS
                    }) || (!c.held.is_empty()
                        && now_ns.saturating_sub(c.held_since) >= HANDSHAKE_WAIT_NS)
                })
                .map(|(k, _)| *k)
                .collect();
        for key in quiet {
            if let Some(mut conn) = self.conns.remove(&key) {
                if now_ns.saturating_sub(conn.held_since) >= HANDSHAKE_WAIT_NS {
                    // No SYNC/PSYNC came: not a replica's handshake.
                    self.release_held(&mut conn, out);
                }
                self.settle_refusable(&mut conn, None, out);
                self.conns.insert(key, conn);
            }
        }
    }

    /// Write every connection's outstanding requests (shutdown).
    pub fn flush_all(&mut self, now_ns: u64, out: &mut impl RecordOut) {
        let keys: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        for key in keys {
            if let Some(mut conn) = self.conns.remove(&key) {
                self.release_held(&mut conn, out);
                // Commands queued in an open MULTI were sent before anything still pending.
                for q in std::mem::take(&mut conn.queued) {
                    self.finish_unknown(&mut conn, q, "auditor stopped before EXEC", now_ns, out);
                }
                while let Some(p) = conn.pending.pop_front() {
                    self.finish_unknown(&mut conn, p, "auditor stopped before reply", now_ns, out);
                }
                self.conns.insert(key, conn);
            }
        }
    }

    /// A loss the kernel reported (ring buffer full): one AUDIT_LOSS record.
    pub fn kernel_loss(
        &mut self,
        lost_events: u64,
        lost_bytes: u64,
        now_ns: u64,
        out: &mut impl RecordOut,
    ) {
        let mut rec = self.bare_record(Category::AuditLoss, b"loss", now_ns);
        rec.command_args = format!(
            "cause={} count={lost_events} bytes={lost_bytes}",
            LossCause::RingBufferFull.as_str()
        )
        .into_bytes();
        rec.result = Outcome::Failure;
        self.push(rec, now_ns, out);
    }

    fn bare_record(&self, category: Category, command: &[u8], ts_ns: u64) -> Record {
        Record::for_server(
            category,
            command,
            self.wall_us(ts_ns),
            self.default_server.clone(),
        )
    }

    fn connection_record(&self, conn: &Conn, command: &[u8], args: &[u8], ts_ns: u64) -> Record {
        let mut rec = self.bare_record(Category::Connection, command, ts_ns);
        rec.command_args = args.to_vec();
        rec.client_id = conn.client_id;
        rec.username = conn.username.clone();
        rec.client_ip = conn.ip.clone();
        rec.client_port = conn.port;
        rec.pid = conn.tgid;
        rec.server = conn.server.clone();
        rec
    }

    fn loss_record(
        &self,
        conn: &Conn,
        cause: LossCause,
        reason: &str,
        count: u64,
        unseen_bytes: u64,
        ts_ns: u64,
    ) -> Record {
        let mut rec = self.connection_record(conn, b"loss", b"", ts_ns);
        rec.category = Category::AuditLoss;
        rec.result = Outcome::Failure;
        rec.command_args = format!(
            "cause={} count={count} bytes={unseen_bytes} reason={reason}",
            cause.as_str()
        )
        .into_bytes();
        rec
    }

    fn wall_us(&self, ts_ns: u64) -> i64 {
        (ts_ns as i64).saturating_add(self.wall_offset_ns) / 1000
    }

    /// The filter stage (`crate::filter::decide`): enabled, events, exclusions, custom categories,
    /// result mode, evaluated with the user the command ran as. Internal (replication) traffic is
    /// dropped here when `ignore_internal_clients` is on.
    fn push(&mut self, mut rec: Record, ts: u64, out: &mut impl RecordOut) {
        let settings = self.settings_at(ts);
        self.push_with(&settings, &mut rec, out);
    }

    #[inline(always)]
    fn push_with(&mut self, settings: &Settings, rec: &mut Record, out: &mut impl RecordOut) {
        if rec.seq == WRITTEN_EARLY {
            return;
        }
        // (A user not known is matched by no user rule: see `UNKNOWN_USER`.)
        // (Its first byte first: the `LazyLock` is not looked at for other names.)
        let unknown =
            rec.username.first() == Some(&b'u') && Arc::ptr_eq(&rec.username, &UNKNOWN_USER);
        let username: &[u8] = if unknown { b"" } else { &rec.username };
        if let Some(cat) = filter::decide(
            &settings.filter,
            &rec.category,
            &rec.command,
            username,
            &rec.client_ip,
            rec.result,
            &mut self.stats.filter_lookups,
        ) {
            rec.category = cat;
            out.put(rec);
        } else {
            self.stats.filtered += 1;
        }
    }

    pub fn capture_cap(&self) -> u64 {
        self.capture_cap
    }
}

/// The error field: the module's `rejected=` for commands the server refused before running them,
/// `acl_deny_reason=` for ACL denials (category AUTH, as the module does), else the error text.
/// The one channel a PUBLISH/SPUBLISH, or a subscribe-family command naming a single channel,
/// is about: its first argument, as the record's `command_args` shows it (`arg1=<channel>`).
fn only_channel(rec: &Record) -> Option<Vec<u8>> {
    let publish = matches!(&*rec.command, b"publish" | b"spublish");
    let subscribe = matches!(&*rec.command, b"subscribe" | b"ssubscribe" | b"psubscribe");
    let args = rec.command_args.strip_prefix(b"arg1=")?;
    let end = args
        .windows(6)
        .position(|w| w == b" arg2=")
        .unwrap_or(args.len());
    if subscribe && end < args.len() {
        return None;
    }
    (publish || subscribe).then(|| args[..end].to_vec())
}

fn fill_error(rec: &mut Record, text: &[u8], arity_ok: bool) {
    let s = String::from_utf8_lossy(text);
    if runs_a_script(&rec.command) && !script_refused(&rec.command, &s) {
        // The script ran and failed: its `error_reply` may say anything ("NOPERM ...", "ERR
        // unknown command ..."), and a `redis.call` error ends in " script: ...". Neither is the
        // server refusing the script command, so neither becomes an ACL denial or a rejection.
        rec.error = text.to_vec();
        return;
    }
    if let Some(rest) = s.strip_prefix("NOPERM") {
        rec.category = Category::Auth;
        let rest = rest.trim_start();
        // (At EXEC, after the user's rules changed, Valkey says "... for the following reason:
        // no permission to execute the command or subcommand" / "... access one of the keys".)
        let (reason, object) =
            if rest.contains("to run the") || rest.contains("to execute the command") {
                ("command", None)
            } else if rest.contains("key") {
                ("key", quoted(rest))
            } else if rest.contains("channel") {
                ("channel", quoted(rest))
            } else if rest.contains("database") || rest.contains(" db") {
                ("db", None)
            } else {
                ("auth", None)
            };
        let mut e = format!("acl_deny_reason={reason}").into_bytes();
        if let Some(o) = object {
            e.extend_from_slice(b" acl_object=");
            e.extend_from_slice(o.as_bytes());
        } else if reason == "key"
            && rec.keys.len() == 1
            && let Some(key) = rec.keys.iter().next()
        {
            // Valkey's text does not name the key; a command of one key can only mean that one.
            e.extend_from_slice(b" acl_object=");
            e.extend_from_slice(key);
        } else if reason == "channel"
            && let Some(channel) = only_channel(rec)
        {
            // Nor the channel: a command of one channel can only mean that one.
            e.extend_from_slice(b" acl_object=");
            e.extend_from_slice(&channel);
        }
        rec.error = e;
        return;
    }
    let rejected = [
        "ERR unknown command",
        "ERR unknown subcommand",
        "ERR wrong number of arguments",
        "ERR Protocol error",
        "NOAUTH",
        "OOM",
        "READONLY",
        // (Not BUSYGROUP or BUSYKEY: those are the command's own failures.)
        "BUSY ",
        "LOADING",
        "MASTERDOWN",
        "MISCONF",
        "ERR EXEC without MULTI",
        "ERR DISCARD without MULTI",
        "ERR MULTI calls can not be nested",
        // (Not EXECABORT: EXEC ran and failed, the queued commands having been refused; the
        // module logs it as exec FAILURE, not as a rejection.)
        "NOREPLICAS",
        "CROSSSLOT",
        "MOVED",
        "ASK",
        "CLUSTERDOWN",
        "TRYAGAIN",
        // A command from a MONITOR client (processCommand refuses it).
        "ERR Replica can't interact with the keyspace",
    ];
    // Rejections with the command's name inside (texts of Valkey 9.1's processCommand).
    let rejected_shape = (s.starts_with("ERR Command '")
        && s.contains("' not allowed inside a transaction"))
        || s.starts_with("ERR Can't execute '")
        || (s.starts_with("ERR ") && s.contains(" command not allowed. If the "));
    let own_arity_error = arity_ok && s.starts_with("ERR wrong number of arguments");
    if !own_arity_error && (rejected_shape || rejected.iter().any(|p| s.starts_with(p))) {
        // The server's own bytes (it quotes the client's, which may not be UTF-8): the formats
        // escape them, where a lossy conversion would have turned them into U+FFFD.
        let msg = text.strip_prefix(b"ERR ").unwrap_or(text);
        let mut e = Vec::with_capacity(9 + msg.len());
        e.extend_from_slice(b"rejected=");
        e.extend_from_slice(msg);
        rec.error = e;
    } else {
        rec.error = text.to_vec();
    }
}

/// Commands whose error reply may come from the script or function they run.
/// A command whose reply may be any status line, +QUEUED included: a script, or one the table
/// does not know (a module's). Its +QUEUED says nothing of a MULTI begun before attach (QA: a
/// script returning QUEUED was taken for queued, and never written once a real MULTI followed).
fn returns_any_status(p: &Pending) -> bool {
    !p.known || runs_a_script(&p.record.command)
}

/// What another node sends on a slot migration's link (`Conn::slot_import`): the slots'
/// snapshot and changes as commands that write keys, database switches, transactions around
/// them, and the migration's own messages. Anything else there is a client's (an ordinary
/// client may send ESTABLISH, and the server runs what follows).
fn is_migration_stream(command: &[u8], write_keys: u64) -> bool {
    write_keys > 0
        || matches!(
            command,
            b"select" | b"multi" | b"exec" | b"ping" | b"cluster|syncslots" | b"function|restore"
        )
}

fn runs_a_script(command: &[u8]) -> bool {
    matches!(
        command,
        b"eval" | b"evalsha" | b"eval_ro" | b"evalsha_ro" | b"fcall" | b"fcall_ro"
    )
}

/// Whether the error of a script command is the server refusing the command itself, before the
/// script ran: texts that name the command (ACL, arity, unknown command, transaction and context
/// refusals), the key-permission denial, or one of the server's fixed refusal texts in full (a
/// script can still forge those word for word; it can no longer pass off any `NOPERM ...` or
/// `ERR unknown command ...` as one). Errors raised inside the script end in " script: ...".
fn script_refused(command: &[u8], s: &str) -> bool {
    const FIXED: [&str; 12] = [
        "NOPERM No permissions to access a key",
        "NOPERM No permissions to access a channel",
        "NOAUTH Authentication required.",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "BUSY Valkey is busy running a script. You can only call ",
        "LOADING Valkey is loading the dataset in memory",
        "READONLY You can't write against a read only replica.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "NOREPLICAS Not enough good replicas to write.",
        "CROSSSLOT Keys in request don't hash to the same slot",
        "CLUSTERDOWN ",
        "TRYAGAIN ",
    ];
    if s.contains(" script: ") {
        return false;
    }
    // The server quotes the name as the client typed it, or in lower case.
    let quoted_name = format!("'{}'", String::from_utf8_lossy(command));
    let lower = s.to_ascii_lowercase();
    let named = |shape: &str| s.starts_with(shape) && lower.contains(&quoted_name);
    FIXED.iter().any(|f| s.starts_with(f))
        || s.starts_with("MOVED ")
        || s.starts_with("ASK ")
        || (s.starts_with("NOPERM User ")
            && lower.ends_with(&format!("run the {quoted_name} command")))
        || named("ERR unknown command ")
        || named("ERR wrong number of arguments for ")
        || named("ERR Command ")
        || named("ERR Can't execute ")
}

/// A failed command's `error` (see `fill_error`), with nothing in it, or in its record, that may
/// be a secret.
fn fill_refusal(p: &mut Pending, text: &[u8], arity_ok: bool) {
    // Only an authentication says these: a command the table does not know that answers one is
    // AUTH renamed (`rename-command AUTH ...`), and its words hold the password that was tried.
    // (A known command cannot be one: a script's `error_reply('WRONGPASS ...')` is the script's.)
    let refused_auth = text.starts_with(b"WRONGPASS")
        || text.starts_with(b"ERR AUTH <password> called without any password configured");
    if refused_auth && !p.known && p.record.category != Category::Auth {
        p.record.category = Category::Auth;
        p.record.command_args = b"password=<REDACTED>".to_vec();
    }
    fill_error(&mut p.record, text, arity_ok);
    if let Some(shown) = &p.secrets {
        redact_quoted(&mut p.record.error, &p.record.command, &shown.quotable);
    }
}

/// Whether `cost` more heap bytes fit the connection's `MAX_HELD_BYTES`. `held_bytes` is only
/// added to as commands come (their records leave by many paths), so it is counted again exactly
/// when it passes the bound; the count leaves a quarter of the bound free, or says no.
fn make_room(conn: &mut Conn, cost: usize) -> bool {
    if conn.held_bytes + cost <= MAX_HELD_BYTES {
        return true;
    }
    conn.held_bytes = conn.pending.iter().map(Pending::held).sum();
    conn.held_bytes + cost <= MAX_HELD_BYTES / 4 * 3
}

/// Count what a connection holds exactly (its running counts only grow between counts).
fn exact_held(conn: &mut Conn) -> usize {
    conn.held_bytes = conn.pending.iter().map(Pending::held).sum();
    conn.queued_bytes = conn.queued.iter().map(Pending::held).sum();
    conn.held_bytes + conn.queued_bytes
}

/// A command that succeeded may show what only a success proves is no secret.
fn show_on_success(p: &mut Pending) {
    if let Some(args) = p.secrets.as_mut().and_then(|s| s.args_on_success.take()) {
        p.record.command_args = args;
    }
}

/// The arguments an error reply may quote unredacted: those that are not secrets (`secrets`, sorted
/// indexes), and equal none (`HELLO 3 AUTH bob bob x`: a quoted `bob` could be the password).
pub(crate) fn quotable_args(args: &[Arg], secrets: &[usize]) -> Vec<Arg> {
    let is_secret = |i: &usize| secrets.binary_search(i).is_ok();
    let secret_words: Vec<&[u8]> = (0..args.len())
        .filter(is_secret)
        .map(|i| args[i].prefix.as_slice())
        .collect();
    (0..args.len())
        .filter(|i| !is_secret(i))
        .map(|i| &args[i])
        .filter(|a| {
            !secret_words
                .iter()
                .any(|w| w.eq_ignore_ascii_case(&a.prefix))
        })
        .cloned()
        .collect()
}

/// Redact what the error reply of a command that can carry secrets quotes. Valkey quotes the
/// words it complains about (`modifier '<pw': ...`, `HELLO option 'x'`), after changing them (CR/LF
/// made spaces, cut at a NUL or at 512 bytes), so a secret cannot be found in the text by its bytes;
/// instead every quoted word that is not one of the command's other arguments (`quotable`) becomes
/// `<REDACTED>`, from its opening quote to the text's last quote (a secret may hold quotes itself)
/// or to its end (cut off). The unquoted text is Valkey's own wording and is left alone: replacing
/// a secret's bytes wherever they occur turned `WRONGPASS invalid username-password pair` into
/// `username-<REDACTED>` for the password `password`, telling it.
pub(crate) fn redact_quoted(error: &mut Vec<u8>, command: &[u8], quotable: &[Arg]) {
    const REDACTED: &[u8] = b"<REDACTED>";
    // Valkey's own words in ACL SETUSER's pattern errors (`... (or the 'allkeys' flag) ...`).
    const OWN_WORDS: [&[u8]; 4] = [b"allkeys", b"resetkeys", b"allchannels", b"resetchannels"];
    // Valkey's own quoted words in a CONFIG SET error (a password set alongside a failing
    // yes/no setting), which ends the text. As a phrase and only there: a lone `'yes'` may be a
    // password ACL SETUSER echoes, and so may a rule holding the phrase with more after it.
    const OWN_PHRASES: [&[u8]; 1] = [b"argument must be 'yes' or 'no'"];
    let own_phrase_start = OWN_PHRASES
        .iter()
        .find(|p| error.ends_with(p))
        .map_or(usize::MAX, |p| error.len() - p.len());
    let in_own_phrase = |e: &[u8], open: usize| (open >= own_phrase_start).then_some(e.len());
    let allowed = |word: &[u8]| {
        word.is_empty()
            || OWN_WORDS.contains(&word)
            // (`wrong number of arguments for 'config|set' command`)
            || word.eq_ignore_ascii_case(command)
            || quotable
                .iter()
                .any(|a| a.is_complete() && a.prefix.eq_ignore_ascii_case(word))
    };
    let mut from = 0;
    // A quote opens a quoted word where a word starts: after `Can` in `Can't` it is an apostrophe.
    let opens = |e: &[u8], i: usize| e[i] == b'\'' && (i == 0 || !e[i - 1].is_ascii_alphanumeric());
    // And closes it where a word ends: a quote followed by a letter, a digit or another quote is
    // inside the word (`'bob'sSecret'`, `''pw''`: a secret may hold quotes).
    let closes = |e: &[u8], i: usize| {
        e.get(i + 1)
            .is_none_or(|&b| !b.is_ascii_alphanumeric() && b != b'\'')
    };
    while let Some(open) = (from..error.len()).find(|&i| opens(error, i)) {
        if let Some(end) = in_own_phrase(error, open) {
            from = end;
            continue;
        }
        let close = error[open + 1..]
            .iter()
            .position(|&b| b == b'\'')
            .map(|i| open + 1 + i);
        if let Some(close) = close
            && closes(error, close)
            && allowed(&error[open + 1..close])
        {
            from = close + 1;
            continue;
        }
        // Up to the last quote, but not into Valkey's own phrase after it.
        let limit = own_phrase_start.min(error.len());
        let end = match error[..limit].iter().rposition(|&b| b == b'\'') {
            Some(last) if last > open => last,
            _ => limit,
        };
        error.splice(open + 1..end, REDACTED.iter().copied());
        return;
    }
}

fn quoted(s: &str) -> Option<String> {
    let start = s.find('\'')? + 1;
    let end = s[start..].find('\'')? + start;
    Some(s[start..end].to_string())
}

/// Commands whose reply may come after the client's next read (they block the client).
fn may_block(command: &[u8]) -> bool {
    matches!(
        command,
        b"blpop"
            | b"brpop"
            | b"brpoplpush"
            | b"blmove"
            | b"blmpop"
            | b"bzpopmin"
            | b"bzpopmax"
            | b"bzmpop"
            | b"xread"
            | b"xreadgroup"
            | b"wait"
            | b"waitaof"
    )
}

/// `keys_modified` of a command that succeeded.
fn keys_changed(write_keys: u64, rule: ChangeReply, reply: &Reply) -> u64 {
    match (rule, reply.kind) {
        (ChangeReply::Unknown, _) => write_keys,
        (ChangeReply::NoneUnlessNil, ReplyKind::Null) => write_keys,
        (ChangeReply::NoneUnlessNil, _) => 0,
        (_, ReplyKind::Null) => 0,
        (ChangeReply::OneUnlessNil, _) => write_keys.min(1),
        // MIGRATE when none of its keys exists: nothing moved, nothing deleted.
        (_, ReplyKind::Simple) if reply.text == b"NOKEY" => 0,
        (ChangeReply::Count, ReplyKind::Integer) => reply.len.max(0) as u64,
        (ChangeReply::NoneIfNilOrZero, ReplyKind::Integer) if reply.len == 0 => 0,
        _ => write_keys,
    }
}

fn effect_of(d: &Described, args: &[Arg]) -> Effect {
    let arg_lower = |i: usize| args.get(i).map(|a| a.lower()).unwrap_or_default();
    match &*d.command {
        b"auth" => match args.len() {
            2 => Effect::Auth(b"default".to_vec()),
            n if n >= 3 => Effect::Auth(args[1].prefix.clone()),
            _ => Effect::None,
        },
        b"hello" => {
            let version = args
                .get(1)
                .and_then(|a| std::str::from_utf8(&a.prefix).ok()?.parse().ok());
            let mut i = 2;
            let mut user = None;
            while i < args.len() {
                if args[i].eq_ignore_case("auth") && i + 2 < args.len() {
                    user = Some(args[i + 1].prefix.clone());
                    i += 3;
                } else if args[i].eq_ignore_case("setname") {
                    i += 2;
                } else {
                    i += 1;
                }
            }
            match user {
                Some(u) => Effect::HelloAuth(version, u),
                None => Effect::Hello(version),
            }
        }
        b"multi" => Effect::Multi,
        b"exec" => Effect::Exec,
        b"discard" => Effect::Discard,
        b"monitor" => Effect::Monitor,
        b"reset" => Effect::Reset,
        b"quit" => Effect::Quit,
        b"acl|whoami" => Effect::WhoAmI,
        b"sync" | b"psync" => Effect::Sync,
        b"config|set"
            if args.iter().skip(2).step_by(2).any(|a| {
                a.eq_ignore_case("port") || a.eq_ignore_case("tls-port") || a.eq_ignore_case("bind")
            }) =>
        {
            // The last `port` given is the one set (a nonzero one: 0 leaves TCP).
            let port = args
                .iter()
                .skip(2)
                .step_by(2)
                .zip(args.iter().skip(3).step_by(2))
                .filter(|(name, _)| name.eq_ignore_case("port"))
                .filter_map(|(_, value)| std::str::from_utf8(&value.prefix).ok()?.parse().ok())
                .next_back()
                .filter(|&p: &u16| p != 0);
            Effect::ListenersChanged(port)
        }
        b"subscribe" | b"psubscribe" | b"ssubscribe" => {
            let kind = match &*d.command {
                b"subscribe" => "subscribe",
                b"psubscribe" => "psubscribe",
                _ => "ssubscribe",
            };
            Effect::Subscribe(kind, channel_count(args), None)
        }
        b"unsubscribe" | b"punsubscribe" | b"sunsubscribe" => {
            let kind = match &*d.command {
                b"unsubscribe" => "unsubscribe",
                b"punsubscribe" => "punsubscribe",
                _ => "sunsubscribe",
            };
            // Without arguments the server sends one confirmation per subscription of the kind
            // (at least one): the one that leaves none completes the command.
            Effect::Subscribe(kind, channel_count(args), None)
        }
        _ => {
            let _ = arg_lower;
            Effect::None
        }
    }
}

/// The user a finished command ran as. The record was made with the connection's user at the time
/// of the request, so usually this is the same `Arc` and nothing changes hands.
fn set_user(record: &mut Record, user: &Arc<[u8]>) {
    if !Arc::ptr_eq(&record.username, user) {
        record.username = user.clone();
    }
}

fn set_server(record: &mut Record, server: &Arc<ServerInfo>) {
    if !Arc::ptr_eq(&record.server, server) {
        record.server = server.clone();
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
