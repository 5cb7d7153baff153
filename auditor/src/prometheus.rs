//! Prometheus endpoint: the numbers of `INFO audit` in the text exposition format (0.0.4), served
//! over HTTP at `/metrics`.
//!
//! [`render`] formats one [`Snapshot`] of [`Metrics`], the same snapshot type `INFO audit` is
//! rendered from, so both show the same numbers. [`serve`] is a minimal HTTP/1.1 server on the
//! daemon's tokio runtime. It is written by hand rather than with an HTTP crate because it has one
//! fixed read-only endpoint and answers one request per connection: a few dozen lines do, and the
//! daemon gains no dependency (and no attack surface) for it. Like the control port it must never
//! get in the way of capture: at most [`MAX_CLIENTS`] connections, the request head bounded in size
//! ([`MAX_HEAD_BYTES`]) and time ([`HEAD_TIMEOUT`]), each connection its own task, and no input
//! makes it panic.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::metrics::{CATEGORY_NAMES, Metrics, SINK_KINDS, Snapshot, TargetInfo};
use crate::sink::SinkStatus;

/// What `/metrics` answers: the exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Most simultaneous connections; more get a 503 at once.
pub const MAX_CLIENTS: usize = 64;
/// Largest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Time a client has to send its whole request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that does not read its response is dropped after this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After answering, what the client still sends is read and discarded for at most this long and
/// this many bytes, so closing with unread input does not reset the connection before the client
/// has read the response.
const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;
/// How long a refused (over the limit) client gets to receive its 503.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// Exposition format
// ---------------------------------------------------------------------------------------------

/// The metrics page for `m` now. `protocol`, `format` and `queue_bytes` are what `INFO audit`
/// is given for `audit_protocol`, `audit_format` and `audit_queue_bytes`.
pub fn render(m: &Metrics, protocol: &str, format: &str, queue_bytes: usize) -> String {
    render_snapshot(&m.snapshot(), protocol, format, queue_bytes)
}

/// Escape a label value: backslash, double quote and line feed, as the format requires.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Text being built: families (HELP, TYPE) and their samples.
struct Page(String);

