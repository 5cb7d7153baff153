//! The syslog sink: `audit.protocol "syslog <facility>"`, one syslog message per audit record.
//!
//! * **Local** (the default target) sends to the local syslog socket (`/dev/log`, else
//!   `/var/run/syslog` or `/var/run/log`), as a datagram socket; a stream socket is used when the
//!   path is one (messages then end in NUL, as glibc's `syslog(3)` frames them).
//! * **Remote** (`audit.syslog_target udp://host:port` or `tcp://host:port`) sends to a syslog server.
//!   TCP uses newline framing (RFC 6587 "non-transparent framing"), which rsyslog's `imtcp` and
//!   syslog-ng accept by default; records never contain a raw newline (the formats escape it).
//!
//! Every message has severity NOTICE (the module calls `syslog(LOG_NOTICE | facility, …)`), the
//! ident `valkey-audit` and the auditor's pid. `audit.syslog_format` picks the header:
//!
//! * `rfc3164` (default) is byte for byte what glibc's `syslog(3)` writes to the local socket,
//!   `<PRI>Mmm dd hh:mm:ss ident[pid]: record` in local time; remote messages also carry the hostname
//!   after the timestamp, as RFC 3164 asks.
//! * `rfc5424` is `<PRI>1 TIMESTAMP HOSTNAME ident pid - - record` with an RFC 3339 timestamp
//!   (microseconds, local offset). Note that rsyslog's local socket input parses RFC 3164 unless it
//!   is configured with `UseSpecialParser="off"`, so RFC 5424 is meant for remote targets.
//!
//! The `syslog` crate provides the facility names and codes. Its formatters are not used: its
//! RFC 3164 formatter stamps UTC time with no zone (it says so itself: the `time` crate cannot read the
//! local offset on Unix), so a remote server would file records hours off, and its RFC 5424 formatter
//! writes a numeric MSGID. Its writers are not used either: the TCP one adds no framing at all, and
//! none reports how far a batch got, which the resumable batches below need.
//!
//! **Batches and failures.** A batch is sent message by message. If a send fails midway, the sink
//! drops the socket, reports a retryable error and remembers which bytes of the batch were already
//! delivered; when the caller retries with the same batch (the [`Sink`] contract), sending resumes at
//! the first message that was not delivered, so no message is sent twice and none is skipped. A
//! datagram is sent whole or not at all. Over TCP a message cut by a broken connection is resent
//! whole on the next connection, and the server may have logged the cut-off part as a message of
//! its own (rsyslog does, with a warning). Over TCP a message is kept until the server's TCP stack
//! has acknowledged it (`SIOCOUTQ`, as the TCP sink does): what a stalled or dying server never
//! acknowledged is sent again, first, on the next connection, and a connection given up with
//! unacknowledged data is reset so that it cannot deliver it too. Out of reach of plain syslog over
//! TCP: messages the server's kernel acknowledged but the server never read (it was killed).
//!
//! **Records too long for one datagram.** A UDP datagram carries at most [`MAX_UDP_PAYLOAD_V4`]
//! bytes ([`MAX_UDP_PAYLOAD_V6`] over IPv6), header included; a local datagram socket refuses
//! (`EMSGSIZE`) what exceeds its send buffer. A message cut to fit would be a torn record (invalid
//! JSON or CSV, a line no one can tell is incomplete), and failing the batch would fail it forever.
//! So such a record is not sent: it is counted and reported through [`Sink::take_loss`] (an
//! `AUDIT_LOSS` record and `audit_lost_sink`), and the batch goes on with the next record. Stream
//! targets (TCP, a local stream socket) have no such limit. Receivers cut long messages on their own
//! (rsyslog at 8 KiB by default, `maxMessageSize`).

use std::fmt;
use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use syslog::Facility;

use super::tcp::{
    ByteQueue, abort_on_close, peer_closed, send_queue_intact, unacknowledged_bytes,
    whole_lines_within,
};
use super::{Sink, SinkError, SinkLoss, SinkStatus, count_lines};

/// Where `syslog(3)` looks for the local syslog socket, in order.
const LOCAL_SOCKET_PATHS: [&str; 3] = ["/dev/log", "/var/run/syslog", "/var/run/log"];

/// How long a reconnection waits for the old connection's acknowledgements.
const ACK_WAIT: Duration = Duration::from_millis(200);
/// How long one send may block before the batch is reported as failed (a syslog daemon that stopped
/// reading its socket must not hang the sink thread; the caller retries).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// After a failure, reconnecting is tried at most this often; between tries batches fail at once.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// The most a UDP datagram over IPv4 can carry: 65,535 bytes of IP packet minus the 20-byte IP and
/// 8-byte UDP headers.
pub const MAX_UDP_PAYLOAD_V4: usize = 65_507;

/// The most a UDP datagram over IPv6 can carry (no jumbograms): the 65,535-byte payload length
/// minus the 8-byte UDP header (the IPv6 header is not counted in it).
pub const MAX_UDP_PAYLOAD_V6: usize = 65_527;

/// The module logs with `LOG_NOTICE`.
const SEVERITY_NOTICE: u8 = 5;

/// Which syslog header format the messages use (`audit.syslog_format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyslogFormat {
    Rfc3164,
    Rfc5424,
}

impl SyslogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            SyslogFormat::Rfc3164 => "rfc3164",
            SyslogFormat::Rfc5424 => "rfc5424",
        }
    }
}

impl FromStr for SyslogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rfc3164" => Ok(SyslogFormat::Rfc3164),
            "rfc5424" => Ok(SyslogFormat::Rfc5424),
            _ => Err(format!(
                "syslog format must be rfc3164 or rfc5424, not '{}'",
                s.trim()
            )),
        }
    }
}

impl fmt::Display for SyslogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the messages go (`audit.syslog_target`): the local syslog socket or a remote server, as
/// `host:port` (IPv6 literals in brackets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyslogTarget {
    Local,
    Udp(String),
    Tcp(String),
}

impl SyslogTarget {
    /// The setting's text: `local`, `udp://host:port` or `tcp://host:port`.
    pub fn render(&self) -> String {
        match self {
            SyslogTarget::Local => "local".to_string(),
            SyslogTarget::Udp(addr) => format!("udp://{addr}"),
            SyslogTarget::Tcp(addr) => format!("tcp://{addr}"),
        }
    }

    fn is_remote(&self) -> bool {
        !matches!(self, SyslogTarget::Local)
    }
}

impl FromStr for SyslogTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        if text.is_empty() || text.eq_ignore_ascii_case("local") {
            return Ok(SyslogTarget::Local);
        }
        let invalid = || {
            format!("syslog target must be local, udp://host:port or tcp://host:port, not '{text}'")
        };
        let (scheme, addr) = text.split_once("://").ok_or_else(invalid)?;
        check_host_port(addr).map_err(|why| format!("{}: {why}", invalid()))?;
        match scheme.to_ascii_lowercase().as_str() {
            "udp" => Ok(SyslogTarget::Udp(addr.to_string())),
            "tcp" => Ok(SyslogTarget::Tcp(addr.to_string())),
            _ => Err(invalid()),
        }
    }
}

