//! Counters shared by the capture thread, the sink thread (writers) and the control port and the
//! Prometheus endpoint (readers: `INFO audit`, `/metrics`).
//!
//! Both readers render from one [`Snapshot`], so `INFO audit` and `/metrics` show the same numbers.
//!
//! Per-target counters: every audited server (a *target*) is registered with
//! [`Metrics::target_added`] and stays listed after [`Metrics::target_removed`] (marked not
//! attached, counters kept, so sums over targets never go backwards), up to [`MAX_TARGETS`]
//! entries, beyond which the oldest removed ones are forgotten. [`Metrics::record_written`] runs
//! once per written record (about a million a second), so it never takes a lock: each thread keeps
//! a cache of `pid → counter` (a sorted vector of shared atomics) that it rebuilds, under the
//! registry lock, only when the registry changed (a generation number, unique across all `Metrics`
//! values, tells it so).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
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

/// Names of the per-category counters, in [`Snapshot::by_category`] order (`audit_events_<name>`).
pub const CATEGORY_NAMES: [&str; 8] = [
    "connection",
    "auth",
    "config",
    "key_op",
    "other",
    "custom",
    "audit",
    "audit_loss",
];

/// Sink kinds, in [`Snapshot::sink_status`] order (`audit_<kind>_status`).
pub const SINK_KINDS: [&str; 3] = ["file", "syslog", "tcp"];

/// Most targets listed (attached or not). Attached targets are never dropped (the kernel's
/// `TARGETS` map holds 256 at most); beyond this, the oldest removed ones are.
pub const MAX_TARGETS: usize = 1024;

/// One audited server, as `INFO audit` and `/metrics` describe it. Empty strings and port 0 mean
/// unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetInfo {
    /// Pid in the auditor's pid namespace (what `Record::pid` holds).
    pub pid: u32,
    /// Pid inside the server's own pid namespace (its container), 0 if unknown.
    pub ns_pid: u32,
    /// Listening port, 0 if unknown.
    pub port: u16,
    pub comm: String,
    pub container_id: String,
    pub pod_name: String,
    pub pod_namespace: String,
}

impl TargetInfo {
    /// A target known only by its pid.
    pub fn unknown(pid: u32) -> TargetInfo {
        TargetInfo {
            pid,
            ..TargetInfo::default()
        }
    }

    /// Same Prometheus series: the fields that become labels are equal.
    fn same_labels(&self, other: &TargetInfo) -> bool {
        self.pid == other.pid
            && self.port == other.port
            && self.comm == other.comm
            && self.container_id == other.container_id
            && self.pod_name == other.pod_name
            && self.pod_namespace == other.pod_namespace
    }
}

/// A target and its counters at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSnapshot {
    pub info: TargetInfo,
    pub records: u64,
    pub attached: bool,
    /// Records of this pid count here (the attached entry, else the one removed last): the one
    /// `audit_target_<pid>` shows when a pid was reused.
    pub counting: bool,
}

/// What the kernel side counts, read live from any thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    /// Failed ring-buffer writes `(records, bytes)`, summed over CPUs.
    pub drops: (u64, u64),
    /// The most unread bytes the ring held since the capture loop last took the peak.
    pub ring_peak: u64,
}

/// Reads the kernel's counters from any thread.
pub type KernelCountersSource = Box<dyn Fn() -> Option<KernelCounters> + Send + Sync>;

/// How many prefix filters and custom categories the settings hold (`INFO audit`).
#[derive(Clone, Copy, Debug, Default)]
pub struct FilterSizes {
    pub prefix_filters: usize,
    pub custom_categories: usize,
}

/// Every counter read once: what both `INFO audit` and `/metrics` are rendered from.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub uptime_seconds: u64,
    /// Records written per category, in [`CATEGORY_NAMES`] order.
    pub by_category: [u64; 8],
    pub bytes_written: u64,
    pub write_errors: u64,
    pub filtered: u64,
    pub prefix_filter_checks: u64,
    pub prefix_filter_matches: u64,
    pub custom_category_matches: u64,
    pub commands_not_captured: u64,
    pub tls_connections: u64,
    pub lost_ring_events: u64,
    pub lost_ring_bytes: u64,
    pub request_resyncs: u64,
    pub reply_resyncs: u64,
    pub protocol_errors: u64,
    pub bytes_skipped: u64,
    pub bytes_elided: u64,
    /// `sockets` or `syscalls` (`audit_capture_mode`).
    pub capture_mode: &'static str,
    pub connections: u64,
    pub lost_queue: u64,
    pub lost_sink: u64,
    pub sink_backlog_bytes: u64,
    /// Status of each sink, in [`SINK_KINDS`] order.
    pub sink_status: [SinkStatus; 3],
    pub ring_used_bytes: u64,
    pub ring_size_bytes: u64,
    /// Every listed target, in registration order.
    pub targets: Vec<TargetSnapshot>,
}

