//! Delivery: one bounded queue between the pipeline and the sink, and the sink thread that numbers,
//! formats and writes records.
//!
//! The queue is bounded in bytes (`audit.max_queue_size`). When it is full, `audit.overflow block`
//! makes the producer wait (the capture thread then stops reading the ring buffer, the kernel drops
//! and counts, and the server is never slowed), and `drop` drops the newest records and counts them.
//! Every loss becomes an `AUDIT_LOSS` record as soon as one can be written. `seq` is assigned here, at
//! formatting time, so it is gapless over the records actually written. A batch the sink refuses (disk
//! full, collector away) is kept whole and retried: no torn line, no gap, no duplicate.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::format::{Format, write_record};
use crate::metrics::Metrics;
use crate::record::{Category, Outcome, Record};
use crate::settings::Overflow;
use crate::sink::Sink;

/// Rough bytes a record takes in the queue (its variable parts plus a fixed overhead).
pub fn record_cost(r: &Record) -> usize {
    200 + r.command.len()
        + r.command_args.len()
        + r.username.len()
        + r.client_ip.len()
        + r.error.len()
        + r.keys.total_bytes()
        + 4 * r.keys.len()
}

struct QueueState {
    /// Batches as the producers handed them over, each with its cost: whole `Vec`s move between
    /// the threads, not single records (a record is ~240 bytes to copy).
    batches: VecDeque<(Vec<Record>, usize)>,
    /// Emptied batch `Vec`s on their way back to the producers: a producer that started every
    /// batch from an empty `Vec` regrew it record by record, copying the records at each doubling
    /// (perf: 2% of the capture thread at `-P 16`).
    spare: Vec<Vec<Record>>,
    bytes: usize,
    max_bytes: usize,
    overflow: Overflow,
    /// Records dropped by `overflow drop` since the last loss record.
    dropped: u64,
    closed: bool,
    /// The sink thread waits for records / producers wait for room: notify only then, since a
    /// condvar notification is a futex syscall even when nobody waits.
    consumer_waiting: bool,
    producers_waiting: usize,
}

/// Spare batch `Vec`s kept for the producers, and the largest capacity kept (bounds their memory).
const SPARE_BATCHES: usize = 4;
const SPARE_MAX_RECORDS: usize = 2048;

impl QueueState {
    /// Keep an emptied batch `Vec` for the producers, unless enough are kept or it is oversized.
    fn recycle(&mut self, mut batch: Vec<Record>) {
        batch.clear();
        if self.spare.len() < SPARE_BATCHES
            && batch.capacity() > 0
            && batch.capacity() <= SPARE_MAX_RECORDS
        {
            self.spare.push(batch);
        }
    }
}

/// The bounded queue. Cloned handles share it.
#[derive(Clone)]
pub struct Queue {
    state: Arc<(Mutex<QueueState>, Condvar, Condvar)>,
    /// Drops are counted here at once, so INFO shows them while the sink is stuck.
    metrics: Arc<Metrics>,
}