impl fmt::Display for SyslogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// Checks `host:port` or `[v6]:port` without resolving the host (that happens when connecting).
fn check_host_port(addr: &str) -> Result<(), &'static str> {
    let (host, port) = addr.rsplit_once(':').ok_or("missing :port")?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']').ok_or("unbalanced [ in host")?,
        None if host.contains(':') => return Err("IPv6 addresses go in brackets"),
        None => host,
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("bad host");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("port must be 1..65535"),
    }
}

/// Parses a facility name as `syslog(3)` knows it (`local0`..`local7`, `user`, `daemon`, `auth`,
/// `authpriv`, `syslog`, `mail`, `cron`, `lpr`, `news`, `uucp`, `ftp`, ...), case-insensitive, with or
/// without the `log_` prefix. `kern` is refused: it is reserved for the kernel, and `syslog(3)`
/// itself replaces it with the default facility.
pub fn parse_facility(s: &str) -> Result<Facility, String> {
    let name = s.trim();
    match Facility::from_str(name) {
        Ok(Facility::LOG_KERN) => Err(format!(
            "syslog facility '{name}' is reserved for the kernel; use local0..local7, user or daemon"
        )),
        Ok(facility) => Ok(facility),
        Err(()) => Err(format!(
            "unknown syslog facility '{name}' (local0..local7, user, daemon, auth, authpriv, syslog, mail, cron, ...)"
        )),
    }
}

/// Everything the syslog sink needs; built from `audit.protocol`, `audit.syslog_format` and
/// `audit.syslog_target`.
#[derive(Clone, Debug)]
pub struct SyslogOptions {
    pub facility: Facility,
    /// The facility as the operator wrote it (what `CONFIG GET audit.protocol` shows).
    pub facility_name: String,
    pub format: SyslogFormat,
    pub target: SyslogTarget,
    /// The syslog tag; the module's is `valkey-audit`.
    pub ident: String,
    /// Local syslog socket to use instead of `/dev/log` (tests, containers with the socket elsewhere).
    pub local_socket: Option<PathBuf>,
}

impl SyslogOptions {
    /// The module's setup for a facility name: RFC 3164 to the local socket, ident `valkey-audit`.
    pub fn new(facility_name: &str) -> Result<Self, String> {
        Ok(SyslogOptions {
            facility: parse_facility(facility_name)?,
            facility_name: facility_name.trim().to_string(),
            format: SyslogFormat::Rfc3164,
            target: SyslogTarget::Local,
            ident: "valkey-audit".to_string(),
            local_socket: None,
        })
    }
}

/// The loss cause of datagrams a UDP receiver refused (its port was closed).
const SYSLOG_REFUSED: &str = "syslog_refused";

/// An open connection to the syslog daemon or server.
enum Transport {
    LocalDatagram(UnixDatagram),
    /// A local socket that is a stream socket; each message ends in NUL.
    LocalStream(UnixStream),
    Udp {
        socket: UdpSocket,
        server: SocketAddr,
    },
    /// Newline-framed messages.
    Tcp(TcpStream),
}

impl Transport {
    fn is_datagram(&self) -> bool {
        matches!(self, Transport::LocalDatagram(_) | Transport::Udp { .. })
    }

    /// The longest message known to fit one datagram before sending. A local datagram socket's
    /// limit is its send buffer, which the kernel checks (`EMSGSIZE`); streams have none.
    fn max_message(&self) -> Option<usize> {
        match self {
            Transport::Udp { server, .. } if server.is_ipv4() => Some(MAX_UDP_PAYLOAD_V4),
            Transport::Udp { .. } => Some(MAX_UDP_PAYLOAD_V6),
            Transport::LocalDatagram(_) | Transport::LocalStream(_) | Transport::Tcp(_) => None,
        }
    }

