//! `audit.fsync everysec` off the sink thread, as Valkey does its own `appendfsync everysec` on a
//! background thread.
//!
//! `fdatasync` waits for the file's dirty pages and a journal commit. That is a few milliseconds
//! on an idle disk, but on a saturated one it waits behind the queue of writes (42 ms seen at
//! `-P 16 -d 1024`, hundreds of milliseconds in a disk stall). The sink thread blocked there
//! stops draining the record queue, which then fills, and the ring buffer after it. So the
//! periodic sync runs on the `log-sync` thread: the sink starts one per second when the last one
//! has finished, and learns its outcome at the next flush. Forced syncs (close, roll, shutdown)
//! and `audit.fsync always` stay on the sink thread, where their guarantee is wanted.

use std::fs::File;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};

/// What the sink knows of its background syncs.
#[derive(Default)]
pub struct BackgroundSync {
    state: Arc<Mutex<SyncState>>,
}

#[derive(Default)]
struct SyncState {
    in_flight: bool,
    /// The outcome of the last finished sync not yet taken by the sink.
    finished: Option<Result<(), String>>,
}

struct Job {
    file: Arc<File>,
    state: Arc<Mutex<SyncState>>,
}

impl BackgroundSync {
    /// Start a sync of `file` unless one is still running. Returns false when it was not started
    /// (one still runs, or there is no helper thread); the caller then stays unsynced.
    pub fn start(&self, file: Arc<File>) -> bool {
        {
            let mut st = lock(&self.state);
            if st.in_flight {
                return false;
            }
            st.in_flight = true;
        }
        let job = Job {
            file,
            state: self.state.clone(),
        };
        if helper().is_some_and(|tx| tx.try_send(job).is_ok()) {
            return true;
        }
        lock(&self.state).in_flight = false;
        false
    }

    /// Whether a sync is still running.
    pub fn busy(&self) -> bool {
        lock(&self.state).in_flight
    }

    /// The outcome of the last sync that finished since the previous call, if any.
    pub fn take_finished(&self) -> Option<Result<(), String>> {
        lock(&self.state).finished.take()
    }
}

fn lock(state: &Mutex<SyncState>) -> std::sync::MutexGuard<'_, SyncState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The helper thread's queue, started on first use; `None` if the thread could not be started
/// (then the sink syncs on its own thread).
fn helper() -> Option<&'static SyncSender<Job>> {
    static HELPER: OnceLock<Option<SyncSender<Job>>> = OnceLock::new();
    HELPER
        // One job per sink at a time; a few sinks (`%port%` files) may queue at once.
        .get_or_init(|| super::start_helper("log-sync", 64, run))
        .as_ref()
}

fn run(jobs: Receiver<Job>) {
    for job in jobs {
        let outcome = job.file.sync_data().map_err(|e| e.to_string());
        let mut st = lock(&job.state);
        st.in_flight = false;
        // A failure is kept until the sink takes it, even if a later sync succeeded meanwhile
        // (it cannot have: only one runs at a time per sink).
        st.finished = Some(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn wait_finished(sync: &BackgroundSync) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(outcome) = sync.take_finished() {
                return outcome;
            }
            assert!(Instant::now() < deadline, "background sync never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_sync_runs_once_at_a_time_and_reports_its_outcome() {
        let dir = std::env::temp_dir().join(format!("auditor-bgsync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = Arc::new(File::create(dir.join("log")).unwrap());
        let sync = BackgroundSync::default();
        assert!(sync.take_finished().is_none());
        assert!(sync.start(file.clone()));
        // While it runs, a second one is not started.
        let second = sync.start(file.clone());
        assert_eq!(wait_finished(&sync), Ok(()));
        if second {
            assert_eq!(wait_finished(&sync), Ok(()));
        }
        assert!(!sync.busy());
        assert!(sync.start(file));
        assert_eq!(wait_finished(&sync), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_sync_is_reported() {
        // fdatasync on a pipe fails with EINVAL.
        let mut fds = [0; 2];
        // SAFETY: a plain pipe(2) into a two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the write end is ours alone from here; the read end is closed below.
        let file = Arc::new(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) });
        let sync = BackgroundSync::default();
        assert!(sync.start(file));
        let outcome = wait_finished(&sync);
        assert!(outcome.is_err(), "{outcome:?}");
        // SAFETY: closing the read end we own.
        unsafe { libc::close(fds[0]) };
    }
}
