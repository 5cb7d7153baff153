//! The control port: a small RESP server that `valkey-cli`, `redis-cli` and client libraries talk to
//! as if it were Valkey, to read and change the auditor's `audit.*` settings at run time.
//!
//! It is started only once the probes are attached and pre-existing connections are known, so
//! `PING` → `PONG` means "auditing".
//!
//! What it speaks:
//! * requests as RESP2 multibulk (what every client library sends) or inline lines (telnet users),
//!   with Valkey's quoting rules; replies in RESP2, or RESP3 after `HELLO 3`;
//! * `PING`, `ECHO`, `HELLO`, `AUTH`, `QUIT`, `RESET`, `SELECT 0`,
//!   `CLIENT ID|GETNAME|SETNAME|INFO|SETINFO`, `COMMAND [COUNT|INFO|DOCS]` (enough for valkey-cli's
//!   help and hints), `INFO [section ...]` and `CONFIG GET|SET|REWRITE|RESETSTAT`, with Valkey's
//!   replies and error texts;
//! * a password (`audit.control_requirepass`): until AUTH, only AUTH, HELLO, PING, QUIT and RESET
//!   are answered, the rest gets `-NOAUTH`. CONFIG SET/REWRITE/RESETSTAT and AUTH attempts are
//!   written to the audit log through the backend, never with a value or password.
//!
//! The settings themselves live in the daemon: the server is written against [`ControlBackend`], so
//! this module knows nothing of how a setting is parsed, validated, applied or persisted.
//!
//! Safety limits, because the port must never get in the way of capture: at most [`MAX_CLIENTS`]
//! connections, requests bounded in size and argument count, a protocol error or a write that
//! stalls closes only that connection, each connection is its own task, and backend calls that may
//! touch files run on the blocking pool.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::{Buf as _, Bytes, BytesMut};
use futures::StreamExt as _;
use redis_protocol::resp2::types::BytesFrame as Resp2Frame;
use redis_protocol::resp3::types::{BytesFrame as Resp3Frame, VerbatimStringFormat};
use tokio::io::AsyncWriteExt as _;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{Decoder, FramedRead};

use crate::argv::Arg;
use crate::commands::{CommandTable, Described, command_args, command_args_on_success};
use crate::record::Category;

/// What the control port needs from the daemon. Implemented in main.rs.
///
/// Methods are called from the control port's async tasks. The cheap getters are called inline;
/// `set_settings`, `rewrite_config`, `reset_stats` and `audit_control_event` run on tokio's blocking
/// pool, so they may take locks or do file I/O.
pub trait ControlBackend: Send + Sync + 'static {
    /// Every setting name (full, e.g. "audit.format"), in a stable order.
    fn setting_names(&self) -> Vec<String>;
    /// Current rendered values of settings as CONFIG GET shows them (None if unknown), all from one
    /// state of the settings. Secrets render as "".
    fn get_settings(&self, names: &[String]) -> Vec<Option<String>>;
    /// Apply several settings atomically (all or nothing). Err(message) is the full Valkey-style text
    /// WITHOUT the leading "ERR " (e.g. "CONFIG SET failed (possibly related to argument
    /// 'audit.format') - argument(s) must be one of the following: text, json, csv"), and must never
    /// contain a secret value. An unknown name should give Valkey's "Unknown option or number of
    /// arguments for CONFIG SET - '<name>'". Names arrive in the spelling of `setting_names()` when they
    /// match one case-insensitively, otherwise as the client typed them.
    fn set_settings(&self, pairs: &[(String, String)]) -> Result<(), String>;
    /// CONFIG REWRITE: Err(message) e.g. "The server is running without a config file".
    fn rewrite_config(&self) -> Result<(), String>;
    /// CONFIG RESETSTAT: zero the counters shown by `info_audit`.
    fn reset_stats(&self);
    /// The `# audit` INFO section body lines "name:value" (without the header), already formatted.
    fn info_audit(&self) -> Vec<(String, String)>;
    /// Control password currently in force (None = no auth required). Checked at each command.
    fn control_password(&self) -> Option<String>;
    /// Write an audit record for a CONFIG SET / CONFIG REWRITE / CONFIG RESETSTAT, accepted or
    /// refused, and for a control AUTH or HELLO AUTH, successful or failed, with the category
    /// [`control_event_category`] gives (AUTH for AUTH and HELLO, like the server's records of them).
    /// `command` is "config|set", "config|rewrite", "config|resetstat", "auth" or "hello"; `args` is
    /// the server's CONFIG records' "subcommand=<as typed>", and for CONFIG SET "param=<name>" for
    /// each setting after it (never values), for AUTH/HELLO what the
    /// server's records of them show (`[user=<u> ]password=<REDACTED>`, HELLO's preceded by
    /// `protover=<n> `), "" otherwise; `client` is the control client's address; `user` is the user
    /// the command ran as, always the control user ("default": a failed AUTH changes nothing, and
    /// the user an AUTH asked for is in `args`); `error` is the error reply text without "ERR " (""
    /// on success). The record must be written even when the change just disabled auditing, so
    /// that turning the audit off is itself audited.
    fn audit_control_event(
        &self,
        command: &str,
        args: &str,
        client: SocketAddr,
        user: &str,
        success: bool,
        error: &str,
    );
}

/// Most simultaneous control clients; more are refused so a misbehaving script cannot exhaust us.
pub const MAX_CLIENTS: usize = 256;
/// Largest request: sum of its argument lengths (and the largest single argument).
const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Most arguments in one request (Valkey allows far more; nothing here needs more than a few).
const MAX_ARGS: usize = 1024;
/// Longest inline command line, as Valkey's PROTO_INLINE_MAX_SIZE.
const MAX_INLINE_BYTES: usize = 64 * 1024;
/// Longest `*<count>` / `$<len>` header line: a length needs at most 20 digits, so anything longer is
/// garbage and is refused before it can fill memory.
const MAX_LENGTH_LINE: usize = 32;
/// A client that stops reading its replies is dropped after this long, freeing its slot.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that began a request and sent nothing more of it for this long is dropped, and so is
/// one that has not authenticated (a password is set) and sent nothing: neither may hold one of
/// the [`MAX_CLIENTS`] slots for long, or a few such connections would lock the operator out.
#[cfg(not(test))]
const STALL_TIMEOUT: Duration = Duration::from_secs(10);
#[cfg(test)]
const STALL_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a refused (over the limit) client gets to receive its error.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Header of the audit INFO section. Valkey prints a module's section under its lower-case module
/// name, so this is where scripts written for the Valkey Audit Module look.
const AUDIT_INFO_HEADER: &str = "# audit";
/// Settings whose values CONFIG GET never shows, whatever the backend renders.
const SECRET_SETTING_SUFFIX: &str = "requirepass";
/// What AUTH and HELLO AUTH records say instead of the password.
const REDACTED_PASSWORD: &str = "password=<REDACTED>";
/// The only user of the control port: every control command runs as it.
const CONTROL_USER: &str = "default";

/// The category of a control event's record: AUTH for AUTH and HELLO ... AUTH, as the server's
/// records of those commands have, CONFIG for the CONFIG subcommands.
pub fn control_event_category(command: &str) -> Category {
    match command {
        "auth" | "hello" => Category::Auth,
        _ => Category::Config,
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the control port {addr}"))
}

/// Accept control clients forever. Each connection runs in its own task; the future returned never
/// completes, so the daemon drops it (e.g. in a `select!`) to stop listening.
pub async fn serve(
    listener: TcpListener,
    backend: Arc<dyn ControlBackend>,
    protected: ProtectedConfigs,
) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let shared = Arc::new(Shared {
        backend,
        protected,
        started: Instant::now(),
        port,
        slots: Arc::new(Semaphore::new(MAX_CLIENTS)),
        next_client_id: AtomicU64::new(1),
        stats: Stats::default(),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        Stats::bump(&shared.stats.connections_received);
        match shared.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(serve_client(stream, peer, shared.clone(), permit));
            }
            Err(_) => {
                Stats::bump(&shared.stats.rejected_connections);
                tokio::spawn(refuse_client(stream));
            }
        }
    }
}

/// Who may change, at run time, the settings that make the auditor (root) run a program or write
/// where it is told: `audit.archive_command`, `audit.protocol` naming another file,
/// `audit.spool_dir`, and the control password that would let its setter change them (Valkey's `enable-protected-configs` for `dir` and `dbfilename`). Without
/// this, any local user could reach root through a control port without a password: an archive
/// command runs as root, and a log written to `/etc/ld.so.preload` would load a library the
/// user names in a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtectedConfigs {
    /// A client that authenticated with the control password, or one on this host whose socket
    /// belongs to root (the default).
    Root,
    /// Any client that may run CONFIG SET.
    Yes,
    /// None: they are set only at start (command line, `--config` file).
    No,
}

/// The control password's setting.
const PASSWORD_SETTING: &str = "audit.control_requirepass";

/// Whether setting `name` to `value` (over `current`) is a protected change.
fn protected_change(name: &str, value: &str, current: Option<&str>) -> bool {
    let same = || current.is_some_and(|c| c.split_whitespace().eq(value.split_whitespace()));
    match name {
        // Whoever sets the password becomes the one client that may change the rest (QA: a local
        // user set one, gave it, and had an archive command run as root). Hidden by CONFIG GET,
        // so any SET counts.
        PASSWORD_SETTING => true,
        "audit.archive_command" | "audit.spool_dir" => !same(),
        // Syslog and TCP targets write no file; the file in force may be named again (to reopen
        // it after logrotate).
        "audit.protocol" => {
            let kind = value.split_whitespace().next().unwrap_or("");
            !(kind.eq_ignore_ascii_case("syslog") || kind.eq_ignore_ascii_case("tcp") || same())
        }
        _ => false,
    }
}

/// State shared by all connections of one control port.
struct Shared {
    backend: Arc<dyn ControlBackend>,
    protected: ProtectedConfigs,
    started: Instant,
    port: u16,
    slots: Arc<Semaphore>,
    next_client_id: AtomicU64,
    stats: Stats,
}

impl Shared {
    fn connected_clients(&self) -> usize {
        MAX_CLIENTS.saturating_sub(self.slots.available_permits())
    }

    fn password_required(&self) -> bool {
        self.backend.control_password().is_some()
    }

    /// Run a backend call that may block (locks, file I/O) off the async thread. A panic inside the
    /// backend becomes `None` instead of taking the connection task (or the process) down.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn ControlBackend) -> T + Send + 'static,
    ) -> Option<T> {
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || call(backend.as_ref()))
            .await
            .ok()
    }

    async fn audit(&self, event: ControlEvent) {
        let _ = self
            .blocking(move |b| {
                b.audit_control_event(
                    event.command,
                    &event.args,
                    event.client,
                    &event.user,
                    event.error.is_empty(),
                    &event.error,
                )
            })
            .await;
    }
}

/// One control action to be written to the audit log.
struct ControlEvent {
    command: &'static str,
    args: String,
    client: SocketAddr,
    user: String,
    /// The error reply's text as the server's records carry it (`rejected=` before a refusal:
    /// NOAUTH, arity); empty on success.
    error: String,
}