impl Page {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label_value(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

fn target_labels(t: &TargetInfo) -> [(&'static str, String); 6] {
    [
        ("pid", t.pid.to_string()),
        ("port", t.port.to_string()),
        ("comm", t.comm.clone()),
        ("container_id", t.container_id.clone()),
        ("pod", t.pod_name.clone()),
        ("namespace", t.pod_namespace.clone()),
    ]
}

/// The metrics page for one snapshot (see [`render`]). Every number is the one
/// [`Snapshot::info_fields`] shows for the same snapshot.
pub fn render_snapshot(s: &Snapshot, protocol: &str, format: &str, queue_bytes: usize) -> String {
    let mut p = Page(String::with_capacity(4096 + 256 * s.targets.len()));

    p.family(
        "auditor_info",
        "gauge",
        "Auditor version and output settings.",
    );
    p.sample(
        "auditor_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("protocol", protocol),
            ("format", format),
        ],
        1,
    );
    p.single(
        "auditor_uptime_seconds",
        "gauge",
        "Seconds since the auditor started (audit_uptime_seconds).",
        s.uptime_seconds,
    );

    p.family(
        "auditor_records_total",
        "counter",
        "Audit records written, by category (audit_events_<category>).",
    );
    for (name, n) in CATEGORY_NAMES.iter().zip(s.by_category) {
        p.sample("auditor_records_total", &[("category", name)], n);
    }
    p.single(
        "auditor_records_written_bytes_total",
        "counter",
        "Bytes of audit records written (audit_bytes_written).",
        s.bytes_written,
    );
    p.single(
        "auditor_write_errors_total",
        "counter",
        "Batches a sink refused (audit_total_errors).",
        s.write_errors,
    );
    p.single(
        "auditor_filtered_total",
        "counter",
        "Commands not audited because of the filter settings (audit_exclusion_hits).",
        s.filtered,
    );

    p.family(
        "auditor_lost_records_total",
        "counter",
        "Records or commands lost, by cause (audit_lost_*).",
    );
    for (cause, n) in [
        ("ring_buffer_full", s.lost_ring_events),
        ("queue_overflow", s.lost_queue),
        ("sink", s.lost_sink),
        ("parser_resync_request", s.request_resyncs),
        ("parser_resync_reply", s.reply_resyncs),
        ("commands_not_captured", s.commands_not_captured),
    ] {
        p.sample("auditor_lost_records_total", &[("cause", cause)], n);
    }
    p.single(
        "auditor_client_protocol_errors_total",
        "counter",
        "Malformed requests from clients, written as protocol_error records; not losses \
         (audit_client_protocol_errors).",
        s.protocol_errors,
    );
    p.single(
        "auditor_tls_connections_total",
        "counter",
        "TLS connections, whose commands are encrypted on the socket and not audited \
         (audit_tls_connections).",
        s.tls_connections,
    );
    p.single(
        "auditor_lost_ring_buffer_bytes_total",
        "counter",
        "Bytes the kernel could not write to the full ring buffer (audit_lost_ring_buffer_bytes).",
        s.lost_ring_bytes,
    );
    p.single(
        "auditor_bytes_not_captured_total",
        "counter",
        "Bytes of client traffic not captured (audit_bytes_not_captured).",
        s.bytes_skipped,
    );
    p.single(
        "auditor_reply_bytes_elided_total",
        "counter",
        "Reply payload bytes the kernel left out on purpose (audit_reply_bytes_elided).",
        s.bytes_elided,
    );

    p.single(
        "auditor_connections",
        "gauge",
        "Client connections of the audited servers being followed (audit_connections).",
        s.connections,
    );
    p.single(
        "auditor_queue_bytes",
        "gauge",
        "Bytes of records waiting to be written (audit_queue_bytes).",
        queue_bytes as u64,
    );
    p.single(
        "auditor_ring_buffer_used_bytes",
        "gauge",
        "Most unread bytes the kernel ring buffer held in the last 100 ms (audit_ring_buffer_used_bytes).",
        s.ring_used_bytes,
    );
    p.single(
        "auditor_ring_buffer_size_bytes",
        "gauge",
        "Size of the kernel ring buffer (audit_ring_buffer_size_bytes).",
        s.ring_size_bytes,
    );
    p.single(
        "auditor_sink_backlog_bytes",
        "gauge",
        "Bytes the sink took but has not delivered: a TCP collector's backlog (audit_sink_backlog_bytes).",
        s.sink_backlog_bytes,
    );
    p.single(
        "auditor_prefix_filter_checks_total",
        "counter",
        "Commands looked up in audit.prefix_filter (audit_prefix_filter_checks).",
        s.prefix_filter_checks,
    );
    p.single(
        "auditor_prefix_filter_matches_total",
        "counter",
        "Commands a prefix of audit.prefix_filter matched (audit_prefix_filter_matches).",
        s.prefix_filter_matches,
    );
    p.single(
        "auditor_custom_category_matches_total",
        "counter",
        "Commands audit.custom_category gave a category (audit_custom_category_matches).",
        s.custom_category_matches,
    );

    p.family(
        "auditor_sink_up",
        "gauge",
        "1 if the sink is connected (audit_<sink>_status is connected), else 0.",
    );
    for (kind, status) in SINK_KINDS.iter().zip(s.sink_status) {
        let up = u64::from(status == SinkStatus::Connected);
        p.sample("auditor_sink_up", &[("sink", kind)], up);
    }
    p.family(
        "auditor_sink_status",
        "gauge",
        "1 for the current status of each sink (audit_<sink>_status), 0 for the others.",
    );
    for (kind, status) in SINK_KINDS.iter().zip(s.sink_status) {
        for candidate in [
            SinkStatus::Connected,
            SinkStatus::Disconnected,
            SinkStatus::Error,
        ] {
            p.sample(
                "auditor_sink_status",
                &[("sink", kind), ("status", candidate.as_str())],
                u64::from(status == candidate),
            );
        }
    }

    p.single(
        "auditor_targets",
        "gauge",
        "Audited servers currently attached (audit_targets).",
        s.attached_targets() as u64,
    );
    p.family(
        "auditor_target_records_total",
        "counter",
        "Audit records written per audited server (audit_target_<pid> records).",
    );
    for t in &s.targets {
        let labels = target_labels(&t.info);
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        p.sample("auditor_target_records_total", &labels, t.records);
    }
    p.family(
        "auditor_target_attached",
        "gauge",
        "1 while the server is audited, 0 once it exited or was detached (audit_target_<pid> attached).",
    );
    for t in &s.targets {
        let labels = target_labels(&t.info);
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        p.sample("auditor_target_attached", &labels, u64::from(t.attached));
    }
    p.0
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))
}

