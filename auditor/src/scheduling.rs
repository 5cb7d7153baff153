//! Scheduling policy of the auditor's sink thread, chosen from the data rate and the queue's depth.
//!
//! Under SCHED_BATCH a thread keeps its CPU share, but its wake-ups do not preempt the server. Only
//! the sink thread (writing formatted batches) is ever put there, and only while that is safe: it sits
//! behind the bounded queue, which absorbs a late start. The capture thread, which drains the
//! kernel's ring buffer, always keeps the normal policy: a batch thread may wait several
//! milliseconds for a CPU, and at `-P 16 -d 1024` (~700 MB/s) a 16 MiB ring fills in 24 ms. (Both
//! threads under SCHED_BATCH lost records in full bench runs, each time at the onset of a burst.)
//!
//! The sink runs under SCHED_BATCH while the ring would take at least 100 ms to fill at the last
//! window's rate and the queue is shallow; it returns to the normal policy as soon as the rate
//! rises, the capture thread finds a backlog in the ring, or the queue holds 1/8 of its bound.
//!
//! [`RateGovernor`] is the pure decision; [`set_policy`] applies it.

/// How often the data rate is measured.
const WINDOW_NS: u64 = 100_000_000;
/// SCHED_BATCH is allowed while the ring would take at least this long to fill.
const BATCH_FILL_NS: u64 = 100_000_000;
/// ... and ends once the ring would fill in less than this (hysteresis between the two).
const NORMAL_FILL_NS: u64 = 50_000_000;

/// Decides, pass by pass, whether the sink thread may run under SCHED_BATCH.
#[derive(Debug)]
pub struct RateGovernor {
    ring_bytes: u64,
    batch: bool,
    window_start_ns: u64,
    window_bytes: u64,
}

impl RateGovernor {
    /// Starts under the normal policy; the first quiet window switches to SCHED_BATCH.
    pub fn new(ring_bytes: u64, now_ns: u64) -> RateGovernor {
        RateGovernor {
            ring_bytes,
            batch: false,
            window_start_ns: now_ns,
            window_bytes: 0,
        }
    }

    /// Whether the sink thread should be under SCHED_BATCH now.
    pub fn batch(&self) -> bool {
        self.batch
    }

    /// Account one pass over the ring that consumed `pass_bytes`, after which the queue holds
    /// `queue_bytes` of at most `queue_max`; returns the new policy when it changes (`Some(true)`:
    /// SCHED_BATCH, `Some(false)`: normal).
    pub fn after_pass(
        &mut self,
        pass_bytes: u64,
        queue_bytes: u64,
        queue_max: u64,
        now_ns: u64,
    ) -> Option<bool> {
        self.window_bytes += pass_bytes;
        let backlog = pass_bytes >= self.ring_bytes / 4 || queue_bytes >= queue_max / 8;
        if self.batch && backlog {
            self.batch = false;
            return Some(false);
        }
        let elapsed = now_ns.saturating_sub(self.window_start_ns);
        if elapsed < WINDOW_NS {
            return None;
        }
        // Time to fill the ring at this window's rate: ring_bytes / (window_bytes / elapsed).
        let fill_ns = if self.window_bytes == 0 {
            u64::MAX
        } else {
            (u128::from(self.ring_bytes) * u128::from(elapsed) / u128::from(self.window_bytes))
                .min(u128::from(u64::MAX)) as u64
        };
        self.window_start_ns = now_ns;
        self.window_bytes = 0;
        if self.batch && fill_ns < NORMAL_FILL_NS {
            self.batch = false;
            Some(false)
        } else if !self.batch && fill_ns >= BATCH_FILL_NS && !backlog {
            self.batch = true;
            Some(true)
        } else {
            None
        }
    }
}