    /// The bytes that end each message on this transport.
    fn terminator(&self) -> &'static [u8] {
        match self {
            Transport::LocalStream(_) => b"\0",
            Transport::Tcp(_) => b"\n",
            Transport::LocalDatagram(_) | Transport::Udp { .. } => b"",
        }
    }

    /// Sends the rest of a framed message from `*sent` on (a datagram whole). A stream write that
    /// times out midway leaves `*sent` at what was written: the rest must follow on the same
    /// connection, or its server sees a cut message.
    fn send_from(&mut self, message: &[u8], sent: &mut usize) -> io::Result<()> {
        let stream: &mut dyn io::Write = match self {
            Transport::LocalStream(stream) => stream,
            Transport::Tcp(stream) => stream,
            Transport::LocalDatagram(_) | Transport::Udp { .. } => {
                self.send(message)?;
                *sent = message.len();
                return Ok(());
            }
        };
        while *sent < message.len() {
            match stream.write(&message[*sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => *sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends one framed message, whole (a datagram is all or nothing; a stream write is completed).
    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        match self {
            Transport::LocalDatagram(socket) => {
                retry_interrupted(|| socket.send(message)).map(drop)
            }
            Transport::Udp { socket, .. } => retry_interrupted(|| socket.send(message)).map(drop),
            Transport::LocalStream(stream) => stream.write_all(message),
            Transport::Tcp(stream) => stream.write_all(message),
        }
    }
}

fn retry_interrupted<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Sends audit records as syslog messages; see the module documentation.
pub struct SyslogSink {
    opts: SyslogOptions,
    /// For RFC 5424 and remote RFC 3164 headers (`/proc/sys/kernel/hostname`).
    hostname: String,
    pid: u32,
    transport: Option<Transport>,
    status: SinkStatus,
    /// When a batch failed midway: the part of it already delivered. A retry with a batch that starts
    /// with these bytes resumes after them.
    delivered_prefix: Vec<u8>,
    last_connect_attempt: Option<Instant>,
    send_timeout: Duration,
    reconnect_interval: Duration,
    /// Reused message buffer: header, record, terminator.
    message: Vec<u8>,
    last_error: Option<String>,
    messages_sent: u64,
    /// Records not sent because no datagram can carry them, not yet taken by [`Sink::take_loss`].
    loss: SinkLoss,
    /// UDP datagrams the receiver refused (a send failed with ECONNREFUSED: an earlier datagram
    /// met a closed port), not yet taken by [`Sink::take_loss`].
    refused: SinkLoss,
    /// TCP messages (framed, as sent: each ends in a newline) written to the connection that its
    /// server's TCP stack has not acknowledged yet, oldest first. Bounded by the socket's send
    /// buffer, one message more at most.
    unacked: ByteQueue,
    /// The record lines of the messages in `unacked`, in the same order: what a switch of
    /// `audit.protocol` hands to the next sink (the messages' headers are this sink's).
    unacked_records: ByteQueue,
    /// After `retire`: the record lines the server had not acknowledged, for the next sink.
    handed_over: ByteQueue,
    /// A message a stream write that timed out left cut (`partial_sent` bytes of it written) and
    /// the record line it carries: its rest goes first on the same connection (QA: a stalled
    /// rsyslog logged the cut prefix as a message of its own once the connection was reset).
    partial: Vec<u8>,
    partial_sent: usize,
    partial_record: Vec<u8>,
}

fn push_line(queue: &mut ByteQueue, line: &[u8]) {
    queue.push(line);
    queue.push(b"\n");
}

/// Bytes of the first `n` lines of `data` (all of it if it has fewer).
fn lines_len(data: &[u8], n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    data.iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'\n')
        .nth(n - 1)
        .map_or(data.len(), |(i, _)| i + 1)
}

/// A stream write that ran into its send timeout (`SO_SNDTIMEO`).
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl SyslogSink {
    /// Connects to the target (the local socket, or the remote server); fails if that is impossible
    /// now, with a retryable error.
    pub fn open(opts: SyslogOptions) -> Result<Self, SinkError> {
        let (sink, error) = Self::open_or_retry(opts);
        match error {
            Some(e) => Err(e),
            None => Ok(sink),
        }
    }

    /// Like `open`, but a target that cannot be reached now gives a sink in the `error` state that
    /// keeps trying (records wait in the queue), with the reason.
    pub fn open_or_retry(opts: SyslogOptions) -> (Self, Option<SinkError>) {
        let mut sink = SyslogSink {
            opts,
            hostname: read_hostname(),
            pid: std::process::id(),
            transport: None,
            status: SinkStatus::Disconnected,
            delivered_prefix: Vec::new(),
            last_connect_attempt: None,
            send_timeout: SEND_TIMEOUT,
            reconnect_interval: RECONNECT_INTERVAL,
            message: Vec::with_capacity(4096),
            last_error: None,
            messages_sent: 0,
            loss: SinkLoss::default(),
            refused: SinkLoss::default(),
            unacked: ByteQueue::default(),
            unacked_records: ByteQueue::default(),
            handed_over: ByteQueue::default(),
            partial: Vec::new(),
            partial_sent: 0,
            partial_record: Vec::new(),
        };
        let error = sink.connect().err();
        (sink, error)
    }

    pub fn options(&self) -> &SyslogOptions {
        &self.opts
    }

    /// Why the last connection or send failed, if one did.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Messages sent since the sink was opened.
    pub fn messages_sent(&self) -> u64 {
        self.messages_sent
    }

    fn connect(&mut self) -> Result<(), SinkError> {
        // What the old connection's server acknowledged is not sent again (QA: every SIGHUP or
        // restart of rsyslog duplicated the last batch). A connection still open (a SIGHUP) gets
        // a moment for the acknowledgements of what was just sent.
        if let Some(Transport::Tcp(stream)) = &self.transport
            && !self.unacked.is_empty()
            && !peer_closed(stream)
        {
            let deadline = Instant::now() + ACK_WAIT;
            while unacknowledged_bytes(stream).is_ok_and(|n| n > 0) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.release_acknowledged();
        self.drop_transport();
        self.last_connect_attempt = Some(Instant::now());
        match open_transport(&self.opts, self.send_timeout) {
            Ok(mut transport) => {
                // What the last connection never got acknowledged goes first, in its order.
                if !self.unacked.is_empty()
                    && let Err(e) = transport.send(self.unacked.bytes())
                {
                    if let Transport::Tcp(stream) = &transport {
                        abort_on_close(stream);
                    }
                    let message = format!(
                        "syslog: sending again to {} what it had not acknowledged: {e}",
                        self.describe_target()
                    );
                    return Err(self.fail(message));
                }
                self.transport = Some(transport);
                self.status = SinkStatus::Connected;
                self.release_acknowledged();
                Ok(())
            }
            Err(e) => {
                let message = format!("syslog: connecting to {}: {e}", self.describe_target());
                Err(self.fail(message))
            }
        }
    }

    /// Reconnects if the last try is old enough; otherwise fails at once. A TCP connection the
    /// server closed (a restarted rsyslog) is replaced first: a message written into it would be
    /// lost without an error.
    fn ensure_connected(&mut self) -> Result<(), SinkError> {
        if let Some(Transport::Tcp(stream)) = &self.transport
            && peer_closed(stream)
        {
            return self.connect();
        }
        if self.transport.is_some() {
            return Ok(());
        }
        let due = self
            .last_connect_attempt
            .is_none_or(|at| at.elapsed() >= self.reconnect_interval);
        if due {
            self.connect()
        } else {
            Err(SinkError {
                message: self
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "syslog: not connected".to_string()),
                retryable: true,
            })
        }
    }

    /// Closes the connection; one holding messages the server has not acknowledged is reset, so
    /// that they are not delivered by it as well as sent again on the next.
    fn drop_transport(&mut self) {
        if let Some(Transport::Tcp(stream)) = &self.transport
            && (!self.unacked.is_empty() || !self.partial.is_empty())
        {
            abort_on_close(stream);
        }
        self.transport = None;
        // A cut message goes whole on the next connection, with its batch.
        self.partial.clear();
        self.partial_sent = 0;
        self.partial_record.clear();
    }

    /// Finishes the message a timed-out write cut, if the line at `pos` is its record: returns
    /// the position after that line. A different line means another batch came: the cut message
    /// cannot be finished, and the connection is dropped to end it.
    fn finish_partial(&mut self, lines: &[u8], pos: usize) -> Result<usize, SinkError> {
        if self.partial.is_empty() {
            return Ok(pos);
        }
        let rest = &lines[pos..];
        let carries = rest.starts_with(&self.partial_record)
            && rest
                .get(self.partial_record.len())
                .is_none_or(|&b| b == b'\n');
        if !carries {
            self.drop_transport();
            return Ok(pos);
        }
        let next = (pos + self.partial_record.len() + 1).min(lines.len());
        let Some(transport) = self.transport.as_mut() else {
            return Ok(pos);
        };
        let mut sent = self.partial_sent;
        let result = transport.send_from(&self.partial, &mut sent);
        self.partial_sent = sent;
        match result {
            Ok(()) => {
                if matches!(transport, Transport::Tcp(_)) {
                    self.unacked.push(&self.partial);
                    push_line(&mut self.unacked_records, &self.partial_record);
                }
                self.messages_sent += 1;
                self.partial.clear();
                self.partial_sent = 0;
                self.partial_record.clear();
                Ok(next)
            }
            Err(e) => {
                let keep = timed_out(&e);
                Err(self.send_failed(lines, pos, &e, keep))
            }
        }
    }

    /// A send failed at the line at `pos`: what the server acknowledged is released, the
    /// connection is kept only if `keep` (a stream send that timed out, whose cut message
    /// follows first on it), and the batch's retry resumes at `pos`.
    fn send_failed(&mut self, lines: &[u8], pos: usize, e: &io::Error, keep: bool) -> SinkError {
        self.release_acknowledged();
        if !keep {
            self.drop_transport();
        }
        self.delivered_prefix.extend_from_slice(&lines[..pos]);
        let message = format!("syslog: sending to {}: {e}", self.describe_target());
        self.fail(message)
    }

    /// Forgets the TCP messages at the front that the server's TCP stack acknowledged.
    fn release_acknowledged(&mut self) {
        let Some(Transport::Tcp(stream)) = &self.transport else {
            return;
        };
        // A reset connection's send queue is purged (it reads 0): nothing was acknowledged then.
        if !send_queue_intact(stream) {
            return;
        }
        let Ok(unacknowledged) = unacknowledged_bytes(stream) else {
            return;
        };
        if !send_queue_intact(stream) {
            return;
        }
        let acknowledged = (self.unacked.len() as u64).saturating_sub(unacknowledged);
        let whole = whole_lines_within(self.unacked.bytes(), acknowledged);
        let messages = count_lines(&self.unacked.bytes()[..whole]);
        self.unacked.release(whole);
        let records = lines_len(self.unacked_records.bytes(), messages);
        self.unacked_records.release(records);
    }

    fn fail(&mut self, message: String) -> SinkError {
        self.status = SinkStatus::Error;
        self.last_error = Some(message.clone());
        SinkError {
            message,
            retryable: true,
        }
    }

    fn describe_target(&self) -> String {
        match (&self.opts.target, &self.opts.local_socket) {
            (SyslogTarget::Local, Some(path)) => path.display().to_string(),
            (SyslogTarget::Local, None) => "the local syslog socket".to_string(),
            (target, _) => target.render(),
        }
    }

    /// The message header for this batch (every message of a batch carries the same timestamp).
    fn header(&self) -> Vec<u8> {
        let priority = self.opts.facility as u8 | SEVERITY_NOTICE;
        let now = chrono::Local::now();
        let ident = &self.opts.ident;
        let pid = self.pid;
        let text = match self.opts.format {
            SyslogFormat::Rfc3164 => {
                // `%e` pads the day with a space, as glibc's "%h %e %T" does.
                let stamp = now.format("%b %e %H:%M:%S");
                if self.opts.target.is_remote() {
                    format!("<{priority}>{stamp} {} {ident}[{pid}]: ", self.hostname)
                } else {
                    format!("<{priority}>{stamp} {ident}[{pid}]: ")
                }
            }
            SyslogFormat::Rfc5424 => {
                let stamp = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                format!("<{priority}>1 {stamp} {} {ident} {pid} - - ", self.hostname)
            }
        };
        text.into_bytes()
    }
}

/// The first of `paths` that is a socket, not merely a path that exists (QA: without /dev/log, a
/// directory at /var/run/log was taken, and the error named it).
fn first_socket<'a>(mut paths: impl Iterator<Item = &'a Path>) -> Option<&'a Path> {
    paths.find(|p| {
        std::fs::metadata(p)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
    })
}

