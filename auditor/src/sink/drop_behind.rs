//! Drop-behind for the audit log, done on a helper thread so the sink never waits for the disk.
//!
//! The audit log is written once and never read back by the auditor, so its pages are pushed to
//! disk and dropped from the page cache as it grows: every [`CHUNK`], writeback of the newest chunk
//! is started and the chunk before it (on disk by then, or waited for) is dropped. The log then
//! does not evict the server's cache, and the few pages it uses are recycled instead of new memory
//! being faulted in for every page of log.
//!
//! Starting writeback runs the filesystem's block allocation in the caller, and waiting for the
//! previous chunk blocks on the device. Done by the sink thread itself, a disk hiccup of a few
//! hundred milliseconds stopped the sink, filled the record queue and made the capture thread
//! lose ring-buffer data (`-P 16 -d 1024`, measured). The `drop-behind` thread does both instead;
//! when it falls behind, the sink skips steps and the next step covers the whole range, so the
//! sink never blocks here. Best effort throughout: nothing here changes what was written.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd as _;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, OnceLock};

/// Bytes between drop-behind steps.
pub const CHUNK: u64 = 8 << 20;
/// Steps the helper may have queued before the sink skips one (the skipped range joins the next).
const QUEUED_STEPS: usize = 4;
/// Writeback stops short of the end on this boundary, so the sink never appends into a folio the
/// helper is writing back: the append would wait for that writeback. Page-cache folios can be as
/// large as 2 MiB (ext4 large folios); with 64 KiB here the sink still stalled in
/// `folio_wait_bit` for hundreds of milliseconds, with 2 MiB it did not (measured).
const ALIGN: u64 = 2 << 20;

/// One step for the helper: start writeback of `write`, then wait for `drop` and drop it.
struct Step {
    file: Arc<File>,
    write: Range<u64>,
    drop: Range<u64>,
}

/// Drop-behind state of one open log file.
pub struct DropBehind {
    /// The sink's log file, shared with queued steps.
    file: Option<Arc<File>>,
    /// Writeback was handed to the helper up to here...
    writeback_from: u64,
    /// ...and everything before this was handed over to be dropped.
    dropped_to: u64,
}

impl DropBehind {
    /// For a file whose first `len` bytes are already there (they are left alone). `file` is
    /// `None` for what is not a regular file.
    pub fn new(file: Option<Arc<File>>, len: u64) -> DropBehind {
        DropBehind {
            file,
            writeback_from: len,
            dropped_to: len,
        }
    }

    /// The file now ends at `end`. Hands a step to the helper once a chunk is complete; never
    /// blocks.
    pub fn advance(&mut self, end: u64) {
        if end < self.writeback_from {
            // The file was cut back (a failed batch): start over from there.
            self.writeback_from = end;
            self.dropped_to = self.dropped_to.min(end);
            return;
        }
        let Some(file) = &self.file else {
            return;
        };
        let write_to = end - end % ALIGN;
        if write_to < self.writeback_from + CHUNK {
            return;
        }
        let step = Step {
            file: file.clone(),
            write: self.writeback_from..write_to,
            drop: self.dropped_to..self.writeback_from,
        };
        if helper().is_some_and(|tx| tx.try_send(step).is_ok()) {
            self.dropped_to = self.writeback_from;
            self.writeback_from = write_to;
        }
    }
}

/// The helper thread's queue, started on first use; `None` if the thread could not be started
/// (then there is no drop-behind and the kernel's own writeback does the job).
fn helper() -> Option<&'static SyncSender<Step>> {
    static HELPER: OnceLock<Option<SyncSender<Step>>> = OnceLock::new();
    HELPER
        .get_or_init(|| super::start_helper("drop-behind", QUEUED_STEPS, run))
        .as_ref()
}

fn run(steps: Receiver<Step>) {
    for step in steps {
        let fd = step.file.as_raw_fd();
        // SAFETY: plain syscalls on a descriptor `step.file` keeps open; ranges are within i64.
        unsafe {
            if !step.write.is_empty() {
                libc::sync_file_range(
                    fd,
                    step.write.start as i64,
                    (step.write.end - step.write.start) as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            if !step.drop.is_empty() {
                let (from, len) = (
                    step.drop.start as i64,
                    (step.drop.end - step.drop.start) as i64,
                );
                libc::sync_file_range(
                    fd,
                    from,
                    len,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
                libc::posix_fadvise(fd, from, len, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::time::{Duration, Instant};

    /// Pages of `file` resident in the page cache, by mincore over a mapping of it.
    fn resident_pages(file: &File, len: u64) -> usize {
        let page = 4096usize;
        let pages = (len as usize).div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: a shared read-only mapping of `len` bytes of an open file, unmapped below.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            assert_eq!(libc::mincore(addr, len as usize, vec.as_mut_ptr()), 0);
            libc::munmap(addr, len as usize);
        }
        vec.iter().filter(|&&v| v & 1 == 1).count()
    }

    #[test]
    fn written_chunks_leave_the_page_cache() {
        // On the build's disk: tmpfs pages (a tmpfs TMPDIR) cannot be dropped.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/tmp")
            .join(format!("auditor-dropbehind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let file = Arc::new(File::create(&path).unwrap());
        let mut behind = DropBehind::new(Some(file.clone()), 0);
        let block = vec![b'x'; 1 << 20];
        let mut end = 0u64;
        for _ in 0..(4 * CHUNK / block.len() as u64) {
            (&*file).write_all(&block).unwrap();
            end += block.len() as u64;
            behind.advance(end);
        }
        // Handed over: the first chunks were passed on to be dropped, the last one is not yet.
        assert!(
            behind.dropped_to >= 2 * CHUNK,
            "dropped_to {}",
            behind.dropped_to
        );
        assert!(behind.writeback_from > behind.dropped_to);
        let deadline = Instant::now() + Duration::from_secs(10);
        let dropped = behind.dropped_to;
        let reader = File::open(&path).unwrap();
        while resident_pages(&reader, dropped) > 0 {
            assert!(
                Instant::now() < deadline,
                "dropped chunks stayed in the page cache"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // A cut-back file starts over from its new end.
        behind.advance(CHUNK / 2);
        assert_eq!(behind.writeback_from, CHUNK / 2);
        assert!(behind.dropped_to <= CHUNK / 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn what_is_not_a_regular_file_is_left_alone() {
        let mut behind = DropBehind::new(None, 0);
        behind.advance(10 * CHUNK);
        assert_eq!(behind.writeback_from, 0);
    }
}