/// Bounds of one server (constants in the daemon, smaller in tests).
#[derive(Clone, Copy)]
struct Limits {
    max_clients: usize,
    max_head: usize,
    head_timeout: Duration,
}

const LIMITS: Limits = Limits {
    max_clients: MAX_CLIENTS,
    max_head: MAX_HEAD_BYTES,
    head_timeout: HEAD_TIMEOUT,
};

/// Serve `GET /metrics` (and `GET /`) forever with the page `render` returns. Each connection runs
/// in its own task and gets one response, then is closed; the future never completes, so the
/// daemon drops it (or its runtime) to stop listening.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    serve_with(listener, render, LIMITS).await
}

async fn serve_with(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_clients));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let render = render.clone();
                tokio::spawn(async move {
                    handle(stream, render, limits).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let busy = Response::error(503, "Service Unavailable", "too many clients\n");
                    finish(stream, &busy.to_bytes(true), REFUSE_TIMEOUT).await;
                });
            }
        }
    }
}

struct Response {
    code: u16,
    reason: &'static str,
    content_type: &'static str,
    allow: bool,
    body: String,
}

impl Response {
    fn error(code: u16, reason: &'static str, body: &str) -> Response {
        Response {
            code,
            reason,
            content_type: "text/plain; charset=utf-8",
            allow: false,
            body: body.into(),
        }
    }