/// Opens the transport for the target. Remote hosts are resolved here, so a reconnect sees DNS changes.
fn open_transport(opts: &SyslogOptions, send_timeout: Duration) -> io::Result<Transport> {
    match &opts.target {
        SyslogTarget::Local => match &opts.local_socket {
            Some(path) => open_local(path, send_timeout),
            None => {
                let found = first_socket(LOCAL_SOCKET_PATHS.iter().map(Path::new));
                let path = found.ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no syslog socket at {}", LOCAL_SOCKET_PATHS.join(", ")),
                    )
                })?;
                open_local(path, send_timeout)
            }
        },
        SyslogTarget::Udp(addr) => {
            let server = resolve(addr)?
                .into_iter()
                .next()
                .expect("resolve returns at least one");
            let local: SocketAddr = if server.is_ipv4() {
                "0.0.0.0:0".parse().expect("literal")
            } else {
                "[::]:0".parse().expect("literal")
            };
            // Connected, so that the kernel reports the receiver's ICMP "port unreachable" (the
            // next send fails with ECONNREFUSED): a syslog daemon that is down is then seen, the
            // records wait in the queue, and the datagram it refused is counted as lost, where
            // an unconnected socket sent every record into the void without a word.
            let socket = UdpSocket::bind(local)?;
            socket.connect(server)?;
            socket.set_write_timeout(Some(send_timeout))?;
            Ok(Transport::Udp { socket, server })
        }
        SyslogTarget::Tcp(addr) => {
            let mut last_error = None;
            for server in resolve(addr)? {
                match TcpStream::connect_timeout(&server, send_timeout) {
                    Ok(stream) => {
                        stream.set_write_timeout(Some(send_timeout))?;
                        return Ok(Transport::Tcp(stream));
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            Err(last_error.expect("resolve returns at least one address"))
        }
    }
}

fn open_local(path: &Path, send_timeout: Duration) -> io::Result<Transport> {
    let socket = UnixDatagram::unbound()?;
    match socket.connect(path) {
        Ok(()) => {
            socket.set_write_timeout(Some(send_timeout))?;
            Ok(Transport::LocalDatagram(socket))
        }
        // The path is a stream socket (syslog-ng can be set up that way); glibc falls back the same way.
        Err(e) if e.raw_os_error() == Some(libc::EPROTOTYPE) => {
            let stream = UnixStream::connect(path)?;
            stream.set_write_timeout(Some(send_timeout))?;
            Ok(Transport::LocalStream(stream))
        }
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

fn resolve(addr: &str) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        ));
    }
    Ok(addrs)
}

fn read_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
        .unwrap_or_else(|| "localhost".to_string())
}

impl Sink for SyslogSink {
    fn write_batch(&mut self, lines: &[u8], _line_count: usize) -> Result<(), SinkError> {
        // A retry of the batch that failed midway resumes after what was delivered; any other batch
        // starts from its beginning.
        let mut pos =
            if !self.delivered_prefix.is_empty() && lines.starts_with(&self.delivered_prefix) {
                self.delivered_prefix.len()
            } else {
                0
            };
        self.delivered_prefix.clear();
        if let Err(e) = self.ensure_connected() {
            self.delivered_prefix.extend_from_slice(&lines[..pos]);
            return Err(e);
        }
        pos = self.finish_partial(lines, pos)?;
        let header = self.header();
        while pos < lines.len() {
            let end = lines[pos..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(lines.len(), |i| pos + i);
            let record = &lines[pos..end];
            let next = (end + 1).min(lines.len());
            let transport = self.transport.as_mut().expect("connected above");
            self.message.clear();
            self.message.extend_from_slice(&header);
            self.message.extend_from_slice(record);
            self.message.extend_from_slice(transport.terminator());
            let too_long = transport
                .max_message()
                .is_some_and(|max| self.message.len() > max);
            let mut written = 0;
            let sent = if too_long {
                Err(io::Error::from_raw_os_error(libc::EMSGSIZE))
            } else {
                transport.send_from(&self.message, &mut written)
            };
            // A datagram refused as too long will be refused every time: the record is counted
            // as lost and the batch goes on, instead of failing the batch forever.
            if transport.is_datagram()
                && matches!(&sent, Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE))
            {
                self.loss.records += 1;
                self.loss.bytes += (next - pos) as u64;
                self.last_error = Some(format!(
                    "syslog: a record of {} bytes does not fit one datagram to {}: not sent, counted as lost",
                    self.message.len(),
                    self.describe_target()
                ));
                pos = next;
                continue;
            }
            if let Err(e) = sent {
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && matches!(transport, Transport::Udp { .. })
                {
                    // This record was not sent (it is retried with the batch), but the error is
                    // the receiver's answer to an earlier datagram, which is gone. At least one:
                    // refusals that arrive together are reported once.
                    self.refused.records += 1;
                    self.refused.cause = Some(SYSLOG_REFUSED);
                }
                // A send that timed out left the connection as it was: what it acknowledged
                // need not be sent again. Over a stream it stays open, a cut message's rest to
                // follow first.
                let keep = !transport.is_datagram() && timed_out(&e);
                if keep && written > 0 {
                    self.partial = std::mem::take(&mut self.message);
                    self.partial_sent = written;
                    self.partial_record = record.to_vec();
                }
                return Err(self.send_failed(lines, pos, &e, keep));
            }
            if matches!(transport, Transport::Tcp(_)) {
                self.unacked.push(&self.message);
                push_line(&mut self.unacked_records, record);
            }
            self.messages_sent += 1;
            pos = next;
        }
        self.release_acknowledged();
        self.status = SinkStatus::Connected;
        Ok(())
    }