/// Put thread `tid` (0: the calling thread) under SCHED_BATCH or the normal policy. Best effort:
/// a failure only costs latency, never records.
pub fn set_policy(tid: i32, batch: bool) {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if batch {
        libc::SCHED_BATCH
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: sets the scheduling policy of one of our own threads with a valid parameter.
    unsafe { libc::sched_setscheduler(tid, policy, &param) };
}

/// Set the calling thread's nice value (threads it starts later inherit it).
pub fn set_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: plain syscall on the calling thread (PRIO_PROCESS with 0 is the calling thread on
    // Linux, where nice values are per thread).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's nice value.
pub fn nice() -> i32 {
    // SAFETY: plain syscall on the calling thread; -1 is also a valid value, so errors are ignored.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// The calling thread's id, for [`set_policy`] from another thread.
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RING: u64 = 8 << 20;
    const MS: u64 = 1_000_000;
    const QUEUE: u64 = 16 << 20;

    /// Feeds `rate` bytes per second in 10 ms passes for `ms` milliseconds from `start`; returns
    /// the last change.
    fn feed(g: &mut RateGovernor, start: u64, ms: u64, rate: u64) -> Option<bool> {
        let mut last = None;
        for step in 1..=ms / 10 {
            if let Some(c) = g.after_pass(rate / 100, 0, QUEUE, start + step * 10 * MS) {
                last = Some(c);
            }
        }
        last
    }

    /// A governor that went to SCHED_BATCH after 200 ms at 1 MB/s.
    fn in_batch() -> RateGovernor {
        let mut g = RateGovernor::new(RING, 0);
        feed(&mut g, 0, 200, 1_000_000);
        assert!(g.batch());
        g
    }

    #[test]
    fn quiet_traffic_switches_to_batch_after_one_window() {
        let mut g = RateGovernor::new(RING, 0);
        assert!(!g.batch());
        // 20 MB/s: the 8 MiB ring takes 420 ms to fill.
        assert_eq!(feed(&mut g, 0, 90, 20_000_000), None);
        assert_eq!(feed(&mut g, 90 * MS, 20, 20_000_000), Some(true));
        assert!(g.batch());
    }

    #[test]
    fn high_rate_returns_to_normal_and_stays() {
        let mut g = in_batch();
        // 700 MB/s (-P 16 -d 1024): the ring fills in 12 ms.
        assert_eq!(feed(&mut g, 200 * MS, 200, 700_000_000), Some(false));
        assert_eq!(feed(&mut g, 400 * MS, 500, 700_000_000), None);
        assert!(!g.batch());
    }

    #[test]
    fn rates_between_the_thresholds_keep_the_current_policy() {
        // 120 MB/s: fills in 70 ms, between 50 and 100.
        let mut g = RateGovernor::new(RING, 0);
        assert_eq!(feed(&mut g, 0, 500, 120_000_000), None);
        assert!(!g.batch());
        let mut g = in_batch();
        assert_eq!(feed(&mut g, 200 * MS, 500, 120_000_000), None);
        assert!(g.batch());
    }

    #[test]
    fn a_backlog_ends_batch_at_once() {
        let mut g = in_batch();
        // Mid-window: a pass that found a quarter of the ring unread.
        assert_eq!(g.after_pass(RING / 4, 0, QUEUE, 205 * MS), Some(false));
        assert!(!g.batch());
    }

    #[test]
    fn a_filling_queue_ends_batch_at_once_and_blocks_its_return() {
        let mut g = in_batch();
        assert_eq!(g.after_pass(1000, QUEUE / 8, QUEUE, 205 * MS), Some(false));
        // A quiet window does not bring SCHED_BATCH back while the queue is still that deep.
        assert_eq!(g.after_pass(0, QUEUE / 4, QUEUE, 400 * MS), None);
        assert_eq!(g.after_pass(0, 0, QUEUE, 600 * MS), Some(true));
    }

    #[test]
    fn idle_windows_allow_batch() {
        let mut g = RateGovernor::new(RING, 0);
        assert_eq!(g.after_pass(0, 0, QUEUE, 150 * MS), Some(true));
    }
}
