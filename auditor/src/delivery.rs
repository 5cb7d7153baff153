//! Delivery: the formatting stage, one bounded queue of formatted lines, and the sink thread that
//! writes them.
//!
//! Records are formatted on the thread that made them (the capture thread), as soon as they are
//! made, while they are still in its cache; whole batches of lines cross to the sink thread, which
//! only writes them. (Records used to cross and be formatted by the sink thread: moving 216-byte
//! records between threads, first writes into buffers freed on the other core, and freeing records
//! made on the other thread took about a third of the capture thread's time and a tenth of the sink
//! thread's at `-P 16`.)
//!
//! The queue is bounded in bytes (`audit.max_queue_size`: each record counts [`record_cost`], or
//! its line's length when that is longer). Room is
//! reserved before a record is formatted, and `seq` is assigned when it is formatted, so `seq` is
//! gapless over the records written: when the queue is full, `audit.overflow block` makes the
//! producer wait (the capture thread then stops reading the ring buffer, the kernel drops and
//! counts, and the server is never slowed), and `drop` drops the newest records, before they are
//! numbered, and counts them. Every loss becomes an `AUDIT_LOSS` record as soon as there is room for
//! one. A batch the sink refuses (disk full, collector away) is kept whole and retried: no torn
//! line, no gap, no duplicate.
//!
//! Locks: the formatting stage's (`Formatter`) is taken before the queue's, never the other way,
//! and nobody waits for room while holding the formatter's (the sink thread takes it to report its
//! own losses).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::clock::{monotonic_ns, wall_now_us};
use crate::format::{Format, JsonFieldCache, write_record_cached};
use crate::metrics::Metrics;
use crate::record::{Category, Outcome, Record, ServerFile};
use crate::session::RecordOut;
use crate::settings::Overflow;
use crate::sink::{Sink, SinkError};

/// Rough bytes a record takes in the queue (its variable parts plus a fixed overhead), known
/// before it is formatted.
pub fn record_cost(r: &Record) -> usize {
    200 + r.command.len()
        + r.command_args.len()
        + r.username.len()
        + r.client_ip.len()
        + r.error.len()
        + r.keys.total_bytes()
        + 4 * r.keys.len()
}

/// Formatted lines on their way to the sink, with what the counters need of each record.
#[derive(Debug, Default)]
pub struct Lines {
    /// Whole lines, each ending in `\n`.
    pub bytes: Vec<u8>,
    /// Number of lines.
    pub count: usize,
    /// Each line's category and `Record::pid`, for the counters once the lines are written.
    categories: Vec<Category>,
    pids: Vec<u32>,
    /// The server file all these lines belong to, when the sink keeps a file per server;
    /// `None` when lines of all servers go together.
    pub file: Option<ServerFile>,
    /// Their cost in the queue (what their records reserved).
    cost: usize,
}

impl Lines {
    fn clear(&mut self) {
        self.bytes.clear();
        self.count = 0;
        self.categories.clear();
        self.pids.clear();
        self.file = None;
        self.cost = 0;
    }
}

/// How records are written as lines; follows CONFIG SET through [`Queue::configure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineFormat {
    pub format: Format,
    /// The sink keeps one file per server (`%port%`): each batch then holds one server's lines.
    pub per_server: bool,
}

/// Where the auditor's own records (losses) say they come from.
#[derive(Clone, Debug)]
pub struct Origin {
    pub hostname: String,
}

impl Origin {
    fn loss_record(&self, cause: &str, count: u64, bytes: u64) -> Record {
        let mut rec = Record::event(Category::AuditLoss, b"loss", wall_now_us(), &self.hostname);
        rec.command_args = format!("cause={cause} count={count} bytes={bytes}").into_bytes();
        rec.result = Outcome::Failure;
        rec
    }
}

/// A batch is handed to the sink once it holds this many lines or bytes (or at the end of each
/// pass over the ring buffer, see [`Queue::flush`]). 1024 lines are one `write()` of ~300 KB at
/// `-d 3`; more only kept more memory resident for no measurable gain.
const SEAL_LINES: usize = 1024;
const SEAL_BYTES: usize = 256 << 10;

/// Room the formatting stage reserves at a time: one queue lock per ~1000 small records.
const RESERVE_BYTES: usize = 256 << 10;

/// How far the auditor's own records may go beyond the queue's bound.
const FORCED_SLACK: usize = 1 << 20;

/// Spare batches kept for the producers, and the largest buffer kept (bounds their memory).
const SPARE_BATCHES: usize = 4;
const SPARE_MAX_BYTES: usize = 2 * SEAL_BYTES;

/// The formatting stage's state, shared by every producer so that `seq` follows the queue's order.
struct Formatter {
    line_format: LineFormat,
    next_seq: u64,
    /// The batch being filled.
    open: Lines,
    /// Room reserved in the queue and not yet used.
    budget: usize,
    /// Records dropped (`overflow drop`) since the last loss record.
    dropped: u64,
    origin: Origin,
    /// The last record's client and server fields as JSON (see `write_record_cached`).
    json_fields: JsonFieldCache,
}

struct QueueState {
    batches: VecDeque<Lines>,
    /// Emptied batches on their way back to the producers, with their capacity.
    spare: Vec<Lines>,
    /// Cost of the queued batches plus the room the formatting stage reserved.
    bytes: usize,
    max_bytes: usize,
    overflow: Overflow,
    closed: bool,
    /// The sink thread waits for lines / producers wait for room: notify only then, since a
    /// condvar notification is a futex syscall even when nobody waits.
    consumer_waiting: bool,
    producers_waiting: usize,
    /// Records of the batch the sink took and has not written yet.
    in_flight: u64,
}