    /// Messages are not buffered: each was handed to the socket by `write_batch`. A retired
    /// sink's lines that no sink took by shutdown are lost, and counted.
    fn flush(&mut self, force: bool) -> Result<(), SinkError> {
        if force && !self.handed_over.is_empty() {
            self.loss.records += count_lines(self.handed_over.bytes()) as u64;
            self.loss.bytes += self.handed_over.len() as u64;
            self.handed_over = ByteQueue::default();
        }
        Ok(())
    }

    /// Reconnects in the background after a failure, so the status recovers without traffic.
    fn tick(&mut self) -> Result<(), SinkError> {
        self.release_acknowledged();
        if let Some(Transport::Tcp(stream)) = &self.transport
            && !self.unacked.is_empty()
            && peer_closed(stream)
        {
            // A server that went away while idle: what it never acknowledged goes to the next.
            let _ = self.connect();
            return Ok(());
        }
        if self.transport.is_none()
            && self
                .last_connect_attempt
                .is_none_or(|at| at.elapsed() >= self.reconnect_interval)
        {
            // Failing here changes nothing the next batch would not report.
            let _ = self.connect();
        }
        Ok(())
    }

    /// Reconnects now (a restarted syslog daemon, a remote name that moved).
    fn reopen(&mut self) -> Result<(), SinkError> {
        self.connect()
    }

    /// What the server's TCP stack acknowledged stays delivered; the rest is taken back for the
    /// next sink and the connection reset, so that the old server gets none of it late (QA: a
    /// switch away from a stalled rsyslog lost the unacknowledged messages uncounted, and those
    /// it read after all were in both places).
    fn retire(&mut self) {
        self.release_acknowledged();
        self.drop_transport();
        self.handed_over.push(self.unacked_records.bytes());
        self.unacked = ByteQueue::default();
        self.unacked_records = ByteQueue::default();
    }

    fn undelivered(&mut self, max: usize) -> &[u8] {
        let bytes = self.handed_over.bytes();
        &bytes[..super::hand_over_len(bytes, max)]
    }

    fn release_undelivered(&mut self, n: usize) {
        self.handed_over.release(n);
    }

    fn delivered_of(&self, lines: &[u8]) -> usize {
        if !self.delivered_prefix.is_empty() && lines.starts_with(&self.delivered_prefix) {
            self.delivered_prefix.len()
        } else {
            0
        }
    }

    fn status(&self) -> SinkStatus {
        self.status
    }

