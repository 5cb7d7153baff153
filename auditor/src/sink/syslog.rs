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
//! its own (rsyslog does, with a warning). Messages handed to the kernel just before a TCP connection
//! breaks can be lost without any error: plain syslog over TCP has no acknowledgements.
//!
//! Messages longer than a datagram can carry are cut to [`MAX_DATAGRAM_MESSAGE`] bytes (at a UTF-8
//! character boundary); rsyslog cuts at 8 KiB by default anyway (`maxMessageSize`).

use std::fmt;
use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use syslog::Facility;

use super::{Sink, SinkError, SinkLoss, SinkStatus};

/// Where `syslog(3)` looks for the local syslog socket, in order.
const LOCAL_SOCKET_PATHS: [&str; 3] = ["/dev/log", "/var/run/syslog", "/var/run/log"];

/// How long one send may block before the batch is reported as failed (a syslog daemon that stopped
/// reading its socket must not hang the sink thread; the caller retries).
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// After a failure, reconnecting is tried at most this often; between tries batches fail at once.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// The largest message sent as one datagram: the most a UDP datagram over IPv4 can carry, and well
/// below what a local datagram socket accepts by default.
pub const MAX_DATAGRAM_MESSAGE: usize = 65_507;

/// What a datagram is cut to when the socket still refuses it as too long (`EMSGSIZE`).
const SMALL_DATAGRAM_MESSAGE: usize = 2048;

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

    /// The bytes that end each message on this transport.
    fn terminator(&self) -> &'static [u8] {
        match self {
            Transport::LocalStream(_) => b"\0",
            Transport::Tcp(_) => b"\n",
            Transport::LocalDatagram(_) | Transport::Udp { .. } => b"",
        }
    }

    /// Sends one framed message, whole (a datagram is all or nothing; a stream write is completed).
    fn send(&mut self, message: &[u8]) -> io::Result<()> {
        match self {
            Transport::LocalDatagram(socket) => {
                retry_interrupted(|| socket.send(message)).map(drop)
            }
            Transport::Udp { socket, server } => {
                retry_interrupted(|| socket.send_to(message, *server)).map(drop)
            }
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
    /// Reused message buffer: header, record, terminator.
    message: Vec<u8>,
    last_error: Option<String>,
    messages_sent: u64,
}

impl SyslogSink {
    /// Connects to the target (the local socket, or the remote server); fails if that is impossible
    /// now, with a retryable error.
    pub fn open(opts: SyslogOptions) -> Result<Self, SinkError> {
        let mut sink = SyslogSink {
            opts,
            hostname: read_hostname(),
            pid: std::process::id(),
            transport: None,
            status: SinkStatus::Disconnected,
            delivered_prefix: Vec::new(),
            last_connect_attempt: None,
            send_timeout: SEND_TIMEOUT,
            message: Vec::with_capacity(4096),
            last_error: None,
            messages_sent: 0,
        };
        sink.connect()?;
        Ok(sink)
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
        self.transport = None;
        self.last_connect_attempt = Some(Instant::now());
        match open_transport(&self.opts, self.send_timeout) {
            Ok(transport) => {
                self.transport = Some(transport);
                self.status = SinkStatus::Connected;
                Ok(())
            }
            Err(e) => {
                let message = format!("syslog: connecting to {}: {e}", self.describe_target());
                Err(self.fail(message))
            }
        }
    }

    /// Reconnects if the last try is old enough; otherwise fails at once.
    fn ensure_connected(&mut self) -> Result<(), SinkError> {
        if self.transport.is_some() {
            return Ok(());
        }
        let due = self
            .last_connect_attempt
            .is_none_or(|at| at.elapsed() >= RECONNECT_INTERVAL);
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

/// Opens the transport for the target. Remote hosts are resolved here, so a reconnect sees DNS changes.
fn open_transport(opts: &SyslogOptions, send_timeout: Duration) -> io::Result<Transport> {
    match &opts.target {
        SyslogTarget::Local => match &opts.local_socket {
            Some(path) => open_local(path, send_timeout),
            None => {
                let found = LOCAL_SOCKET_PATHS
                    .iter()
                    .map(Path::new)
                    .find(|p| p.exists());
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
            // Not connected: ICMP errors from earlier datagrams would otherwise fail later sends,
            // making it unknowable whether a message went out. UDP syslog is fire and forget.
            let socket = UdpSocket::bind(local)?;
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

/// The longest prefix of `text` of at most `max` bytes that does not split a UTF-8 character.
fn cut_at_char_boundary(text: &[u8], max: usize) -> &[u8] {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while end > 0 && (text[end] & 0xC0) == 0x80 {
        end -= 1;
    }
    &text[..end]
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
        let header = self.header();
        while pos < lines.len() {
            let end = lines[pos..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(lines.len(), |i| pos + i);
            let record = &lines[pos..end];
            let transport = self.transport.as_mut().expect("connected above");
            let is_datagram = transport.is_datagram();
            let record = if is_datagram {
                cut_at_char_boundary(record, MAX_DATAGRAM_MESSAGE.saturating_sub(header.len()))
            } else {
                record
            };
            self.message.clear();
            self.message.extend_from_slice(&header);
            self.message.extend_from_slice(record);
            self.message.extend_from_slice(transport.terminator());
            let mut sent = transport.send(&self.message);
            if is_datagram
                && matches!(&sent, Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE))
                && self.message.len() > SMALL_DATAGRAM_MESSAGE
            {
                let max = SMALL_DATAGRAM_MESSAGE.max(header.len());
                let cut = cut_at_char_boundary(&self.message, max).len();
                self.message.truncate(cut);
                sent = transport.send(&self.message);
            }
            if let Err(e) = sent {
                self.transport = None;
                self.delivered_prefix.extend_from_slice(&lines[..pos]);
                let message = format!("syslog: sending to {}: {e}", self.describe_target());
                return Err(self.fail(message));
            }
            self.messages_sent += 1;
            pos = (end + 1).min(lines.len());
        }
        self.status = SinkStatus::Connected;
        Ok(())
    }

    /// Messages are not buffered: each was handed to the socket by `write_batch`.
    fn flush(&mut self, _force: bool) -> Result<(), SinkError> {
        Ok(())
    }

    /// Reconnects in the background after a failure, so the status recovers without traffic.
    fn tick(&mut self) -> Result<(), SinkError> {
        if self.transport.is_none()
            && self
                .last_connect_attempt
                .is_none_or(|at| at.elapsed() >= RECONNECT_INTERVAL)
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

    fn status(&self) -> SinkStatus {
        self.status
    }

    /// Nothing is dropped inside this sink: failed batches go back to the caller.
    fn take_loss(&mut self) -> SinkLoss {
        SinkLoss::default()
    }

    fn kind(&self) -> &'static str {
        "syslog"
    }
}