impl Snapshot {
    pub fn total_events(&self) -> u64 {
        self.by_category.iter().sum()
    }

    /// Every loss counter that is not zero, as `INFO audit` names it (`name=value ...`); `None`
    /// when nothing was lost.
    pub fn loss_summary(&self) -> Option<String> {
        let lost: Vec<String> = self
            .info_fields("", "", 0, FilterSizes::default())
            .into_iter()
            .filter(|(name, value)| {
                (name.starts_with("audit_lost_")
                    || name == "audit_bytes_not_captured"
                    || name == "audit_tls_connections")
                    && value != "0"
            })
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        (!lost.is_empty()).then(|| lost.join(" "))
    }

    /// Targets currently attached.
    pub fn attached_targets(&self) -> usize {
        self.targets.iter().filter(|t| t.attached).count()
    }

    /// The entry `INFO audit` shows for each pid (the one its records are counted in), in
    /// registration order.
    pub fn info_targets(&self) -> impl Iterator<Item = &TargetSnapshot> {
        self.targets.iter().filter(|t| t.counting)
    }

    /// The `audit` section of INFO: the module's field names first (`audit_<name>`), then ours.
    /// The order and names of existing fields are a compatibility contract: only append.
    pub fn info_fields(
        &self,
        protocol: &str,
        format: &str,
        queue_bytes: usize,
        filters: FilterSizes,
    ) -> Vec<(String, String)> {
        let uptime = self.uptime_seconds;
        let total = self.total_events();
        let errors = self.write_errors;
        let filtered = self.filtered;
        let pct = |n: u64, d: u64| {
            if d == 0 {
                "0.00".to_string()
            } else {
                format!("{:.2}", n as f64 * 100.0 / d as f64)
            }
        };
        let status = |i: usize| self.sink_status[i].as_str().to_string();
        let mut f: Vec<(String, String)> = vec![
            ("audit_total_events".into(), total.to_string()),
            ("audit_total_errors".into(), errors.to_string()),
            ("audit_exclusion_hits".into(), filtered.to_string()),
            ("audit_uptime_seconds".into(), uptime.to_string()),
            ("audit_file_status".into(), status(0)),
            ("audit_syslog_status".into(), status(1)),
            ("audit_tcp_status".into(), status(2)),
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
        for (name, n) in CATEGORY_NAMES.iter().zip(self.by_category) {
            f.push((format!("audit_events_{name}"), n.to_string()));
        }
        let more = [
            ("audit_bytes_written", self.bytes_written),
            ("audit_lost_ring_buffer_events", self.lost_ring_events),
            ("audit_lost_ring_buffer_bytes", self.lost_ring_bytes),
            ("audit_lost_parser_resync_request", self.request_resyncs),
            ("audit_lost_parser_resync_reply", self.reply_resyncs),
            ("audit_client_protocol_errors", self.protocol_errors),
            ("audit_bytes_not_captured", self.bytes_skipped),
            ("audit_lost_queue_overflow", self.lost_queue),
            ("audit_lost_sink", self.lost_sink),
            ("audit_connections", self.connections),
            ("audit_queue_bytes", queue_bytes as u64),
        ];
        for (k, v) in more {
            f.push((k.into(), v.to_string()));
        }
        f.push((
            "audit_attached_pids".into(),
            self.targets
                .iter()
                .filter(|t| t.attached)
                .map(|t| t.info.pid.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ));
        f.push(("audit_protocol".into(), protocol.into()));
        f.push(("audit_format".into(), format.into()));
        // Added after the original set; then the module's filter counters (its hash-table and
        // command-table fields describe its own internals and have no counterpart here).
        let later: [(&str, String); 14] = [
            (
                "audit_ring_buffer_used_bytes",
                self.ring_used_bytes.to_string(),
            ),
            (
                "audit_ring_buffer_size_bytes",
                self.ring_size_bytes.to_string(),
            ),
            ("audit_targets", self.attached_targets().to_string()),
            ("audit_reply_bytes_elided", self.bytes_elided.to_string()),
            ("audit_capture_mode", self.capture_mode.into()),
            (
                "audit_prefix_filters_count",
                filters.prefix_filters.to_string(),
            ),
            (
                "audit_prefix_filter_checks",
                self.prefix_filter_checks.to_string(),
            ),
            (
                "audit_prefix_filter_matches",
                self.prefix_filter_matches.to_string(),
            ),
            (
                "audit_prefix_filter_hit_rate_percent",
                pct(self.prefix_filter_matches, self.prefix_filter_checks),
            ),
            (
                "audit_custom_categories_count",
                filters.custom_categories.to_string(),
            ),
            (
                "audit_custom_category_matches",
                self.custom_category_matches.to_string(),
            ),
            (
                "audit_sink_backlog_bytes",
                self.sink_backlog_bytes.to_string(),
            ),
            (
                "audit_lost_commands_not_captured",
                self.commands_not_captured.to_string(),
            ),
            // Connections whose commands were not audited: encrypted on the socket.
            ("audit_tls_connections", self.tls_connections.to_string()),
        ];
        f.extend(later.into_iter().map(|(k, v)| (k.to_string(), v)));
        for t in self.info_targets() {
            f.push((
                format!("audit_target_{}", t.info.pid),
                format!(
                    "port={},records={},attached={}",
                    t.info.port,
                    t.records,
                    u8::from(t.attached)
                ),
            ));
        }
        f
    }
}

struct TargetEntry {
    info: TargetInfo,
    /// Shared with the per-thread caches of `record_written`.
    records: Arc<AtomicU64>,
    attached: bool,
    /// Order of removal (for dropping the oldest removed first); 0 while attached.
    removed_seq: u64,
}

#[derive(Default)]
struct Registry {
    /// In registration order. At most one attached entry per pid.
    entries: Vec<TargetEntry>,
    removals: u64,
}

/// For each pid, the index of the entry its records are counted in: the attached one (at most one
/// per pid), else the one removed last.
fn counting_entries(entries: &[TargetEntry]) -> HashMap<u32, usize> {
    // Attached entries rank above every removed one (`removed_seq` is 0 while attached).
    let rank = |e: &TargetEntry| if e.attached { u64::MAX } else { e.removed_seq };
    let mut chosen: HashMap<u32, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let better = chosen
            .get(&e.info.pid)
            .and_then(|&j| entries.get(j))
            .is_none_or(|old| rank(e) > rank(old));
        if better {
            chosen.insert(e.info.pid, i);
        }
    }
    chosen
}

/// Source of registry generations, unique across every `Metrics` of the process, so a thread's
/// cache built for one `Metrics` is never taken for another's.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

fn next_generation() -> u64 {
    NEXT_GENERATION.fetch_add(1, Relaxed)
}

/// A thread's `pid → counter` view of one registry generation, sorted by pid.
struct TargetCache {
    generation: u64,
    pids: Vec<u32>,
    counters: Vec<Arc<AtomicU64>>,
    /// Index of the last hit: records come in runs of one target.
    last: usize,
}

impl TargetCache {
    fn find(&mut self, pid: u32) -> Option<&AtomicU64> {
        if self.pids.get(self.last) != Some(&pid) {
            self.last = self.pids.binary_search(&pid).ok()?;
        }
        self.counters.get(self.last).map(|c| &**c)
    }
}

thread_local! {
    static TARGET_CACHE: RefCell<TargetCache> = const {
        RefCell::new(TargetCache {
            generation: 0,
            pids: Vec::new(),
            counters: Vec::new(),
            last: 0,
        })
    };
}

pub struct Metrics {
    started: Instant,
    by_category: [AtomicU64; 8],
    pub bytes_written: AtomicU64,
    pub write_errors: AtomicU64,
    pub filtered: AtomicU64,
    pub lost_ring_events: AtomicU64,
    pub lost_ring_bytes: AtomicU64,
    pub request_resyncs: AtomicU64,
    pub reply_resyncs: AtomicU64,
    pub prefix_filter_checks: AtomicU64,
    pub prefix_filter_matches: AtomicU64,
    pub custom_category_matches: AtomicU64,
    /// Commands a request-side capture gap held whole, counted by their replies.
    pub commands_not_captured: AtomicU64,
    /// TLS connections seen (their commands are encrypted on the socket: not audited).
    pub tls_connections: AtomicU64,
    /// Malformed client requests (not losses: every byte was seen).
    pub protocol_errors: AtomicU64,
    pub bytes_skipped: AtomicU64,
    /// Reply payload bytes the kernel's reply scanner left out on purpose (not a loss).
    pub bytes_elided: AtomicU64,
    pub connections: AtomicU64,
    /// Records dropped because the queue was full (`audit.overflow drop`).
    pub lost_queue: AtomicU64,
    /// Records a sink dropped (TCP spool full, buffering off while disconnected).
    pub lost_sink: AtomicU64,
    /// Bytes the sink took but has not delivered (gauge, set by the sink thread).
    pub sink_backlog_bytes: AtomicU64,
    /// Bytes waiting in the ring buffer and its size (gauges, set by the capture loop).
    pub ring_used_bytes: AtomicU64,
    pub ring_size_bytes: AtomicU64,
    /// Status of the file, syslog and tcp sinks: 0 disconnected, 1 connected, 2 error.
    sink_status: [AtomicU64; 3],
    targets: Mutex<Registry>,
    /// Set to a fresh [`next_generation`] whenever the entry a pid counts in may have changed.
    targets_generation: AtomicU64,
    /// Reads the kernel's ring-drop counters and ring peak from any thread
    /// ([`Metrics::observe_kernel_drops`] turns the drops into the two counters above).
    kernel_counters: OnceLock<KernelCountersSource>,
    /// The kernel's counts last added to `lost_ring_*` (deltas, so RESETSTAT can zero them).
    kernel_drops_seen: Mutex<(u64, u64)>,
    /// Where the kernel captures (`sockets` or `syscalls`), set once attached.
    pub capture_mode: std::sync::OnceLock<&'static str>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(Vec::new())
    }
}