/// Counters shown under `# Stats`, reset by CONFIG RESETSTAT.
#[derive(Default)]
struct Stats {
    connections_received: AtomicU64,
    rejected_connections: AtomicU64,
    commands_processed: AtomicU64,
    error_replies: AtomicU64,
    protocol_error_disconnections: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn reset(&self) {
        for counter in [
            &self.connections_received,
            &self.rejected_connections,
            &self.commands_processed,
            &self.error_replies,
            &self.protocol_error_disconnections,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

async fn refuse_client(mut stream: TcpStream) {
    let _ = tokio::time::timeout(
        REFUSE_TIMEOUT,
        stream.write_all(b"-ERR max number of clients reached\r\n"),
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

/// Per-connection state, as CLIENT INFO shows it.
struct Client {
    id: u64,
    peer: SocketAddr,
    local: SocketAddr,
    fd: i32,
    name: Option<Bytes>,
    lib_name: Option<Bytes>,
    lib_ver: Option<Bytes>,
    connected_at: Instant,
    last_command_at: Instant,
    /// RESP version of replies: 2, or 3 after `HELLO 3`.
    resp: u8,
    /// As Valkey: true if no password was required when the connection (or its RESET) started, or
    /// after a successful AUTH. Setting a password later does not log out existing clients.
    authenticated: bool,
    last_command: &'static str,
    commands: u64,
    bytes_out: u64,
}

/// What to do after a command.
enum Outcome {
    Reply(Reply),
    /// Send the reply, then close (QUIT).
    ReplyAndClose(Reply),
    /// Close without a word: what looked like an HTTP request (cross-protocol attack).
    Close,
}

async fn serve_client(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], shared.port)));
    let now = Instant::now();
    let mut client = Client {
        id: shared.next_client_id.fetch_add(1, Ordering::Relaxed),
        peer,
        local,
        fd,
        name: None,
        lib_name: None,
        lib_ver: None,
        connected_at: now,
        last_command_at: now,
        resp: 2,
        authenticated: !shared.password_required(),
        last_command: "NULL",
        commands: 0,
        bytes_out: 0,
    };
    let (read_half, mut write_half) = stream.into_split();
    let mut requests = FramedRead::new(
        read_half,
        RequestDecoder {
            shared: Some(shared.clone()),
            ..RequestDecoder::default()
        },
    );
    let mut out = BytesMut::with_capacity(4096);
    // When a request still incomplete at a timeout was first seen so (a request must complete
    // within one to two STALL_TIMEOUTs of its first byte, however slowly it trickles in).
    let mut partial_since: Option<Instant> = None;
    loop {
        requests.decoder_mut().unauthenticated = !client.authenticated;
        // Cancel-safe: what was read of a request stays in the decoder's buffer.
        let request = match tokio::time::timeout(STALL_TIMEOUT, requests.next()).await {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(_) => {
                if !client.authenticated {
                    break;
                }
                if requests.read_buffer().is_empty() {
                    partial_since = None;
                } else if partial_since.is_some_and(|t| t.elapsed() >= STALL_TIMEOUT) {
                    break;
                } else {
                    partial_since.get_or_insert_with(Instant::now);
                }
                continue;
            }
        };
        partial_since = None;
        let args = match request {
            Ok(args) => args,
            Err(DecodeError::Protocol(why)) => {
                Stats::bump(&shared.stats.protocol_error_disconnections);
                encode(
                    &Reply::Error(format!("ERR Protocol error: {why}")),
                    client.resp,
                    &mut out,
                );
                let _ = send(&mut write_half, &mut out, &mut client).await;
                break;
            }
            Err(DecodeError::Io) => break,
        };
        client.last_command_at = Instant::now();
        client.commands += 1;
        Stats::bump(&shared.stats.commands_processed);
        let (reply, close) = match execute(&mut client, &shared, &args, requests.decoder()).await {
            Outcome::Reply(reply) => (reply, false),
            Outcome::ReplyAndClose(reply) => (reply, true),
            Outcome::Close => break,
        };
        if matches!(reply, Reply::Error(_)) {
            Stats::bump(&shared.stats.error_replies);
        }
        encode(&reply, client.resp, &mut out);
        if !send(&mut write_half, &mut out, &mut client).await || close {
            break;
        }
    }
    let _ = write_half.shutdown().await;
}

/// Write what is in `out`; false if the client is gone or stopped reading.
async fn send(write_half: &mut OwnedWriteHalf, out: &mut BytesMut, client: &mut Client) -> bool {
    let written = tokio::time::timeout(WRITE_TIMEOUT, write_half.write_all(out)).await;
    client.bytes_out += out.len() as u64;
    out.clear();
    matches!(written, Ok(Ok(())))
}

// ---------------------------------------------------------------------------------------------
// Request decoding
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum DecodeError {
    /// Malformed or oversized request: reply `-ERR Protocol error: <text>` and close.
    Protocol(String),
    /// Reading the socket failed: the connection is gone, there is nobody to tell.
    Io,
}

impl From<std::io::Error> for DecodeError {
    fn from(_: std::io::Error) -> Self {
        DecodeError::Io
    }
}

fn protocol_error<T>(why: &str) -> Result<T, DecodeError> {
    Err(DecodeError::Protocol(why.to_string()))
}

/// Splits the byte stream into requests: RESP multibulk (`*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n`) or an
/// inline line (`ECHO "hi there"\r\n`), following Valkey's `processMultibulkBuffer` and
/// `processInlineBuffer`. Every length is checked against the limits when its header arrives, before
/// its bytes are buffered, so a client cannot make us hold more than about one maximum request.
#[derive(Default)]
struct RequestDecoder {
    /// Bytes of complete requests consumed so far (CLIENT INFO `tot-net-in`).
    consumed: u64,
    /// The client has not authenticated: while a password is set (asked at each request, for it
    /// may be cleared meanwhile, as Valkey's `authRequired` does) Valkey's smaller limits apply
    /// (`UNAUTHENTICATED_*`), so a stranger cannot make the auditor hold a maximum request.
    unauthenticated: bool,
    shared: Option<Arc<Shared>>,
}

/// Valkey's limits for a client that has not authenticated (`processMultibulkBuffer`): at most 10
/// arguments of at most 16 KiB each, else "Protocol error: unauthenticated ..." and the link is
/// closed. (Before, 250 such clients each holding a 1 MiB partial request took 280 MB.)
const UNAUTHENTICATED_ARGS: i64 = 10;
const UNAUTHENTICATED_BULK: i64 = 16 * 1024;
/// Valkey's default `proto-max-bulk-len`: a longer bulk is "invalid bulk length" before any other
/// check.
const PROTO_MAX_BULK_LEN: i64 = 512 * 1024 * 1024;

/// One step of parsing the start of the buffer.
enum Parsed {
    Incomplete,
    /// Bytes to drop that hold no command (an empty line, `*0`).
    Skip(usize),
    /// A request of this many bytes, with its arguments as ranges into them.
    Multibulk(usize, Vec<std::ops::Range<usize>>),
    /// An inline request of this many bytes, with its (unquoted) arguments.
    Inline(usize, Vec<Vec<u8>>),
}

impl Decoder for RequestDecoder {
    type Item = Vec<Bytes>;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Vec<Bytes>>, DecodeError> {
        loop {
            let Some(&first) = src.first() else {
                return Ok(None);
            };
            let parsed = if first == b'*' {
                let limited = self.unauthenticated
                    && self.shared.as_ref().is_none_or(|s| s.password_required());
                parse_multibulk(src, limited)?
            } else {
                parse_inline(src)?
            };
            match parsed {
                Parsed::Incomplete => return Ok(None),
                Parsed::Skip(n) => {
                    src.advance(n);
                    self.consumed += n as u64;
                }
                Parsed::Multibulk(n, ranges) => {
                    let request = src.split_to(n).freeze();
                    self.consumed += n as u64;
                    return Ok(Some(ranges.into_iter().map(|r| request.slice(r)).collect()));
                }
                Parsed::Inline(n, args) => {
                    src.advance(n);
                    self.consumed += n as u64;
                    return Ok(Some(args.into_iter().map(Bytes::from).collect()));
                }
            }
        }
    }
}

/// Parse a `<prefix><decimal>\r\n` header at `at`. Ok(None): not all of it has arrived yet.
fn parse_length_line(
    src: &[u8],
    at: usize,
    invalid: &str,
) -> Result<Option<(i64, usize)>, DecodeError> {
    let rest = &src[at..];
    let Some(cr) = rest.iter().take(MAX_LENGTH_LINE).position(|&b| b == b'\r') else {
        return if rest.len() >= MAX_LENGTH_LINE {
            protocol_error(invalid)
        } else {
            Ok(None)
        };
    };
    let Some(&lf) = rest.get(cr + 1) else {
        return Ok(None);
    };
    let digits = std::str::from_utf8(&rest[1..cr]).ok();
    match (lf, digits.and_then(|d| d.parse::<i64>().ok())) {
        (b'\n', Some(value)) => Ok(Some((value, at + cr + 2))),
        _ => protocol_error(invalid),
    }
}

fn parse_multibulk(src: &[u8], unauthenticated: bool) -> Result<Parsed, DecodeError> {
    const INVALID_COUNT: &str = "invalid multibulk length";
    const INVALID_LEN: &str = "invalid bulk length";
    let Some((count, mut pos)) = parse_length_line(src, 0, INVALID_COUNT)? else {
        return Ok(Parsed::Incomplete);
    };
    // Valkey's order: a length no request can have, then the unauthenticated limit.
    if count > i64::from(i32::MAX) {
        return protocol_error(INVALID_COUNT);
    }
    if unauthenticated && count > UNAUTHENTICATED_ARGS {
        return protocol_error("unauthenticated multibulk length");
    }
    if count > MAX_ARGS as i64 {
        return protocol_error(INVALID_COUNT);
    }
    if count <= 0 {
        return Ok(Parsed::Skip(pos));
    }
    let mut ranges = Vec::with_capacity(count as usize);
    let mut total = 0usize;
    for _ in 0..count {
        let Some(&marker) = src.get(pos) else {
            return Ok(Parsed::Incomplete);
        };
        if marker != b'$' {
            return protocol_error(&format!(
                "expected '$', got '{}'",
                char::from(marker).escape_default()
            ));
        }
        let Some((len, body)) = parse_length_line(src, pos, INVALID_LEN)? else {
            return Ok(Parsed::Incomplete);
        };
        if !(0..=PROTO_MAX_BULK_LEN).contains(&len) {
            return protocol_error(INVALID_LEN);
        }
        if unauthenticated && len > UNAUTHENTICATED_BULK {
            return protocol_error("unauthenticated bulk length");
        }
        if len < 0 || len as u64 > MAX_REQUEST_BYTES as u64 {
            return protocol_error(INVALID_LEN);
        }
        let len = len as usize;
        total += len;
        if total > MAX_REQUEST_BYTES {
            return protocol_error("request too large");
        }
        let end = body + len;
        if src.len() < end + 2 {
            return Ok(Parsed::Incomplete);
        }
        if &src[end..end + 2] != b"\r\n" {
            return protocol_error("invalid CRLF in request");
        }
        ranges.push(body..end);
        pos = end + 2;
    }
    Ok(Parsed::Multibulk(pos, ranges))
}

fn parse_inline(src: &[u8]) -> Result<Parsed, DecodeError> {
    let Some(newline) = src
        .iter()
        .take(MAX_INLINE_BYTES + 1)
        .position(|&b| b == b'\n')
    else {
        return if src.len() > MAX_INLINE_BYTES {
            protocol_error("too big inline request")
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = src[..newline]
        .strip_suffix(b"\r")
        .unwrap_or(&src[..newline]);
    let Some(args) = split_inline_args(line) else {
        return protocol_error("unbalanced quotes in request");
    };
    if args.len() > MAX_ARGS {
        return protocol_error("invalid multibulk length");
    }
    if args.is_empty() {
        return Ok(Parsed::Skip(newline + 1));
    }
    Ok(Parsed::Inline(newline + 1, args))
}

/// Split an inline command line like Valkey's `sdssplitargs`, with the capture parser's splitter
/// (one implementation of Valkey's quoting rules). None: unbalanced quotes.
fn split_inline_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    // Control lines are at most 64 KiB, far under the splitter's retention budget, so every
    // argument is kept whole.
    let (args, _) = crate::resp::split_inline_args(line, usize::MAX)?;
    Some(args.into_iter().map(|a| a.prefix).collect())
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// A reply, independent of the RESP version it will be sent in.
#[derive(Debug)]
enum Reply {
    Status(Cow<'static, str>),
    /// Full error text including its code: "ERR ...", "NOAUTH ...".
    Error(String),
    Int(i64),
    Bulk(Bytes),
    Null,
    Array(Vec<Reply>),
    /// A RESP3 map; a flat key, value, ... array in RESP2.
    Map(Vec<(Reply, Reply)>),
    /// A RESP3 set; an array in RESP2.
    Set(Vec<Reply>),
    /// Text for humans (INFO, CLIENT INFO): RESP3 verbatim "txt", RESP2 bulk.
    Verbatim(String),
}

impl Reply {
    fn ok() -> Reply {
        Reply::Status(Cow::Borrowed("OK"))
    }

    fn status(text: &'static str) -> Reply {
        Reply::Status(Cow::Borrowed(text))
    }

    fn err(text: impl Into<String>) -> Reply {
        Reply::Error(text.into())
    }

    fn bulk(text: impl Into<String>) -> Reply {
        Reply::Bulk(Bytes::from(text.into()))
    }

    fn str_map(pairs: impl IntoIterator<Item = (&'static str, Reply)>) -> Reply {
        Reply::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Reply::bulk(k), v))
                .collect(),
        )
    }
}

/// Error and status lines must stay on one line; Valkey replaces CR and LF with spaces too.
fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

/// Append `reply` to `out` in RESP2 or RESP3. Leaves (and all of RESP2) are encoded by
/// redis-protocol; RESP3 aggregate headers are written here because redis-protocol's RESP3 maps and
/// sets are hash-based and would scramble the order of HELLO and CONFIG GET replies.
fn encode(reply: &Reply, resp: u8, out: &mut BytesMut) {
    let start = out.len();
    let encoded = if resp >= 3 {
        encode_resp3(reply, out)
    } else {
        redis_protocol::resp2::encode::extend_encode(out, &to_resp2(reply), false).map(|_| ())
    };
    if encoded.is_err() {
        out.truncate(start);
        out.extend_from_slice(b"-ERR internal error encoding the reply\r\n");
    }
}

fn to_resp2(reply: &Reply) -> Resp2Frame {
    match reply {
        Reply::Status(s) => Resp2Frame::SimpleString(Bytes::from(one_line(s))),
        Reply::Error(e) => Resp2Frame::Error(one_line(e).into()),
        Reply::Int(i) => Resp2Frame::Integer(*i),
        Reply::Bulk(b) => Resp2Frame::BulkString(b.clone()),
        Reply::Null => Resp2Frame::Null,
        Reply::Verbatim(s) => Resp2Frame::BulkString(Bytes::from(s.clone())),
        Reply::Array(items) | Reply::Set(items) => {
            Resp2Frame::Array(items.iter().map(to_resp2).collect())
        }
        Reply::Map(pairs) => Resp2Frame::Array(
            pairs
                .iter()
                .flat_map(|(k, v)| [to_resp2(k), to_resp2(v)])
                .collect(),
        ),
    }
}

fn encode_resp3(
    reply: &Reply,
    out: &mut BytesMut,
) -> Result<(), redis_protocol::error::RedisProtocolError> {
    let header = |out: &mut BytesMut, kind: char, len: usize| {
        out.extend_from_slice(format!("{kind}{len}\r\n").as_bytes());
    };
    let leaf = match reply {
        Reply::Array(items) | Reply::Set(items) => {
            header(
                out,
                if matches!(reply, Reply::Set(_)) {
                    '~'
                } else {
                    '*'
                },
                items.len(),
            );
            return items.iter().try_for_each(|item| encode_resp3(item, out));
        }
        Reply::Map(pairs) => {
            header(out, '%', pairs.len());
            return pairs.iter().try_for_each(|(k, v)| {
                encode_resp3(k, out)?;
                encode_resp3(v, out)
            });
        }
        Reply::Status(s) => Resp3Frame::SimpleString {
            data: Bytes::from(one_line(s)),
            attributes: None,
        },
        Reply::Error(e) => Resp3Frame::SimpleError {
            data: one_line(e).into(),
            attributes: None,
        },
        Reply::Int(i) => Resp3Frame::Number {
            data: *i,
            attributes: None,
        },
        Reply::Bulk(b) => Resp3Frame::BlobString {
            data: b.clone(),
            attributes: None,
        },
        Reply::Null => Resp3Frame::Null,
        Reply::Verbatim(s) => Resp3Frame::VerbatimString {
            data: Bytes::from(s.clone()),
            format: VerbatimStringFormat::Text,
            attributes: None,
        },
    };
    redis_protocol::resp3::encode::complete::extend_encode(out, &leaf, false).map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// The command table (drives dispatch, arity checks, COMMAND and COMMAND DOCS)
// ---------------------------------------------------------------------------------------------

/// One command or subcommand, with what COMMAND / COMMAND DOCS report about it.
#[derive(Clone, Copy)]
struct CommandSpec {
    /// Lower-case full name: "ping", "config|get".
    name: &'static str,
    /// Valkey's arity: N means exactly N words including the name, -N at least N.
    arity: i64,
    flags: &'static [&'static str],
    acl_categories: &'static [&'static str],
    group: &'static str,
    since: &'static str,
    summary: &'static str,
    complexity: &'static str,
    arguments: &'static [ArgSpec],
    subcommands: &'static [CommandSpec],
}

/// One argument as COMMAND DOCS describes it (valkey-cli builds its hints from these).
#[derive(Clone, Copy)]
struct ArgSpec {
    name: &'static str,
    /// "string", "integer", "pattern", "pure-token", "oneof" or "block".
    kind: &'static str,
    token: Option<&'static str>,
    optional: bool,
    multiple: bool,
    arguments: &'static [ArgSpec],
}

const fn command(name: &'static str, arity: i64, group: &'static str) -> CommandSpec {
    CommandSpec {
        name,
        arity,
        flags: &[],
        acl_categories: &[],
        group,
        since: "1.0.0",
        summary: "",
        complexity: "O(1)",
        arguments: &[],
        subcommands: &[],
    }
}

impl CommandSpec {
    const fn doc(mut self, since: &'static str, summary: &'static str) -> Self {
        self.since = since;
        self.summary = summary;
        self
    }
    const fn flags(mut self, flags: &'static [&'static str]) -> Self {
        self.flags = flags;
        self
    }
    const fn acl(mut self, categories: &'static [&'static str]) -> Self {
        self.acl_categories = categories;
        self
    }
    const fn complexity(mut self, complexity: &'static str) -> Self {
        self.complexity = complexity;
        self
    }
    const fn args(mut self, arguments: &'static [ArgSpec]) -> Self {
        self.arguments = arguments;
        self
    }
    const fn subs(mut self, subcommands: &'static [CommandSpec]) -> Self {
        self.subcommands = subcommands;
        self
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.flags.contains(&flag)
    }

    /// Whether `words` (name included) fits the arity.
    fn arity_ok(&self, words: usize) -> bool {
        let words = words as i64;
        if self.arity >= 0 {
            words == self.arity
        } else {
            words >= -self.arity
        }
    }

    /// The subcommand part of "parent|sub".
    fn sub_name(&self) -> &'static str {
        self.name.split_once('|').map_or(self.name, |(_, sub)| sub)
    }
}

