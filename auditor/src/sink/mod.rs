//! Destinations for audit records: file (with rolling and retention), syslog, TCP collector.
//!
//! The capture thread formats records (assigning `seq`, see `delivery`); the sink thread hands
//! each batch of whole lines to a [`Sink`]. A sink either takes the whole batch or returns an error and takes none of it, so a line
//! is never torn and never written twice; the caller keeps the batch and retries.

use std::fmt;

pub mod drop_behind;
pub mod file;
pub mod syslog;
pub mod tcp;

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkLoss {
    pub records: u64,
    pub bytes: u64,
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
    /// Name of the sink kind: "file", "syslog" or "tcp" (selects the INFO status field).
    fn kind(&self) -> &'static str;
}
