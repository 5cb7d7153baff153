//! Destinations for audit records: file (with rolling and retention), syslog, TCP collector.
//!
//! The capture thread formats records (assigning `seq`, see `delivery`); the sink thread hands
//! each batch of whole lines to a [`Sink`]. A sink either takes the whole batch or returns an error and takes none of it, so a line
//! is never torn and never written twice; the caller keeps the batch and retries.

use std::fmt;

pub mod background_sync;
pub mod drop_behind;
pub mod file;
pub mod syslog;
pub mod tcp;

/// How many records `bytes` holds: a record is exactly one line.
pub fn count_lines(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b == b'\n').count()
}

/// Start a named helper thread that runs `run` over the jobs sent to the returned queue (at most
/// `capacity` waiting); `None` when the thread cannot be started, and the caller then does the
/// work itself.
fn start_helper<T: Send + 'static>(
    name: &str,
    capacity: usize,
    run: fn(std::sync::mpsc::Receiver<T>),
) -> Option<std::sync::mpsc::SyncSender<T>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || run(rx))
        .ok()
        .map(|_| tx)
}

/// What `INFO audit` shows as `file_status` / `syslog_status` / `tcp_status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkStatus {
    Connected,
    Disconnected,
    Error,
}

impl SinkStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SinkStatus::Connected => "connected",
            SinkStatus::Disconnected => "disconnected",
            SinkStatus::Error => "error",
        }
    }
}

/// Why a batch was not taken. The caller keeps the batch, counts the error and retries later.
#[derive(Debug)]
pub struct SinkError {
    pub message: String,
    /// Retrying can succeed (disk full, collector away); false for errors that need an operator.
    pub retryable: bool,
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SinkError {}

/// Records dropped inside a sink (e.g. a TCP spool that overflowed), reported as AUDIT_LOSS.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkLoss {
    pub records: u64,
    pub bytes: u64,
    /// The cause of this loss when it is not the sink's usual one ([`Sink::loss_cause`]).
    pub cause: Option<&'static str>,
    /// What the dropped lines that were themselves AUDIT_LOSS records said, by cause: reported
    /// again, so that the losses they stood for stay counted exactly (`records` counts each such
    /// line as one record, which is what its `seq` gap shows).
    pub carried: Vec<CarriedLoss>,
}

/// The sum of the dropped AUDIT_LOSS lines of one cause.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CarriedLoss {
    pub cause: String,
    pub count: u64,
    pub bytes: u64,
}