const fn arg(name: &'static str, kind: &'static str) -> ArgSpec {
    ArgSpec {
        name,
        kind,
        token: None,
        optional: false,
        multiple: false,
        arguments: &[],
    }
}

impl ArgSpec {
    const fn token(mut self, token: &'static str) -> Self {
        self.token = Some(token);
        self
    }
    const fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
    const fn multiple(mut self) -> Self {
        self.multiple = true;
        self
    }
    const fn nested(mut self, arguments: &'static [ArgSpec]) -> Self {
        self.arguments = arguments;
        self
    }
}

const CONNECTION_FAST: &[&str] = &["@fast", "@connection"];
const CONNECTION_SLOW: &[&str] = &["@slow", "@connection"];
const ADMIN: &[&str] = &["@admin", "@slow", "@dangerous"];
const NO_AUTH_FLAGS: &[&str] = &[
    "noscript",
    "loading",
    "stale",
    "fast",
    "no_auth",
    "allow_busy",
];
const CLIENT_FLAGS: &[&str] = &["noscript", "loading", "stale"];
const ADMIN_FLAGS: &[&str] = &["admin", "noscript", "loading", "stale"];
const INFO_FLAGS: &[&str] = &["loading", "stale"];

static CLIENT_SUBCOMMANDS: &[CommandSpec] = &[
    command("client|getname", 2, "connection")
        .doc("2.6.9", "Returns the name of the connection.")
        .flags(CLIENT_FLAGS)
        .acl(CONNECTION_SLOW),
    command("client|help", 2, "connection")
        .doc(
            "5.0.0",
            "Returns helpful text about the different subcommands.",
        )
        .flags(INFO_FLAGS)
        .acl(CONNECTION_SLOW),
    command("client|id", 2, "connection")
        .doc("5.0.0", "Returns the unique client ID of the connection.")
        .flags(CLIENT_FLAGS)
        .acl(CONNECTION_SLOW),
    command("client|info", 2, "connection")
        .doc("6.2.0", "Returns information about the connection.")
        .flags(CLIENT_FLAGS)
        .acl(CONNECTION_SLOW),
    command("client|setinfo", 4, "connection")
        .doc(
            "7.2.0",
            "Sets information specific to the client or connection.",
        )
        .flags(CLIENT_FLAGS)
        .acl(CONNECTION_SLOW)
        .args(&[arg("attr", "oneof").nested(&[
            arg("libname", "string").token("LIB-NAME"),
            arg("libver", "string").token("LIB-VER"),
        ])]),
    command("client|setname", 3, "connection")
        .doc("2.6.9", "Sets the connection name.")
        .flags(CLIENT_FLAGS)
        .acl(CONNECTION_SLOW)
        .args(&[arg("connection-name", "string")]),
];

static COMMAND_SUBCOMMANDS: &[CommandSpec] = &[
    command("command|count", 2, "server")
        .doc("2.8.13", "Returns a count of commands.")
        .flags(INFO_FLAGS)
        .acl(CONNECTION_SLOW),
    command("command|docs", -2, "server")
        .doc(
            "7.0.0",
            "Returns documentary information about one, multiple or all commands.",
        )
        .flags(INFO_FLAGS)
        .acl(CONNECTION_SLOW)
        .complexity("O(N) where N is the number of commands to look up")
        .args(&[arg("command-name", "string").optional().multiple()]),
    command("command|help", 2, "server")
        .doc(
            "5.0.0",
            "Returns helpful text about the different subcommands.",
        )
        .flags(INFO_FLAGS)
        .acl(CONNECTION_SLOW),
    command("command|info", -2, "server")
        .doc(
            "2.8.13",
            "Returns information about one, multiple or all commands.",
        )
        .flags(INFO_FLAGS)
        .acl(CONNECTION_SLOW)
        .complexity("O(N) where N is the number of commands to look up")
        .args(&[arg("command-name", "string").optional().multiple()]),
];

static CONFIG_SUBCOMMANDS: &[CommandSpec] = &[
    command("config|get", -3, "server")
        .doc("2.0.0", "Returns the effective values of auditor settings.")
        .flags(ADMIN_FLAGS)
        .acl(ADMIN)
        .complexity("O(N) when N is the number of settings")
        .args(&[arg("parameter", "string").multiple()]),
    command("config|help", 2, "server")
        .doc(
            "5.0.0",
            "Returns helpful text about the different subcommands.",
        )
        .flags(INFO_FLAGS)
        .acl(&["@slow"]),
    command("config|resetstat", 2, "server")
        .doc("2.0.0", "Resets the auditor's statistics.")
        .flags(ADMIN_FLAGS)
        .acl(ADMIN),
    command("config|rewrite", 2, "server")
        .doc(
            "2.8.0",
            "Persists the effective settings to the config file.",
        )
        .flags(ADMIN_FLAGS)
        .acl(ADMIN),
    command("config|set", -4, "server")
        .doc("2.0.0", "Sets auditor settings, all or none.")
        .flags(ADMIN_FLAGS)
        .acl(ADMIN)
        .complexity("O(N) when N is the number of settings to set")
        .args(&[arg("data", "block")
            .multiple()
            .nested(&[arg("parameter", "string"), arg("value", "string")])]),
];

/// Every command the control port answers, in COMMAND's order.
static COMMANDS: &[CommandSpec] = &[
    command("auth", -2, "connection")
        .doc("1.0.0", "Authenticates the connection.")
        .flags(NO_AUTH_FLAGS)
        .acl(CONNECTION_FAST)
        .args(&[
            arg("username", "string").optional(),
            arg("password", "string"),
        ]),
    command("client", -2, "connection")
        .doc("2.4.0", "A container for client connection commands.")
        .acl(&["@slow"])
        .complexity("Depends on subcommand.")
        .subs(CLIENT_SUBCOMMANDS),
    command("command", -1, "server")
        .doc("2.8.13", "Returns detailed information about all commands.")
        .flags(INFO_FLAGS)
        .acl(CONNECTION_SLOW)
        .complexity("O(N) where N is the total number of commands")
        .subs(COMMAND_SUBCOMMANDS),
    command("config", -2, "server")
        .doc("2.0.0", "A container for auditor settings commands.")
        .acl(&["@slow"])
        .complexity("Depends on subcommand.")
        .subs(CONFIG_SUBCOMMANDS),
    command("echo", 2, "connection")
        .doc("1.0.0", "Returns the given string.")
        .flags(&["fast"])
        .acl(CONNECTION_FAST)
        .args(&[arg("message", "string")]),
    command("hello", -1, "connection")
        .doc("6.0.0", "Handshakes with the control port.")
        .flags(NO_AUTH_FLAGS)
        .acl(CONNECTION_FAST)
        .args(&[arg("arguments", "block").optional().nested(&[
            arg("protover", "integer"),
            arg("auth", "block")
                .token("AUTH")
                .optional()
                .nested(&[arg("username", "string"), arg("password", "string")]),
            arg("clientname", "string").token("SETNAME").optional(),
        ])]),
    command("info", -1, "server")
        .doc(
            "1.0.0",
            "Returns information and statistics about the auditor.",
        )
        .flags(INFO_FLAGS)
        .acl(&["@slow", "@dangerous"])
        .args(&[arg("section", "string").optional().multiple()]),
    // PING needs no AUTH here (unlike Valkey) so health checks work on a password-protected port.
    command("ping", -1, "connection")
        .doc("1.0.0", "Returns the server's liveliness response.")
        .flags(&["fast", "no_auth"])
        .acl(CONNECTION_FAST)
        .args(&[arg("message", "string").optional()]),
    command("quit", -1, "connection")
        .doc("1.0.0", "Closes the connection.")
        .flags(NO_AUTH_FLAGS)
        .acl(CONNECTION_FAST),
    command("reset", 1, "connection")
        .doc("6.2.0", "Resets the connection.")
        .flags(NO_AUTH_FLAGS)
        .acl(CONNECTION_FAST),
    command("select", 2, "connection")
        .doc("1.0.0", "Changes the selected database (only 0 exists).")
        .flags(&["loading", "stale", "fast"])
        .acl(CONNECTION_FAST)
        .args(&[arg("index", "integer")]),
];

/// Look up "name" or "parent|sub" (lower case).
fn find_command(name: &str) -> Option<&'static CommandSpec> {
    match name.split_once('|') {
        None => COMMANDS.iter().find(|c| c.name == name),
        Some((parent, _)) => COMMANDS
            .iter()
            .find(|c| c.name == parent)?
            .subcommands
            .iter()
            .find(|s| s.name == name),
    }
}

fn command_info(spec: &CommandSpec) -> Reply {
    let statuses = |items: &[&'static str]| {
        Reply::Set(
            items
                .iter()
                .map(|s| Reply::Status(Cow::Borrowed(s)))
                .collect(),
        )
    };
    Reply::Array(vec![
        Reply::bulk(spec.name),
        Reply::Int(spec.arity),
        statuses(spec.flags),
        Reply::Int(0),
        Reply::Int(0),
        Reply::Int(0),
        statuses(spec.acl_categories),
        Reply::Set(Vec::new()),
        Reply::Array(Vec::new()),
        Reply::Array(spec.subcommands.iter().map(command_info).collect()),
    ])
}

fn command_docs(spec: &CommandSpec) -> Reply {
    let mut doc = vec![
        ("summary", Reply::bulk(spec.summary)),
        ("since", Reply::bulk(spec.since)),
        ("group", Reply::bulk(spec.group)),
        ("complexity", Reply::bulk(spec.complexity)),
    ];
    // Like Valkey, only commands that take arguments have the key (valkey-cli relies on it).
    if !spec.arguments.is_empty() {
        doc.push((
            "arguments",
            Reply::Array(spec.arguments.iter().map(argument_docs).collect()),
        ));
    }
    if !spec.subcommands.is_empty() {
        doc.push((
            "subcommands",
            Reply::Map(
                spec.subcommands
                    .iter()
                    .map(|s| (Reply::bulk(s.name), command_docs(s)))
                    .collect(),
            ),
        ));
    }
    Reply::str_map(doc)
}