impl Metrics {
    /// Counters starting now, with `pids` registered as attached targets (nothing else known).
    pub fn new(pids: Vec<u32>) -> Self {
        let m = Metrics {
            started: Instant::now(),
            by_category: Default::default(),
            bytes_written: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            filtered: AtomicU64::new(0),
            prefix_filter_checks: AtomicU64::new(0),
            prefix_filter_matches: AtomicU64::new(0),
            custom_category_matches: AtomicU64::new(0),
            commands_not_captured: AtomicU64::new(0),
            tls_connections: AtomicU64::new(0),
            lost_ring_events: AtomicU64::new(0),
            lost_ring_bytes: AtomicU64::new(0),
            request_resyncs: AtomicU64::new(0),
            reply_resyncs: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            bytes_skipped: AtomicU64::new(0),
            bytes_elided: AtomicU64::new(0),
            capture_mode: std::sync::OnceLock::new(),
            connections: AtomicU64::new(0),
            lost_queue: AtomicU64::new(0),
            lost_sink: AtomicU64::new(0),
            sink_backlog_bytes: AtomicU64::new(0),
            ring_used_bytes: AtomicU64::new(0),
            ring_size_bytes: AtomicU64::new(0),
            sink_status: Default::default(),
            targets: Mutex::new(Registry::default()),
            targets_generation: AtomicU64::new(next_generation()),
            kernel_counters: OnceLock::new(),
            kernel_drops_seen: Mutex::new((0, 0)),
        };
        for pid in pids {
            m.target_added(TargetInfo::unknown(pid));
        }
        m
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One record written: `pid` is `Record::pid`. Records of pids that are not targets (0, the
    /// auditor's own) count only in the totals. Lock-free and allocation-free (see the module doc).
    pub fn record_written(&self, c: &Category, pid: u32, bytes: u64) {
        self.by_category[slot(c)].fetch_add(1, Relaxed);
        self.bytes_written.fetch_add(bytes, Relaxed);
        if pid != 0 {
            self.count_for_target(pid);
        }
    }

    fn count_for_target(&self, pid: u32) {
        let generation = self.targets_generation.load(Acquire);
        // `try_with`/`try_borrow_mut`: never panic, even during thread teardown.
        let _ = TARGET_CACHE.try_with(|cache| {
            let Ok(mut cache) = cache.try_borrow_mut() else {
                return;
            };
            if cache.generation != generation {
                self.fill_cache(&mut cache);
            }
            if let Some(counter) = cache.find(pid) {
                counter.fetch_add(1, Relaxed);
            }
        });
    }

    /// Rebuild a thread's cache from the registry (only after the registry changed).
    fn fill_cache(&self, cache: &mut TargetCache) {
        let reg = self.registry();
        // Read under the lock, which every change holds: the cache matches this generation.
        cache.generation = self.targets_generation.load(Acquire);
        let chosen = counting_entries(&reg.entries);
        let mut pairs: Vec<(u32, Arc<AtomicU64>)> = chosen
            .into_iter()
            .filter_map(|(pid, i)| Some((pid, reg.entries.get(i)?.records.clone())))
            .collect();
        pairs.sort_unstable_by_key(|(p, _)| *p);
        cache.pids = pairs.iter().map(|(p, _)| *p).collect();
        cache.counters = pairs.into_iter().map(|(_, c)| c).collect();
        cache.last = 0;
    }

    /// A server is now audited. The same pid already attached: its description is updated and
    /// its counter kept. A removed entry with the same description (same series): it is attached
    /// again, counter kept. Otherwise a new entry, counting from 0.
    pub fn target_added(&self, info: TargetInfo) {
        let mut guard = self.registry();
        let reg = &mut *guard;
        if reg
            .entries
            .iter()
            .any(|e| e.attached && e.info.pid == info.pid)
        {
            // Removed entries that now describe the same series are folded into this one, so no
            // two entries ever share a label set (and the series never goes backwards).
            let mut folded = 0u64;
            reg.entries.retain(|e| {
                let same = !e.attached && e.info.same_labels(&info);
                if same {
                    folded += e.records.load(Relaxed);
                }
                !same
            });
            if let Some(e) = reg
                .entries
                .iter_mut()
                .find(|e| e.attached && e.info.pid == info.pid)
            {
                e.records.fetch_add(folded, Relaxed);
                e.info = info;
            }
        } else if let Some(e) = reg
            .entries
            .iter_mut()
            .find(|e| !e.attached && e.info.same_labels(&info))
        {
            e.info = info;
            e.attached = true;
            e.removed_seq = 0;
        } else {
            reg.entries.push(TargetEntry {
                info,
                records: Arc::new(AtomicU64::new(0)),
                attached: true,
                removed_seq: 0,
            });
        }
        // Beyond the bound, forget the oldest removed targets (attached ones are all kept).
        while reg.entries.len() > MAX_TARGETS {
            let oldest = reg
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.attached)
                .min_by_key(|(_, e)| e.removed_seq)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    reg.entries.remove(i);
                }
                None => break,
            }
        }
        self.targets_generation.store(next_generation(), Release);
    }

    /// A server is no longer audited (it exited or was detached). It stays listed, not attached,
    /// with its counter, which still counts its records that were in flight.
    pub fn target_removed(&self, pid: u32) {
        let mut reg = self.registry();
        let reg = &mut *reg;
        for e in reg.entries.iter_mut() {
            if e.attached && e.info.pid == pid {
                reg.removals += 1;
                e.attached = false;
                e.removed_seq = reg.removals;
            }
        }
        // The pid still counts in the same entry: caches stay valid.
    }

    /// Ring-buffer use as the capture loop last saw it.
    pub fn set_ring_usage(&self, used: u64, size: u64) {
        self.ring_used_bytes.store(used, Relaxed);
        self.ring_size_bytes.store(size, Relaxed);
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

    fn sink_status(&self, i: usize) -> SinkStatus {
        match self.sink_status[i].load(Relaxed) {
            1 => SinkStatus::Connected,
            2 => SinkStatus::Error,
            _ => SinkStatus::Disconnected,
        }
    }

    pub fn total_events(&self) -> u64 {
        self.by_category.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// The kernel's ring-drop counters can be read from any thread: every snapshot (INFO,
    /// `/metrics`) reads them, so losses show while they happen, even while the capture thread
    /// waits for room in the queue.
    pub fn set_kernel_counters_source(&self, read: KernelCountersSource) {
        let _ = self.kernel_counters.set(read);
    }

    /// The kernel's ring-drop counts now: what is new since the last call is added to
    /// `lost_ring_events` / `lost_ring_bytes`.
    pub fn observe_kernel_drops(&self, (events, bytes): (u64, u64)) {
        let mut seen = self
            .kernel_drops_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.lost_ring_events
            .fetch_add(events.saturating_sub(seen.0), Relaxed);
        self.lost_ring_bytes
            .fetch_add(bytes.saturating_sub(seen.1), Relaxed);
        *seen = (seen.0.max(events), seen.1.max(bytes));
    }

    /// CONFIG RESETSTAT: counters restart (per target too); uptime, gauges and the target list
    /// do not.
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
            &self.protocol_errors,
            &self.bytes_skipped,
            &self.bytes_elided,
            &self.lost_queue,
            &self.lost_sink,
            &self.prefix_filter_checks,
            &self.prefix_filter_matches,
            &self.custom_category_matches,
            &self.commands_not_captured,
            &self.tls_connections,
        ] {
            c.store(0, Relaxed);
        }
        for e in &self.registry().entries {
            e.records.store(0, Relaxed);
        }
    }

    /// Every counter, each read once.
    pub fn snapshot(&self) -> Snapshot {
        // The ring's fill as the capture loop last took it, or as the kernel sees it now if
        // that is more: while the loop waits for room in the queue it takes nothing, and the
        // ring filling up is exactly what an operator then needs to see.
        let mut ring_used_bytes = self.ring_used_bytes.load(Relaxed);
        if let Some(live) = self.kernel_counters.get().and_then(|read| read()) {
            self.observe_kernel_drops(live.drops);
            ring_used_bytes = ring_used_bytes.max(live.ring_peak);
        }
        let targets = {
            let reg = self.registry();
            let chosen = counting_entries(&reg.entries);
            reg.entries
                .iter()
                .enumerate()
                .map(|(i, e)| TargetSnapshot {
                    info: e.info.clone(),
                    records: e.records.load(Relaxed),
                    attached: e.attached,
                    counting: chosen.get(&e.info.pid) == Some(&i),
                })
                .collect()
        };
        Snapshot {
            uptime_seconds: self.started.elapsed().as_secs(),
            by_category: std::array::from_fn(|i| self.by_category[i].load(Relaxed)),
            bytes_written: self.bytes_written.load(Relaxed),
            write_errors: self.write_errors.load(Relaxed),
            filtered: self.filtered.load(Relaxed),
            prefix_filter_checks: self.prefix_filter_checks.load(Relaxed),
            prefix_filter_matches: self.prefix_filter_matches.load(Relaxed),
            custom_category_matches: self.custom_category_matches.load(Relaxed),
            commands_not_captured: self.commands_not_captured.load(Relaxed),
            tls_connections: self.tls_connections.load(Relaxed),
            lost_ring_events: self.lost_ring_events.load(Relaxed),
            lost_ring_bytes: self.lost_ring_bytes.load(Relaxed),
            request_resyncs: self.request_resyncs.load(Relaxed),
            reply_resyncs: self.reply_resyncs.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
            bytes_skipped: self.bytes_skipped.load(Relaxed),
            bytes_elided: self.bytes_elided.load(Relaxed),
            capture_mode: self.capture_mode.get().copied().unwrap_or(""),
            connections: self.connections.load(Relaxed),
            lost_queue: self.lost_queue.load(Relaxed),
            lost_sink: self.lost_sink.load(Relaxed),
            sink_status: std::array::from_fn(|i| self.sink_status(i)),
            sink_backlog_bytes: self.sink_backlog_bytes.load(Relaxed),
            ring_used_bytes,
            ring_size_bytes: self.ring_size_bytes.load(Relaxed),
            targets,
        }
    }

    /// The `audit` section of INFO (see [`Snapshot::info_fields`]).
    pub fn info_fields(
        &self,
        protocol: &str,
        format: &str,
        queue_bytes: usize,
        filters: FilterSizes,
    ) -> Vec<(String, String)> {
        self.snapshot()
            .info_fields(protocol, format, queue_bytes, filters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: u32, port: u16, comm: &str) -> TargetInfo {
        TargetInfo {
            pid,
            ns_pid: 1,
            port,
            comm: comm.into(),
            container_id: "c0ffee".into(),
            pod_name: "valkey-0".into(),
            pod_namespace: "default".into(),
        }
    }

    fn field(m: &Metrics, name: &str) -> Option<String> {
        m.info_fields("file", "text", 0, FilterSizes::default())
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    fn assert_target(m: &Metrics, pid: u32, expected: &str) {
        assert_eq!(
            field(m, &format!("audit_target_{pid}")).as_deref(),
            Some(expected)
        );
    }

    #[test]
    fn new_registers_pids_and_keeps_the_original_fields() {
        let m = Metrics::new(vec![42, 43]);
        let fields = m.info_fields("file /x.log", "json", 7, FilterSizes::default());
        let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        // The original fields, in their original order, come first.
        let original = [
            "audit_total_events",
            "audit_total_errors",
            "audit_exclusion_hits",
            "audit_uptime_seconds",
            "audit_file_status",
            "audit_syslog_status",
            "audit_tcp_status",
            "audit_error_rate_percent",
            "audit_exclusion_rate_percent",
            "audit_events_per_second",
            "audit_events_connection",
            "audit_events_auth",
            "audit_events_config",
            "audit_events_key_op",
            "audit_events_other",
            "audit_events_custom",
            "audit_events_audit",
            "audit_events_audit_loss",
            "audit_bytes_written",
            "audit_lost_ring_buffer_events",
            "audit_lost_ring_buffer_bytes",
            "audit_lost_parser_resync_request",
            "audit_lost_parser_resync_reply",
            "audit_client_protocol_errors",
            "audit_bytes_not_captured",
            "audit_lost_queue_overflow",
            "audit_lost_sink",
            "audit_connections",
            "audit_queue_bytes",
            "audit_attached_pids",
            "audit_protocol",
            "audit_format",
        ];
        assert_eq!(&names[..original.len()], &original[..]);
        assert_eq!(field(&m, "audit_attached_pids").unwrap(), "42,43");
        assert_eq!(field(&m, "audit_targets").unwrap(), "2");
        assert_target(&m, 42, "port=0,records=0,attached=1");
        assert_eq!(field(&m, "audit_ring_buffer_used_bytes").unwrap(), "0");
    }

    #[test]
    fn records_count_per_target_and_own_records_only_in_totals() {
        let m = Metrics::new(vec![]);
        m.target_added(info(100, 6379, "valkey-server"));
        m.target_added(info(200, 6380, "valkey-server"));
        for _ in 0..3 {
            m.record_written(&Category::KeyOp, 100, 10);
        }
        m.record_written(&Category::Auth, 200, 10);
        m.record_written(&Category::AuditLoss, 0, 10);
        m.record_written(&Category::Audit, std::process::id(), 10);
        m.record_written(&Category::Other, 999, 10); // not a target
        assert_eq!(m.total_events(), 7);
        assert_eq!(field(&m, "audit_bytes_written").unwrap(), "70");
        assert_target(&m, 100, "port=6379,records=3,attached=1");
        assert_target(&m, 200, "port=6380,records=1,attached=1");
        // A target added later is seen by the (cached) hot path.
        m.target_added(info(300, 6381, "valkey-server"));
        m.record_written(&Category::KeyOp, 300, 1);
        m.record_written(&Category::KeyOp, 100, 1);
        assert_target(&m, 300, "port=6381,records=1,attached=1");
        assert_target(&m, 100, "port=6379,records=4,attached=1");
    }

    #[test]
    fn removed_targets_stay_listed_and_keep_counting_late_records() {
        let m = Metrics::new(vec![]);
        m.target_added(info(100, 6379, "valkey-server"));
        m.target_added(info(200, 6380, "valkey-server"));
        m.record_written(&Category::KeyOp, 100, 1);
        m.target_removed(100);
        assert_eq!(field(&m, "audit_attached_pids").unwrap(), "200");
        assert_eq!(field(&m, "audit_targets").unwrap(), "1");
        // A record still in flight when the target went away.
        m.record_written(&Category::KeyOp, 100, 1);
        assert_target(&m, 100, "port=6379,records=2,attached=0");
        // The same server again (same description): the same entry, attached again.
        m.target_added(info(100, 6379, "valkey-server"));
        m.record_written(&Category::KeyOp, 100, 1);
        let s = m.snapshot();
        assert_eq!(s.targets.len(), 2);
        assert_target(&m, 100, "port=6379,records=3,attached=1");
        // Another server reusing the pid: a new entry; the old one stays, frozen.
        m.target_removed(100);
        m.target_added(info(100, 7000, "valkey-server"));
        m.record_written(&Category::KeyOp, 100, 1);
        let s = m.snapshot();
        assert_eq!(s.targets.len(), 3);
        let old = s.targets.iter().find(|t| t.info.port == 6379).unwrap();
        assert_eq!((old.records, old.attached), (3, false));
        assert_target(&m, 100, "port=7000,records=1,attached=1");
        // Removed again: INFO shows the newest entry for the pid.
        m.target_removed(100);
        assert_target(&m, 100, "port=7000,records=1,attached=0");
        assert_eq!(field(&m, "audit_attached_pids").unwrap(), "200");
        // The older description comes back, then goes: late records and INFO follow the entry
        // removed last, not the one registered last.
        m.target_added(info(100, 6379, "valkey-server"));
        m.target_removed(100);
        m.record_written(&Category::KeyOp, 100, 1);
        assert_target(&m, 100, "port=6379,records=4,attached=0");
        let s = m.snapshot();
        assert_eq!(s.targets.iter().filter(|t| t.counting).count(), 2);
    }

    #[test]
    fn updating_an_attached_target_keeps_its_counter_and_merges_series() {
        let m = Metrics::new(vec![100]);
        m.record_written(&Category::KeyOp, 100, 1);
        m.target_added(info(100, 6379, "valkey-server"));
        m.record_written(&Category::KeyOp, 100, 1);
        let s = m.snapshot();
        assert_eq!(s.targets.len(), 1);
        assert_eq!(s.targets[0].records, 2);
        assert_eq!(s.targets[0].info.port, 6379);
        // Removed X, new Y on the same pid, then Y described as X: one series, counts summed.
        m.target_removed(100);
        m.target_added(info(100, 7000, "valkey-server"));
        m.record_written(&Category::KeyOp, 100, 1);
        m.target_added(info(100, 6379, "valkey-server"));
        let s = m.snapshot();
        assert_eq!(s.targets.len(), 1);
        assert_eq!((s.targets[0].records, s.targets[0].attached), (3, true));
    }

    #[test]
    fn the_registry_is_bounded_dropping_the_oldest_removed_first() {
        let m = Metrics::new(vec![]);
        m.target_added(info(1, 1, "attached-forever"));
        for pid in 2..(MAX_TARGETS as u32 + 50) {
            m.target_added(info(pid, 1, "x"));
            m.record_written(&Category::KeyOp, pid, 1);
            m.target_removed(pid);
        }
        let s = m.snapshot();
        assert_eq!(s.targets.len(), MAX_TARGETS);
        assert!(s.targets[0].attached && s.targets[0].info.pid == 1);
        // The oldest removed were dropped; the newest are kept.
        assert!(!s.targets.iter().any(|t| t.info.pid == 2));
        assert!(
            s.targets
                .iter()
                .any(|t| t.info.pid == MAX_TARGETS as u32 + 49)
        );
        assert_eq!(s.total_events(), MAX_TARGETS as u64 + 48);
    }

    #[test]
    fn caches_follow_the_right_metrics_and_threads_add_up() {
        let a = Arc::new(Metrics::new(vec![7]));
        let b = Metrics::new(vec![7]);
        for _ in 0..5 {
            a.record_written(&Category::KeyOp, 7, 1);
            b.record_written(&Category::KeyOp, 7, 1);
        }
        assert_eq!(a.snapshot().targets[0].records, 5);
        assert_eq!(b.snapshot().targets[0].records, 5);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        a.record_written(&Category::KeyOp, 7, 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(a.snapshot().targets[0].records, 20_005);
        assert_eq!(a.total_events(), 20_005);
    }

    #[test]
    fn reset_zeroes_counters_but_not_targets_or_gauges() {
        let m = Metrics::new(vec![5]);
        m.record_written(&Category::KeyOp, 5, 9);
        m.set_ring_usage(4096, 1 << 24);
        m.reset();
        let s = m.snapshot();
        assert_eq!(s.total_events(), 0);
        assert_eq!(s.targets[0].records, 0);
        assert!(s.targets[0].attached);
        assert_eq!((s.ring_used_bytes, s.ring_size_bytes), (4096, 1 << 24));
        assert_eq!(
            field(&m, "audit_ring_buffer_size_bytes").unwrap(),
            (1u64 << 24).to_string()
        );
    }

    #[test]
    fn snapshots_read_the_kernel_live_when_the_capture_loop_is_behind() {
        let m = Metrics::new(vec![5]);
        m.set_ring_usage(4096, 1 << 24);
        m.set_kernel_counters_source(Box::new(|| {
            Some(KernelCounters {
                drops: (3, 300),
                ring_peak: 9000,
            })
        }));
        let s = m.snapshot();
        assert_eq!(s.ring_used_bytes, 9000);
        assert_eq!((s.lost_ring_events, s.lost_ring_bytes), (3, 300));
        // The capture loop's own reading wins when it is the larger one.
        m.set_ring_usage(20_000, 1 << 24);
        assert_eq!(m.snapshot().ring_used_bytes, 20_000);
    }
}