/// Adds what the AUDIT_LOSS lines among `lines` (whole lines, any format) say to `carried`.
///
/// Only the auditor's own loss records are read: the category is the second field in every format
/// and comes right after the fixed-width timestamp, before any field a client controls, and the
/// first `cause=` after it is the record's own `command_args`.
pub fn carry_losses(lines: &[u8], carried: &mut Vec<CarriedLoss>) {
    const TS: usize = "2026-01-01 00:00:00".len();
    for line in lines.split(|&b| b == b'\n') {
        // Where the category starts, and how it is written, in JSON, text and CSV.
        let (start, marker): (usize, &[u8]) = match line.first() {
            Some(b'{') => (
                "{\"timestamp\":\"".len() + TS,
                b"\",\"category\":\"AUDIT_LOSS\"",
            ),
            Some(b'[') => (1 + TS, b"] [AUDIT_LOSS] "),
            _ => (TS, b",AUDIT_LOSS,"),
        };
        if !line
            .get(start..)
            .is_some_and(|rest| rest.starts_with(marker))
        {
            continue;
        }
        let rest = &line[start + marker.len()..];
        let Some(at) = find(rest, b"cause=") else {
            continue;
        };
        let args = &rest[at + b"cause=".len()..];
        let end = args
            .iter()
            .position(|&b| b == b' ' || b == b'"' || b == b',')
            .unwrap_or(args.len());
        let cause = String::from_utf8_lossy(&args[..end]).into_owned();
        let number = |key: &[u8]| -> u64 {
            find(args, key).map_or(0, |i| {
                args[i + key.len()..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .fold(0u64, |n, &d| {
                        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
                    })
            })
        };
        let (count, bytes) = (number(b" count="), number(b" bytes="));
        match carried.iter_mut().find(|c| c.cause == cause) {
            Some(c) => {
                c.count += count;
                c.bytes += bytes;
            }
            None => carried.push(CarriedLoss {
                cause,
                count,
                bytes,
            }),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub trait Sink: Send {
    /// Take a batch of whole lines (each ending in `\n`), all or nothing.
    fn write_batch(&mut self, lines: &[u8], line_count: usize) -> Result<(), SinkError>;
    /// Push buffered data towards durability according to the sink's policy (called at least every
    /// 10 ms when idle, and on shutdown with `force`).
    fn flush(&mut self, force: bool) -> Result<(), SinkError>;
    /// Periodic housekeeping (every ~100 ms): time-based rolling, retries, reconnects, spool replay.
    fn tick(&mut self) -> Result<(), SinkError>;
    /// SIGHUP: reopen files / reconnect.
    fn reopen(&mut self) -> Result<(), SinkError>;
    fn status(&self) -> SinkStatus;
    /// Records lost inside the sink since the last call (taken: the counter resets).
    fn take_loss(&mut self) -> SinkLoss;
    /// Records lost but not yet reported through `take_loss` (shown in INFO at once).
    fn pending_loss(&self) -> u64 {
        0
    }
    /// The `cause=` of the AUDIT_LOSS records that report what `take_loss` returns.
    fn loss_cause(&self) -> &'static str {
        "sink_overflow"
    }
    /// Name of the sink kind: "file", "syslog" or "tcp" (selects the INFO status field).
    fn kind(&self) -> &'static str;
    /// Bytes taken but not yet delivered (a TCP collector's backlog in memory and spool), shown
    /// in INFO: `audit_bytes_written` counts what the sink took.
    fn backlog_bytes(&self) -> u64 {
        0
    }
    /// `audit.protocol` switched to another kind of sink: stop delivering (a TCP sink closes its
    /// connection), keeping what was not delivered for [`undelivered`](Self::undelivered); the
    /// others push their data towards durability.
    fn retire(&mut self) {
        let _ = self.flush(true);
    }
    /// A retired sink's oldest undelivered whole lines (at most about `max` bytes, one line at
    /// least), for the new sink to take; empty when none is left.
    fn undelivered(&mut self, _max: usize) -> &[u8] {
        &[]
    }
    /// The first `n` bytes `undelivered` gave were taken by the new sink.
    fn release_undelivered(&mut self, _n: usize) {}
    /// Of a batch whose `write_batch` failed midway, the leading bytes this sink delivered (a
    /// retry resumes after them): a retired sink's are not written again by the next one.
    fn delivered_of(&self, _lines: &[u8]) -> usize {
        0
    }
}

/// Length of the longest prefix of `data` made of whole lines and at most `max` bytes long, or of
/// its first line when that alone is longer.
pub(crate) fn hand_over_len(data: &[u8], max: usize) -> usize {
    match tcp::whole_lines_within(data, max as u64) {
        0 => data.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1),
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Format, write_record};
    use crate::record::{Category, Outcome, Record};

    fn line(format: Format, category: Category, args: &str, username: &[u8]) -> Vec<u8> {
        let mut rec = Record::event(category, b"loss", 1_700_000_000_000_000, "host");
        rec.command_args = args.as_bytes().to_vec();
        rec.result = Outcome::Failure;
        rec.username = std::sync::Arc::from(username);
        let mut out = Vec::new();
        write_record(format, &rec, &mut out);
        out
    }

    #[test]
    fn dropped_loss_lines_are_carried_in_every_format_and_client_text_is_not() {
        for format in [Format::Json, Format::Text, Format::Csv] {
            let mut lines = Vec::new();
            lines.extend(line(
                format,
                Category::AuditLoss,
                "cause=queue_overflow count=12 bytes=0",
                b"default",
            ));
            // A client's record that only looks like one.
            lines.extend(line(
                format,
                Category::KeyOp,
                "key=k payload=cause=queue_overflow count=999",
                b"AUDIT_LOSS",
            ));
            lines.extend(line(
                format,
                Category::AuditLoss,
                "cause=ring_buffer_full count=3 bytes=4096",
                b"default",
            ));
            lines.extend(line(
                format,
                Category::AuditLoss,
                "cause=queue_overflow count=5 bytes=0",
                b"default",
            ));
            let mut carried = Vec::new();
            carry_losses(&lines, &mut carried);
            assert_eq!(
                carried,
                vec![
                    CarriedLoss {
                        cause: "queue_overflow".into(),
                        count: 17,
                        bytes: 0
                    },
                    CarriedLoss {
                        cause: "ring_buffer_full".into(),
                        count: 3,
                        bytes: 4096
                    },
                ],
                "{format:?}"
            );
        }
    }
}