/// The formatting stage and the bounded queue. Cloned handles share them.
#[derive(Clone)]
pub struct Queue {
    formatter: Arc<Mutex<Formatter>>,
    state: Arc<(Mutex<QueueState>, Condvar, Condvar)>,
    /// Drops are counted here at once, so INFO shows them while the sink is stuck.
    metrics: Arc<Metrics>,
    /// The auditor's own records that belong at a point in time ([`Queue::push_at`]), oldest
    /// first, and the time of the oldest (`u64::MAX` when none), which the capture thread reads
    /// once per ring event.
    placed: Arc<Placed>,
}

/// Records waiting for their place in time, oldest first, and the time of the oldest
/// (`u64::MAX` when none), which the capture thread reads once per ring event.
struct Placed {
    records: Mutex<VecDeque<(u64, Placement)>>,
    oldest: AtomicU64,
}

/// What waits for its place in time.
enum Placement {
    /// Boxed: rare, and it keeps the queue of placements small.
    Record(Box<Record>),
    /// A new `audit.format` (or per-server split): records after this point get it.
    Format(LineFormat),
}

/// Records waiting for their place in time, at most; past it they are written at once.
const PLACED_MAX: usize = 4096;

impl Queue {
    pub fn new(
        max_bytes: usize,
        overflow: Overflow,
        line_format: LineFormat,
        origin: Origin,
        metrics: Arc<Metrics>,
    ) -> Self {
        Queue {
            metrics,
            placed: Arc::new(Placed {
                records: Mutex::new(VecDeque::new()),
                oldest: AtomicU64::new(u64::MAX),
            }),
            formatter: Arc::new(Mutex::new(Formatter {
                line_format,
                next_seq: 1,
                open: Lines::default(),
                budget: 0,
                dropped: 0,
                origin,
                json_fields: JsonFieldCache::default(),
            })),
            state: Arc::new((
                Mutex::new(QueueState {
                    batches: VecDeque::new(),
                    spare: Vec::new(),
                    bytes: 0,
                    max_bytes,
                    overflow,
                    closed: false,
                    consumer_waiting: false,
                    producers_waiting: 0,
                    in_flight: 0,
                }),
                Condvar::new(), // not empty
                Condvar::new(), // not full
            )),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn formatter(&self) -> MutexGuard<'_, Formatter> {
        self.formatter.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply CONFIG SET: the bound, the overflow policy, and the format of the next record.
    pub fn configure(&self, max_bytes: usize, overflow: Overflow, line_format: LineFormat) {
        self.set_line_format(line_format);
        self.set_bound(max_bytes, overflow);
    }

    fn set_bound(&self, max_bytes: usize, overflow: Overflow) {
        let mut st = self.lock();
        st.max_bytes = max_bytes;
        st.overflow = overflow;
        self.state.2.notify_all();
    }

    fn set_line_format(&self, line_format: LineFormat) {
        let mut f = self.formatter();
        if f.line_format != line_format {
            // Lines already formatted keep their format; the next record gets the new one.
            self.seal(&mut f);
            f.line_format = line_format;
        }
    }

    /// A [`RecordOut`] that formats each record it is lent into the open batch, reserving room
    /// first: in block mode it waits while the queue has no room (unless `stop` is set); in drop
    /// mode the records that do not fit are dropped and counted (and, once one did not fit, the
    /// rest of this appender's records that do not fit the room already reserved). A record larger
    /// than the whole bound still enters an empty queue, so nothing is refused forever. The batch
    /// goes to the sink when it is full or at [`Queue::flush`].
    ///
    /// It holds the formatting stage's lock from its first record until it is dropped (one lock
    /// per ring event, not per record), except while it waits for room.
    pub fn appender<'a>(&'a self, stop: &'a AtomicBool) -> Appender<'a> {
        Appender {
            queue: self,
            stop,
            formatter: None,
            no_room: false,
        }
    }

    /// Format records into the open batch through an [`Queue::appender`]; the vector is emptied.
    pub fn append(&self, records: &mut Vec<Record>, stop: &AtomicBool) {
        if records.is_empty() {
            return;
        }
        let mut out = self.appender(stop);
        for rec in records.iter_mut() {
            out.put(rec);
        }
        drop(out);
        records.clear();
    }

    /// Hand the open batch to the sink and give back the room reserved for records that did not
    /// come. Also writes the loss record of recent drops when there is room for it now.
    pub fn flush(&self) {
        let mut f = self.formatter();
        if f.dropped > 0 {
            self.emit_drop_loss(&mut f, false);
        }
        self.seal(&mut f);
        if f.budget > 0 {
            let mut st = self.lock();
            st.bytes = st.bytes.saturating_sub(std::mem::take(&mut f.budget));
            if st.producers_waiting > 0 {
                self.state.2.notify_all();
            }
        }
    }

    /// [`Queue::append`] then [`Queue::flush`]: for records that should reach the sink now.
    pub fn push_all(&self, records: &mut Vec<Record>, stop: &AtomicBool) {
        self.append(records, stop);
        self.flush();
    }

    /// The auditor's own records (CONFIG changes on the control port, start and stop, sink
    /// losses): they never wait, so the control port answers while the sink is stuck, and they may
    /// go [`FORCED_SLACK`] beyond the bound; past that (a CONFIG SET loop against a full disk) they
    /// are dropped and counted like any other record, so memory stays bounded.
    pub fn push_forced(&self, records: &mut Vec<Record>) {
        self.push_beyond_bound(records, false);
    }

    /// The last records of a run (the stop record): as [`Queue::push_forced`], but never dropped,
    /// and preceded by the loss record of drops not reported yet (a full queue held it back). Only
    /// a few records: the bound is passed by their bytes at most.
    pub fn push_final(&self, records: &mut Vec<Record>) {
        self.push_beyond_bound(records, true);
    }

    fn push_beyond_bound(&self, records: &mut Vec<Record>, last: bool) {
        let mut f = self.formatter();
        if last && f.dropped > 0 {
            self.emit_drop_loss(&mut f, true);
        }
        for rec in records.drain(..) {
            let mut rec = rec;
            let cost = record_cost(&rec);
            {
                let mut st = self.lock();
                if !last && st.bytes + cost > st.max_bytes + FORCED_SLACK && !st.batches.is_empty()
                {
                    drop(st);
                    self.count_drop(&mut f);
                    continue;
                }
                st.bytes += cost;
            }
            self.format_into(&mut f, &mut rec, cost);
        }
        self.seal(&mut f);
    }

    /// An auditor record (a CONFIG change on the control port) that happened at `at_ns`
    /// (CLOCK_MONOTONIC, the kernel's event clock): it is written where it belongs among the
    /// records of the commands, once the capture thread has handled the events before it (see
    /// [`Queue::release_placed`]), so that `seq` order is time order. It never waits for room,
    /// like [`Queue::push_forced`]; when too many wait for their place, it goes in at once.
    pub fn push_at(&self, at_ns: u64, rec: Record) {
        self.place(at_ns, Placement::Record(Box::new(rec)));
    }

    /// [`Queue::configure`] for a CONFIG SET made at `at_ns`: the bound and the overflow policy
    /// apply now, the line format from that point in time on (like [`Queue::push_at`]), so a
    /// command that ran after the change is written in the new format however far the pipeline
    /// lags, and one that completed before it in the old.
    pub fn configure_at(
        &self,
        at_ns: u64,
        max_bytes: usize,
        overflow: Overflow,
        line_format: LineFormat,
    ) {
        self.set_bound(max_bytes, overflow);
        self.place(at_ns, Placement::Format(line_format));
    }

    fn place(&self, at_ns: u64, item: Placement) {
        let mut placed = self
            .placed
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if placed.len() >= PLACED_MAX {
            drop(placed);
            self.apply(vec![item]);
            return;
        }
        // Callers are the control port's tasks: times arrive almost in order; keep them sorted.
        let at = placed.partition_point(|(t, _)| *t <= at_ns);
        placed.insert(at, (at_ns, item));
        self.placed.oldest.store(placed[0].0, Ordering::Release);
    }

    /// Write placed records and apply placed format changes, in their order.
    fn apply(&self, items: Vec<Placement>) {
        let mut records = Vec::new();
        for item in items {
            match item {
                Placement::Record(rec) => records.push(*rec),
                Placement::Format(line_format) => {
                    self.push_forced(&mut records);
                    self.set_line_format(line_format);
                }
            }
        }
        self.push_forced(&mut records);
    }

    /// Whether a placed record is due before an event of time `ts_ns` (one atomic load).
    #[inline]
    pub fn placed_due(&self, ts_ns: u64) -> bool {
        ts_ns >= self.placed.oldest.load(Ordering::Acquire)
    }

    /// Write the placed records of time `upto_ns` or earlier. Called by the capture thread before
    /// an event that is later than the oldest (and with the time a pass began, when the ring was
    /// drained), by the sink thread for records left waiting 100 ms (a stalled capture thread), and
    /// before the stop record.
    pub fn release_placed(&self, upto_ns: u64) {
        let due: Vec<Placement> = {
            let mut placed = self
                .placed
                .records
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let n = placed.partition_point(|(t, _)| *t <= upto_ns);
            let due = placed.drain(..n).map(|(_, r)| r).collect();
            self.placed.oldest.store(
                placed.front().map_or(u64::MAX, |(t, _)| *t),
                Ordering::Release,
            );
            due
        };
        if !due.is_empty() {
            self.apply(due);
        }
    }

    /// Records lost inside the sink: an AUDIT_LOSS record, forced in.
    pub fn report_loss(&self, cause: &str, records: u64, bytes: u64) {
        let rec = self.formatter().origin.loss_record(cause, records, bytes);
        self.push_forced(&mut vec![rec]);
    }

    fn count_drop(&self, f: &mut Formatter) {
        f.dropped += 1;
        self.metrics.lost_queue.fetch_add(1, Ordering::Relaxed);
    }

    /// The loss record of the drops since the last one, if there is room for it (budget or queue)
    /// or it is `forced` in (the end of the run).
    fn emit_drop_loss(&self, f: &mut Formatter, forced: bool) {
        let mut rec = f.origin.loss_record("queue_overflow", f.dropped, 0);
        let cost = record_cost(&rec);
        if f.budget < cost {
            let mut st = self.lock();
            if !forced && st.bytes + cost > st.max_bytes && !st.batches.is_empty() {
                return; // still no room: keep counting
            }
            st.bytes += cost;
            f.budget += cost;
        }
        f.budget -= cost;
        f.dropped = 0;
        self.write_line(f, &mut rec, cost);
    }

    /// Number and format one record into the open batch (first the loss record of earlier drops).
    fn format_into(&self, f: &mut Formatter, rec: &mut Record, cost: usize) {
        if f.dropped > 0 {
            self.emit_drop_loss(f, false);
        }
        self.write_line(f, rec, cost);
    }

    fn write_line(&self, f: &mut Formatter, rec: &mut Record, cost: usize) {
        if f.line_format.per_server {
            let file = rec.server.file();
            if f.open.count > 0 && f.open.file.as_ref() != Some(&file) {
                self.seal(f);
            }
            f.open.file = Some(file);
        }
        rec.seq = f.next_seq;
        f.next_seq += 1;
        let start = f.open.bytes.len();
        write_record_cached(
            f.line_format.format,
            rec,
            &mut f.open.bytes,
            &mut f.json_fields,
        );
        // A line longer than its record's estimate (escaped binary can take six times its bytes)
        // is charged its length, so the queue's bound holds for the formatted lines.
        let charged = cost.max(f.open.bytes.len() - start);
        let extra = charged - cost;
        if extra > 0 {
            let from_budget = extra.min(f.budget);
            f.budget -= from_budget;
            if extra > from_budget {
                self.lock().bytes += extra - from_budget;
            }
        }
        f.open.count += 1;
        f.open.cost += charged;
        f.open.pids.push(rec.pid);
        f.open
            .categories
            .push(std::mem::replace(&mut rec.category, Category::Other));
        if f.open.count >= SEAL_LINES || f.open.bytes.len() >= SEAL_BYTES {
            self.seal(f);
        }
    }

    /// Queue the open batch (its room was reserved: the queue's byte count does not change).
    fn seal(&self, f: &mut Formatter) {
        if f.open.count == 0 {
            return;
        }
        let mut st = self.lock();
        let next = st.spare.pop().unwrap_or_default();
        let batch = std::mem::replace(&mut f.open, next);
        st.batches.push_back(batch);
        if st.consumer_waiting {
            self.state.1.notify_one();
        }
    }

    /// Reserve room for records: `want` if there is, at least `need` unless drop mode finds less
    /// (then what there is). Block mode waits for `need`, unless `stop` is set or the queue is
    /// empty or closed (a record larger than the bound still goes through).
    fn reserve(&self, want: usize, need: usize, stop: &AtomicBool) -> usize {
        let mut st = self.lock();
        loop {
            let room = st.max_bytes.saturating_sub(st.bytes);
            let granted = if room >= need {
                room.min(want)
            } else if st.batches.is_empty() || st.closed {
                need
            } else {
                match st.overflow {
                    Overflow::Drop => room,
                    Overflow::Block if stop.load(Ordering::Relaxed) => need,
                    Overflow::Block => {
                        st.producers_waiting += 1;
                        st = self
                            .state
                            .2
                            .wait_timeout(st, Duration::from_millis(50))
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                        st.producers_waiting -= 1;
                        continue;
                    }
                }
            };
            st.bytes += granted;
            return granted;
        }
    }

    /// The oldest batch, waiting up to `wait` for one (a zero `wait` does not wait: a
    /// single-threaded pipeline, `pipeline-bench`, takes batches so). Give it back with
    /// [`Queue::recycle`] once written.
    pub fn pop(&self, wait: Duration) -> Option<Lines> {
        let mut st = self.lock();
        // (A zero timeout still sleeps for the timer slack, ~50 µs.)
        if st.batches.is_empty() && !st.closed && !wait.is_zero() {
            st.consumer_waiting = true;
            st = self
                .state
                .1
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            st.consumer_waiting = false;
        }
        let batch = st.batches.pop_front()?;
        st.bytes = st.bytes.saturating_sub(batch.cost);
        st.in_flight = batch.count as u64;
        if st.producers_waiting > 0 {
            self.state.2.notify_all();
        }
        Some(batch)
    }

    /// Give a written batch's buffers back to the producers, unless enough are kept or they are
    /// oversized.
    pub fn recycle(&self, mut batch: Lines) {
        self.lock().in_flight = 0;
        if batch.bytes.capacity() > SPARE_MAX_BYTES || batch.categories.capacity() > 2 * SEAL_LINES
        {
            return;
        }
        batch.clear();
        let mut st = self.lock();
        if st.spare.len() < SPARE_BATCHES {
            st.spare.push(batch);
        }
    }

    /// No more records will come: hand over the open batch and let the sink finish.
    pub fn close(&self) {
        self.release_placed(u64::MAX);
        self.flush();
        let mut st = self.lock();
        st.closed = true;
        self.state.1.notify_all();
        self.state.2.notify_all();
    }

    fn is_drained(&self) -> bool {
        let st = self.lock();
        st.closed && st.batches.is_empty()
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Shutdown gave up on the sink: empty the queue, returning how many records it held.
    fn discard_all(&self) -> u64 {
        let mut st = self.lock();
        let n = st.batches.iter().map(|b| b.count as u64).sum();
        st.batches.clear();
        st.bytes = 0;
        n
    }

    /// Records not written yet: those in the queue and those of the batch the sink holds.
    pub fn unwritten_records(&self) -> u64 {
        let st = self.lock();
        st.in_flight + st.batches.iter().map(|b| b.count as u64).sum::<u64>()
    }

    pub fn len_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Bytes queued and the bound, together.
    pub fn fill(&self) -> (usize, usize) {
        let st = self.lock();
        (st.bytes, st.max_bytes)
    }
}

/// See [`Queue::appender`].
pub struct Appender<'a> {
    queue: &'a Queue,
    stop: &'a AtomicBool,
    formatter: Option<MutexGuard<'a, Formatter>>,
    /// Drop mode found no room: later records that do not fit are dropped without asking again.
    no_room: bool,
}

impl RecordOut for Appender<'_> {
    fn put(&mut self, rec: &mut Record) {
        let queue = self.queue;
        let cost = record_cost(rec);
        let f = self.formatter.get_or_insert_with(|| queue.formatter());
        if cost <= f.budget {
            f.budget -= cost;
            queue.format_into(f, rec, cost);
            return;
        }
        if self.no_room {
            queue.count_drop(f);
            return;
        }
        // Hand over what is formatted, so that the sink can make room, and wait for room without
        // the formatter's lock.
        queue.seal(f);
        self.formatter = None;
        let granted = queue.reserve(RESERVE_BYTES.max(cost), cost, self.stop);
        let f = self.formatter.insert(queue.formatter());
        f.budget += granted;
        if granted < cost {
            queue.count_drop(f);
            self.no_room = true;
        } else {
            f.budget -= cost;
            queue.format_into(f, rec, cost);
        }
    }
}

/// Owns the active sink and follows the running settings.
pub trait SinkProvider: Send {
    /// The sink to write to now.
    fn sink(&mut self) -> &mut dyn Sink;
    /// Called every loop: reconfigure or replace the sink when the settings changed.
    fn refresh(&mut self);
    /// One destination per server (`%port%` in the file path): names the server of the next
    /// batch.
    fn select(&mut self, _file: &ServerFile) {}
    /// The oldest sink a switch of `audit.protocol` replaced, while it has not been dropped.
    fn retired(&mut self) -> Option<&mut dyn Sink> {
        None
    }
    /// Writes the next lines the oldest retired sink did not deliver to the active sink: true when
    /// some were written, false when it has none left.
    fn hand_over(&mut self) -> Result<bool, SinkError> {
        Ok(false)
    }
    /// Drops the oldest retired sink (its losses reported, nothing left to hand over).
    fn drop_retired(&mut self) {}
}

/// The sink thread's loop: runs until the queue is closed and drained.
/// Drops the first `bytes` (whole lines) of `batch`, which a sink delivered: counted as written.
fn skip_delivered(batch: &mut Lines, bytes: usize, metrics: &Metrics) {
    if bytes == 0 || bytes > batch.bytes.len() {
        return;
    }
    let lines = crate::sink::count_lines(&batch.bytes[..bytes]);
    let per = bytes as u64 / lines.max(1) as u64;
    for (c, &pid) in batch.categories.iter().zip(&batch.pids).take(lines) {
        metrics.record_written(c, pid, per);
    }
    batch.bytes.drain(..bytes);
    batch.categories.drain(..lines.min(batch.categories.len()));
    batch.pids.drain(..lines.min(batch.pids.len()));
    batch.count = batch.count.saturating_sub(lines);
}

/// Turn what the sink dropped since the last call into AUDIT_LOSS records; true when there was any.
fn report_sink_loss(queue: &Queue, sink: &mut dyn Sink, reported: &mut u64) -> bool {
    let loss = sink.take_loss();
    if loss.records == 0 {
        return false;
    }
    queue.report_loss(
        loss.cause.unwrap_or_else(|| sink.loss_cause()),
        loss.records,
        loss.bytes,
    );
    *reported += loss.records;
    // Loss records among the dropped lines: what they said is said again (their causes' counters
    // already counted it).
    for c in &loss.carried {
        queue.report_loss(&c.cause, c.count, c.bytes);
    }
    true
}

pub fn run_sink(
    queue: Queue,
    mut provider: Box<dyn SinkProvider>,
    metrics: Arc<Metrics>,
    reopen: Arc<AtomicBool>,
) {
    let mut current: Option<Lines> = None;
    let mut last_tick = Instant::now();
    let mut last_flush = Instant::now();
    let mut backoff = Duration::from_millis(10);
    let mut sink_reported = 0u64;
    let mut shutdown_since: Option<Instant> = None;
    // The last error printed: a sink that stays broken is reported once, not at every retry.
    let mut last_error: Option<String> = None;
    loop {
        // Housekeeping: settings, SIGHUP, rolling, reconnects, sink-internal losses.
        provider.refresh();
        let sink = provider.sink();
        if reopen.swap(false, Ordering::AcqRel)
            && let Err(e) = sink.reopen()
        {
            eprintln!("auditor: reopening the sink: {e}");
        }
        if last_tick.elapsed() >= Duration::from_millis(100) {
            last_tick = Instant::now();
            // Placed records the capture thread has not reached in 100 ms (it waits for room, or
            // no event came): their neighbours are long written.
            queue.release_placed(monotonic_ns().saturating_sub(100_000_000));
            let _ = sink.tick();
            report_sink_loss(&queue, sink, &mut sink_reported);
            // INFO shows sink losses at once, reported or not yet.
            metrics
                .lost_sink
                .store(sink_reported + sink.pending_loss(), Ordering::Relaxed);
            let backlog = sink.backlog_bytes();
            // (What a replaced sink still holds is waiting too.)
            let retired = provider.retired().map_or(0, |old| old.backlog_bytes());
            metrics
                .sink_backlog_bytes
                .store(backlog + retired, Ordering::Relaxed);
            let sink = provider.sink();
            metrics.set_sink_status(sink.kind(), sink.status());
        }
        // What a sink replaced by a switch did not deliver goes first, in order.
        if provider.retired().is_some() {
            match provider.hand_over() {
                Ok(true) => continue,
                Ok(false) => {
                    if let Some(old) = provider.retired() {
                        report_sink_loss(&queue, old, &mut sink_reported);
                        // A batch it failed midway is written from where it stopped: what it
                        // sent before is delivered, or among what it handed over.
                        if let Some(batch) = current.as_mut() {
                            let done = old.delivered_of(&batch.bytes);
                            skip_delivered(batch, done, &metrics);
                        }
                    }
                    provider.drop_retired();
                }
                Err(e) => {
                    metrics.write_errors.fetch_add(1, Ordering::Relaxed);
                    let message = e.to_string();
                    if last_error.as_deref() != Some(message.as_str()) {
                        eprintln!("auditor: handing the old sink's backlog over: {message}");
                    }
                    last_error = Some(message);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    if queue.is_closed()
                        && shutdown_since.get_or_insert_with(Instant::now).elapsed()
                            >= SHUTDOWN_GRACE
                    {
                        if let Some(old) = provider.retired() {
                            // As the active sink at shutdown: a TCP sink parks its backlog in its
                            // spool (sent first by the next run to that collector) and says
                            // what did not fit.
                            if let Err(e) = old.flush(true) {
                                eprintln!("auditor: at shutdown, the replaced sink: {e}");
                            }
                            say_unreported_sink_loss(old);
                        }
                        provider.drop_retired();
                    }
                    continue;
                }
            }
        }
        // Take a batch only when the previous one was written.
        if current.is_none() {
            current = queue.pop(Duration::from_millis(10));
        }
        if let Some(batch) = current.take() {
            provider.select(batch.file.as_ref().unwrap_or(&ServerFile::Auditor));
            let sink = provider.sink();
            let written = sink.write_batch(&batch.bytes, batch.count);
            metrics
                .sink_backlog_bytes
                .store(sink.backlog_bytes(), Ordering::Relaxed);
            match written {
                Ok(()) => {
                    // The batch's bytes, shared out so that they add up exactly (the remainder
                    // goes to the first record).
                    let len = batch.bytes.len() as u64;
                    let per = len / batch.count.max(1) as u64;
                    let mut extra = len % batch.count.max(1) as u64;
                    for (c, &pid) in batch.categories.iter().zip(&batch.pids) {
                        metrics.record_written(c, pid, per + std::mem::take(&mut extra));
                    }
                    queue.recycle(batch);
                    backoff = Duration::from_millis(10);
                    if last_error.take().is_some() {
                        eprintln!("auditor: the {} sink writes again", sink.kind());
                    }
                    metrics.set_sink_status(sink.kind(), sink.status());
                }
                Err(e) => {
                    metrics.write_errors.fetch_add(1, Ordering::Relaxed);
                    metrics.set_sink_status(sink.kind(), sink.status());
                    let message = e.to_string();
                    if last_error.is_none() {
                        // The first failure of a streak is said at once (a full disk, a collector
                        // gone); "writes again" ends it. Retries in between are not repeated.
                        let retry = if e.retryable { " (retrying)" } else { "" };
                        eprintln!("auditor: {message}{retry}");
                    } else if !e.retryable && last_error.as_deref() != Some(message.as_str()) {
                        eprintln!("auditor: {message}");
                    }
                    last_error = Some(message);
                    // Keep the batch; retry after a pause (the queue fills meanwhile: back-pressure).
                    let count = batch.count as u64;
                    current = Some(batch);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    if queue.is_closed() {
                        // The process must exit: a sink that stays broken gets a bounded grace period.
                        let since = *shutdown_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= SHUTDOWN_GRACE {
                            let lost = count + queue.discard_all();
                            metrics.lost_sink.fetch_add(lost, Ordering::Relaxed);
                            eprintln!(
                                "auditor: giving up at shutdown: {lost} unwritten records: {e}"
                            );
                            say_unreported_sink_loss(sink);
                            return;
                        }
                    }
                    continue;
                }
            }
        }
        let sink = provider.sink();
        if last_flush.elapsed() >= Duration::from_millis(10) {
            last_flush = Instant::now();
            let _ = sink.flush(false);
        }
        if current.is_none() && queue.is_drained() {
            // Losses since the last tick still get their record before the end.
            if report_sink_loss(&queue, sink, &mut sink_reported) {
                metrics.lost_sink.store(sink_reported, Ordering::Relaxed);
                continue;
            }
            break;
        }
    }
    let sink = provider.sink();
    if let Err(e) = sink.flush(true) {
        // Nothing can record it any more: stderr is the last place to say what did not arrive.
        eprintln!("auditor: at shutdown: {e}");
    }
    say_unreported_sink_loss(sink);
    metrics.set_sink_status(sink.kind(), sink.status());
}

/// At the end: records the sink dropped whose loss record it still held back (it waits for room
/// in its backlog) are said on stderr, the last place left.
fn say_unreported_sink_loss(sink: &mut dyn Sink) {
    let unreported = sink.pending_loss();
    if unreported > 0 {
        eprintln!(
            "auditor: at shutdown: {unreported} records the {} sink dropped ({}) have no \
             AUDIT_LOSS record in the log",
            sink.kind(),
            sink.loss_cause()
        );
    }
}

/// How long a clean stop keeps retrying a sink that refuses every batch before giving up.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(port: u16) -> Record {
        let mut r = Record::event(Category::Other, b"x", 0, "h");
        Arc::make_mut(&mut r.server).port = port;
        r
    }

    fn recs(n: usize) -> Vec<Record> {
        (0..n).map(|_| rec(0)).collect()
    }

    /// Room for one test record: its JSON line (with a three-digit `seq`), which is longer than
    /// its estimate.
    fn unit() -> usize {
        let mut r = rec(0);
        r.seq = 999;
        let mut line = Vec::new();
        crate::format::write_record(Format::Json, &r, &mut line);
        line.len().max(record_cost(&r))
    }

    /// A sink that keeps what it is given and has dropped `pending` records of its own.
    struct LossySink {
        written: Arc<std::sync::Mutex<Vec<u8>>>,
        pending: u64,
    }

    impl Sink for LossySink {
        fn write_batch(
            &mut self,
            lines: &[u8],
            _count: usize,
        ) -> Result<(), crate::sink::SinkError> {
            self.written.lock().unwrap().extend_from_slice(lines);
            Ok(())
        }
        fn flush(&mut self, _force: bool) -> Result<(), crate::sink::SinkError> {
            Ok(())
        }
        fn tick(&mut self) -> Result<(), crate::sink::SinkError> {
            Ok(())
        }
        fn reopen(&mut self) -> Result<(), crate::sink::SinkError> {
            Ok(())
        }
        fn status(&self) -> crate::sink::SinkStatus {
            crate::sink::SinkStatus::Connected
        }
        fn take_loss(&mut self) -> crate::sink::SinkLoss {
            crate::sink::SinkLoss {
                records: std::mem::take(&mut self.pending),
                bytes: 10,
                cause: None,
                carried: Vec::new(),
            }
        }
        fn kind(&self) -> &'static str {
            "file"
        }
    }

    struct OneSink(LossySink);

    impl SinkProvider for OneSink {
        fn sink(&mut self) -> &mut dyn Sink {
            &mut self.0
        }
        fn refresh(&mut self) {}
    }

    #[test]
    fn a_sink_loss_just_before_the_end_still_gets_its_record() {
        let (q, metrics) = queue(100, Overflow::Block, json());
        q.push_all(&mut recs(1), &AtomicBool::new(false));
        q.close();
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = LossySink {
            written: written.clone(),
            pending: 3,
        };
        // Ends at once (queue closed and drained): before any 100 ms tick.
        run_sink(
            q,
            Box::new(OneSink(sink)),
            metrics.clone(),
            Arc::new(AtomicBool::new(false)),
        );
        let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[1]["category"], "AUDIT_LOSS");
        assert_eq!(
            lines[1]["command_args"],
            "cause=sink_overflow count=3 bytes=10"
        );
        assert_eq!(metrics.lost_sink.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn placed_records_are_written_at_their_time() {
        let (q, _) = queue(100, Overflow::Block, json());
        let named = |name: &[u8]| Record::event(Category::Config, name, 0, "h");
        q.push_at(200, named(b"late"));
        q.push_at(100, named(b"early"));
        assert!(!q.placed_due(99));
        assert!(q.placed_due(100));
        q.release_placed(150);
        q.flush();
        let first: Vec<_> = take_lines(&q)
            .iter()
            .map(|l| l["command"].clone())
            .collect();
        assert_eq!(first, ["early"]);
        assert!(!q.placed_due(199));
        // Closing writes what still waits.
        q.close();
        let rest: Vec<_> = take_lines(&q)
            .iter()
            .map(|l| l["command"].clone())
            .collect();
        assert_eq!(rest, ["late"]);
        assert!(!q.placed_due(u64::MAX - 1));
    }

    #[test]
    fn a_format_change_applies_from_its_place_in_time() {
        let (q, _) = queue(100, Overflow::Block, json());
        let csv = LineFormat {
            format: Format::Csv,
            per_server: false,
        };
        q.configure_at(100, 100 * unit(), Overflow::Block, csv);
        // A record completed before the change (the pipeline reaches it later): still JSON.
        q.push_all(&mut recs(1), &AtomicBool::new(false));
        // The capture thread reaches the change's time, then a later record.
        q.release_placed(100);
        q.push_all(&mut recs(1), &AtomicBool::new(false));
        q.close();
        let mut text = Vec::new();
        while let Some(batch) = q.pop(Duration::ZERO) {
            text.extend_from_slice(&batch.bytes);
        }
        let text = String::from_utf8(text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with('{'), "{text}");
        assert!(!lines[1].starts_with('{'), "{text}");
    }

    fn json() -> LineFormat {
        LineFormat {
            format: Format::Json,
            per_server: false,
        }
    }

    fn queue(records: usize, overflow: Overflow, line_format: LineFormat) -> (Queue, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new(Vec::new()));
        let origin = Origin {
            hostname: "h".into(),
        };
        let q = Queue::new(
            records * unit(),
            overflow,
            line_format,
            origin,
            metrics.clone(),
        );
        (q, metrics)
    }

    /// Every line the queue holds, as JSON, taking the batches.
    fn take_lines(q: &Queue) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Some(b) = q.pop(Duration::ZERO) {
            let text = String::from_utf8(b.bytes.clone()).unwrap();
            assert_eq!(text.lines().count(), b.count);
            out.extend(text.lines().map(|l| serde_json::from_str(l).unwrap()));
            q.recycle(b);
        }
        out
    }

    fn seqs(lines: &[serde_json::Value]) -> Vec<u64> {
        lines.iter().map(|v| v["seq"].as_u64().unwrap()).collect()
    }

    #[test]
    fn drop_mode_numbers_only_what_it_keeps_and_reports_the_rest() {
        let (q, metrics) = queue(3, Overflow::Drop, json());
        let stop = AtomicBool::new(false);
        q.push_all(&mut recs(2), &stop);
        q.push_all(&mut recs(2), &stop);
        let lines = take_lines(&q);
        assert_eq!(lines.len(), 3, "the oldest that fit");
        assert_eq!(seqs(&lines), [1, 2, 3]);
        assert_eq!(metrics.lost_queue.load(Ordering::Relaxed), 1);
        assert_eq!(q.len_bytes(), 0, "nothing stays reserved");
        // Room again: the loss record comes first, numbered next.
        q.push_all(&mut recs(1), &stop);
        let lines = take_lines(&q);
        assert_eq!(seqs(&lines), [4, 5]);
        assert_eq!(lines[0]["category"], "AUDIT_LOSS");
        assert_eq!(
            lines[0]["command_args"],
            "cause=queue_overflow count=1 bytes=0"
        );
    }

    #[test]
    fn the_loss_record_waits_for_room_but_not_for_more_traffic() {
        let (q, _) = queue(3, Overflow::Drop, json());
        let stop = AtomicBool::new(false);
        q.push_all(&mut recs(5), &stop);
        assert_eq!(take_lines(&q).len(), 3);
        q.flush();
        let lines = take_lines(&q);
        assert_eq!(seqs(&lines), [4]);
        assert_eq!(
            lines[0]["command_args"],
            "cause=queue_overflow count=2 bytes=0"
        );
    }

    #[test]
    fn emptied_batches_go_back_to_the_producer_with_their_capacity() {
        let (q, _) = queue(100, Overflow::Block, json());
        let stop = AtomicBool::new(false);
        q.push_all(&mut recs(2), &stop);
        let b = q.pop(Duration::ZERO).unwrap();
        let cap = b.bytes.capacity();
        assert!(cap > 0);
        q.recycle(b);
        q.push_all(&mut recs(1), &stop);
        // The batch just handed over took the spare's place as the one being filled.
        assert!(q.formatter().open.bytes.capacity() >= cap, "reused buffer");
        let b = q.pop(Duration::ZERO).unwrap();
        // Oversized ones are not kept.
        let mut big = b;
        big.bytes.reserve(SPARE_MAX_BYTES + 1);
        q.recycle(big);
        assert!(q.lock().spare.is_empty());
    }

    #[test]
    fn a_record_larger_than_the_bound_enters_an_empty_queue() {
        let (q, _) = queue(1, Overflow::Block, json());
        let stop = AtomicBool::new(false);
        let mut big = rec(0);
        big.command_args = vec![b'a'; 10_000];
        q.push_all(&mut vec![big], &stop);
        assert_eq!(take_lines(&q).len(), 1);
    }

    #[test]
    fn block_mode_waits_for_room_and_loses_nothing() {
        let (q, _) = queue(2, Overflow::Block, json());
        let stop = Arc::new(AtomicBool::new(false));
        q.push_all(&mut recs(2), &stop);
        let producer = {
            let (q, stop) = (q.clone(), stop.clone());
            std::thread::spawn(move || q.push_all(&mut recs(3), &stop))
        };
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < 5 && Instant::now() < deadline {
            if let Some(b) = q.pop(Duration::from_millis(10)) {
                let text = String::from_utf8(b.bytes.clone()).unwrap();
                got.extend(text.lines().map(|l| serde_json::from_str(l).unwrap()));
                q.recycle(b);
            }
        }
        producer.join().unwrap();
        assert_eq!(seqs(&got), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_line_longer_than_its_estimate_is_charged_its_length() {
        let (q, _) = queue(1000, Overflow::Block, json());
        let stop = AtomicBool::new(false);
        let mut binary = rec(0);
        binary.command_args = vec![0x01; 1000];
        let estimate = record_cost(&binary);
        q.push_all(&mut vec![binary], &stop);
        let line = q.formatter().open.bytes.len() + {
            let st = q.lock();
            st.batches.iter().map(|b| b.bytes.len()).sum::<usize>()
        };
        assert!(line > 5 * 1000, "escaped as \\u0001: {line} bytes");
        assert!(q.len_bytes() >= line, "{} < {line}", q.len_bytes());
        assert!(q.len_bytes() > estimate);
        take_lines(&q);
        assert_eq!(q.len_bytes(), 0, "charged and released alike");
    }

    #[test]
    fn forced_records_stay_within_a_slack_beyond_the_bound() {
        let (q, metrics) = queue(1, Overflow::Block, json());
        let stop = AtomicBool::new(false);
        q.push_all(&mut recs(1), &stop);
        let n = 2 * FORCED_SLACK / record_cost(&rec(0));
        for _ in 0..n {
            q.push_forced(&mut recs(1));
        }
        assert!(q.len_bytes() <= unit() + FORCED_SLACK + 2 * unit());
        let dropped = metrics.lost_queue.load(Ordering::Relaxed);
        assert!(dropped > 0 && dropped < n as u64, "{dropped} of {n}");
        let lines = take_lines(&q);
        assert_eq!(lines.len() as u64 + dropped, n as u64 + 1);
        assert_eq!(seqs(&lines), (1..=lines.len() as u64).collect::<Vec<_>>());
    }

    #[test]
    fn forced_records_never_wait() {
        let (q, _) = queue(1, Overflow::Block, json());
        let stop = AtomicBool::new(false);
        q.push_all(&mut recs(1), &stop);
        q.push_forced(&mut recs(3));
        assert_eq!(seqs(&take_lines(&q)), [1, 2, 3, 4]);
    }

    #[test]
    fn lines_of_one_server_per_batch_when_the_sink_keeps_a_file_per_server() {
        let (q, _) = queue(
            100,
            Overflow::Block,
            LineFormat {
                format: Format::Json,
                per_server: true,
            },
        );
        let stop = AtomicBool::new(false);
        q.push_all(&mut vec![rec(1), rec(1), rec(2), rec(1)], &stop);
        let mut batches = Vec::new();
        while let Some(b) = q.pop(Duration::ZERO) {
            batches.push((b.file, b.count));
        }
        let port = |p| Some(ServerFile::Port(p));
        assert_eq!(batches, [(port(1), 2), (port(2), 1), (port(1), 1)]);
    }

    #[test]
    fn a_new_format_applies_from_the_next_record() {
        let (q, _) = queue(100, Overflow::Block, json());
        let stop = AtomicBool::new(false);
        q.append(&mut recs(1), &stop);
        q.configure(
            100 * unit(),
            Overflow::Block,
            LineFormat {
                format: Format::Csv,
                per_server: false,
            },
        );
        q.push_all(&mut recs(1), &stop);
        let first = q.pop(Duration::ZERO).unwrap();
        let second = q.pop(Duration::ZERO).unwrap();
        assert!(first.bytes.starts_with(b"{"), "JSON");
        assert!(!second.bytes.starts_with(b"{"), "CSV");
        assert_eq!(q.len_bytes(), 0);
    }
}