    /// Status line, headers and (unless `HEAD`) the body.
    fn to_bytes(&self, with_body: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.code,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            head.push_str("Allow: GET, HEAD\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if with_body {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// Why no request head could be read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// The client closed (or failed) before sending anything: nobody to answer.
    Gone,
    /// The connection ended in the middle of a head.
    Truncated,
    /// More than the size limit without the blank line that ends a head.
    TooLarge,
}

/// Read the request head, up to and including the blank line that ends it.
async fn read_head(stream: &mut TcpStream, max: usize) -> Result<Vec<u8>, HeadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(n) => n,
            Err(_) if buf.is_empty() => return Err(HeadError::Gone),
            Err(_) => return Err(HeadError::Truncated),
        };
        if n == 0 {
            return Err(if buf.is_empty() {
                HeadError::Gone
            } else {
                HeadError::Truncated
            });
        }
        let searched = buf.len().saturating_sub(3);
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some(end) = head_end(&buf, searched) {
            if end > max {
                return Err(HeadError::TooLarge);
            }
            buf.truncate(end);
            return Ok(buf);
        }
        if buf.len() > max {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Position of the blank line ending a head (`\r\n\r\n`, or a bare `\n\n`), searching from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// What a valid request asks for.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parse a request head (RFC 9112: request line, then `name: value` lines). `None`: not HTTP/1.x.
fn parse_head(head: &[u8]) -> Option<Request> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty());
    let request_line = lines.next()?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.bytes().all(is_token_char)
        || !target.starts_with('/')
        || !target.bytes().all(|b| b.is_ascii_graphic())
        || !(version == "HTTP/1.1" || version == "HTTP/1.0")
    {
        return None;
    }
    for line in lines {
        let (name, value) = line.split_once(':')?;
        if name.is_empty()
            || !name.bytes().all(is_token_char)
            || value.bytes().any(|b| b.is_ascii_control() && b != b'\t')
        {
            return None;
        }
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Some(Request {
        method: method.into(),
        path: path.into(),
    })
}

/// The response to a parsed request, and whether it carries its body (not for `HEAD`).
fn respond(req: &Request, render: &(dyn Fn() -> String + Send + Sync)) -> (Response, bool) {
    if req.path != "/metrics" && req.path != "/" {
        return (Response::error(404, "Not Found", "not found\n"), true);
    }
    match req.method.as_str() {
        "GET" | "HEAD" => (
            Response {
                code: 200,
                reason: "OK",
                content_type: CONTENT_TYPE,
                allow: false,
                body: render(),
            },
            req.method == "GET",
        ),
        _ => {
            let mut r = Response::error(405, "Method Not Allowed", "method not allowed\n");
            r.allow = true;
            (r, true)
        }
    }
}

async fn handle(
    mut stream: TcpStream,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    limits: Limits,
) {
    let _ = stream.set_nodelay(true);
    let head =
        tokio::time::timeout(limits.head_timeout, read_head(&mut stream, limits.max_head)).await;
    let (response, with_body) = match head {
        Err(_) => (
            Response::error(408, "Request Timeout", "request timeout\n"),
            true,
        ),
        Ok(Err(HeadError::Gone)) => return,
        Ok(Err(HeadError::TooLarge)) => (
            Response::error(
                431,
                "Request Header Fields Too Large",
                "request head too large\n",
            ),
            true,
        ),
        Ok(Err(HeadError::Truncated)) => {
            (Response::error(400, "Bad Request", "bad request\n"), true)
        }
        Ok(Ok(head)) => match parse_head(&head) {
            Some(req) => respond(&req, render.as_ref()),
            None => (Response::error(400, "Bad Request", "bad request\n"), true),
        },
    };
    finish(stream, &response.to_bytes(with_body), WRITE_TIMEOUT).await;
}

/// Write the response, close, and linger a little.
async fn finish(mut stream: TcpStream, out: &[u8], write_timeout: Duration) {
    if !matches!(
        tokio::time::timeout(write_timeout, stream.write_all(out)).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let _ = stream.shutdown().await;
    // Drain what the client still sends (a body, the rest of an oversized head) until it closes,
    // so the response is not lost to a reset; bounded in time and bytes.
    let _ = tokio::time::timeout(LINGER_TIMEOUT, async {
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::TargetInfo;
    use crate::record::Category;
    use std::collections::{HashMap, HashSet};

    /// One sample line: name, labels (unescaped), value.
    type Sample = (String, Vec<(String, String)>, u64);

    /// Parse labels `{a="x",b="y"}` (after the name), undoing the format's escapes; returns the
    /// labels and the rest of the line.
    fn parse_labels(s: &str) -> (Vec<(String, String)>, &str) {
        let mut labels = Vec::new();
        let Some(mut rest) = s.strip_prefix('{') else {
            return (labels, s);
        };
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                return (labels, r);
            }
            rest = rest.strip_prefix(',').unwrap_or(rest);
            let (name, r) = rest.split_once("=\"").expect("label name");
            assert!(
                name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "label name {name:?}"
            );
            let mut value = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                let (i, c) = chars.next().expect("unterminated label value");
                match c {
                    '"' => break i,
                    '\\' => match chars.next().expect("escape").1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        other => panic!("bad escape \\{other}"),
                    },
                    '\n' => panic!("raw newline in a label value"),
                    c => value.push(c),
                }
            };
            labels.push((name.to_string(), value));
            rest = &r[end + 1..];
        }
    }

