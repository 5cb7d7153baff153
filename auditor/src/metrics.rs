//! Counters shared by the capture thread (writer) and the control port (`INFO audit`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use crate::record::Category;
use crate::sink::SinkStatus;

/// Index of a category in the per-category counters.
fn slot(c: &Category) -> usize {
    match c {
        Category::Connection => 0,
        Category::Auth => 1,
        Category::Config => 2,
        Category::KeyOp => 3,
        Category::Other => 4,
        Category::Custom(_) => 5,
        Category::Audit => 6,
        Category::AuditLoss => 7,
    }
}

const SLOT_NAMES: [&str; 8] = [
    "connection",
    "auth",
    "config",
    "key_op",
    "other",
    "custom",
    "audit",
    "audit_loss",
];

#[derive(Default)]
pub struct Metrics {
    started: Mutex<Option<Instant>>,
    by_category: [AtomicU64; 8],
    pub bytes_written: AtomicU64,
    pub write_errors: AtomicU64,
    pub filtered: AtomicU64,
    pub lost_ring_events: AtomicU64,
    pub lost_ring_bytes: AtomicU64,
    pub request_resyncs: AtomicU64,
    pub reply_resyncs: AtomicU64,
    pub bytes_skipped: AtomicU64,
    pub connections: AtomicU64,
    /// Records dropped because the queue was full (`audit.overflow drop`).
    pub lost_queue: AtomicU64,
    /// Records a sink dropped (TCP spool full, buffering off while disconnected).
    pub lost_sink: AtomicU64,
    /// Status of the file, syslog and tcp sinks: 0 disconnected, 1 connected, 2 error.
    sink_status: [AtomicU64; 3],
    pids: Mutex<Vec<u32>>,
}

impl Metrics {
    pub fn new(pids: Vec<u32>) -> Self {
        let m = Metrics::default();
        *m.started.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        *m.pids.lock().unwrap_or_else(|p| p.into_inner()) = pids;
        m
    }

    pub fn record_written(&self, c: &Category, bytes: u64) {
        self.by_category[slot(c)].fetch_add(1, Relaxed);
        self.bytes_written.fetch_add(bytes, Relaxed);
    }

    pub fn set_sink_status(&self, kind: &str, status: SinkStatus) {
        let i = match kind {
            "file" => 0,
            "syslog" => 1,
            _ => 2,
        };
        let v = match status {
            SinkStatus::Disconnected => 0,
            SinkStatus::Connected => 1,
            SinkStatus::Error => 2,
        };
        for (j, slot) in self.sink_status.iter().enumerate() {
            slot.store(if j == i { v } else { 0 }, Relaxed);
        }
    }

    fn sink_status_str(&self, i: usize) -> &'static str {
        match self.sink_status[i].load(Relaxed) {
            1 => "connected",
            2 => "error",
            _ => "disconnected",
        }
    }

    pub fn total_events(&self) -> u64 {
        self.by_category.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// CONFIG RESETSTAT: counters restart; uptime does not.
    pub fn reset(&self) {
        for c in &self.by_category {
            c.store(0, Relaxed);
        }
        for c in [
            &self.bytes_written,
            &self.write_errors,
            &self.filtered,
            &self.lost_ring_events,
            &self.lost_ring_bytes,
            &self.request_resyncs,
            &self.reply_resyncs,
            &self.bytes_skipped,
            &self.lost_queue,
            &self.lost_sink,
        ] {
            c.store(0, Relaxed);
        }
    }

    /// The `audit` section of INFO: the module's field names first (`audit_<name>`), then ours.
    pub fn info_fields(
        &self,
        protocol: &str,
        format: &str,
        queue_bytes: usize,
    ) -> Vec<(String, String)> {
        let uptime = self
            .started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|s| s.elapsed().as_secs())
            .unwrap_or(0);
        let total = self.total_events();
        let errors = self.write_errors.load(Relaxed);
        let filtered = self.filtered.load(Relaxed);
        let pct = |n: u64, d: u64| {
            if d == 0 {
                "0.00".to_string()
            } else {
                format!("{:.2}", n as f64 * 100.0 / d as f64)
            }
        };
        let mut f: Vec<(String, String)> = vec![
            ("audit_total_events".into(), total.to_string()),
            ("audit_total_errors".into(), errors.to_string()),
            ("audit_exclusion_hits".into(), filtered.to_string()),
            ("audit_uptime_seconds".into(), uptime.to_string()),
            ("audit_file_status".into(), self.sink_status_str(0).into()),
            ("audit_syslog_status".into(), self.sink_status_str(1).into()),
            ("audit_tcp_status".into(), self.sink_status_str(2).into()),
            (
                "audit_error_rate_percent".into(),
                pct(errors, total + errors),
            ),
            (
                "audit_exclusion_rate_percent".into(),
                pct(filtered, total + filtered),
            ),
            (
                "audit_events_per_second".into(),
                total.checked_div(uptime).unwrap_or(total).to_string(),
            ),
        ];
        for (i, name) in SLOT_NAMES.iter().enumerate() {
            f.push((
                format!("audit_events_{name}"),
                self.by_category[i].load(Relaxed).to_string(),
            ));
        }
        let more = [
            ("audit_bytes_written", self.bytes_written.load(Relaxed)),
            (
                "audit_lost_ring_buffer_events",
                self.lost_ring_events.load(Relaxed),
            ),
            (
                "audit_lost_ring_buffer_bytes",
                self.lost_ring_bytes.load(Relaxed),
            ),
            (
                "audit_lost_parser_resync_request",
                self.request_resyncs.load(Relaxed),
            ),
            (
                "audit_lost_parser_resync_reply",
                self.reply_resyncs.load(Relaxed),
            ),
            ("audit_bytes_not_captured", self.bytes_skipped.load(Relaxed)),
            ("audit_lost_queue_overflow", self.lost_queue.load(Relaxed)),
            ("audit_lost_sink", self.lost_sink.load(Relaxed)),
            ("audit_connections", self.connections.load(Relaxed)),
            ("audit_queue_bytes", queue_bytes as u64),
        ];
        for (k, v) in more {
            f.push((k.into(), v.to_string()));
        }
        let pids = self.pids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        f.push((
            "audit_attached_pids".into(),
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ));
        f.push(("audit_protocol".into(), protocol.into()));
        f.push(("audit_format".into(), format.into()));
        f
    }
}