fn argument_docs(arg: &ArgSpec) -> Reply {
    let mut doc = vec![
        ("name", Reply::bulk(arg.name)),
        ("type", Reply::bulk(arg.kind)),
    ];
    if matches!(arg.kind, "string" | "integer" | "pattern") {
        doc.push(("display_text", Reply::bulk(arg.name)));
    }
    if let Some(token) = arg.token {
        doc.push(("token", Reply::bulk(token)));
    }
    // valkey-cli asserts that flags are status replies.
    let mut flags = Vec::new();
    if arg.optional {
        flags.push(Reply::status("optional"));
    }
    if arg.multiple {
        flags.push(Reply::status("multiple"));
    }
    if !flags.is_empty() {
        doc.push(("flags", Reply::Set(flags)));
    }
    if !arg.arguments.is_empty() {
        doc.push((
            "arguments",
            Reply::Array(arg.arguments.iter().map(argument_docs).collect()),
        ));
    }
    Reply::str_map(doc)
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

fn lower(word: &[u8]) -> String {
    String::from_utf8_lossy(word).to_ascii_lowercase()
}

fn lossy(word: &[u8]) -> String {
    String::from_utf8_lossy(word).into_owned()
}

/// At most `max` bytes of `word`, as text (Valkey's `%.128s`).
fn truncated(word: &[u8], max: usize) -> String {
    String::from_utf8_lossy(&word[..word.len().min(max)]).into_owned()
}

fn arity_error(name: &str) -> Reply {
    Reply::err(format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

/// Valkey's text for an unknown command: the name and, within 128 bytes in all, its first arguments,
/// each quoted and followed by a space.
fn unknown_command_error(args: &[Bytes]) -> Reply {
    let mut shown = Vec::new();
    for arg in &args[1..] {
        if shown.len() >= 128 {
            break;
        }
        let room = 128 - shown.len();
        shown.push(b'\'');
        shown.extend_from_slice(&arg[..arg.len().min(room)]);
        shown.extend_from_slice(b"' ");
    }
    Reply::err(format!(
        "ERR unknown command '{}', with args beginning with: {}",
        truncated(&args[0], 128),
        lossy(&shown)
    ))
}

fn help_reply(command: &[u8], lines: &[&'static str]) -> Reply {
    let mut items = vec![Reply::Status(Cow::Owned(format!(
        "{} <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
        lossy(command).to_ascii_uppercase()
    )))];
    items.extend(lines.iter().map(|l| Reply::status(l)));
    items.push(Reply::status("HELP"));
    items.push(Reply::status("    Print this help."));
    Reply::Array(items)
}

/// Valkey's rule for client names and library attributes: printable ASCII without spaces, so that
/// CLIENT INFO stays splittable on spaces.
fn valid_client_attr(value: &[u8]) -> bool {
    value.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

/// Compare a password without an early exit on the first differing byte.
fn password_matches(given: &[u8], expected: &[u8]) -> bool {
    let longest = given.len().max(expected.len());
    let mut difference = (given.len() != expected.len()) as u8;
    for i in 0..longest {
        let a = given.get(i).copied().unwrap_or(0);
        let b = expected.get(i).copied().unwrap_or(0);
        difference |= std::hint::black_box(a ^ b);
    }
    difference == 0
}

/// Only the user "default" exists. Without a password it accepts any password, as Valkey's
/// `nopass` default user does.
fn credentials_valid(user: &[u8], password: &[u8], required: Option<&str>) -> bool {
    let password_ok = match required {
        None => true,
        Some(expected) => password_matches(password, expected.as_bytes()),
    };
    password_ok && user == CONTROL_USER.as_bytes()
}

async fn execute(
    client: &mut Client,
    shared: &Shared,
    args: &[Bytes],
    decoder: &RequestDecoder,
) -> Outcome {
    let name = lower(&args[0]);
    // A browser tricked into POSTing to the port would otherwise have its header lines run as
    // inline commands; Valkey closes such connections the same way.
    if name == "post" || name == "host:" {
        return Outcome::Close;
    }
    let Some(mut spec) = find_command(&name).filter(|_| !name.contains('|')) else {
        return Outcome::Reply(unknown_command_error(args));
    };
    if !spec.subcommands.is_empty() && args.len() >= 2 {
        let sub = lower(&args[1]);
        match spec.subcommands.iter().find(|s| s.sub_name() == sub) {
            Some(found) => spec = found,
            None => {
                return Outcome::Reply(Reply::err(format!(
                    "ERR unknown subcommand '{}'. Try {} HELP.",
                    truncated(&args[1], 128),
                    lossy(&args[0]).to_ascii_uppercase()
                )));
            }
        }
    }
    if !spec.arity_ok(args.len()) {
        let reply = arity_error(spec.name);
        if let (Some(command), Reply::Error(text)) =
            (CONFIG_CHANGES.iter().find(|c| **c == spec.name), &reply)
        {
            // Refused before it ran, as on the server: the log shows the attempt all the same.
            audit_refused(
                client,
                shared,
                command,
                args,
                record_error(args, text, true),
            )
            .await;
        }
        return Outcome::Reply(reply);
    }
    if !client.authenticated && !spec.has_flag("no_auth") && shared.password_required() {
        const NOAUTH: &str = "NOAUTH Authentication required.";
        if let Some(command) = CONFIG_CHANGES.iter().find(|c| **c == spec.name) {
            // An attempt to change the auditor's settings (to switch auditing off, say) is what
            // the log must show, refused or not.
            audit_refused(
                client,
                shared,
                command,
                args,
                record_error(args, NOAUTH, true),
            )
            .await;
        }
        return Outcome::Reply(Reply::err(NOAUTH));
    }
    client.last_command = spec.name;
    let reply = match spec.name {
        "ping" => match args.len() {
            1 => Reply::status("PONG"),
            2 => Reply::Bulk(args[1].clone()),
            _ => arity_error("ping"),
        },
        "echo" => Reply::Bulk(args[1].clone()),
        "quit" => return Outcome::ReplyAndClose(Reply::ok()),
        "reset" => {
            client.name = None;
            client.resp = 2;
            client.authenticated = !shared.password_required();
            Reply::status("RESET")
        }
        "select" => match std::str::from_utf8(&args[1])
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            None => Reply::err("ERR value is not an integer or out of range"),
            Some(0) => Reply::ok(),
            Some(_) => Reply::err("ERR DB index is out of range"),
        },
        "auth" => auth(client, shared, args).await,
        "hello" => hello(client, shared, args).await,
        "info" => info(shared, &args[1..]),
        "client|id" => Reply::Int(client.id as i64),
        "client|getname" => client.name.clone().map_or(Reply::Null, Reply::Bulk),
        "client|setname" => {
            if valid_client_attr(&args[2]) {
                client.name = Some(args[2].clone()).filter(|n| !n.is_empty());
                Reply::ok()
            } else {
                Reply::err(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                )
            }
        }
        "client|setinfo" => client_setinfo(client, args),
        "client|info" => Reply::Verbatim(client_info(client, decoder)),
        "client|help" => help_reply(&args[0], CLIENT_HELP),
        "command" => Reply::Array(COMMANDS.iter().map(command_info).collect()),
        "command|count" => Reply::Int(COMMANDS.len() as i64),
        "command|info" => command_info_reply(&args[2..]),
        "command|docs" => command_docs_reply(&args[2..]),
        "command|help" => help_reply(&args[0], COMMAND_HELP),
        "config|get" => config_get(shared, &args[2..]),
        "config|set" => config_set(client, shared, args).await,
        "config|rewrite" => config_rewrite(client, shared, args).await,
        "config|resetstat" => {
            shared.stats.reset();
            let _ = shared.blocking(|b| b.reset_stats()).await;
            shared
                .audit(ControlEvent {
                    command: "config|resetstat",
                    args: record_args(args, true),
                    client: client.peer,
                    user: CONTROL_USER.into(),
                    error: String::new(),
                })
                .await;
            Reply::ok()
        }
        "config|help" => help_reply(&args[0], CONFIG_HELP),
        // Only the CLIENT and CONFIG containers land here, and their arity (-2) already refused them.
        other => Reply::err(format!("ERR command '{other}' needs a subcommand")),
    };
    Outcome::Reply(reply)
}

const CLIENT_HELP: &[&str] = &[
    "GETNAME",
    "    Return the name of the current connection.",
    "ID",
    "    Return the ID of the current connection.",
    "INFO",
    "    Return information about the current client connection.",
    "SETINFO <option> <value>",
    "    Set client meta attr. Options are:",
    "    * LIB-NAME: the client lib name.",
    "    * LIB-VER: the client lib version.",
    "SETNAME <name>",
    "    Assign the name <name> to the current connection.",
];

const COMMAND_HELP: &[&str] = &[
    "(no subcommand)",
    "    Return details about all commands.",
    "COUNT",
    "    Return the total number of commands in this server.",
    "DOCS [<command-name> ...]",
    "    Return documentation details about multiple commands.",
    "    If no command names are given, documentation details for all",
    "    commands are returned.",
    "INFO [<command-name> ...]",
    "    Return details about multiple commands.",
    "    If no command names are given, documentation details for all",
    "    commands are returned.",
];

const CONFIG_HELP: &[&str] = &[
    "GET <pattern>",
    "    Return parameters matching the glob-like <pattern> and their values.",
    "SET <directive> <value>",
    "    Set the configuration <directive> to <value>.",
    "RESETSTAT",
    "    Reset statistics reported by the INFO command.",
    "REWRITE",
    "    Rewrite the configuration file.",
];

async fn auth(client: &mut Client, shared: &Shared, args: &[Bytes]) -> Reply {
    if args.len() > 3 {
        // Still an attempt to log in: recorded like the others (every argument hidden).
        audit_auth(shared, "auth", client.peer, args, "ERR syntax error").await;
        return Reply::err("ERR syntax error");
    }
    let required = shared.backend.control_password();
    let (user, password) = if args.len() == 2 {
        if required.is_none() {
            let error = "AUTH <password> called without any password configured for the default \
                         user. Are you sure your configuration is correct?";
            audit_auth(shared, "auth", client.peer, args, error).await;
            return Reply::err(format!("ERR {error}"));
        }
        (CONTROL_USER.as_bytes(), &args[1])
    } else {
        (&args[1][..], &args[2])
    };
    if credentials_valid(user, password, required.as_deref()) {
        audit_auth(shared, "auth", client.peer, args, "").await;
        client.authenticated = true;
        Reply::ok()
    } else {
        audit_auth(shared, "auth", client.peer, args, WRONGPASS).await;
        Reply::err(WRONGPASS)
    }
}

/// The reply to a wrong user or password, and the `error` of its record (the whole reply text, as
/// in the server's records of a failed AUTH).
const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

/// The record of an AUTH or HELLO ... AUTH: run as the control user whatever the outcome, naming
/// the user asked for in its arguments.
async fn audit_auth(
    shared: &Shared,
    command: &'static str,
    peer: SocketAddr,
    args: &[Bytes],
    error: &str,
) {
    shared
        .audit(ControlEvent {
            command,
            args: record_args(args, error.is_empty()),
            client: peer,
            user: CONTROL_USER.into(),
            error: error.into(),
        })
        .await;
}

/// The record of a CONFIG change refused before it ran (`error` as the record shows it).
async fn audit_refused(
    client: &Client,
    shared: &Shared,
    command: &'static str,
    args: &[Bytes],
    error: String,
) {
    shared
        .audit(ControlEvent {
            command,
            args: record_args(args, false),
            client: client.peer,
            user: CONTROL_USER.into(),
            error,
        })
        .await;
}

/// `command_args` of a control-port record (AUTH, HELLO, CONFIG SET/REWRITE/RESETSTAT), made by
/// the code that makes the server's records of those commands, so that both read alike and a
/// password is redacted by the same rules (`succeeded`: what only a success shows, see
/// `Described::shown_on_success`).
fn record_args(args: &[Bytes], succeeded: bool) -> String {
    let Some((described, argv)) = describe(args) else {
        return REDACTED_PASSWORD.into();
    };
    // The payload settings apply to KEY_OP records only.
    let shown = succeeded
        .then(|| command_args_on_success(&described, &argv, true, 0))
        .flatten()
        .unwrap_or_else(|| command_args(&described, &argv, true, 0));
    String::from_utf8_lossy(&shown).into_owned()
}

/// A control-port command as the server's records see it.
fn describe(args: &[Bytes]) -> Option<(Described, Vec<Arg>)> {
    static TABLE: OnceLock<Option<CommandTable>> = OnceLock::new();
    // The daemon refuses to start without the embedded table, so a caller's fallback is never
    // used; it must still name no secret.
    let table = TABLE
        .get_or_init(|| CommandTable::builtin().ok())
        .as_ref()?;
    let argv: Vec<Arg> = args.iter().map(|a| Arg::new(a)).collect();
    let described = table.describe(&argv, argv.len() as u64);
    Some((described, argv))
}

/// The `error` of a control-port record of a failed command: its error reply's text, redacted as
/// the server's records' are (Valkey's error may quote the rest of a password typed with a
/// space), and `rejected=` without `ERR ` for a refusal, as there.
fn record_error(args: &[Bytes], reply_text: &str, refused: bool) -> String {
    let mut error = reply_text.as_bytes().to_vec();
    match describe(args) {
        Some((d, argv)) if d.may_quote_secrets => {
            let quotable = crate::session::quotable_args(&argv, &d.secrets);
            crate::session::redact_quoted(&mut error, &d.command, &quotable);
        }
        Some(_) => {}
        None => return REDACTED_PASSWORD.into(),
    }
    let text = String::from_utf8_lossy(&error);
    if refused {
        format!("rejected={}", text.strip_prefix("ERR ").unwrap_or(&text))
    } else {
        text.into_owned()
    }
}

async fn hello(client: &mut Client, shared: &Shared, args: &[Bytes]) -> Reply {
    let mut version = None;
    let mut next = 1;
    if let Some(word) = args.get(1) {
        match std::str::from_utf8(word)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            None => return Reply::err("ERR Protocol version is not an integer or out of range"),
            Some(v @ 2..=3) => version = Some(v as u8),
            Some(_) => return Reply::err("NOPROTO unsupported protocol version"),
        }
        next = 2;
    }
    let mut credentials = None;
    let mut new_name = None;
    let mut j = next;
    while j < args.len() {
        let more = args.len() - 1 - j;
        match lower(&args[j]).as_str() {
            "auth" if more >= 2 => {
                credentials = Some((&args[j + 1], &args[j + 2]));
                j += 3;
            }
            "setname" if more >= 1 => {
                new_name = Some(&args[j + 1]);
                j += 2;
            }
            _ => {
                return Reply::err(format!(
                    "ERR Syntax error in HELLO option '{}'",
                    truncated(&args[j], 128)
                ));
            }
        }
    }
    if let Some((user, password)) = credentials {
        let required = shared.backend.control_password();
        if !credentials_valid(user, password, required.as_deref()) {
            audit_auth(shared, "hello", client.peer, args, WRONGPASS).await;
            return Reply::err(WRONGPASS);
        }
        audit_auth(shared, "hello", client.peer, args, "").await;
        client.authenticated = true;
    }
    if !client.authenticated && shared.password_required() {
        return Reply::err(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the \
             HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and \
             select the RESP protocol version at the same time",
        );
    }
    if let Some(name) = new_name {
        if !valid_client_attr(name) {
            return Reply::err(
                "ERR Client names cannot contain spaces, newlines or special characters.",
            );
        }
        client.name = Some(name.clone()).filter(|n| !n.is_empty());
    }
    if let Some(v) = version {
        client.resp = v;
    }
    Reply::str_map([
        ("server", Reply::bulk("auditor")),
        ("version", Reply::bulk(env!("CARGO_PKG_VERSION"))),
        ("proto", Reply::Int(i64::from(client.resp))),
        ("id", Reply::Int(client.id as i64)),
        ("mode", Reply::bulk("standalone")),
        ("role", Reply::bulk("master")),
        ("modules", Reply::Array(Vec::new())),
    ])
}

fn client_setinfo(client: &mut Client, args: &[Bytes]) -> Reply {
    let attr = lower(&args[2]);
    let value = &args[3];
    let slot = match attr.as_str() {
        "lib-name" => &mut client.lib_name,
        "lib-ver" => &mut client.lib_ver,
        _ => {
            return Reply::err(format!(
                "ERR Unrecognized option '{}'",
                truncated(&args[2], 128)
            ));
        }
    };
    if !valid_client_attr(value) {
        return Reply::err(format!(
            "ERR {} cannot contain spaces, newlines or special characters.",
            truncated(&args[2], 128)
        ));
    }
    *slot = Some(value.clone()).filter(|v| !v.is_empty());
    Reply::ok()
}

/// One CLIENT INFO line in Valkey's field order; fields that mean nothing here read as Valkey
/// shows them for an idle client.
fn client_info(client: &Client, decoder: &RequestDecoder) -> String {
    let text = |v: &Option<Bytes>| v.as_deref().map(lossy).unwrap_or_default();
    format!(
        "id={} addr={} laddr={} fd={} name={} age={} idle={} flags=N db=0 sub=0 psub=0 ssub=0 \
         multi=-1 watch=0 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 \
         tot-mem=0 events=r cmd={} user=default redir=-1 resp={} lib-name={} lib-ver={} \
         tot-net-in={} tot-net-out={} tot-cmds={}\n",
        client.id,
        client.peer,
        client.local,
        client.fd,
        text(&client.name),
        client.connected_at.elapsed().as_secs(),
        client.last_command_at.elapsed().as_secs(),
        client.last_command,
        client.resp,
        text(&client.lib_name),
        text(&client.lib_ver),
        decoder.consumed,
        client.bytes_out,
        client.commands,
    )
}

fn command_info_reply(names: &[Bytes]) -> Reply {
    if names.is_empty() {
        return Reply::Array(COMMANDS.iter().map(command_info).collect());
    }
    Reply::Array(
        names
            .iter()
            .map(|n| find_command(&lower(n)).map_or(Reply::Null, command_info))
            .collect(),
    )
}

fn command_docs_reply(names: &[Bytes]) -> Reply {
    let specs: Vec<&CommandSpec> = if names.is_empty() {
        COMMANDS.iter().collect()
    } else {
        names
            .iter()
            .filter_map(|n| find_command(&lower(n)))
            .collect()
    };
    Reply::Map(
        specs
            .into_iter()
            .map(|s| (Reply::bulk(s.name), command_docs(s)))
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// INFO
// ---------------------------------------------------------------------------------------------

/// INFO sections in output order.
const INFO_SECTIONS: &[&str] = &["server", "clients", "stats", "audit"];

fn info(shared: &Shared, requested: &[Bytes]) -> Reply {
    let wanted: Vec<&str> = if requested.is_empty() {
        INFO_SECTIONS.to_vec()
    } else {
        let requested: Vec<String> = requested.iter().map(|s| lower(s)).collect();
        if requested
            .iter()
            .any(|s| matches!(s.as_str(), "all" | "everything" | "default"))
        {
            INFO_SECTIONS.to_vec()
        } else {
            INFO_SECTIONS
                .iter()
                .copied()
                .filter(|s| requested.iter().any(|r| r == s))
                .collect()
        }
    };
    let mut text = String::new();
    for section in wanted {
        if !text.is_empty() {
            text.push_str("\r\n");
        }
        let (header, fields) = info_section(shared, section);
        text.push_str(&header);
        text.push_str("\r\n");
        for (name, value) in fields {
            text.push_str(&one_line(&name));
            text.push(':');
            text.push_str(&one_line(&value));
            text.push_str("\r\n");
        }
    }
    Reply::Verbatim(text)
}

fn info_section(shared: &Shared, section: &str) -> (String, Vec<(String, String)>) {
    let field = |name: &str, value: &dyn std::fmt::Display| (name.to_string(), value.to_string());
    let uptime = shared.started.elapsed().as_secs();
    let stats = &shared.stats;
    match section {
        "server" => (
            "# Server".into(),
            vec![
                field("auditor_version", &env!("CARGO_PKG_VERSION")),
                field("process_id", &std::process::id()),
                field("tcp_port", &shared.port),
                field("uptime_in_seconds", &uptime),
                field("uptime_in_days", &(uptime / 86_400)),
            ],
        ),
        "clients" => (
            "# Clients".into(),
            vec![
                field("connected_clients", &shared.connected_clients()),
                field("maxclients", &MAX_CLIENTS),
            ],
        ),
        "stats" => (
            "# Stats".into(),
            vec![
                field(
                    "total_connections_received",
                    &Stats::get(&stats.connections_received),
                ),
                field(
                    "total_commands_processed",
                    &Stats::get(&stats.commands_processed),
                ),
                field(
                    "rejected_connections",
                    &Stats::get(&stats.rejected_connections),
                ),
                field("total_error_replies", &Stats::get(&stats.error_replies)),
                field(
                    "protocol_error_disconnections",
                    &Stats::get(&stats.protocol_error_disconnections),
                ),
            ],
        ),
        _ => (AUDIT_INFO_HEADER.into(), shared.backend.info_audit()),
    }
}

// ---------------------------------------------------------------------------------------------
// CONFIG
// ---------------------------------------------------------------------------------------------

fn is_secret(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(SECRET_SETTING_SUFFIX)
}

/// CONFIG GET: every setting matching any pattern, once, in the backend's order.
fn config_get(shared: &Shared, patterns: &[Bytes]) -> Reply {
    let names = shared.backend.setting_names();
    let mut selected = vec![false; names.len()];
    for pattern in patterns {
        // As Valkey: only words with glob characters are globs; others are plain names.
        let is_glob = pattern.iter().any(|b| matches!(b, b'*' | b'?' | b'['));
        let glob = is_glob.then(|| Glob::new(pattern));
        for (i, name) in names.iter().enumerate() {
            let hit = match &glob {
                Some(glob) => glob.matches(name.as_bytes()),
                None => name.as_bytes().eq_ignore_ascii_case(pattern),
            };
            selected[i] |= hit;
        }
    }
    let names: Vec<String> = names
        .into_iter()
        .zip(selected)
        .filter_map(|(name, hit)| hit.then_some(name))
        .collect();
    // One snapshot: a CONFIG SET of several settings never shows half applied.
    let values = shared.backend.get_settings(&names);
    let pairs = names
        .into_iter()
        .zip(values)
        .filter_map(|(name, value)| {
            let value = value?;
            let value = if is_secret(&name) {
                String::new()
            } else {
                value
            };
            Some((Reply::bulk(name), Reply::bulk(value)))
        })
        .collect();
    Reply::Map(pairs)
}

async fn config_set(client: &Client, shared: &Shared, full_args: &[Bytes]) -> Reply {
    let words = &full_args[2..];
    if !words.len().is_multiple_of(2) {
        // (Fewer than one pair was refused by the arity check, as Valkey does.)
        const SYNTAX: &str = "ERR syntax error";
        audit_refused(client, shared, "config|set", full_args, SYNTAX.into()).await;
        return Reply::err(SYNTAX);
    }
    let known = shared.backend.setting_names();
    let mut pairs = Vec::with_capacity(words.len() / 2);
    let mut all_known = true;
    let mut duplicate = None;
    for pair in words.chunks_exact(2) {
        let typed = lossy(&pair[0]);
        let name = match known.iter().find(|k| k.eq_ignore_ascii_case(&typed)) {
            Some(canonical) => {
                if pairs.iter().any(|(earlier, _)| earlier == canonical) {
                    // Valkey names the last repeated parameter, as it was typed.
                    duplicate = Some(typed);
                }
                canonical.clone()
            }
            None => {
                all_known = false;
                typed
            }
        };
        pairs.push((name, pair[1].clone()));
    }
    let protected = match all_known && duplicate.is_none() {
        true => protected_refused(client, shared, &pairs).await,
        false => None,
    };
    let result = match (duplicate.filter(|_| all_known), protected) {
        // (An unknown name is reported first, by the backend, as Valkey does.)
        (Some(name), _) => Err(format!(
            "CONFIG SET failed (possibly related to argument '{name}') - duplicate parameter"
        )),
        (None, Some(name)) => Err(format!(
            "CONFIG SET failed (possibly related to argument '{name}') - can't set protected config"
        )),
        (None, None) => config_set_checked(shared, pairs).await,
    };
    shared
        .audit(ControlEvent {
            command: "config|set",
            args: record_args(full_args, result.is_ok()),
            client: client.peer,
            user: CONTROL_USER.into(),
            // The error reply's text, as the server's records carry it.
            error: result
                .as_ref()
                .err()
                .map(|m| record_error(full_args, &format!("ERR {m}"), false))
                .unwrap_or_default(),
        })
        .await;
    match result {
        Ok(()) => Reply::ok(),
        Err(message) => Reply::err(format!("ERR {message}")),
    }
}

/// The first protected change among `pairs` that `client` may not make (see `ProtectedConfigs`).
async fn protected_refused(
    client: &Client,
    shared: &Shared,
    pairs: &[(String, Bytes)],
) -> Option<String> {
    let names: Vec<String> = pairs.iter().map(|(name, _)| name.clone()).collect();
    let current = shared.backend.get_settings(&names);
    let protected: Vec<&str> = pairs
        .iter()
        .zip(&current)
        .filter(|((name, value), current)| {
            protected_change(name, &String::from_utf8_lossy(value), current.as_deref())
        })
        .map(|((name, _), _)| name.as_str())
        .collect();
    let first = *protected.first()?;
    // (Only a password already set and given proves anything: one this client just set proves
    // nothing, which is why setting it is itself protected.)
    let authenticated = shared.password_required() && client.authenticated;
    let allowed = match shared.protected {
        ProtectedConfigs::Yes => return None,
        // Only set at start; but the password may be changed by a client that gave it.
        ProtectedConfigs::No => {
            return protected
                .into_iter()
                .find(|name| !(*name == PASSWORD_SETTING && authenticated))
                .map(str::to_string);
        }
        ProtectedConfigs::Root => {
            authenticated || {
                let (peer, local) = (client.peer, client.local);
                tokio::task::spawn_blocking(move || crate::procscan::local_peer_uid(peer, local))
                    .await
                    .ok()
                    .flatten()
                    == Some(0)
            }
        }
    };
    (!allowed).then(|| first.to_string())
}

/// The values' own check, then the backend's all-or-nothing apply (which names unknown parameters
/// as Valkey would: before duplicates, checked by the caller only when every name is known).
async fn config_set_checked(shared: &Shared, pairs: Vec<(String, Bytes)>) -> Result<(), String> {
    let mut settings = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        let Ok(value) = String::from_utf8(value.to_vec()) else {
            return Err(format!(
                "CONFIG SET failed (possibly related to argument '{name}') - argument must be valid UTF-8"
            ));
        };
        settings.push((name, value));
    }
    shared
        .blocking(move |b| b.set_settings(&settings))
        .await
        .unwrap_or_else(|| Err("CONFIG SET failed - internal error".into()))
}

/// The CONFIG commands that change something, recorded even when refused.
const CONFIG_CHANGES: [&str; 3] = ["config|set", "config|rewrite", "config|resetstat"];

async fn config_rewrite(client: &Client, shared: &Shared, args: &[Bytes]) -> Reply {
    let result = shared
        .blocking(|b| b.rewrite_config())
        .await
        .unwrap_or_else(|| Err("Rewriting config file: internal error".into()));
    shared
        .audit(ControlEvent {
            command: "config|rewrite",
            args: record_args(args, result.is_ok()),
            client: client.peer,
            user: CONTROL_USER.into(),
            // The error reply's text, as the server's records carry it.
            error: result
                .as_ref()
                .err()
                .map(|m| format!("ERR {m}"))
                .unwrap_or_default(),
        })
        .await;
    match result {
        Ok(()) => Reply::ok(),
        Err(message) => Reply::err(format!("ERR {message}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Glob patterns
// ---------------------------------------------------------------------------------------------

/// A glob pattern as Valkey's `stringmatchlen(..., nocase=1)` reads it: `*`, `?`, `[abc]`, `[^a-z]`,
/// and `\` to escape. Matching is ASCII case-insensitive and linear in time (one backtrack point),
/// so a hostile pattern like `*a*a*a*...` cannot stall the port.
struct Glob {
    tokens: Vec<GlobToken>,
}

enum GlobToken {
    Star,
    AnyByte,
    Byte(u8),
    Class {
        negated: bool,
        ranges: Vec<(u8, u8)>,
    },
}

impl GlobToken {
    fn matches(&self, byte: u8) -> bool {
        let byte = byte.to_ascii_lowercase();
        match self {
            GlobToken::Star | GlobToken::AnyByte => true,
            GlobToken::Byte(b) => *b == byte,
            GlobToken::Class { negated, ranges } => {
                ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&byte)) != *negated
            }
        }
    }
}

impl Glob {
    fn new(pattern: &[u8]) -> Glob {
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < pattern.len() {
            let c = pattern[i];
            i += 1;
            match c {
                b'*' => {
                    if !matches!(tokens.last(), Some(GlobToken::Star)) {
                        tokens.push(GlobToken::Star);
                    }
                }
                b'?' => tokens.push(GlobToken::AnyByte),
                b'\\' if i < pattern.len() => {
                    tokens.push(GlobToken::Byte(pattern[i].to_ascii_lowercase()));
                    i += 1;
                }
                b'[' => {
                    let negated = pattern.get(i) == Some(&b'^');
                    if negated {
                        i += 1;
                    }
                    let mut ranges = Vec::new();
                    // An unterminated class ends with the pattern, as in Valkey.
                    while i < pattern.len() {
                        let c = pattern[i];
                        if c == b'\\' && i + 1 < pattern.len() {
                            let e = pattern[i + 1].to_ascii_lowercase();
                            ranges.push((e, e));
                            i += 2;
                        } else if c == b']' {
                            i += 1;
                            break;
                        } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' {
                            let (a, b) =
                                (c.to_ascii_lowercase(), pattern[i + 2].to_ascii_lowercase());
                            ranges.push((a.min(b), a.max(b)));
                            i += 3;
                        } else {
                            let c = c.to_ascii_lowercase();
                            ranges.push((c, c));
                            i += 1;
                        }
                    }
                    tokens.push(GlobToken::Class { negated, ranges });
                }
                other => tokens.push(GlobToken::Byte(other.to_ascii_lowercase())),
            }
        }
        Glob { tokens }
    }

    fn matches(&self, text: &[u8]) -> bool {
        let tokens = &self.tokens;
        let (mut p, mut t) = (0, 0);
        // Where the last `*` was and how much text it has swallowed so far.
        let mut backtrack: Option<(usize, usize)> = None;
        while t < text.len() {
            match tokens.get(p) {
                Some(GlobToken::Star) => {
                    backtrack = Some((p, t));
                    p += 1;
                    continue;
                }
                Some(token) if token.matches(text[t]) => {
                    p += 1;
                    t += 1;
                    continue;
                }
                _ => {}
            }
            match backtrack {
                Some((star, swallowed)) => {
                    backtrack = Some((star, swallowed + 1));
                    p = star + 1;
                    t = swallowed + 1;
                }
                None => return false,
            }
        }
        tokens[p..].iter().all(|t| matches!(t, GlobToken::Star))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::AsyncReadExt as _;

    use super::*;

    /// What the fake backend saw of a control event.
    #[derive(Debug, Clone, PartialEq)]
    struct Event {
        command: String,
        args: String,
        user: String,
        success: bool,
        error: String,
    }

    /// In-memory settings; only `audit.format` is validated. It renders the password as is, so the
    /// tests also show that the control port masks it on its own.
    struct FakeBackend {
        settings: Mutex<Vec<(String, String)>>,
        events: Mutex<Vec<Event>>,
        resets: Mutex<u32>,
        has_config_file: bool,
    }

    impl FakeBackend {
        fn new(password: &str) -> Arc<FakeBackend> {
            Arc::new(FakeBackend {
                settings: Mutex::new(vec![
                    ("audit.enabled".into(), "yes".into()),
                    ("audit.format".into(), "text".into()),
                    ("audit.events".into(), "all".into()),
                    ("audit.excluderules".into(), "".into()),
                    ("audit.control_requirepass".into(), password.into()),
                ]),
                events: Mutex::new(Vec::new()),
                resets: Mutex::new(0),
                has_config_file: false,
            })
        }

        fn value(&self, name: &str) -> String {
            let settings = self.settings.lock().unwrap();
            let found = settings.iter().find(|(n, _)| n == name);
            found.map(|(_, v)| v.clone()).unwrap()
        }

        fn events(&self) -> Vec<Event> {
            self.events.lock().unwrap().clone()
        }

        /// With the settings that name a file or a program, too.
        fn with_protected(password: &str) -> Arc<FakeBackend> {
            let backend = FakeBackend::new(password);
            backend.settings.lock().unwrap().extend([
                (
                    "audit.protocol".into(),
                    "file /var/log/valkey/audit.log".into(),
                ),
                ("audit.archive_command".into(), "".into()),
            ]);
            backend
        }
    }

    impl ControlBackend for FakeBackend {
        fn setting_names(&self) -> Vec<String> {
            let settings = self.settings.lock().unwrap();
            settings.iter().map(|(n, _)| n.clone()).collect()
        }

        fn get_settings(&self, names: &[String]) -> Vec<Option<String>> {
            let settings = self.settings.lock().unwrap();
            let value = |name: &String| {
                let found = settings.iter().find(|(n, _)| n == name);
                found.map(|(_, v)| v.clone())
            };
            names.iter().map(value).collect()
        }

        fn set_settings(&self, pairs: &[(String, String)]) -> Result<(), String> {
            let mut settings = self.settings.lock().unwrap();
            for (name, value) in pairs {
                if !settings.iter().any(|(n, _)| n == name) {
                    return Err(format!(
                        "Unknown option or number of arguments for CONFIG SET - '{name}'"
                    ));
                }
                if name == "audit.format"
                    && !["text", "json", "csv"].contains(&value.to_ascii_lowercase().as_str())
                {
                    return Err(
                        "CONFIG SET failed (possibly related to argument 'audit.format') \
                                - argument(s) must be one of the following: text, json, csv"
                            .into(),
                    );
                }
            }
            for (name, value) in pairs {
                if let Some(slot) = settings.iter_mut().find(|(n, _)| n == name) {
                    slot.1 = value.clone();
                }
            }
            Ok(())
        }

        fn rewrite_config(&self) -> Result<(), String> {
            if self.has_config_file {
                Ok(())
            } else {
                Err("The server is running without a config file".into())
            }
        }

        fn reset_stats(&self) {
            *self.resets.lock().unwrap() += 1;
        }

        fn info_audit(&self) -> Vec<(String, String)> {
            vec![
                ("audit_total_events".into(), "5".into()),
                ("audit_file_status".into(), "connected".into()),
            ]
        }

        fn control_password(&self) -> Option<String> {
            Some(self.value("audit.control_requirepass")).filter(|p| !p.is_empty())
        }

        fn audit_control_event(
            &self,
            command: &str,
            args: &str,
            _client: SocketAddr,
            user: &str,
            success: bool,
            error: &str,
        ) {
            self.events.lock().unwrap().push(Event {
                command: command.into(),
                args: args.into(),
                user: user.into(),
                success,
                error: error.into(),
            });
        }
    }

    async fn start(backend: Arc<FakeBackend>) -> u16 {
        start_with(backend, ProtectedConfigs::Root).await
    }

    async fn start_with(backend: Arc<FakeBackend>, protected: ProtectedConfigs) -> u16 {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(serve(listener, backend, protected));
        port
    }

    #[test]
    fn protected_changes_are_those_that_run_or_write_somewhere_else() {
        let file = Some("file /var/log/valkey/audit.log");
        assert!(!protected_change(
            "audit.protocol",
            "file /var/log/valkey/audit.log",
            file
        ));
        assert!(!protected_change(
            "audit.protocol",
            " file  /var/log/valkey/audit.log",
            file
        ));
        assert!(protected_change(
            "audit.protocol",
            "file /etc/ld.so.preload",
            file
        ));
        assert!(protected_change(
            "audit.protocol",
            "FILE /etc/ld.so.preload",
            file
        ));
        assert!(!protected_change("audit.protocol", "syslog local0", file));
        assert!(!protected_change(
            "audit.protocol",
            "TCP 10.0.0.1:514",
            file
        ));
        assert!(protected_change(
            "audit.archive_command",
            "/bin/sh -c id",
            Some("")
        ));
        assert!(protected_change(
            "audit.archive_command",
            "",
            Some("/usr/bin/ship %path")
        ));
        assert!(!protected_change("audit.archive_command", "", Some("")));
        assert!(protected_change(
            "audit.spool_dir",
            "/etc/cron.d",
            Some("/var/spool/auditor")
        ));
        assert!(!protected_change("audit.format", "json", Some("text")));
        assert!(protected_change(
            "audit.control_requirepass",
            "pw",
            Some("")
        ));
    }

    #[tokio::test]
    async fn protected_configs_follow_the_setting() {
        let set_archive = [
            "CONFIG",
            "SET",
            "audit.archive_command",
            "/usr/bin/ship %path",
        ];
        let refused = "-ERR CONFIG SET failed (possibly related to argument \
                       'audit.archive_command') - can't set protected config\r\n";
        // `no`: never at run time, whoever asks; other settings in the same call are not applied.
        let backend = FakeBackend::with_protected("");
        let mut c =
            TestClient::connect(start_with(backend.clone(), ProtectedConfigs::No).await).await;
        let mut both = vec!["CONFIG", "SET", "audit.format", "json"];
        both.extend_from_slice(&set_archive[2..]);
        assert_eq!(c.cmd(&both).await, refused);
        assert_eq!(backend.value("audit.format"), "text");
        // Naming the file in force again (to reopen it) is no change.
        let reopen = [
            "CONFIG",
            "SET",
            "audit.protocol",
            "file /var/log/valkey/audit.log",
        ];
        assert_eq!(c.cmd(&reopen).await, "+OK\r\n");
        // Nor may a password be set at run time; a client that gave the one set at start may
        // change it.
        let set_pw = ["CONFIG", "SET", "audit.control_requirepass", "new"];
        assert_eq!(
            c.cmd(&set_pw).await,
            "-ERR CONFIG SET failed (possibly related to argument 'audit.control_requirepass') - \
             can't set protected config\r\n"
        );
        let backend = FakeBackend::with_protected("pw");
        let mut c =
            TestClient::connect(start_with(backend.clone(), ProtectedConfigs::No).await).await;
        assert_eq!(c.cmd(&["AUTH", "pw"]).await, "+OK\r\n");
        assert_eq!(c.cmd(&set_archive).await, refused);
        assert_eq!(c.cmd(&set_pw).await, "+OK\r\n");
        // `root` (the default): this test runs as root, on this host.
        let backend = FakeBackend::with_protected("");
        let mut c = TestClient::connect(start(backend.clone()).await).await;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(c.cmd(&set_archive).await, "+OK\r\n");
            assert_eq!(
                backend.value("audit.archive_command"),
                "/usr/bin/ship %path"
            );
        } else {
            assert_eq!(c.cmd(&set_archive).await, refused);
        }
        // ... and a client authenticated with the password, whoever it is.
        let backend = FakeBackend::with_protected("pw");
        let mut c = TestClient::connect(start(backend.clone()).await).await;
        assert_eq!(c.cmd(&["AUTH", "pw"]).await, "+OK\r\n");
        assert_eq!(c.cmd(&set_archive).await, "+OK\r\n");
        // `yes`: anyone who may CONFIG SET.
        let backend = FakeBackend::with_protected("");
        let mut c =
            TestClient::connect(start_with(backend.clone(), ProtectedConfigs::Yes).await).await;
        assert_eq!(c.cmd(&set_archive).await, "+OK\r\n");
    }

    /// A raw-bytes client: sends what it is given, returns each reply's exact bytes as text.
    struct TestClient {
        stream: TcpStream,
        buf: BytesMut,
    }

    /// Length of the first complete reply in `buf`, RESP2 or RESP3.
    fn reply_len(buf: &[u8]) -> Option<usize> {
        match redis_protocol::resp2::decode::decode(buf) {
            Ok(done) => done.map(|(_, n)| n),
            Err(_) => redis_protocol::resp3::decode::complete::decode(buf)
                .expect("a valid RESP3 reply")
                .map(|(_, n)| n),
        }
    }

    impl TestClient {
        async fn connect(port: u16) -> TestClient {
            TestClient {
                stream: TcpStream::connect(("127.0.0.1", port)).await.unwrap(),
                buf: BytesMut::new(),
            }
        }

        async fn send(&mut self, raw: &[u8]) {
            self.stream.write_all(raw).await.unwrap();
        }

        async fn read(&mut self) -> String {
            loop {
                if let Some(n) = reply_len(&self.buf) {
                    return String::from_utf8_lossy(&self.buf.split_to(n)).into_owned();
                }
                let read = tokio::time::timeout(
                    Duration::from_secs(5),
                    self.stream.read_buf(&mut self.buf),
                )
                .await
                .expect("a reply within 5 s")
                .expect("read");
                assert!(read > 0, "EOF; buffered {:?}", self.buf);
            }
        }

        async fn cmd(&mut self, args: &[&str]) -> String {
            let mut raw = format!("*{}\r\n", args.len());
            for a in args {
                raw.push_str(&format!("${}\r\n{a}\r\n", a.len()));
            }
            self.send(raw.as_bytes()).await;
            self.read().await
        }

        /// The server closes the connection (after anything already buffered).
        async fn expect_closed(&mut self) {
            let mut rest = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(5), self.stream.read_to_end(&mut rest))
                    .await
                    .expect("close within 5 s");
            assert!(
                read.is_ok() && rest.is_empty(),
                "expected EOF, got {read:?} {rest:?}"
            );
        }
    }

    fn bulk(s: &str) -> String {
        format!("${}\r\n{s}\r\n", s.len())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn ping_echo_multibulk_and_inline() {
        let port = start(FakeBackend::new("")).await;
        let mut c = TestClient::connect(port).await;
        assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
        assert_eq!(c.cmd(&["ping", "hi"]).await, "$2\r\nhi\r\n");
        assert_eq!(c.cmd(&["ECHO", "hello"]).await, "$5\r\nhello\r\n");
        c.send(b"PING\r\n").await;
        assert_eq!(c.read().await, "+PONG\r\n");
        c.send(b"\r\n  echo \"a b\\x41\\n\"  \n").await;
        assert_eq!(c.read().await, "$5\r\na bA\n\r\n");
        c.send(b"echo 'it\\'s'\r\n").await;
        assert_eq!(c.read().await, "$4\r\nit's\r\n");
        // Pipelined requests, split across writes, answered in order.
        c.send(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$3\r")
            .await;
        c.send(b"\nabc\r\n").await;
        assert_eq!(c.read().await, "+PONG\r\n");
        assert_eq!(c.read().await, "$3\r\nabc\r\n");
        assert_eq!(
            c.cmd(&["ECHO"]).await,
            "-ERR wrong number of arguments for 'echo' command\r\n"
        );
        assert_eq!(
            c.cmd(&["PING", "a", "b"]).await,
            "-ERR wrong number of arguments for 'ping' command\r\n"
        );
        assert_eq!(c.cmd(&["SELECT", "0"]).await, "+OK\r\n");
        assert_eq!(
            c.cmd(&["SELECT", "3"]).await,
            "-ERR DB index is out of range\r\n"
        );
        assert_eq!(c.cmd(&["QUIT"]).await, "+OK\r\n");
        c.expect_closed().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unbalanced_quotes_are_a_protocol_error() {
        let port = start(FakeBackend::new("")).await;
        let mut c = TestClient::connect(port).await;
        c.send(b"ECHO \"abc\r\n").await;
        assert_eq!(
            c.read().await,
            "-ERR Protocol error: unbalanced quotes in request\r\n"
        );
        c.expect_closed().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unknown_commands_and_subcommands() {
        let port = start(FakeBackend::new("")).await;
        let mut c = TestClient::connect(port).await;
        assert_eq!(
            c.cmd(&["FOO", "a", "b"]).await,
            "-ERR unknown command 'FOO', with args beginning with: 'a' 'b' \r\n"
        );
        assert_eq!(
            c.cmd(&["foo"]).await,
            "-ERR unknown command 'foo', with args beginning with: \r\n"
        );
        let long = "x".repeat(200);
        let reply = c.cmd(&["FOO", "ab", &long, "c"]).await;
        assert_eq!(
            reply,
            format!(
                "-ERR unknown command 'FOO', with args beginning with: 'ab' '{}' \r\n",
                "x".repeat(123)
            )
        );
        assert_eq!(
            c.cmd(&["config|get", "x"]).await,
            "-ERR unknown command 'config|get', with args beginning with: 'x' \r\n"
        );
        assert_eq!(
            c.cmd(&["CONFIG", "FOO"]).await,
            "-ERR unknown subcommand 'FOO'. Try CONFIG HELP.\r\n"
        );
        assert_eq!(
            c.cmd(&["client", "kill"]).await,
            "-ERR unknown subcommand 'kill'. Try CLIENT HELP.\r\n"
        );
        assert_eq!(
            c.cmd(&["CONFIG"]).await,
            "-ERR wrong number of arguments for 'config' command\r\n"
        );
        assert_eq!(
            c.cmd(&["CONFIG", "GET"]).await,
            "-ERR wrong number of arguments for 'config|get' command\r\n"
        );
        // CR/LF in an echoed argument cannot break the error line.
        assert_eq!(
            c.cmd(&["FOO", "a\r\nb"]).await,
            "-ERR unknown command 'FOO', with args beginning with: 'a  b' \r\n"
        );
        let help = c.cmd(&["CONFIG", "HELP"]).await;
        assert!(help.starts_with(
            "*11\r\n+CONFIG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:\r\n+GET <pattern>\r\n"
        ));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hello_3_switches_to_resp3() {
        let port = start(FakeBackend::new("")).await;
        let mut c = TestClient::connect(port).await;
        assert_eq!(
            c.cmd(&["HELLO", "4"]).await,
            "-NOPROTO unsupported protocol version\r\n"
        );
        assert_eq!(
            c.cmd(&["HELLO", "x"]).await,
            "-ERR Protocol version is not an integer or out of range\r\n"
        );
        assert_eq!(
            c.cmd(&["HELLO", "3", "FOO"]).await,
            "-ERR Syntax error in HELLO option 'FOO'\r\n"
        );
        let reply = c.cmd(&["HELLO", "3", "SETNAME", "cli"]).await;
        let expected = format!(
            "%7\r\n{}{}{}{}{}:3\r\n{}:1\r\n{}{}{}{}{}*0\r\n",
            bulk("server"),
            bulk("auditor"),
            bulk("version"),
            bulk(env!("CARGO_PKG_VERSION")),
            bulk("proto"),
            bulk("id"),
            bulk("mode"),
            bulk("standalone"),
            bulk("role"),
            bulk("master"),
            bulk("modules"),
        );
        assert_eq!(reply, expected);
        assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, bulk("cli"));
        assert_eq!(
            c.cmd(&["CONFIG", "GET", "audit.format"]).await,
            format!("%1\r\n{}{}", bulk("audit.format"), bulk("text"))
        );
        assert_eq!(c.cmd(&["CLIENT", "SETNAME", ""]).await, "+OK\r\n");
        assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, "_\r\n");
        assert!(c.cmd(&["INFO", "clients"]).await.starts_with("=")); // verbatim text
        assert_eq!(c.cmd(&["RESET"]).await, "+RESET\r\n");
        assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, "$-1\r\n");
        let reply = c.cmd(&["HELLO"]).await;
        assert!(reply.starts_with("*14\r\n"), "{reply}");
        assert!(
            reply.contains(&format!("{}:2\r\n", bulk("proto"))),
            "{reply}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn auth_without_password() {
        let backend = FakeBackend::new("");
        let port = start(backend.clone()).await;
        let mut c = TestClient::connect(port).await;
        assert_eq!(
            c.cmd(&["AUTH", "x"]).await,
            "-ERR AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?\r\n"
        );
        assert_eq!(c.cmd(&["AUTH", "default", "anything"]).await, "+OK\r\n");
        assert_eq!(
            c.cmd(&["AUTH", "bob", "x"]).await,
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        );
        assert_eq!(
            c.cmd(&["AUTH", "a", "b", "c"]).await,
            "-ERR syntax error\r\n"
        );
        let events = backend.events();
        let summary: Vec<(&str, &str, &str, bool)> = events
            .iter()
            .map(|e| {
                let (command, args, user) = (e.command.as_str(), e.args.as_str(), e.user.as_str());
                (command, args, user, e.success)
            })
            .collect();
        // The user a command ran as is the control user, whoever an AUTH asked for; the arguments
        // name the user asked for, as the server's AUTH records do.
        assert_eq!(
            summary,
            [
                ("auth", "password=<REDACTED>", "default", false),
                ("auth", "user=default password=<REDACTED>", "default", true),
                ("auth", "user=bob password=<REDACTED>", "default", false),
                (
                    "auth",
                    "user=<REDACTED> password=<REDACTED>",
                    "default",
                    false
                ),
            ]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hello_auth_records_name_the_user_asked_for_like_the_servers() {
        let backend = FakeBackend::new("pw");
        let port = start(backend.clone()).await;
        let mut c = TestClient::connect(port).await;
        let wrongpass = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";
        assert_eq!(
            c.cmd(&["HELLO", "3", "AUTH", "bob", "wrong"]).await,
            wrongpass
        );
        let hello = c
            .cmd(&["HELLO", "2", "AUTH", "default", "pw", "SETNAME", "x"])
            .await;
        assert!(hello.starts_with("*14\r\n"), "{hello}");
        let events = backend.events();
        assert_eq!(
            events[0],
            Event {
                command: "hello".into(),
                args: "protover=3 user=bob password=<REDACTED>".into(),
                user: "default".into(),
                success: false,
                error: WRONGPASS.into(),
            }
        );
        assert_eq!(
            (events[1].args.as_str(), events[1].user.as_str()),
            ("protover=2 user=default password=<REDACTED>", "default")
        );
        assert!(events[1].success);
        assert!(events.iter().all(|e| !e.args.contains("wrong")));
        assert_eq!(control_event_category("hello"), Category::Auth);
        assert_eq!(control_event_category("auth"), Category::Auth);
        for config in ["config|set", "config|rewrite", "config|resetstat"] {
            assert_eq!(control_event_category(config), Category::Config);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn password_gates_everything_but_auth_hello_ping_quit() {
        let backend = FakeBackend::new("s3cret");
        let port = start(backend.clone()).await;
        let mut c = TestClient::connect(port).await;
        assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
        for cmd in [
            &["CONFIG", "GET", "*"][..],
            &["INFO"],
            &["ECHO", "x"],
            &["CLIENT", "ID"],
            &["COMMAND", "COUNT"],
        ] {
            assert_eq!(
                c.cmd(cmd).await,
                "-NOAUTH Authentication required.\r\n",
                "{cmd:?}"
            );
        }
        assert_eq!(
            c.cmd(&["HELLO", "3"]).await,
            "-NOAUTH HELLO must be called with the client already authenticated, otherwise the \
             HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and \
             select the RESP protocol version at the same time\r\n"
        );
        let wrongpass = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";
        assert_eq!(c.cmd(&["AUTH", "wrong"]).await, wrongpass);
        assert_eq!(c.cmd(&["AUTH", "admin", "s3cret"]).await, wrongpass);
        assert_eq!(
            c.cmd(&["HELLO", "3", "AUTH", "default", "s3cre"]).await,
            wrongpass
        );
        assert_eq!(
            c.cmd(&["CONFIG", "GET", "audit.format"]).await,
            "-NOAUTH Authentication required.\r\n"
        );
        assert_eq!(c.cmd(&["AUTH", "s3cret"]).await, "+OK\r\n");
        assert_eq!(
            c.cmd(&["CONFIG", "GET", "audit.format"]).await,
            format!("*2\r\n{}{}", bulk("audit.format"), bulk("text"))
        );
        // RESET logs the connection out again.
        assert_eq!(c.cmd(&["RESET"]).await, "+RESET\r\n");
        assert_eq!(
            c.cmd(&["ECHO", "x"]).await,
            "-NOAUTH Authentication required.\r\n"
        );
        let hello = c.cmd(&["HELLO", "3", "AUTH", "default", "s3cret"]).await;
        assert!(hello.starts_with("%7\r\n"), "{hello}");
        assert_eq!(c.cmd(&["ECHO", "x"]).await, bulk("x"));

        let events = backend.events();
        let summary: Vec<(&str, &str, bool)> = events
            .iter()
            .map(|e| (e.command.as_str(), e.args.as_str(), e.success))
            .collect();
        assert_eq!(
            summary,
            [
                ("auth", "password=<REDACTED>", false),
                ("auth", "user=admin password=<REDACTED>", false),
                (
                    "hello",
                    "protover=3 user=default password=<REDACTED>",
                    false
                ),
                ("auth", "password=<REDACTED>", true),
                ("hello", "protover=3 user=default password=<REDACTED>", true),
            ]
        );
        assert!(events.iter().all(|e| e.user == "default"));
        assert!(events.iter().all(|e| !e.args.contains("s3cre")));

        // A second client is not logged in by the first.
        let mut other = TestClient::connect(port).await;
        assert_eq!(
            other.cmd(&["INFO"]).await,
            "-NOAUTH Authentication required.\r\n"
        );
        assert_eq!(other.cmd(&["QUIT"]).await, "+OK\r\n");
        other.expect_closed().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn setting_a_password_keeps_the_setter_logged_in() {
        let backend = FakeBackend::new("");
        let port = start(backend.clone()).await;
        let mut admin = TestClient::connect(port).await;
        assert_eq!(
            admin
                .cmd(&["CONFIG", "SET", "audit.control_requirepass", "pw"])
                .await,
            "+OK\r\n"
        );
        assert_eq!(admin.cmd(&["ECHO", "still"]).await, bulk("still"));
        let mut newcomer = TestClient::connect(port).await;
        assert_eq!(
            newcomer.cmd(&["ECHO", "x"]).await,
            "-NOAUTH Authentication required.\r\n"
        );
        // The password is never shown, even by a backend that would render it.
        assert_eq!(
            admin
                .cmd(&["CONFIG", "GET", "audit.control_requirepass"])
                .await,
            format!("*2\r\n{}$0\r\n\r\n", bulk("audit.control_requirepass"))
        );
        let event = backend.events().pop().unwrap();
        assert_eq!(event.args, "subcommand=SET param=audit.control_requirepass");
        assert!(event.success);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn config_get_globs() {
        let port = start(FakeBackend::new("pw")).await;
        let mut c = TestClient::connect(port).await;
        assert_eq!(c.cmd(&["AUTH", "pw"]).await, "+OK\r\n");
        let all = c.cmd(&["CONFIG", "GET", "audit.*"]).await;
        assert_eq!(
            all,
            format!(
                "*10\r\n{}{}{}{}{}{}{}$0\r\n\r\n{}$0\r\n\r\n",
                bulk("audit.enabled"),
                bulk("yes"),
                bulk("audit.format"),
                bulk("text"),
                bulk("audit.events"),
                bulk("all"),
                bulk("audit.excluderules"),
                bulk("audit.control_requirepass"),
            )
        );
        assert_eq!(c.cmd(&["CONFIG", "GET", "*"]).await, all);
        // Case-insensitive plain names answer with the canonical name; no duplicates.
        assert_eq!(
            c.cmd(&["CONFIG", "GET", "AUDIT.FORMAT", "audit.f*", "audit.format"])
                .await,
            format!("*2\r\n{}{}", bulk("audit.format"), bulk("text"))
        );
        assert_eq!(
            c.cmd(&["CONFIG", "GET", "audit.e[nv]*"]).await,
            format!(
                "*4\r\n{}{}{}{}",
                bulk("audit.enabled"),
                bulk("yes"),
                bulk("audit.events"),
                bulk("all")
            )
        );
        assert_eq!(
            c.cmd(&["CONFIG", "GET", "audit.?vents", "nosuch"]).await,
            format!("*2\r\n{}{}", bulk("audit.events"), bulk("all"))
        );
        assert_eq!(c.cmd(&["CONFIG", "GET", "maxmemory"]).await, "*0\r\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn config_set_is_all_or_nothing() {
        let backend = FakeBackend::new("");
        let port = start(backend.clone()).await;
        let mut c = TestClient::connect(port).await;
        assert_eq!(
            c.cmd(&[
                "CONFIG",
                "SET",
                "audit.format",
                "json",
                "AUDIT.events",
                "auth"
            ])
            .await,
            "+OK\r\n"
        );
        assert_eq!(backend.value("audit.format"), "json");
        assert_eq!(backend.value("audit.events"), "auth");
        assert_eq!(
            c.cmd(&[
                "CONFIG",
                "SET",
                "audit.events",
                "none",
                "audit.format",
                "xml"
            ])
            .await,
            "-ERR CONFIG SET failed (possibly related to argument 'audit.format') - argument(s) \
             must be one of the following: text, json, csv\r\n"
        );
        assert_eq!(backend.value("audit.events"), "auth");
        assert_eq!(backend.value("audit.format"), "json");
        assert_eq!(
            c.cmd(&[
                "CONFIG",
                "SET",
                "audit.format",
                "csv",
                "audit.FORMAT",
                "text"
            ])
            .await,
            // (As Valkey: the repeated name as typed.)
            "-ERR CONFIG SET failed (possibly related to argument 'audit.FORMAT') - duplicate \
             parameter\r\n"
        );
        assert_eq!(
            c.cmd(&["CONFIG", "SET", "audit.nosuch", "1", "audit.nosuch", "2"])
                .await,
            "-ERR Unknown option or number of arguments for CONFIG SET - 'audit.nosuch'\r\n"
        );
        assert_eq!(
            c.cmd(&["CONFIG", "SET", "audit.format", "csv", "audit.events"])
                .await,
            "-ERR syntax error\r\n"
        );
        assert_eq!(
            c.cmd(&["CONFIG", "SET", "audit.format"]).await,
            "-ERR wrong number of arguments for 'config|set' command\r\n"
        );
        assert_eq!(backend.value("audit.format"), "json");
        assert_eq!(
            c.cmd(&["CONFIG", "REWRITE"]).await,
            "-ERR The server is running without a config file\r\n"
        );
        assert_eq!(c.cmd(&["CONFIG", "RESETSTAT"]).await, "+OK\r\n");
        assert_eq!(*backend.resets.lock().unwrap(), 1);

        let events = backend.events();
        let expected = [
            (
                "config|set",
                "subcommand=SET param=audit.format param=AUDIT.events",
                "",
            ),
            (
                "config|set",
                "subcommand=SET param=audit.events param=audit.format",
                "ERR CONFIG SET failed (possibly related to argument 'audit.format') - argument(s) \
                 must be one of the following: text, json, csv",
            ),
            (
                "config|set",
                "subcommand=SET param=audit.format param=audit.FORMAT",
                "ERR CONFIG SET failed (possibly related to argument 'audit.FORMAT') - duplicate \
                 parameter",
            ),
            (
                "config|set",
                "subcommand=SET param=audit.nosuch param=audit.nosuch",
                "ERR Unknown option or number of arguments for CONFIG SET - 'audit.nosuch'",
            ),
            // Refused before they ran, recorded all the same.
            (
                "config|set",
                "subcommand=SET param=audit.format param=audit.events",
                "ERR syntax error",
            ),
            (
                "config|set",
                "subcommand=SET param=audit.format",
                "rejected=wrong number of arguments for 'config|set' command",
            ),
            (
                "config|rewrite",
                "subcommand=REWRITE",
                "ERR The server is running without a config file",
            ),
            ("config|resetstat", "subcommand=RESETSTAT", ""),
        ];
        assert_eq!(events.len(), expected.len(), "{events:?}");
        for (event, (command, args, error)) in events.iter().zip(expected) {
            assert_eq!(
                (
                    event.command.as_str(),
                    event.args.as_str(),
                    event.error.as_str()
                ),
                (command, args, error)
            );
            assert_eq!(event.success, error.is_empty());
            assert_eq!(event.user, "default");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn oversized_requests_disconnect() {
        let port = start(FakeBackend::new("")).await;
        let cases: [(&[u8], &str); 6] = [
            (b"*1\r\n$2000000\r\n", "invalid bulk length"),
            // (QA: Valkey's text, not a wording of our own.)
            (
                b"*2\r\n$4\r\nECHO\r\n$2\r\nhiXX\r\n",
                "invalid CRLF in request",
            ),
            (b"*2000\r\n", "invalid multibulk length"),
            (b"*1\r\n$-5\r\n", "invalid bulk length"),
            (b"*1\r\n+PING\r\n", "expected '+', got '+'"),
            (b"*x\r\n", "invalid multibulk length"),
        ];
        for (raw, why) in cases {
            let mut c = TestClient::connect(port).await;
            c.send(raw).await;
            let why = why.replace("expected '+'", "expected '$'");
            assert_eq!(c.read().await, format!("-ERR Protocol error: {why}\r\n"));
            c.expect_closed().await;
        }

        // Many arguments, each allowed, that add up to more than 1 MiB.
        let mut c = TestClient::connect(port).await;
        let chunk = "y".repeat(600 * 1024);
        let mut raw = format!("*3\r\n$4\r\nECHO\r\n${}\r\n{chunk}\r\n", chunk.len());
        raw.push_str(&format!("${}\r\n", chunk.len()));
        c.send(raw.as_bytes()).await;
        assert_eq!(c.read().await, "-ERR Protocol error: request too large\r\n");
        c.expect_closed().await;

        // Garbage without a newline.
        let mut c = TestClient::connect(port).await;
        let garbage = vec![b'g'; 70 * 1024];
        let _ = c.stream.write_all(&garbage).await;
        assert_eq!(
            c.read().await,
            "-ERR Protocol error: too big inline request\r\n"
        );
        c.expect_closed().await;

        // A browser's cross-protocol request is dropped without a reply.
        let mut c = TestClient::connect(port).await;
        c.send(b"POST / HTTP/1.1\r\nHost: localhost\r\n\r\nCONFIG SET audit.enabled no\r\n")
            .await;
        c.expect_closed().await;

        // The server is fine afterwards.
        let mut c = TestClient::connect(port).await;
        assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
        let stats = c.cmd(&["INFO", "stats"]).await;
        assert!(
            stats.contains("protocol_error_disconnections:8\r\n"),
            "{stats}"
        );
    }

    /// QA: 64 connections that each sent `*` and nothing more locked every operator out.
    #[tokio::test(flavor = "current_thread")]
    async fn stalled_requests_and_idle_unauthenticated_clients_lose_their_slot() {
        let port = start(FakeBackend::new("")).await;
        let mut stalled = TestClient::connect(port).await;
        stalled.send(b"*").await;
        let mut trickling = TestClient::connect(port).await;
        trickling.send(b"*2\r\n$4\r\nECHO\r\n").await;
        let mut idle = TestClient::connect(port).await;
        assert_eq!(idle.cmd(&["PING"]).await, "+PONG\r\n");
        // A byte now and then does not keep a request open for ever: it is closed meanwhile.
        let mut trickled = 0;
        for b in b"$5\r\nhel" {
            tokio::time::sleep(STALL_TIMEOUT / 2).await;
            if trickling.stream.write_all(&[*b]).await.is_err() {
                break;
            }
            trickled += 1;
        }
        assert!(trickled < 8, "a trickled request kept its slot");
        stalled.expect_closed().await;
        // Idle between requests, and authenticated (no password): kept.
        tokio::time::sleep(STALL_TIMEOUT * 3).await;
        assert_eq!(idle.cmd(&["PING"]).await, "+PONG\r\n");

        let port = start(FakeBackend::new("secret")).await;
        let mut unauthenticated = TestClient::connect(port).await;
        assert_eq!(unauthenticated.cmd(&["PING"]).await, "+PONG\r\n");
        let mut operator = TestClient::connect(port).await;
        assert_eq!(operator.cmd(&["AUTH", "secret"]).await, "+OK\r\n");
        unauthenticated.expect_closed().await;
        tokio::time::sleep(STALL_TIMEOUT * 3).await;
        assert_eq!(operator.cmd(&["PING"]).await, "+PONG\r\n");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn max_clients() {
        let port = start(FakeBackend::new("")).await;
        let mut clients = Vec::new();
        for _ in 0..MAX_CLIENTS {
            let mut c = TestClient::connect(port).await;
            assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
            clients.push(c);
        }
        let mut extra = TestClient::connect(port).await;
        assert_eq!(extra.read().await, "-ERR max number of clients reached\r\n");
        extra.expect_closed().await;
        let info = clients[0].cmd(&["INFO", "clients"]).await;
        assert!(
            info.contains(&format!("connected_clients:{MAX_CLIENTS}\r\n")),
            "{info}"
        );

        // Closing one frees its slot.
        let mut last = clients.pop().unwrap();
        assert_eq!(last.cmd(&["QUIT"]).await, "+OK\r\n");
        last.expect_closed().await;
        let mut tries = 0;
        loop {
            let mut c = TestClient::connect(port).await;
            match c.cmd(&["PING"]).await.as_str() {
                "+PONG\r\n" => break,
                other => assert_eq!(other, "-ERR max number of clients reached\r\n"),
            }
            tries += 1;
            assert!(tries < 50, "slot never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn client_subcommands() {
        let port = start(FakeBackend::new("")).await;
        let mut c = TestClient::connect(port).await;
        assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await, "$-1\r\n");
        assert_eq!(c.cmd(&["CLIENT", "SETNAME", "ops"]).await, "+OK\r\n");
        assert_eq!(c.cmd(&["client", "getname"]).await, bulk("ops"));
        assert_eq!(
            c.cmd(&["CLIENT", "SETNAME", "a b"]).await,
            "-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
        );
        assert_eq!(
            c.cmd(&["CLIENT", "SETINFO", "LIB-NAME", "redis-py"]).await,
            "+OK\r\n"
        );
        assert_eq!(
            c.cmd(&["CLIENT", "SETINFO", "color", "x"]).await,
            "-ERR Unrecognized option 'color'\r\n"
        );
        let id = c.cmd(&["CLIENT", "ID"]).await;
        assert!(id.starts_with(':'), "{id}");
        let info = c.cmd(&["CLIENT", "INFO"]).await;
        let id = id.trim_start_matches(':').trim_end();
        let local = c.stream.local_addr().unwrap();
        assert!(
            info.contains(&format!("id={id} addr={local} laddr=127.0.0.1:{port} fd=")),
            "{info}"
        );
        for field in [
            " name=ops ",
            " db=0 ",
            " cmd=client|info ",
            " user=default ",
            " resp=2 ",
            " lib-name=redis-py ",
        ] {
            assert!(info.contains(field), "{field} in {info}");
        }
        assert!(info.ends_with("\n\r\n"), "{info}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn info_sections() {
        let port = start(FakeBackend::new("")).await;
        let mut c = TestClient::connect(port).await;
        let audit = "# audit\r\naudit_total_events:5\r\naudit_file_status:connected\r\n";
        assert_eq!(c.cmd(&["INFO", "audit"]).await, bulk(audit));
        assert_eq!(c.cmd(&["INFO", "AUDIT"]).await, bulk(audit));
        assert_eq!(c.cmd(&["INFO", "nosuch"]).await, "$0\r\n\r\n");
        let all = c.cmd(&["INFO"]).await;
        assert!(all.contains("\r\n# Server\r\nauditor_version:"), "{all}");
        assert!(all.contains(&format!("\r\ntcp_port:{port}\r\n")), "{all}");
        assert!(all.contains(&format!("\r\nprocess_id:{}\r\n", std::process::id())));
        assert!(
            all.contains("\r\n\r\n# Clients\r\nconnected_clients:1\r\n"),
            "{all}"
        );
        assert!(all.contains("\r\n\r\n# Stats\r\n"), "{all}");
        assert!(all.ends_with(&format!("\r\n\r\n{audit}\r\n")), "{all}");
        let everything = c.cmd(&["INFO", "everything"]).await;
        assert!(
            everything.contains("# Server\r\n") && everything.ends_with(&format!("{audit}\r\n"))
        );
        let two = c.cmd(&["INFO", "audit", "server"]).await;
        assert!(two.contains("# Server\r\n") && two.contains(audit) && !two.contains("# Clients"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn command_introspection() {
        let port = start(FakeBackend::new("")).await;
        let mut c = TestClient::connect(port).await;
        assert_eq!(c.cmd(&["COMMAND", "COUNT"]).await, ":11\r\n");
        let all = c.cmd(&["COMMAND"]).await;
        assert!(
            all.starts_with("*11\r\n*10\r\n$4\r\nauth\r\n:-2\r\n"),
            "{all}"
        );
        let info = c
            .cmd(&["COMMAND", "INFO", "echo", "nosuch", "config|get"])
            .await;
        assert!(
            info.starts_with("*3\r\n*10\r\n$4\r\necho\r\n:2\r\n*1\r\n+fast\r\n"),
            "{info}"
        );
        assert!(
            info.contains("$-1\r\n*10\r\n$10\r\nconfig|get\r\n:-3\r\n"),
            "{info}"
        );
        let docs = c.cmd(&["COMMAND", "DOCS", "config"]).await;
        assert!(docs.starts_with("*2\r\n$6\r\nconfig\r\n"), "{docs}");
        assert!(docs.contains(&bulk("config|set")), "{docs}");
        // In RESP3 the documentation is a proper map of maps, and parses as one.
        assert!(c.cmd(&["HELLO", "3"]).await.starts_with("%7"));
        let docs = c.cmd(&["COMMAND", "DOCS"]).await;
        assert!(
            docs.starts_with("%11\r\n$4\r\nauth\r\n%5\r\n$7\r\nsummary\r\n"),
            "{docs}"
        );
        let (frame, _) = redis_protocol::resp3::decode::complete::decode(docs.as_bytes())
            .unwrap()
            .unwrap();
        let redis_protocol::resp3::types::OwnedFrame::Map { data, .. } = frame else {
            panic!("not a map");
        };
        assert_eq!(data.len(), COMMANDS.len());
        assert_eq!(c.cmd(&["COMMAND", "DOCS", "nosuch"]).await, "%0\r\n");
    }

    /// The real client: skipped (with a note) only if redis-cli is not installed.
    #[tokio::test(flavor = "current_thread")]
    async fn redis_cli_talks_to_the_port() {
        let backend = FakeBackend::new("");
        let port = start(backend.clone()).await;
        let run = |args: Vec<String>| {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new("redis-cli").args(args).output()
            })
        };
        let port_args = |extra: &[&str]| {
            let mut args = vec!["-p".to_string(), port.to_string()];
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        };
        let output = match run(port_args(&["PING"])).await.unwrap() {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("redis-cli not installed; skipping");
                return;
            }
            Err(e) => panic!("running redis-cli: {e}"),
        };
        assert_eq!(String::from_utf8_lossy(&output.stdout), "PONG\n");
        let output = run(port_args(&["CONFIG", "GET", "audit.*"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "audit.enabled\nyes\naudit.format\ntext\naudit.events\nall\naudit.excluderules\n\n\
             audit.control_requirepass\n\n"
        );
        let output = run(port_args(&["CONFIG", "SET", "audit.format", "xml"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "ERR CONFIG SET failed (possibly related to argument 'audit.format') - argument(s) \
             must be one of the following: text, json, csv\n\n"
        );
        // In RESP3 the reply is a map, which redis-cli prints as "key value".
        let output = run(port_args(&["-3", "CONFIG", "GET", "audit.format"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "audit.format text\n"
        );

        backend
            .set_settings(&[("audit.control_requirepass".into(), "pw".into())])
            .unwrap();
        let output = run(port_args(&[
            "--no-auth-warning",
            "-a",
            "pw",
            "CONFIG",
            "GET",
            "audit.format",
        ]))
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "audit.format\ntext\n"
        );
        let output = run(port_args(&["INFO", "audit"])).await.unwrap().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "NOAUTH Authentication required.\n"
        );
    }

    #[test]
    fn glob_matching() {
        let m = |p: &str, t: &str| Glob::new(p.as_bytes()).matches(t.as_bytes());
        assert!(m("audit.*", "audit.format"));
        assert!(m("AUDIT.*", "audit.format"));
        assert!(m("*", ""));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("*.f*t", "audit.format"));
        assert!(m("audit.[a-f]*", "audit.events"));
        assert!(!m("audit.[^a-f]*", "audit.events"));
        assert!(m("audit.[z-a]vents", "audit.events"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("a[\\]]b", "a]b"));
        assert!(!m("audit.format?", "audit.format"));
        assert!(m("**a**", "banana"));
        // Linear time: a pathological pattern against a long text returns at once.
        let pattern = "*a".repeat(500) + "b";
        assert!(!m(&pattern, &"a".repeat(5000)));
    }

    #[test]
    fn inline_splitting() {
        let split = |s: &str| {
            split_inline_args(s.as_bytes())
                .map(|v| v.into_iter().map(|a| lossy(&a)).collect::<Vec<_>>())
        };
        assert_eq!(
            split("  set a  b "),
            Some(vec!["set".into(), "a".into(), "b".into()])
        );
        assert_eq!(split("\"\" x"), Some(vec!["".into(), "x".into()]));
        assert_eq!(split("\"a\\tb\\\"c\""), Some(vec!["a\tb\"c".into()]));
        assert_eq!(split("\"a\"b"), Some(vec!["ab".into()]));
        assert_eq!(split("'a"), None);
        assert_eq!(split("a\"b c\""), Some(vec!["ab c".into()]));
        assert_eq!(split(""), Some(vec![]));
    }

    #[test]
    fn password_comparison() {
        assert!(password_matches(b"abc", b"abc"));
        assert!(!password_matches(b"abc", b"abd"));
        assert!(!password_matches(b"abc", b"abcd"));
        assert!(!password_matches(b"", b"a"));
        assert!(password_matches(b"", b""));
    }
}