    /// Check the page line by line and return its samples.
    fn parse_page(page: &str) -> Vec<Sample> {
        assert!(page.ends_with('\n'));
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps: HashSet<String> = HashSet::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut samples = Vec::new();
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(helps.insert(name.to_string()), "second HELP for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge"].contains(&kind), "{line}");
                assert!(helps.contains(name), "TYPE before HELP for {name}");
                assert!(
                    types.insert(name.to_string(), kind.to_string()).is_none(),
                    "second TYPE for {name}"
                );
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter {name}");
                }
            } else {
                assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
                let name_end = line.find(['{', ' ']).expect("name");
                let name = &line[..name_end];
                assert!(
                    name.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
                    "{name}"
                );
                assert!(types.contains_key(name), "sample {name} without a TYPE");
                let (labels, rest) = parse_labels(&line[name_end..]);
                let value: u64 = rest
                    .strip_prefix(' ')
                    .expect("space")
                    .parse()
                    .expect("value");
                let key = format!("{name}{labels:?}");
                assert!(seen.insert(key), "duplicate series: {line}");
                samples.push((name.to_string(), labels, value));
            }
        }
        samples
    }

    fn get(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> u64 {
        let found: Vec<u64> = samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0]
    }

    fn busy_metrics() -> Metrics {
        let m = Metrics::new(vec![]);
        m.target_added(TargetInfo {
            pid: 100,
            ns_pid: 1,
            port: 6379,
            comm: "valkey-\"server\"\\main\nx".into(),
            container_id: "0123abcd".into(),
            pod_name: "cache-0".into(),
            pod_namespace: "prod".into(),
        });
        m.target_added(TargetInfo::unknown(200));
        for i in 0..50u32 {
            let c = match i % 4 {
                0 => Category::KeyOp,
                1 => Category::Auth,
                2 => Category::Custom("mine".into()),
                _ => Category::Connection,
            };
            m.record_written(&c, if i % 3 == 0 { 200 } else { 100 }, 17);
        }
        m.record_written(&Category::Audit, std::process::id(), 100);
        m.record_written(&Category::AuditLoss, 0, 100);
        m.target_removed(200);
        let counters = [
            (&m.write_errors, 2),
            (&m.filtered, 3),
            (&m.lost_ring_events, 4),
            (&m.lost_ring_bytes, 5),
            (&m.request_resyncs, 6),
            (&m.reply_resyncs, 7),
            (&m.bytes_skipped, 8),
            (&m.bytes_elided, 12),
            (&m.connections, 9),
            (&m.lost_queue, 10),
            (&m.lost_sink, 11),
        ];
        for (c, v) in counters {
            c.store(v, std::sync::atomic::Ordering::Relaxed);
        }
        m.set_sink_status("syslog", SinkStatus::Error);
        m.set_ring_usage(12345, 1 << 24);
        m
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_label_value("plain é"), "plain é");
    }

    #[test]
    fn page_is_well_formed_and_matches_info() {
        let m = busy_metrics();
        let snap = m.snapshot();
        let info: HashMap<String, String> = snap
            .info_fields(
                "syslog udp:x:514",
                "json",
                4321,
                crate::metrics::FilterSizes::default(),
            )
            .into_iter()
            .collect();
        let page = render_snapshot(&snap, "syslog udp:x:514", "json", 4321);
        let samples = parse_page(&page);
        let n = |k: &str| -> u64 { info[k].parse().unwrap() };

        for cat in CATEGORY_NAMES {
            assert_eq!(
                get(&samples, "auditor_records_total", &[("category", cat)]),
                n(&format!("audit_events_{cat}")),
                "{cat}"
            );
        }
        assert_eq!(n("audit_total_events"), 52);
        let pairs = [
            ("auditor_records_written_bytes_total", "audit_bytes_written"),
            ("auditor_write_errors_total", "audit_total_errors"),
            ("auditor_filtered_total", "audit_exclusion_hits"),
            (
                "auditor_lost_ring_buffer_bytes_total",
                "audit_lost_ring_buffer_bytes",
            ),
            (
                "auditor_bytes_not_captured_total",
                "audit_bytes_not_captured",
            ),
            (
                "auditor_reply_bytes_elided_total",
                "audit_reply_bytes_elided",
            ),
            ("auditor_connections", "audit_connections"),
            ("auditor_queue_bytes", "audit_queue_bytes"),
            ("auditor_sink_backlog_bytes", "audit_sink_backlog_bytes"),
            (
                "auditor_prefix_filter_checks_total",
                "audit_prefix_filter_checks",
            ),
            (
                "auditor_prefix_filter_matches_total",
                "audit_prefix_filter_matches",
            ),
            (
                "auditor_custom_category_matches_total",
                "audit_custom_category_matches",
            ),
            ("auditor_uptime_seconds", "audit_uptime_seconds"),
            ("auditor_targets", "audit_targets"),
            (
                "auditor_ring_buffer_used_bytes",
                "audit_ring_buffer_used_bytes",
            ),
            (
                "auditor_ring_buffer_size_bytes",
                "audit_ring_buffer_size_bytes",
            ),
        ];
        for (prom, field) in pairs {
            assert_eq!(get(&samples, prom, &[]), n(field), "{prom}");
        }
        assert_eq!(n("audit_queue_bytes"), 4321);
        assert_eq!(n("audit_ring_buffer_used_bytes"), 12345);
        for (cause, field) in [
            ("ring_buffer_full", "audit_lost_ring_buffer_events"),
            ("queue_overflow", "audit_lost_queue_overflow"),
            ("sink", "audit_lost_sink"),
            ("parser_resync_request", "audit_lost_parser_resync_request"),
            ("parser_resync_reply", "audit_lost_parser_resync_reply"),
            ("commands_not_captured", "audit_lost_commands_not_captured"),
        ] {
            assert_eq!(
                get(&samples, "auditor_lost_records_total", &[("cause", cause)]),
                n(field),
                "{cause}"
            );
        }
        for kind in SINK_KINDS {
            let status = &info[&format!("audit_{kind}_status")];
            assert_eq!(
                get(
                    &samples,
                    "auditor_sink_status",
                    &[("sink", kind), ("status", status)]
                ),
                1
            );
            let total: u64 = samples
                .iter()
                .filter(|(n, l, _)| {
                    n == "auditor_sink_status" && l.contains(&("sink".into(), kind.into()))
                })
                .map(|(_, _, v)| *v)
                .sum();
            assert_eq!(total, 1, "{kind}");
            assert_eq!(
                get(&samples, "auditor_sink_up", &[("sink", kind)]),
                u64::from(status == "connected")
            );
        }
        assert_eq!(info["audit_syslog_status"], "error");
        assert_eq!(
            get(
                &samples,
                "auditor_info",
                &[
                    ("protocol", info["audit_protocol"].as_str()),
                    ("format", info["audit_format"].as_str()),
                    ("version", env!("CARGO_PKG_VERSION")),
                ],
            ),
            1
        );
        // Per target: labels (escaped on the page, intact after parsing) and numbers as INFO.
        for pid in ["100", "200"] {
            let text = &info[&format!("audit_target_{pid}")];
            let kv: HashMap<&str, &str> = text
                .split(',')
                .map(|p| p.split_once('=').unwrap())
                .collect();
            let labels = [("pid", pid), ("port", kv["port"])];
            assert_eq!(
                get(&samples, "auditor_target_records_total", &labels).to_string(),
                kv["records"]
            );
            assert_eq!(
                get(&samples, "auditor_target_attached", &labels).to_string(),
                kv["attached"]
            );
        }
        assert_eq!(info["audit_target_200"], "port=0,records=17,attached=0");
        assert_eq!(
            get(
                &samples,
                "auditor_target_records_total",
                &[
                    ("comm", "valkey-\"server\"\\main\nx"),
                    ("container_id", "0123abcd"),
                    ("pod", "cache-0"),
                    ("namespace", "prod"),
                ],
            ),
            33
        );
        assert!(page.contains(r#"comm="valkey-\"server\"\\main\nx""#));
        // The page from the Metrics itself has the same shape.
        let live = parse_page(&render(&m, "syslog udp:x:514", "json", 4321));
        assert_eq!(live.len(), samples.len());
    }

    #[test]
    fn empty_metrics_render() {
        let samples = parse_page(&render(&Metrics::default(), "file", "text", 0));
        assert_eq!(get(&samples, "auditor_targets", &[]), 0);
        assert!(
            !samples
                .iter()
                .any(|(n, _, _)| n.starts_with("auditor_target_"))
        );
    }

    #[test]
    fn head_parsing() {
        let ok = |s: &str| parse_head(s.as_bytes());
        assert_eq!(
            ok("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n"),
            Some(Request {
                method: "GET".into(),
                path: "/metrics".into()
            })
        );
        assert!(ok("GET / HTTP/1.0\n\n").is_some());
        assert!(ok("\r\nGET / HTTP/1.0\r\n\r\n").is_some());
        for bad in [
            "",
            "GET\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET /metrics HTTP/2\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 x\r\n\r\n",
            "G(T /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n folded: x\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nA: \x01\r\n\r\n",
            "GET /m\x7fetrics HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(ok(bad), None, "{bad:?}");
        }
        assert_eq!(parse_head(b"GET /\xff HTTP/1.1\r\n\r\n"), None);
        // Arbitrary bytes never panic.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for len in 0..2000 {
            let bytes: Vec<u8> = (0..len % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b"GET /metrics HTTP/1.1\r\n: \x00\xff"[(x % 25) as usize]
                })
                .collect();
            let _ = parse_head(&bytes);
            let _ = head_end(&bytes, (x % 7) as usize);
        }
        assert_eq!(head_end(b"a\r\n\r\nb", 0), Some(5));
        assert_eq!(head_end(b"a\n\nb", 0), Some(3));
        assert_eq!(head_end(b"a\r\n\r", 0), None);
    }

    async fn start(limits: Limits) -> SocketAddr {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Arc<dyn Fn() -> String + Send + Sync> =
            Arc::new(|| "# HELP x y\n# TYPE x gauge\nx 1\n".to_string());
        tokio::spawn(serve_with(listener, render, limits));
        addr
    }

    /// Send `request` (all of it, even if the server answers early), return the whole response.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = stream.split();
        let mut out = Vec::new();
        let (_, read) = tokio::join!(
            async {
                let _ = wr.write_all(request).await;
                let _ = wr.shutdown().await;
            },
            tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out))
        );
        read.expect("response within 10 s").expect("read");
        String::from_utf8(out).unwrap()
    }

    fn status(response: &str) -> u16 {
        response
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {response:?}"))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn http_answers() {
        let addr = start(LIMITS).await;
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status(&r), 200);
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
        assert!(head.contains("\r\nConnection: close"));
        assert_eq!(body, "# HELP x y\n# TYPE x gauge\nx 1\n");

        assert_eq!(
            status(&exchange(addr, b"GET / HTTP/1.0\r\n\r\n").await),
            200
        );
        let head_only = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status(&head_only), 200);
        assert!(head_only.ends_with("\r\n\r\n"));
        assert_eq!(
            status(&exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").await),
            404
        );
        let post = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        )
        .await;
        assert_eq!(status(&post), 405);
        assert!(post.contains("\r\nAllow: GET, HEAD\r\n"));
        assert_eq!(
            status(&exchange(addr, b"\x16\x03\x01\x02\x00\x01\r\n\r\n").await),
            400
        );
        assert_eq!(status(&exchange(addr, b"hello there\n\n").await), 400);
        // Closed in the middle of a head.
        assert_eq!(
            status(&exchange(addr, b"GET /metrics HTTP/1.1\r\nHo").await),
            400
        );
        // Nothing at all: closed without a word.
        assert_eq!(exchange(addr, b"").await, "");
        // An oversized head, with or without its end.
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..400 {
            big.extend_from_slice(format!("X-Filler-{i}: aaaaaaaaaa\r\n").as_bytes());
        }
        assert!(big.len() > MAX_HEAD_BYTES);
        assert_eq!(status(&exchange(addr, &big).await), 431);
        big.extend_from_slice(b"\r\n");
        assert_eq!(status(&exchange(addr, &big).await), 431);
        // Still serving.
        assert_eq!(
            status(&exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await),
            200
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn http_limits_time_and_clients() {
        let addr = start(Limits {
            max_clients: 2,
            max_head: MAX_HEAD_BYTES,
            head_timeout: Duration::from_millis(200),
        })
        .await;
        // A client that never finishes its head gets 408 after the timeout.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status(&String::from_utf8(out).unwrap()), 408);
        // Two idle clients hold both slots: a third gets 503 at once.
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), third.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status(&String::from_utf8(out).unwrap()), 503);
        // Once they timed out (and lingered), the slots are free again.
        tokio::time::sleep(LINGER_TIMEOUT + Duration::from_millis(400)).await;
        assert_eq!(
            status(&exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await),
            200
        );
    }
}