    /// Records too long for one datagram (failed batches go back to the caller: not a loss).
    /// Records are only ever dropped here for being too long for one datagram.
    fn loss_cause(&self) -> &'static str {
        "record_too_long"
    }

    fn take_loss(&mut self) -> SinkLoss {
        // One cause per call: the other is taken at the next.
        if self.loss.records > 0 {
            std::mem::take(&mut self.loss)
        } else {
            std::mem::take(&mut self.refused)
        }
    }

    fn pending_loss(&self) -> u64 {
        self.loss.records + self.refused.records
    }

    fn backlog_bytes(&self) -> u64 {
        self.handed_over.len() as u64
    }

    fn kind(&self) -> &'static str {
        "syslog"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead as _, BufReader, Read as _};
    use std::net::TcpListener;
    use std::os::fd::AsRawFd as _;
    use std::os::unix::net::UnixListener;
    use std::process::{Child, Command, Stdio};

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("syslog-sink-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn options(facility: &str, format: SyslogFormat, target: SyslogTarget) -> SyslogOptions {
        SyslogOptions {
            format,
            target,
            ..SyslogOptions::new(facility).unwrap()
        }
    }

    fn local_options(facility: &str, socket: &Path) -> SyslogOptions {
        SyslogOptions {
            local_socket: Some(socket.to_path_buf()),
            ..options(facility, SyslogFormat::Rfc3164, SyslogTarget::Local)
        }
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// `Mmm dd hh:mm:ss`, day padded with a space.
    fn assert_rfc3164_timestamp(stamp: &str) {
        assert_eq!(stamp.len(), 15, "{stamp:?}");
        let parsed =
            chrono::NaiveDateTime::parse_from_str(&format!("2024 {stamp}"), "%Y %b %e %H:%M:%S");
        assert!(parsed.is_ok(), "{stamp:?}");
    }

    #[test]
    fn local_messages_are_what_syslog3_sends() {
        let dir = temp_dir("local");
        let path = dir.join("log.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let mut sink = SyslogSink::open(local_options("local0", &path)).unwrap();
        assert_eq!(sink.status(), SinkStatus::Connected);
        assert_eq!(sink.kind(), "syslog");
        sink.write_batch(b"first record\nsecond \xc3\xa9 record\n", 2)
            .unwrap();
        let pid = std::process::id();
        let mut buf = [0u8; 1024];
        for record in ["first record", "second é record"] {
            let n = receiver.recv(&mut buf).unwrap();
            let message = text(&buf[..n]);
            // local0 (16) * 8 + notice (5) = 133
            assert!(message.starts_with("<133>"), "{message}");
            assert_rfc3164_timestamp(&message[5..20]);
            assert_eq!(&message[20..], format!(" valkey-audit[{pid}]: {record}"));
        }
        assert_eq!(sink.messages_sent(), 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_local_stream_socket_gets_nul_terminated_messages() {
        let dir = temp_dir("stream");
        let path = dir.join("log.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let reader = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut all = Vec::new();
            stream.read_to_end(&mut all).unwrap();
            all
        });
        let mut sink = SyslogSink::open(local_options("user", &path)).unwrap();
        sink.write_batch(b"a\nb\n", 2).unwrap();
        drop(sink);
        let all = reader.join().unwrap();
        let messages: Vec<String> = all.split(|&b| b == 0).map(text).collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(
            messages[0].starts_with("<13>") && messages[0].ends_with("]: a"),
            "{messages:?}"
        );
        assert!(
            messages[1].ends_with("]: b") && messages[2].is_empty(),
            "{messages:?}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn remote_udp_in_both_formats() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let target = SyslogTarget::Udp(receiver.local_addr().unwrap().to_string());
        let hostname = read_hostname();
        let pid = std::process::id();
        let mut buf = [0u8; 2048];

        let mut sink =
            SyslogSink::open(options("daemon", SyslogFormat::Rfc3164, target.clone())).unwrap();
        sink.write_batch(b"udp one\n", 1).unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        let message = text(&buf[..n]);
        // daemon (3) * 8 + notice (5) = 29
        assert!(message.starts_with("<29>"), "{message}");
        assert_rfc3164_timestamp(&message[4..19]);
        assert_eq!(
            &message[19..],
            format!(" {hostname} valkey-audit[{pid}]: udp one")
        );

        let mut sink = SyslogSink::open(options("LOCAL7", SyslogFormat::Rfc5424, target)).unwrap();
        sink.write_batch(b"udp two\n", 1).unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        let message = text(&buf[..n]);
        let fields: Vec<&str> = message.splitn(8, ' ').collect();
        // local7 (23) * 8 + notice (5) = 189
        assert_eq!(fields[0], "<189>1", "{message}");
        assert!(
            chrono::DateTime::parse_from_rfc3339(fields[1]).is_ok(),
            "{message}"
        );
        assert_eq!(
            fields[2..],
            [
                hostname.as_str(),
                "valkey-audit",
                &pid.to_string(),
                "-",
                "-",
                "udp two"
            ]
        );
    }

    #[test]
    fn remote_tcp_messages_are_newline_framed() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = SyslogTarget::Tcp(listener.local_addr().unwrap().to_string());
        let reader = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            BufReader::new(stream)
                .lines()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        });
        let mut sink = SyslogSink::open(options("local1", SyslogFormat::Rfc5424, target)).unwrap();
        let batch: Vec<u8> = (0..500)
            .flat_map(|i| format!("tcp record {i}\n").into_bytes())
            .collect();
        sink.write_batch(&batch, 500).unwrap();
        drop(sink);
        let lines = reader.join().unwrap();
        assert_eq!(lines.len(), 500);
        for (i, line) in lines.iter().enumerate() {
            assert!(line.starts_with("<141>1 "), "{line}");
            assert!(line.ends_with(&format!(" - - tcp record {i}")), "{line}");
        }
    }

    #[test]
    fn a_tcp_server_that_closed_the_connection_is_reconnected_before_sending() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = SyslogTarget::Tcp(listener.local_addr().unwrap().to_string());
        let mut sink = SyslogSink::open(options("local0", SyslogFormat::Rfc3164, target)).unwrap();
        // The server accepts and closes (a restart); the next batch goes to the new connection.
        drop(listener.accept().unwrap());
        std::thread::sleep(Duration::from_millis(20));
        sink.write_batch(b"after restart\n", 1).unwrap();
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        assert!(line.ends_with("]: after restart\n"), "{line}");
    }

    #[test]
    fn a_batch_that_fails_midway_resumes_without_duplicates() {
        let dir = temp_dir("resume");
        let path = dir.join("log.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        receiver.set_nonblocking(true).unwrap();
        let mut sink = SyslogSink::open(local_options("local0", &path)).unwrap();
        sink.send_timeout = Duration::from_millis(5);
        sink.reconnect_interval = Duration::ZERO;
        sink.reopen().unwrap();

        // The receiver does not read, so its queue fills and sends time out midway.
        let batch: Vec<u8> = (0..600)
            .flat_map(|i| format!("record {i}\n").into_bytes())
            .collect();
        let mut received = Vec::new();
        let mut failures = 0;
        let mut buf = [0u8; 256];
        loop {
            let result = sink.write_batch(&batch, 600);
            loop {
                match receiver.recv(&mut buf) {
                    Ok(n) => received.push(text(&buf[..n])),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            match result {
                Ok(()) => break,
                Err(e) => {
                    assert!(e.retryable);
                    assert_eq!(sink.status(), SinkStatus::Error);
                    failures += 1;
                    assert!(failures < 1000);
                }
            }
        }
        assert!(failures > 0, "the receiver's queue never filled");
        assert_eq!(sink.status(), SinkStatus::Connected);
        let records: Vec<&str> = received
            .iter()
            .map(|m| m.split_once("]: ").unwrap().1)
            .collect();
        let expected: Vec<String> = (0..600).map(|i| format!("record {i}")).collect();
        assert_eq!(records, expected);

        // A failure, then a different batch: it starts from its own beginning.
        sink.delivered_prefix = b"record 0\n".to_vec();
        sink.write_batch(b"other 0\nother 1\n", 2).unwrap();
        let n = receiver.recv(&mut buf).unwrap();
        assert!(text(&buf[..n]).ends_with("]: other 0"));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A sink to a TCP server on a fresh loopback port, whose sends time out after 50 ms.
    fn tcp_sink_with_short_timeout() -> (TcpListener, SyslogSink) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = SyslogTarget::Tcp(listener.local_addr().unwrap().to_string());
        let mut sink = SyslogSink::open(options("local0", SyslogFormat::Rfc3164, target)).unwrap();
        sink.send_timeout = Duration::from_millis(50);
        (listener, sink)
    }

    /// `count` numbered lines of ~1 KB: far more than a stalled server's windows hold.
    fn kilobyte_records(count: usize) -> Vec<u8> {
        (0..count)
            .flat_map(|i| format!("record {i:05} {}\n", "x".repeat(1000)).into_bytes())
            .collect()
    }

    #[test]
    fn tcp_messages_the_server_never_acknowledged_are_sent_again_on_the_next_connection() {
        let (listener, mut sink) = tcp_sink_with_short_timeout();
        sink.reconnect_interval = Duration::ZERO;
        sink.reopen().unwrap();
        let _replaced = listener.accept().unwrap();
        // A server that stalls: it never reads, so its window closes and sends time out.
        let (stalled, _) = listener.accept().unwrap();
        let count = 20_000;
        let batch = kilobyte_records(count);
        assert!(
            sink.write_batch(&batch, count).is_err(),
            "the server's window never closed"
        );
        let handed_over = sink
            .delivered_prefix
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        assert!(!sink.unacked.is_empty());
        // The server dies; its successor reads everything.
        drop(stalled);
        let reader = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            BufReader::new(conn)
                .lines()
                .map(|l| l.unwrap())
                .map(|l| {
                    l.split_once("]: ").unwrap().1[7..12]
                        .parse::<usize>()
                        .unwrap()
                })
                .collect::<Vec<usize>>()
        });
        let mut tries = 0;
        while sink.write_batch(&batch, count).is_err() {
            tries += 1;
            assert!(tries < 1000);
        }
        drop(sink);
        let got = reader.join().unwrap();
        // Sent again: from the first message the stalled server had not acknowledged (the ones
        // before it were acknowledged by its kernel, never read: out of any sender's reach), well
        // before the last one the kernel had accepted; then every later one, once, in order.
        let first = got[0];
        assert!(first > 0 && first < handed_over, "{first} {handed_over}");
        assert_eq!(got, (first..count).collect::<Vec<_>>());
    }

    #[test]
    fn a_retired_tcp_sink_hands_over_what_its_server_did_not_acknowledge() {
        // QA: switching `audit.protocol` away from a stalled rsyslog dropped the unacknowledged
        // messages uncounted, and the batch it failed midway was written again whole.
        let (listener, mut sink) = tcp_sink_with_short_timeout();
        let (stalled, _) = listener.accept().unwrap();
        let count = 20_000;
        let batch = kilobyte_records(count);
        assert!(sink.write_batch(&batch, count).is_err());
        let sent = sink.delivered_of(&batch);
        assert!(sent > 0 && sent < batch.len());
        assert_eq!(sink.backlog_bytes(), 0);
        sink.retire();
        // The records of the messages it had not acknowledged: whole lines, without headers,
        // the last of them the last line before the batch's resume point.
        let mut back = Vec::new();
        loop {
            let lines = sink.undelivered(1 << 16).to_vec();
            if lines.is_empty() {
                break;
            }
            sink.release_undelivered(lines.len());
            back.extend_from_slice(&lines);
        }
        assert!(!back.is_empty());
        assert!(
            batch[..sent].ends_with(&back),
            "not the tail of what was sent"
        );
        assert_eq!(sink.backlog_bytes(), 0);
        // The server gets nothing more: its connection was reset.
        drop(stalled);
    }

    #[test]
    fn opening_without_a_syslog_socket_fails_retryably() {
        let dir = temp_dir("missing");
        let err = SyslogSink::open(local_options("local0", &dir.join("none.sock")))
            .err()
            .unwrap();
        assert!(err.retryable);
        assert!(err.message.contains("none.sock"), "{}", err.message);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A JSON record of exactly `len` bytes (without its newline), like the record of an MSET
    /// with many long keys.
    fn json_record(len: usize) -> Vec<u8> {
        let mut record = b"{\"keys\":[\"".to_vec();
        record.resize(len - 3, b'k');
        record.extend_from_slice(b"\"]}");
        record
    }

    /// Every datagram waiting on `receiver`, as the records they carry (the text after the header).
    fn received_records(receiver: &UdpSocket) -> Vec<Vec<u8>> {
        receiver
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = vec![0u8; 70_000];
        let mut records = Vec::new();
        while let Ok(n) = receiver.recv(&mut buf) {
            let message = &buf[..n];
            let at = message.windows(3).position(|w| w == b"]: ").unwrap() + 3;
            records.push(message[at..].to_vec());
        }
        records
    }

    #[test]
    fn records_too_long_for_one_udp_datagram_are_counted_as_lost_not_torn() {
        for (bind, max) in [
            ("127.0.0.1:0", MAX_UDP_PAYLOAD_V4),
            ("[::1]:0", MAX_UDP_PAYLOAD_V6),
        ] {
            let Ok(receiver) = UdpSocket::bind(bind) else {
                eprintln!("{bind}: cannot bind, skipped");
                continue;
            };
            let target = SyslogTarget::Udp(receiver.local_addr().unwrap().to_string());
            let mut sink =
                SyslogSink::open(options("local3", SyslogFormat::Rfc3164, target)).unwrap();
            // The header has the same length in every batch (fixed-width timestamp).
            let room = max - sink.header().len();
            let fits = json_record(room);
            let too_long = json_record(room + 1);
            let mut batch = b"{\"seq\":1}\n".to_vec();
            for record in [&too_long, &fits] {
                batch.extend_from_slice(record);
                batch.push(b'\n');
            }
            batch.extend_from_slice(b"{\"seq\":4}\n");
            sink.write_batch(&batch, 4).unwrap();

            let records = received_records(&receiver);
            assert_eq!(records.len(), 3, "{bind}");
            assert_eq!(records[0], b"{\"seq\":1}", "{bind}");
            assert_eq!(
                records[1], fits,
                "{bind}: the record that fits arrives whole"
            );
            assert_eq!(records[2], b"{\"seq\":4}", "{bind}");
            for record in &records {
                serde_json::from_slice::<serde_json::Value>(record).unwrap();
            }
            assert_eq!(sink.pending_loss(), 1, "{bind}");
            let lost = SinkLoss {
                records: 1,
                bytes: too_long.len() as u64 + 1,
                ..SinkLoss::default()
            };
            assert_eq!(sink.take_loss(), lost, "{bind}");
            assert_eq!(sink.take_loss(), SinkLoss::default(), "taking resets");
            assert_eq!(sink.pending_loss(), 0);
            assert_eq!(sink.status(), SinkStatus::Connected);
            assert_eq!(sink.messages_sent(), 3);
            assert!(sink.last_error().unwrap().contains("not sent"));
        }
    }

    #[test]
    fn records_a_local_datagram_socket_refuses_as_too_long_are_counted_as_lost() {
        let dir = temp_dir("emsgsize");
        let path = dir.join("log.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let mut sink = SyslogSink::open(local_options("local0", &path)).unwrap();
        // A small send buffer, so that the kernel refuses a 20 KB datagram with EMSGSIZE (its limit
        // is the send buffer, about 208 KiB by default).
        let Some(Transport::LocalDatagram(socket)) = &sink.transport else {
            panic!("not a datagram socket");
        };
        let size: libc::c_int = 4096;
        // SAFETY: setsockopt with a valid fd and an int option value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&raw const size).cast(),
                std::mem::size_of_val(&size) as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let mut batch = b"before\n".to_vec();
        batch.extend_from_slice(&json_record(20_000));
        batch.extend_from_slice(b"\nafter\n");
        // Every batch goes through: the refused record does not block the ones after it.
        for _ in 0..2 {
            sink.write_batch(&batch, 3).unwrap();
            let mut buf = [0u8; 1024];
            for record in ["before", "after"] {
                let n = receiver.recv(&mut buf).unwrap();
                assert!(text(&buf[..n]).ends_with(&format!("]: {record}")));
            }
        }
        let lost = SinkLoss {
            records: 2,
            bytes: 2 * 20_001,
            ..SinkLoss::default()
        };
        assert_eq!(sink.take_loss(), lost);
        assert_eq!(sink.status(), SinkStatus::Connected);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn settings_parse_and_render() {
        assert_eq!("RFC5424".parse::<SyslogFormat>(), Ok(SyslogFormat::Rfc5424));
        assert_eq!(
            " rfc3164 ".parse::<SyslogFormat>().unwrap().as_str(),
            "rfc3164"
        );
        assert!("json".parse::<SyslogFormat>().is_err());

        assert_eq!("".parse::<SyslogTarget>(), Ok(SyslogTarget::Local));
        assert_eq!("LOCAL".parse::<SyslogTarget>(), Ok(SyslogTarget::Local));
        let udp = "udp://logs.example:514".parse::<SyslogTarget>().unwrap();
        assert_eq!(udp, SyslogTarget::Udp("logs.example:514".to_string()));
        assert_eq!(udp.render(), "udp://logs.example:514");
        let tcp = "TCP://[::1]:6514".parse::<SyslogTarget>().unwrap();
        assert_eq!(tcp, SyslogTarget::Tcp("[::1]:6514".to_string()));
        assert_eq!(tcp.to_string(), "tcp://[::1]:6514");
        for bad in [
            "udp://host",
            "tcp://:514",
            "tcp://h:0",
            "tcp://h:70000",
            "http://h:1",
            "h:514",
            "tcp://::1:514",
        ] {
            assert!(bad.parse::<SyslogTarget>().is_err(), "{bad}");
        }

        assert!(matches!(parse_facility("local0"), Ok(Facility::LOG_LOCAL0)));
        assert!(matches!(parse_facility("LOCAL7"), Ok(Facility::LOG_LOCAL7)));
        assert!(matches!(parse_facility("user"), Ok(Facility::LOG_USER)));
        assert!(matches!(parse_facility("Daemon"), Ok(Facility::LOG_DAEMON)));
        assert!(matches!(
            parse_facility("authpriv"),
            Ok(Facility::LOG_AUTHPRIV)
        ));
        assert!(parse_facility("kern").unwrap_err().contains("kernel"));
        assert!(
            parse_facility("local8")
                .unwrap_err()
                .contains("unknown syslog facility")
        );
        let opts = SyslogOptions::new(" Local3 ").unwrap();
        assert_eq!(
            (opts.facility_name.as_str(), opts.ident.as_str()),
            ("Local3", "valkey-audit")
        );
        assert_eq!(
            (opts.format, &opts.target),
            (SyslogFormat::Rfc3164, &SyslogTarget::Local)
        );
    }

    /// rsyslogd with a local socket, UDP and TCP inputs, writing facility, severity, tag, pid and
    /// message of everything it receives to one file.
    struct Rsyslog {
        child: Child,
        dir: PathBuf,
        socket: PathBuf,
        udp_port: u16,
        tcp_port: u16,
    }

    impl Rsyslog {
        fn start(dir: &Path) -> Option<Rsyslog> {
            let binary = ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
                .into_iter()
                .find(|p| Path::new(p).exists())?;
            let free_port = || {
                TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            };
            let (udp_port, tcp_port) = (free_port(), free_port());
            let socket = dir.join("log.sock");
            let config = format!(
                r#"global(workDirectory="{dir}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{socket}" RateLimit.Interval="0")
module(load="imudp")
input(type="imudp" address="127.0.0.1" port="{udp_port}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{tcp_port}")
template(name="fields" type="string" string="%syslogfacility-text% %syslogseverity-text% %programname% %procid% %msg%\n")
*.* action(type="omfile" file="{dir}/out.log" template="fields")
"#,
                dir = dir.display(),
                socket = socket.display(),
            );
            std::fs::write(dir.join("rsyslog.conf"), config).unwrap();
            let child = Command::new(binary)
                .arg("-n")
                .arg("-f")
                .arg(dir.join("rsyslog.conf"))
                .arg("-i")
                .arg(dir.join("rsyslog.pid"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            let rsyslog = Rsyslog {
                child,
                dir: dir.to_path_buf(),
                socket,
                udp_port,
                tcp_port,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while !(rsyslog.socket.exists() && TcpStream::connect(("127.0.0.1", tcp_port)).is_ok())
            {
                assert!(Instant::now() < deadline, "rsyslogd did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            Some(rsyslog)
        }

        /// The received (facility, severity, tag, pid, message) lines, once `count` have arrived.
        fn wait_for(&self, count: usize) -> Vec<Vec<String>> {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let out = std::fs::read_to_string(self.dir.join("out.log")).unwrap_or_default();
                let lines: Vec<Vec<String>> = out
                    .lines()
                    .map(|l| l.splitn(5, ' ').map(|f| f.trim().to_string()).collect())
                    .collect();
                if lines.len() >= count || Instant::now() > deadline {
                    return lines;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    impl Drop for Rsyslog {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn a_real_rsyslog_receives_every_record_in_order() {
        let dir = temp_dir("rsyslog");
        let Some(rsyslog) = Rsyslog::start(&dir) else {
            eprintln!("rsyslogd not installed: skipped");
            return;
        };
        let sinks = [
            local_options("local0", &rsyslog.socket),
            options(
                "local1",
                SyslogFormat::Rfc5424,
                SyslogTarget::Udp(format!("127.0.0.1:{}", rsyslog.udp_port)),
            ),
            options(
                "local2",
                SyslogFormat::Rfc3164,
                SyslogTarget::Tcp(format!("127.0.0.1:{}", rsyslog.tcp_port)),
            ),
            options(
                "local3",
                SyslogFormat::Rfc5424,
                SyslogTarget::Tcp(format!("127.0.0.1:{}", rsyslog.tcp_port)),
            ),
        ];
        let per_sink = 2000;
        for opts in sinks {
            let mut sink = SyslogSink::open(opts).unwrap();
            for batch in 0..per_sink / 50 {
                let lines: Vec<u8> = (batch * 50..batch * 50 + 50)
                    .flat_map(|i| format!("{{\"seq\":{i},\"command\":\"SET k v\"}}\n").into_bytes())
                    .collect();
                sink.write_batch(&lines, 50).unwrap();
                // UDP has no flow control: give rsyslog time to read.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let lines = rsyslog.wait_for(4 * per_sink);
        let pid = std::process::id().to_string();
        for facility in ["local0", "local1", "local2", "local3"] {
            let messages: Vec<&Vec<String>> = lines.iter().filter(|l| l[0] == facility).collect();
            assert_eq!(messages.len(), per_sink, "{facility}");
            for (i, fields) in messages.iter().enumerate() {
                assert_eq!(
                    fields[1..4],
                    ["notice", "valkey-audit", pid.as_str()],
                    "{facility}"
                );
                assert_eq!(
                    fields[4],
                    format!("{{\"seq\":{i},\"command\":\"SET k v\"}}"),
                    "{facility}"
                );
            }
        }
        drop(rsyslog);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_local_socket_is_the_first_path_that_is_a_socket() {
        let dir = std::env::temp_dir().join(format!("syslog-paths-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("log")).unwrap();
        let socket = dir.join("sock");
        let _bound = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
        let paths = [dir.join("missing"), dir.join("log"), socket.clone()];
        assert_eq!(
            first_socket(paths.iter().map(|p| p.as_path())),
            Some(socket.as_path())
        );
        assert_eq!(first_socket(paths[..2].iter().map(|p| p.as_path())), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