impl Queue {
    pub fn new(max_bytes: usize, overflow: Overflow, metrics: Arc<Metrics>) -> Self {
        Queue {
            metrics,
            state: Arc::new((
                Mutex::new(QueueState {
                    batches: VecDeque::new(),
                    spare: Vec::new(),
                    bytes: 0,
                    max_bytes,
                    overflow,
                    dropped: 0,
                    closed: false,
                    consumer_waiting: false,
                    producers_waiting: 0,
                }),
                Condvar::new(), // not empty
                Condvar::new(), // not full
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn configure(&self, max_bytes: usize, overflow: Overflow) {
        let mut st = self.lock();
        st.max_bytes = max_bytes;
        st.overflow = overflow;
        self.state.2.notify_all();
    }

    /// Add records (the vector is emptied). In block mode this waits while the queue has no room
    /// for them (unless `stop` is set); in drop mode the newest records that do not fit are dropped
    /// and counted. Records larger than the whole bound are still accepted into an empty queue, so
    /// nothing is refused forever.
    pub fn push_all(&self, records: &mut Vec<Record>, stop: &AtomicBool) {
        if records.is_empty() {
            return;
        }
        let mut cost: usize = records.iter().map(record_cost).sum();
        let mut st = self.lock();
        loop {
            if st.bytes + cost <= st.max_bytes || st.batches.is_empty() || st.closed {
                break;
            }
            match st.overflow {
                Overflow::Drop => {
                    // Keep the oldest records that fit; drop the rest.
                    let room = st.max_bytes.saturating_sub(st.bytes);
                    let mut n = 0;
                    cost = 0;
                    for r in records.iter() {
                        let c = record_cost(r);
                        if cost + c > room {
                            break;
                        }
                        cost += c;
                        n += 1;
                    }
                    let dropped = (records.len() - n) as u64;
                    records.truncate(n);
                    st.dropped += dropped;
                    self.metrics
                        .lost_queue
                        .fetch_add(dropped, Ordering::Relaxed);
                    break;
                }
                Overflow::Block => {
                    if stop.load(Ordering::Relaxed) {
                        // Shutting down: keep the records anyway, the sink drains everything.
                        break;
                    }
                    self.state.1.notify_one();
                    st.producers_waiting += 1;
                    st = self
                        .state
                        .2
                        .wait_timeout(st, Duration::from_millis(50))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    st.producers_waiting -= 1;
                }
            }
        }
        if !records.is_empty() {
            st.bytes += cost;
            let next = st.spare.pop().unwrap_or_default();
            st.batches
                .push_back((std::mem::replace(records, next), cost));
        }
        if st.consumer_waiting {
            self.state.1.notify_one();
        }
    }

    /// True when the queue has no room for more (the capture thread stops reading the ring).
    pub fn is_full(&self) -> bool {
        let st = self.lock();
        st.overflow == Overflow::Block && st.bytes >= st.max_bytes
    }

    /// Take whole batches until `out` holds at least `max` records or the queue is empty, waiting
    /// up to `wait` for the first. Returns the drop count too.
    fn pop_batch(&self, max: usize, wait: Duration, out: &mut Vec<Record>) -> u64 {
        let mut st = self.lock();
        if st.batches.is_empty() && !st.closed {
            st.consumer_waiting = true;
            st = self
                .state
                .1
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            st.consumer_waiting = false;
        }
        while out.len() < max
            && let Some((mut batch, cost)) = st.batches.pop_front()
        {
            st.bytes = st.bytes.saturating_sub(cost);
            if out.is_empty() {
                std::mem::swap(out, &mut batch);
            } else {
                out.append(&mut batch);
            }
            st.recycle(batch);
        }
        let dropped = std::mem::take(&mut st.dropped);
        if st.producers_waiting > 0 {
            self.state.2.notify_all();
        }
        dropped
    }

    pub fn close(&self) {
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
        let n = st.batches.iter().map(|(b, _)| b.len() as u64).sum();
        st.batches.clear();
        st.bytes = 0;
        n
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

/// Owns the active sink and follows the running settings.
pub trait SinkProvider: Send {
    /// The sink to write to now.
    fn sink(&mut self) -> &mut dyn Sink;
    /// Called every loop: reconfigure or replace the sink, and update the format, when the settings
    /// changed.
    fn refresh(&mut self, format: &mut Format);
    /// Hostname for the auditor's own records.
    fn hostname(&self) -> String;
    /// Wall-clock microseconds now.
    fn now_us(&self) -> i64;
    /// One destination per server (`%port%` in the file path): batches hold one server's
    /// records, and `select` names the server before each.
    fn per_server(&self) -> bool {
        false
    }
    fn select(&mut self, _port: u16) {}
}

/// Records the sink thread takes from the queue at a time (whole producer batches of 256, so a
/// little more). 1024 records are one `write()` of ~300 KB at `-d 3` and ~1.5 MB at `-d 1024`;
/// 4096 kept ~12 MB of records and formatted text resident at `-d 1024` for no measurable gain.
const SINK_BATCH_RECORDS: usize = 1024;

/// The sink thread's loop: runs until the queue is closed and drained.
pub fn run_sink(
    queue: Queue,
    mut format: Format,
    mut provider: Box<dyn SinkProvider>,
    metrics: Arc<Metrics>,
    reopen: Arc<AtomicBool>,
    first_seq: Arc<AtomicU64>,
) {
    let mut next_seq = first_seq.load(Ordering::Relaxed).max(1);
    let mut pending: Vec<Record> = Vec::with_capacity(SINK_BATCH_RECORDS + 256);
    let mut carry: Vec<Record> = Vec::new();
    let mut batch_port = 0u16;
    let mut batch: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut batch_lines = 0usize;
    let mut batch_cats: Vec<Category> = Vec::new();
    // `Record::pid` of each line, parallel to `batch_cats`, for the per-target counters.
    let mut batch_pids: Vec<u32> = Vec::new();
    let mut last_tick = Instant::now();
    let mut last_flush = Instant::now();
    let mut backoff = Duration::from_millis(10);
    let mut sink_reported = 0u64;
    let mut shutdown_since: Option<Instant> = None;
    loop {
        // Housekeeping: settings, SIGHUP, rolling, reconnects, sink-internal losses.
        provider.refresh(&mut format);
        let per_server = provider.per_server();
        let hostname = provider.hostname();
        let now_us = provider.now_us();
        let sink = provider.sink();
        if reopen.swap(false, Ordering::AcqRel)
            && let Err(e) = sink.reopen()
        {
            eprintln!("auditor: reopening the sink: {e}");
        }
        if last_tick.elapsed() >= Duration::from_millis(100) {
            last_tick = Instant::now();
            let _ = sink.tick();
            let loss = sink.take_loss();
            if loss.records > 0 {
                pending.insert(
                    0,
                    loss_record(&hostname, now_us, "sink_overflow", loss.records, loss.bytes),
                );
                sink_reported += loss.records;
            }
            // INFO shows sink losses at once, reported or not yet.
            metrics
                .lost_sink
                .store(sink_reported + sink.pending_loss(), Ordering::Relaxed);
            metrics.set_sink_status(sink.kind(), sink.status());
        }
        // Fill a batch only when the previous one was written.
        if batch.is_empty() {
            if pending.is_empty() {
                let dropped =
                    queue.pop_batch(SINK_BATCH_RECORDS, Duration::from_millis(10), &mut pending);
                if dropped > 0 {
                    pending.insert(
                        0,
                        loss_record(&hostname, now_us, "queue_overflow", dropped, 0),
                    );
                }
            }
            batch_cats.clear();
            batch_pids.clear();
            // One file per server: a batch holds the records of one server (the first pending
            // one's); the others wait, in order, for the next batches.
            batch_port = pending.first().map(|r| r.server.port).unwrap_or(0);
            for mut rec in pending.drain(..) {
                if per_server && rec.server.port != batch_port {
                    carry.push(rec);
                    continue;
                }
                batch_pids.push(rec.pid);
                rec.seq = next_seq;
                next_seq += 1;
                write_record(format, &rec, &mut batch);
                batch_lines += 1;
                batch_cats.push(std::mem::replace(&mut rec.category, Category::Other));
            }
            std::mem::swap(&mut pending, &mut carry);
        }
        provider.select(batch_port);
        let sink = provider.sink();
        if !batch.is_empty() {
            match sink.write_batch(&batch, batch_lines) {
                Ok(()) => {
                    let per = batch.len() as u64 / batch_lines.max(1) as u64;
                    for (c, &pid) in batch_cats.iter().zip(&batch_pids) {
                        metrics.record_written(c, pid, per);
                    }
                    batch.clear();
                    batch_lines = 0;
                    backoff = Duration::from_millis(10);
                    metrics.set_sink_status(sink.kind(), sink.status());
                }
                Err(e) => {
                    metrics.write_errors.fetch_add(1, Ordering::Relaxed);
                    metrics.set_sink_status(sink.kind(), sink.status());
                    if !e.retryable {
                        eprintln!("auditor: {e}");
                    }
                    // Keep the batch; retry after a pause (the queue fills meanwhile: back-pressure).
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    if queue.is_closed() {
                        // The process must exit: a sink that stays broken gets a bounded grace period.
                        let since = *shutdown_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= SHUTDOWN_GRACE {
                            let lost = batch_lines as u64 + queue.discard_all();
                            metrics.lost_sink.fetch_add(lost, Ordering::Relaxed);
                            eprintln!(
                                "auditor: giving up at shutdown: {lost} unwritten records: {e}"
                            );
                            return;
                        }
                    }
                    continue;
                }
            }
        }
        if last_flush.elapsed() >= Duration::from_millis(10) {
            last_flush = Instant::now();
            let _ = sink.flush(false);
        }
        if queue.is_drained() && batch.is_empty() && pending.is_empty() {
            break;
        }
    }
    let sink = provider.sink();
    let _ = sink.flush(true);
    metrics.set_sink_status(sink.kind(), sink.status());
    first_seq.store(next_seq, Ordering::Relaxed);
}

/// How long a clean stop keeps retrying a sink that refuses every batch before giving up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn loss_record(hostname: &str, now_us: i64, cause: &str, count: u64, bytes: u64) -> Record {
    let mut rec = Record::event(Category::AuditLoss, b"loss", now_us, hostname);
    rec.command_args = format!("cause={cause} count={count} bytes={bytes}").into_bytes();
    rec.result = Outcome::Failure;
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        Record::event(Category::Other, b"x", 0, "h")
    }

    fn queue(records: usize, overflow: Overflow) -> (Queue, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new(Vec::new()));
        let q = Queue::new(records * record_cost(&rec()), overflow, metrics.clone());
        (q, metrics)
    }

    #[test]
    fn drop_mode_keeps_the_oldest_that_fit_and_counts_the_rest() {
        let (q, metrics) = queue(3, Overflow::Drop);
        let stop = AtomicBool::new(false);
        q.push_all(&mut vec![rec(), rec()], &stop);
        q.push_all(&mut vec![rec(), rec()], &stop);
        let mut out = Vec::new();
        let dropped = q.pop_batch(100, Duration::ZERO, &mut out);
        assert_eq!((out.len(), dropped), (3, 1));
        assert_eq!(metrics.lost_queue.load(Ordering::Relaxed), 1);
        assert_eq!(q.len_bytes(), 0);
    }

    #[test]
    fn emptied_batches_go_back_to_the_producer_with_their_capacity() {
        let (q, _) = queue(100, Overflow::Block);
        let stop = AtomicBool::new(false);
        let mut records = vec![rec(), rec()];
        q.push_all(&mut records, &stop);
        assert_eq!(records.capacity(), 0, "no spare yet");
        let mut out = Vec::with_capacity(500);
        q.pop_batch(100, Duration::ZERO, &mut out);
        assert_eq!(out.len(), 2);
        records.push(rec());
        q.push_all(&mut records, &stop);
        assert!(records.is_empty());
        assert!(records.capacity() >= 500, "capacity {}", records.capacity());
        // Oversized ones are not kept.
        let mut out = Vec::with_capacity(SPARE_MAX_RECORDS + 1);
        q.pop_batch(100, Duration::ZERO, &mut out);
        assert!(q.lock().spare.is_empty());
    }

    #[test]
    fn a_batch_larger_than_the_bound_enters_an_empty_queue() {
        let (q, _) = queue(1, Overflow::Block);
        let stop = AtomicBool::new(false);
        q.push_all(&mut vec![rec(), rec(), rec()], &stop);
        let mut out = Vec::new();
        assert_eq!(q.pop_batch(2, Duration::ZERO, &mut out), 0);
        assert_eq!(out.len(), 3, "batches are taken whole");
    }

    #[test]
    fn block_mode_waits_for_room_and_loses_nothing() {
        let (q, _) = queue(2, Overflow::Block);
        let stop = Arc::new(AtomicBool::new(false));
        q.push_all(&mut vec![rec(), rec()], &stop);
        let producer = {
            let (q, stop) = (q.clone(), stop.clone());
            std::thread::spawn(move || q.push_all(&mut vec![rec(), rec()], &stop))
        };
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.len() < 4 && Instant::now() < deadline {
            q.pop_batch(100, Duration::from_millis(10), &mut out);
        }
        producer.join().unwrap();
        assert_eq!(out.len(), 4);
    }
}
