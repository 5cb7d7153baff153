//! File sink (`audit.protocol "file <path>"`): appends whole batches of audit lines to a log file,
//! rolls it by time and size the way Cassandra's audit log does, and keeps the rolled files within a
//! total size or hands each one to an archive command.
//!
//! What it guarantees:
//! - A batch is taken whole or not at all. The batch goes to an `O_APPEND` descriptor in one write
//!   loop; when that fails partway (a full disk), the file is cut back to its length before the
//!   batch, so no torn line stays and the caller's retry of the same batch writes no line twice.
//!   Should even the cut fail, nothing more is written until it succeeds.
//! - The live file is created 0640 (less the umask) in a directory that must exist. It is reopened
//!   on SIGHUP ([`Sink::reopen`]), on a new path ([`FileSink::reconfigure`]) and when `tick` finds
//!   that the path no longer names the open file, so logrotate's move-and-create works unchanged.
//!   A deleted file (`st_nlink` 0) is noticed before each batch, so no batch goes into it; when its
//!   directory is gone too, the batch fails and is kept until the directory is back.
//! - Rolling renames the live file to `<stem>-YYYYMMDD-HHMMSS-NNNN.<ext>` beside it (no `.<ext>`
//!   when the live file has none). The timestamp is the local time the file's content began (when
//!   it was opened or the previous file was rolled), so timestamps never decrease; the zero-padded
//!   counter (`0001`, `0002`, ...) separates files begun in the same second and is always higher
//!   than any taken before. So a plain byte sort (`ls`) is the order the files were rolled in,
//!   which [`FileSink::rolled_files`] and retention use too: by (timestamp, counter), which also
//!   places the `-N`-less and unpadded `-N` names of earlier versions.
//! - A roll that fails (a read-only directory, say) leaves the live file open and growing: the sink
//!   shows as failing in INFO until a roll works again, and stderr says so once per series.
//! - Retention: with `archive_command` set, every rolled file is given to the command (in a
//!   background thread, one at a time, retried with back-off; giving up on a file is said on
//!   stderr) and nothing is deleted; otherwise the oldest rolled files are deleted while their
//!   total exceeds `max_log_size`. Only files named after the live file's pattern are ever touched.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use chrono::{DateTime, Local, NaiveDateTime, Timelike};

use super::background_sync::BackgroundSync;
use super::drop_behind::DropBehind;
use super::{Sink, SinkError, SinkLoss, SinkStatus};

/// `audit.max_archive_retries` when not configured.
pub const DEFAULT_MAX_ARCHIVE_RETRIES: u32 = 10;

/// Mode of a newly created live file; the process umask may only remove bits.
const LOG_FILE_MODE: u32 = 0o640;
/// Wait before the first retry of a failed archive command; doubled per retry up to the cap.
const ARCHIVE_FIRST_BACKOFF: Duration = Duration::from_millis(100);
const ARCHIVE_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// `audit.fsync everysec`: the longest unsynced data may wait.
const EVERYSEC_INTERVAL: Duration = Duration::from_secs(1);
/// After a failed retention pass, the wait before `tick` scans the directory again.
const RETENTION_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How much of a failed archive command's stderr goes into the error message.
const ARCHIVE_STDERR_TAIL: usize = 300;
/// `YYYYMMDD-HHMMSS`, the timestamp in a rolled file's name.
const STAMP_FORMAT: &str = "%Y%m%d-%H%M%S";
const STAMP_LEN: usize = 15;
/// Digits of the same-second counter in a rolled file's name (`-0001`): a fixed width keeps
/// `-0010` after `-0009` in name order. 10,000 rolls within one second would need a batch every
/// 100 µs, each one past `max_file_size`; beyond `-9999` the counter just grows wider.
const COUNTER_WIDTH: usize = 4;

/// `audit.roll_cycle`: start a new file when the local minute, hour or day changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RollCycle {
    #[default]
    Never,
    Minutely,
    Hourly,
    Daily,
}

impl RollCycle {
    pub fn as_str(self) -> &'static str {
        match self {
            RollCycle::Never => "never",
            RollCycle::Minutely => "minutely",
            RollCycle::Hourly => "hourly",
            RollCycle::Daily => "daily",
        }
    }

    /// Start of the cycle containing `time`; `None` for `never`, which has no cycles.
    fn cycle_start(self, time: NaiveDateTime) -> Option<NaiveDateTime> {
        let (hour, minute) = match self {
            RollCycle::Never => return None,
            RollCycle::Minutely => (time.hour(), time.minute()),
            RollCycle::Hourly => (time.hour(), 0),
            RollCycle::Daily => (0, 0),
        };
        time.date().and_hms_opt(hour, minute, 0)
    }
}

impl FromStr for RollCycle {
    type Err = InvalidFileOption;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            RollCycle::Never,
            RollCycle::Minutely,
            RollCycle::Hourly,
            RollCycle::Daily,
        ]
        .into_iter()
        .find(|cycle| s.eq_ignore_ascii_case(cycle.as_str()))
        .ok_or_else(|| InvalidFileOption {
            setting: "audit.roll_cycle",
            value: s.to_string(),
            expected: "never, minutely, hourly or daily",
        })
    }
}

impl fmt::Display for RollCycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `audit.fsync`: when written data is pushed to the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Only when a file is rolled or closed, and on a forced flush (shutdown).
    No,
    /// At most once a second, when something was written since the last sync.
    #[default]
    Everysec,
    /// After every batch; a batch whose sync fails is not taken.
    Always,
}

impl FsyncPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FsyncPolicy::No => "no",
            FsyncPolicy::Everysec => "everysec",
            FsyncPolicy::Always => "always",
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = InvalidFileOption;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [FsyncPolicy::No, FsyncPolicy::Everysec, FsyncPolicy::Always]
            .into_iter()
            .find(|policy| s.eq_ignore_ascii_case(policy.as_str()))
            .ok_or_else(|| InvalidFileOption {
                setting: "audit.fsync",
                value: s.to_string(),
                expected: "no, everysec or always",
            })
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value of `audit.roll_cycle` or `audit.fsync` that is not one of the known words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidFileOption {
    pub setting: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl fmt::Display for InvalidFileOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} {:?} (expected {})",
            self.setting, self.value, self.expected
        )
    }
}

impl std::error::Error for InvalidFileOption {}

/// Everything `CONFIG SET` can change about the file sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileOptions {
    pub path: PathBuf,
    pub roll_cycle: RollCycle,
    /// Roll before a batch would take the live file past this many bytes; 0 = no size limit.
    pub max_file_size: u64,
    /// Total bytes of rolled files to keep, oldest deleted first; 0 = keep every rolled file.
    /// Ignored while `archive_command` is set.
    pub max_log_size: u64,
    /// Run for each rolled file, e.g. `/usr/local/bin/archive %path --gzip`: split on whitespace
    /// (double quotes group words), `%path` replaced in every argument, run without a shell.
    /// Empty or blank means none.
    pub archive_command: Option<String>,
    /// Retries of a failing archive command, with back-off, before giving up on that file.
    pub max_archive_retries: u32,
    pub fsync: FsyncPolicy,
}

impl FileOptions {
    /// Defaults for everything but the path: never roll, no limits, no archiving, `everysec`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileOptions {
            path: path.into(),
            roll_cycle: RollCycle::Never,
            max_file_size: 0,
            max_log_size: 0,
            archive_command: None,
            max_archive_retries: DEFAULT_MAX_ARCHIVE_RETRIES,
            fsync: FsyncPolicy::Everysec,
        }
    }
}

/// Where "now" comes from: local wall-clock time, replaceable in tests.
type Clock = Box<dyn Fn() -> NaiveDateTime + Send>;

fn local_now() -> NaiveDateTime {
    Local::now().naive_local()
}

/// The audit log file sink. See the module documentation.
pub struct FileSink {
    opts: FileOptions,
    archive_command: Option<ArchiveCommand>,
    naming: RollNaming,
    /// `None` after opening failed (reopen, roll, vanished directory); retried on each write and
    /// tick.
    live: Option<LiveFile>,
    /// A failed batch left bytes past this length that could not be cut off yet; nothing is
    /// written until they are, or the next line would continue the torn one.
    torn_at: Option<u64>,
    /// The last write_batch failed; cleared by the next one that succeeds.
    write_failed: bool,
    /// The last sync failed; cleared by the next successful sync.
    sync_failed: bool,
    write_errors: u64,
    last_error: Option<String>,
    /// Failed attempts to roll the live file since rolling last worked; the file grows past its
    /// limits meanwhile, so INFO shows the sink as failing and stderr says why, once.
    failed_rolls: u64,
    /// Data written since the last sync.
    unsynced: bool,
    last_sync: Instant,
    /// `everysec` syncs run on the `log-sync` thread, so a slow disk does not stop the sink.
    background: BackgroundSync,
    /// Retention has work to do (after a roll, a new option, a failed pass) no earlier than this.
    retention_due: Option<Instant>,
    archiver: Archiver,
    clock: Clock,
    /// Test stand-in for the free space of the disk: writes fail with ENOSPC beyond it.
    #[cfg(test)]
    simulated_free_space: Option<u64>,
}

/// The open live file.
struct LiveFile {
    /// Shared with the drop-behind steps still queued for it.
    file: Arc<File>,
    dev: u64,
    ino: u64,
    /// Rolling, cutting back and retention only make sense for a regular file, not for a device
    /// or pipe someone pointed the path at.
    regular: bool,
    /// Local time the file's content began: names the file when it is rolled and places it in a
    /// roll cycle.
    content_since: NaiveDateTime,
    /// Pushes written chunks to disk and out of the page cache, off the sink thread.
    behind: DropBehind,
}

impl FileSink {
    /// Open (create 0640, append) the live file. Not retryable when the parent directory does not
    /// exist ("audit log directory <dir> does not exist").
    pub fn open(opts: FileOptions) -> Result<Self, SinkError> {
        Self::open_with_clock(opts, Box::new(local_now))
    }

    fn open_with_clock(opts: FileOptions, clock: Clock) -> Result<Self, SinkError> {
        let archive_command = ArchiveCommand::from_option(opts.archive_command.as_deref())?;
        let now = clock();
        let live = open_live(&opts.path, now, None)?;
        let mut sink = FileSink {
            naming: RollNaming::for_live(&opts.path),
            opts,
            archive_command,
            live: Some(live),
            torn_at: None,
            write_failed: false,
            sync_failed: false,
            write_errors: 0,
            last_error: None,
            failed_rolls: 0,
            unsynced: false,
            last_sync: Instant::now(),
            background: BackgroundSync::default(),
            retention_due: Some(Instant::now()),
            archiver: Archiver::new(),
            clock,
            #[cfg(test)]
            simulated_free_space: None,
        };
        // Files rolled before a restart are archived or trimmed now, not at the next roll.
        sink.run_retention_if_due();
        Ok(sink)
    }

    /// Apply new options (`CONFIG SET` of any file option). The path is reopened unless it still
    /// names the open file, so setting `audit.protocol` to the same path after logrotate moved the
    /// file works like SIGHUP. The new file is opened before the old one is let go; on error
    /// nothing changes.
    pub fn reconfigure(&mut self, opts: FileOptions) -> Result<(), SinkError> {
        let archive_command = ArchiveCommand::from_option(opts.archive_command.as_deref())?;
        let same_path = opts.path == self.opts.path;
        let still_open = same_path
            && self
                .live
                .as_ref()
                .is_some_and(|live| path_names(&opts.path, live));
        if !still_open {
            let now = (self.clock)();
            let previous = if same_path { self.live.as_ref() } else { None };
            let live = open_live(&opts.path, now, previous)?;
            self.retire_live();
            self.live = Some(live);
            self.naming = RollNaming::for_live(&opts.path);
        }
        if archive_command != self.archive_command {
            // Files a previous command gave up on get a chance with the new one; queued jobs of the
            // old command are dropped and re-queued below with the new one.
            self.archiver.forget_pending();
        }
        self.opts = opts;
        self.archive_command = archive_command;
        self.retention_due = Some(Instant::now());
        self.run_retention_if_due();
        Ok(())
    }

    /// Rolled files currently kept, oldest first.
    pub fn rolled_files(&self) -> Vec<PathBuf> {
        self.naming
            .scan()
            .map(|files| files.into_iter().map(|file| file.path).collect())
            .unwrap_or_default()
    }

    /// Failed batch writes, syncs and rolls so far.
    pub fn write_errors(&self) -> u64 {
        self.write_errors
    }

    /// Message of the most recent error of the sink itself (not of the archive command).
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Rolled files the archive command failed on after all retries (kept on disk).
    pub fn archive_failures(&self) -> u64 {
        self.archiver.lock().failures
    }

    /// Message of the archive command's most recent failure.
    pub fn last_archive_error(&self) -> Option<String> {
        self.archiver.lock().last_error.clone()
    }

    pub fn options(&self) -> &FileOptions {
        &self.opts
    }

    /// Count an error that the caller sees (or, for a roll, that it does not see) and keep its
    /// message for INFO.
    fn count_error(&mut self, error: &SinkError) {
        self.write_errors += 1;
        self.last_error = Some(error.message.clone());
    }

    fn append_batch(&mut self, lines: &[u8], now: NaiveDateTime) -> Result<(), SinkError> {
        if self.live.is_none() {
            self.live = Some(open_live(&self.opts.path, now, None)?);
        } else if self.live_unlinked() {
            // Deleted (`rm`, or its whole directory) since the last tick: nobody could ever read
            // this batch there. Like a moved path, but it cannot wait for the next tick. When the
            // directory is gone too, the open fails and the caller keeps the batch.
            self.reopen_at(now)?;
        }
        self.cut_torn_bytes()?;
        let mut size = self.live_len()?;
        if self.roll_due(now, size, lines.len() as u64) {
            match self.roll(now) {
                Ok(()) => {
                    self.roll_succeeded();
                    size = self.live_len()?;
                }
                // Still holding the old file: an oversized file beats a stalled audit log, and the
                // next batch tries again.
                Err(error) if self.live.is_some() => self.roll_failed(&error),
                Err(error) => return Err(error),
            }
        } else {
            self.roll_not_needed();
        }
        let live = self.live.as_ref().ok_or_else(|| SinkError {
            message: format!("audit log {} is not open", self.opts.path.display()),
            retryable: true,
        })?;

        #[cfg(test)]
        let free_space = self.simulated_free_space.as_mut();
        #[cfg(not(test))]
        let free_space = None;
        let failure = match append_all(&live.file, lines, free_space) {
            Ok(()) if self.opts.fsync == FsyncPolicy::Always => {
                sync_data(live).err().map(|e| self.sync_error(e).message)
            }
            Ok(()) => None,
            Err((e, _)) => Some(format!(
                "cannot write audit log {}: {e}",
                self.opts.path.display()
            )),
        };
        if let Some(message) = failure {
            // Take nothing: what reached the file goes again, or the retry would duplicate it.
            if live.regular && live.file.set_len(size).is_err() {
                self.torn_at = Some(size);
            }
            return Err(SinkError {
                message,
                retryable: true,
            });
        }
        if self.opts.fsync == FsyncPolicy::Always {
            self.last_sync = Instant::now();
        } else {
            self.unsynced = true;
        }
        if let Some(live) = self.live.as_mut() {
            live.behind.advance(size + lines.len() as u64);
        }
        Ok(())
    }

    /// Whether the open file was deleted: no name links to it any more. A device or pipe the path
    /// points at is never replaced this way.
    fn live_unlinked(&self) -> bool {
        self.live.as_ref().is_some_and(|live| {
            live.regular && live.file.metadata().is_ok_and(|meta| meta.nlink() == 0)
        })
    }

    /// A roll failed while the live file stays open: it is written on past its limits, which
    /// only this error explains, so the first failure of a series goes to stderr too.
    fn roll_failed(&mut self, error: &SinkError) {
        self.count_error(error);
        if self.failed_rolls == 0 {
            eprintln!(
                "auditor: rolling audit log {} failed: {error}; writing on into it, retrying with each batch",
                self.opts.path.display()
            );
        }
        self.failed_rolls += 1;
    }

    fn roll_succeeded(&mut self) {
        if self.failed_rolls > 0 {
            eprintln!(
                "auditor: rolling audit log {} works again (after {})",
                self.opts.path.display(),
                failed_attempts(self.failed_rolls)
            );
            self.failed_rolls = 0;
        }
    }

    /// The live file is within its limits again without a roll (new options, a new file after
    /// SIGHUP or a move): the series of failures is over.
    fn roll_not_needed(&mut self) {
        if self.failed_rolls > 0 && self.live.is_some() {
            eprintln!(
                "auditor: audit log {} no longer needs rolling (after {})",
                self.opts.path.display(),
                failed_attempts(self.failed_rolls)
            );
            self.failed_rolls = 0;
        }
    }

    fn live_len(&self) -> Result<u64, SinkError> {
        let Some(live) = &self.live else {
            return Ok(0);
        };
        live.file
            .metadata()
            .map(|meta| meta.len())
            .map_err(|e| SinkError {
                message: format!("cannot stat audit log {}: {e}", self.opts.path.display()),
                retryable: true,
            })
    }

    /// Cut off what a failed batch left, if an earlier attempt could not.
    fn cut_torn_bytes(&mut self) -> Result<(), SinkError> {
        let (Some(len), Some(live)) = (self.torn_at, &self.live) else {
            return Ok(());
        };
        live.file.set_len(len).map_err(|e| SinkError {
            message: format!(
                "cannot remove a partly written batch from audit log {}: {e}",
                self.opts.path.display()
            ),
            retryable: true,
        })?;
        self.torn_at = None;
        Ok(())
    }

    /// Whether the live file (`size` bytes) must be rolled before `incoming` more bytes go in.
    /// An empty file is never rolled; instead it starts over in the current cycle.
    fn roll_due(&mut self, now: NaiveDateTime, size: u64, incoming: u64) -> bool {
        let cycle = self.opts.roll_cycle;
        let Some(live) = &mut self.live else {
            return false;
        };
        if !live.regular {
            return false;
        }
        let cycle_passed = cycle.cycle_start(live.content_since) != cycle.cycle_start(now);
        if size == 0 {
            if cycle_passed {
                live.content_since = now;
            }
            return false;
        }
        let too_big =
            self.opts.max_file_size > 0 && size.saturating_add(incoming) > self.opts.max_file_size;
        cycle_passed || too_big
    }

    /// Close the live file under its rolled name and start a new one.
    fn roll(&mut self, now: NaiveDateTime) -> Result<(), SinkError> {
        let Some(live) = &self.live else {
            return Ok(());
        };
        let path = &self.opts.path;
        // Renaming the path must not move someone else's file: if ours was moved away (logrotate
        // without SIGHUP yet), it is already "rolled" and we only need the new one.
        if !path_names(path, live) {
            return self.reopen_at(now);
        }
        // The rolled file is final: it may be archived or deleted, so it must be on disk first.
        live.file.sync_all().map_err(|e| SinkError {
            message: format!("cannot sync audit log {}: {e}", path.display()),
            retryable: true,
        })?;
        self.unsynced = false;
        self.sync_failed = false;
        let stamp = live.content_since.format(STAMP_FORMAT).to_string();
        let rolled = self.naming.unused_name(&stamp).map_err(|e| SinkError {
            // Listing the directory or checking a candidate name (too long, say) failed.
            message: format!(
                "cannot choose a name for the rolled audit log in {}: {e}",
                self.naming.dir.display()
            ),
            retryable: true,
        })?;
        fs::rename(path, &rolled).map_err(|e| SinkError {
            message: format!(
                "cannot roll audit log {} to {}: {e}",
                path.display(),
                rolled.display()
            ),
            retryable: is_transient(&e),
        })?;
        // From here the old descriptor is the rolled file: nothing more may go into it.
        self.live = None;
        let reopened = open_live(path, now, None);
        sync_directory(&self.naming.dir);
        // Even when no new file could be opened, the rolled one is archived or trimmed now.
        self.retention_due = Some(Instant::now());
        self.run_retention_if_due();
        self.live = Some(reopened?);
        Ok(())
    }

    /// Let go of the live file: cut off a torn batch if still possible, sync what was written.
    fn retire_live(&mut self) {
        let Some(old) = self.live.take() else {
            return;
        };
        if let Some(len) = self.torn_at.take() {
            // Best effort: the file is being abandoned, there is no later chance.
            let _ = old.file.set_len(len);
        }
        if self.unsynced {
            self.unsynced = false;
            if let Err(e) = sync_data(&old) {
                let error = self.sync_error(e);
                self.count_error(&error);
            }
        }
    }

    /// Open the configured path again (SIGHUP, a file moved or deleted under us).
    fn reopen_at(&mut self, now: NaiveDateTime) -> Result<(), SinkError> {
        let reopened = open_live(&self.opts.path, now, self.live.as_ref());
        // Unless the path is still the same file, the old one belongs to logrotate now; writing on
        // into it could put records into a file that is already compressed or deleted.
        self.retire_live();
        self.live = Some(reopened?);
        Ok(())
    }

    fn sync_live(&mut self) -> Result<(), SinkError> {
        let Some(live) = &self.live else {
            self.unsynced = false;
            return Ok(());
        };
        match sync_data(live) {
            Ok(()) => {
                self.unsynced = false;
                self.sync_failed = false;
                self.last_sync = Instant::now();
                Ok(())
            }
            // Still unsynced: the next flush tries again.
            Err(e) => Err(self.fail_sync(e)),
        }
    }

    /// Start the periodic sync on the `log-sync` thread. While the last one still runs the data
    /// stays unsynced and the next tick tries again, so syncs never pile up behind a slow disk.
    fn sync_in_background(&mut self) -> Result<(), SinkError> {
        let Some(live) = &self.live else {
            self.unsynced = false;
            return Ok(());
        };
        if !live.regular {
            // A device or pipe has nothing to sync: `sync_live` settles it at once.
            return self.sync_live();
        }
        if self.background.busy() {
            return Ok(());
        }
        if self.background.start(live.file.clone()) {
            self.unsynced = false;
            self.last_sync = Instant::now();
            Ok(())
        } else {
            // No helper thread: sync here, as before.
            self.sync_live()
        }
    }

    /// What a background sync found: a failure leaves the data unsynced (the next flush tries
    /// again) and shows in the error count and status, like a failed sync on the sink thread.
    fn background_sync_finished(&mut self, outcome: Result<(), String>) -> Result<(), SinkError> {
        match outcome {
            Ok(()) => {
                self.sync_failed = false;
                Ok(())
            }
            Err(e) => {
                self.unsynced = true;
                Err(self.fail_sync(e))
            }
        }
    }

    fn sync_error(&self, e: impl fmt::Display) -> SinkError {
        SinkError {
            message: format!("cannot sync audit log {}: {e}", self.opts.path.display()),
            retryable: true,
        }
    }

    /// A failed sync: counted, and the sink shows as failing until a sync succeeds.
    fn fail_sync(&mut self, e: impl fmt::Display) -> SinkError {
        self.sync_failed = true;
        let error = self.sync_error(e);
        self.count_error(&error);
        error
    }

    /// Archive or delete rolled files when a roll, an option change or an earlier failure asks
    /// for it. Failures are recorded and retried later, they do not fail the caller.
    fn run_retention_if_due(&mut self) {
        match self.retention_due {
            Some(due) if due <= Instant::now() => {}
            _ => return,
        }
        self.retention_due = None;
        if let Err(e) = self.run_retention() {
            self.last_error = Some(e.message);
            self.retention_due = Some(Instant::now() + RETENTION_RETRY_INTERVAL);
        }
    }

    fn run_retention(&mut self) -> Result<(), SinkError> {
        let scan_error = |e: io::Error| SinkError {
            message: format!(
                "cannot list audit log directory {}: {e}",
                self.naming.dir.display()
            ),
            retryable: true,
        };
        if let Some(command) = &self.archive_command {
            let rolled = self.naming.scan().map_err(scan_error)?;
            return self
                .archiver
                .submit(&rolled, command, self.opts.max_archive_retries);
        }
        if self.opts.max_log_size == 0 {
            return Ok(());
        }
        let rolled = self.naming.scan().map_err(scan_error)?;
        let mut total: u64 = rolled.iter().map(|file| file.size).sum();
        let mut first_error = None;
        for file in rolled {
            if total <= self.opts.max_log_size {
                break;
            }
            match fs::remove_file(&file.path) {
                Ok(()) => total -= file.size,
                Err(e) if e.kind() == io::ErrorKind::NotFound => total -= file.size,
                // Go on with the next oldest: keeping the total bounded protects the disk.
                Err(e) => {
                    first_error.get_or_insert(SinkError {
                        message: format!(
                            "cannot delete rolled audit log {}: {e}",
                            file.path.display()
                        ),
                        retryable: true,
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    #[cfg(test)]
    fn archive_idle(&self) -> bool {
        let state = self.archiver.lock();
        state.queue.is_empty() && state.in_flight.is_none()
    }
}

impl Sink for FileSink {
    fn write_batch(&mut self, lines: &[u8], _line_count: usize) -> Result<(), SinkError> {
        if lines.is_empty() {
            return Ok(());
        }
        let now = (self.clock)();
        match self.append_batch(lines, now) {
            Ok(()) => {
                self.write_failed = false;
                Ok(())
            }
            Err(error) => {
                self.write_failed = true;
                self.count_error(&error);
                Err(error)
            }
        }
    }

    fn flush(&mut self, force: bool) -> Result<(), SinkError> {
        if let Some(outcome) = self.background.take_finished() {
            self.background_sync_finished(outcome)?;
        }
        if !self.unsynced {
            return Ok(());
        }
        let due = force
            || match self.opts.fsync {
                FsyncPolicy::No => false,
                FsyncPolicy::Everysec => self.last_sync.elapsed() >= EVERYSEC_INTERVAL,
                FsyncPolicy::Always => true,
            };
        if !due {
            return Ok(());
        }
        if force || self.opts.fsync == FsyncPolicy::Always {
            return self.sync_live();
        }
        self.sync_in_background()
    }

    fn tick(&mut self) -> Result<(), SinkError> {
        let now = (self.clock)();
        let mut first_error: Option<SinkError> = None;

        let moved = match &self.live {
            None => true,
            Some(live) => !path_names(&self.opts.path, live),
        };
        if moved && let Err(e) = self.reopen_at(now) {
            self.last_error = Some(e.message.clone());
            first_error.get_or_insert(e);
        }
        if let Err(e) = self.cut_torn_bytes() {
            first_error.get_or_insert(e);
        }
        if self.torn_at.is_none() {
            match self.live_len() {
                Ok(size) if self.roll_due(now, size, 0) => match self.roll(now) {
                    Ok(()) => self.roll_succeeded(),
                    Err(e) => {
                        if self.live.is_some() {
                            self.roll_failed(&e);
                        } else {
                            self.count_error(&e);
                        }
                        first_error.get_or_insert(e);
                    }
                },
                Ok(_) => self.roll_not_needed(),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Err(e) = self.flush(false) {
            first_error.get_or_insert(e);
        }
        self.run_retention_if_due();
        if let Err(e) = self.archiver.ensure_worker_if_queued() {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    fn reopen(&mut self) -> Result<(), SinkError> {
        let now = (self.clock)();
        self.reopen_at(now).inspect_err(|e| {
            self.last_error = Some(e.message.clone());
        })
    }

    fn status(&self) -> SinkStatus {
        if self.live.is_none() || self.write_failed || self.sync_failed || self.failed_rolls > 0 {
            SinkStatus::Error
        } else {
            SinkStatus::Connected
        }
    }

    fn take_loss(&mut self) -> SinkLoss {
        // Nothing is dropped here: a batch is either written or handed back to the caller.
        SinkLoss::default()
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        // Best effort: the caller normally flushed with force already.
        if self.unsynced {
            let _ = self.sync_live();
        }
    }
}

/// `fdatasync` of the live file. A device or pipe the path points at has nothing to sync (the
/// call would fail with EINVAL every second).
fn sync_data(live: &LiveFile) -> io::Result<()> {
    if live.regular {
        live.file.sync_data()
    } else {
        Ok(())
    }
}

/// Open `path` to append to it (created 0640), following a symbolic link only if root (or this
/// process's user) owns it: the auditor writes as root, and a user who may write in the log's
/// directory could otherwise point the log at any file root may write (QA: a symlink swapped in
/// before a reopen put records with a key naming a library into a root-only file).
/// `/dev/stdout` and links an operator made are root's.
fn open_append(path: &Path) -> io::Result<File> {
    let open = |follow: bool| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(LOG_FILE_MODE)
            .custom_flags(if follow { 0 } else { libc::O_NOFOLLOW })
            .open(path)
    };
    match open(false) {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            let owner = fs::symlink_metadata(path)?.uid();
            // SAFETY: geteuid has no preconditions.
            if owner == 0 || owner == unsafe { libc::geteuid() } {
                open(true)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "it is a symbolic link owned by uid {owner}, not root: refused, since \
                         its owner could point it at any file root may write"
                    ),
                ))
            }
        }
        opened => opened,
    }
}

/// Open (create 0640, append) the live file at `path`, whose directory must exist. `previous` is
/// the file being replaced: if the path still names it, its content keeps its start time.
fn open_live(
    path: &Path,
    now: NaiveDateTime,
    previous: Option<&LiveFile>,
) -> Result<LiveFile, SinkError> {
    require_directory(path)?;
    let file = open_append(path).map_err(|e| SinkError {
        message: format!("cannot open audit log {}: {e}", path.display()),
        retryable: is_transient(&e),
    })?;
    let meta = file.metadata().map_err(|e| SinkError {
        message: format!("cannot stat audit log {}: {e}", path.display()),
        retryable: true,
    })?;
    let content_since = match previous {
        Some(prev) if prev.dev == meta.dev() && prev.ino == meta.ino() => prev.content_since,
        // Content from before a restart: its last change bounds its start from above, which
        // keeps rolled names in order and lets a file from an earlier cycle roll at once.
        _ if meta.len() > 0 => meta
            .modified()
            .map(|mtime| DateTime::<Local>::from(mtime).naive_local().min(now))
            .unwrap_or(now),
        _ => now,
    };
    let file = Arc::new(file);
    let regular = meta.file_type().is_file();
    Ok(LiveFile {
        behind: DropBehind::new(regular.then(|| file.clone()), meta.len()),
        file,
        dev: meta.dev(),
        ino: meta.ino(),
        regular,
        content_since,
    })
}

fn require_directory(path: &Path) -> Result<(), SinkError> {
    let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) else {
        return Ok(());
    };
    let problem = match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => "is not a directory".to_string(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => "does not exist".to_string(),
        Err(e) => format!("cannot be read: {e}"),
    };
    Err(SinkError {
        message: format!("audit log directory {} {problem}", dir.display()),
        retryable: false,
    })
}

/// Whether `path` still names the open file (not moved away, deleted or replaced).
fn path_names(path: &Path, live: &LiveFile) -> bool {
    match fs::metadata(path) {
        Ok(meta) => meta.dev() == live.dev && meta.ino() == live.ino,
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}

/// "1 failed attempt", "2 failed attempts", for stderr messages.
fn failed_attempts(count: u64) -> String {
    let plural = if count == 1 { "" } else { "s" };
    format!("{count} failed attempt{plural}")
}

/// Errors that can go away by themselves (space, descriptors, memory, a flaky device).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOSPC
                | libc::EDQUOT
                | libc::EIO
                | libc::EAGAIN
                | libc::EINTR
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOMEM
                | libc::EBUSY
                | libc::ETIMEDOUT
                | libc::ESTALE
        )
    )
}

/// Make a rename in `dir` durable; best effort, the data itself is already synced.
fn sync_directory(dir: &Path) {
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}

/// Append `data` with as many write(2) calls as it takes. On failure also says how many bytes
/// reached the file. `free_space`, when given, stands in for the disk's free space (tests).
fn append_all(
    mut file: &File,
    data: &[u8],
    mut free_space: Option<&mut u64>,
) -> Result<(), (io::Error, usize)> {
    let mut written = 0;
    while written < data.len() {
        let mut chunk = &data[written..];
        if let Some(free) = free_space.as_deref_mut() {
            if *free == 0 {
                return Err((io::Error::from_raw_os_error(libc::ENOSPC), written));
            }
            chunk = &chunk[..chunk
                .len()
                .min(usize::try_from(*free).unwrap_or(usize::MAX))];
        }
        match file.write(chunk) {
            Ok(0) => return Err((io::ErrorKind::WriteZero.into(), written)),
            Ok(n) => {
                written += n;
                if let Some(free) = free_space.as_deref_mut() {
                    *free = free.saturating_sub(n as u64);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((e, written)),
        }
    }
    Ok(())
}

/// Names of the rolled files of one live file: `<stem>-YYYYMMDD-HHMMSS-NNNN[.<ext>]` beside it,
/// so that name order is time order. Names of earlier versions,
/// `<stem>-YYYYMMDD-HHMMSS[-N][.<ext>]` (counter 0 for none), are recognised too: retention still
/// finds and orders them.
#[derive(Clone, Debug)]
struct RollNaming {
    dir: PathBuf,
    /// `<stem>-`
    prefix: Vec<u8>,
    /// `.<ext>`, or empty when the live file has no extension.
    suffix: Vec<u8>,
    /// The last name handed out: an `archive_command` may have moved every file of that second
    /// away, and the next one must still not reuse a name (the archive would overwrite it).
    last_rolled: Option<RollKey>,
}

/// Order of rolled files: when their content began, then the same-second counter.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RollKey {
    stamp: Vec<u8>,
    counter: u32,
}

#[derive(Clone, Debug)]
struct RolledFile {
    key: RollKey,
    path: PathBuf,
    size: u64,
}

impl RollNaming {
    fn for_live(path: &Path) -> Self {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = Path::new(path.file_name().unwrap_or(OsStr::new("audit")));
        let stem = file_name.file_stem().unwrap_or(file_name.as_os_str());
        let mut prefix = stem.as_bytes().to_vec();
        prefix.push(b'-');
        let suffix = match file_name.extension() {
            Some(ext) => [b".", ext.as_bytes()].concat(),
            None => Vec::new(),
        };
        RollNaming {
            dir,
            prefix,
            suffix,
            last_rolled: None,
        }
    }

    fn path_for(&self, stamp: &[u8], counter: u32) -> PathBuf {
        let mut name = self.prefix.clone();
        name.extend_from_slice(stamp);
        name.extend_from_slice(format!("-{counter:0COUNTER_WIDTH$}").as_bytes());
        name.extend_from_slice(&self.suffix);
        self.dir.join(OsString::from_vec(name))
    }

    /// The position of a file named `name` among the rolled files, if it is one.
    fn parse(&self, name: &[u8]) -> Option<RollKey> {
        let middle = name
            .strip_prefix(self.prefix.as_slice())?
            .strip_suffix(self.suffix.as_slice())?;
        if middle.len() < STAMP_LEN {
            return None;
        }
        let (stamp, rest) = middle.split_at(STAMP_LEN);
        let stamp_ok = stamp.iter().enumerate().all(|(i, &b)| {
            if i == 8 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
        if !stamp_ok {
            return None;
        }
        let counter = if rest.is_empty() {
            // Written by an earlier version for the first file of a second.
            0
        } else {
            let digits = std::str::from_utf8(rest.strip_prefix(b"-")?).ok()?;
            if !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let counter: u32 = digits.parse().ok()?;
            // Only the spelling we write (`-0001`) or an earlier version wrote (`-1`), so that no
            // two names of one second share a counter.
            let ours = digits == format!("{counter:0COUNTER_WIDTH$}");
            let earlier = digits == counter.to_string();
            if counter == 0 || !(ours || earlier) {
                return None;
            }
            counter
        };
        Some(RollKey {
            stamp: stamp.to_vec(),
            counter,
        })
    }

    /// The rolled files on disk (regular files only), oldest first.
    fn scan(&self) -> io::Result<Vec<RolledFile>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(key) = self.parse(entry.file_name().as_bytes()) else {
                continue;
            };
            // symlink_metadata: a link that merely looks like a rolled file is not ours to delete.
            match entry.path().symlink_metadata() {
                Ok(meta) if meta.is_file() => files.push(RolledFile {
                    key,
                    path: self.dir.join(entry.file_name()),
                    size: meta.len(),
                }),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        files.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(files)
    }

    /// A free name for a file whose content began at `stamp`, ordered after every rolled file of
    /// the same second still on disk (not merely the first free one: retention may have deleted
    /// the oldest of that second) and after the last one this sink named (an archive command may
    /// have moved them all away). Counters start at 1.
    fn unused_name(&mut self, stamp: &str) -> io::Result<PathBuf> {
        let stamp = stamp.as_bytes();
        let named = self
            .last_rolled
            .as_ref()
            .filter(|last| last.stamp == stamp)
            .map_or(0, |last| last.counter);
        let mut counter = self
            .scan()?
            .iter()
            .filter(|file| file.key.stamp == stamp)
            .map(|file| file.key.counter)
            .max()
            .unwrap_or(0)
            .max(named)
            + 1;
        loop {
            let path = self.path_for(stamp, counter);
            match path.symlink_metadata() {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    self.last_rolled = Some(RollKey {
                        stamp: stamp.to_vec(),
                        counter,
                    });
                    return Ok(path);
                }
                Err(e) => return Err(e),
                Ok(_) => counter += 1,
            }
        }
    }
}

/// `audit.archive_command` split into arguments, each still holding its `%path` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ArchiveCommand {
    args: Vec<String>,
}

impl ArchiveCommand {
    const PLACEHOLDER: &str = "%path";

    /// `None` for no command (unset, empty or blank).
    fn from_option(command: Option<&str>) -> Result<Option<Self>, SinkError> {
        match command {
            Some(command) if !command.trim().is_empty() => Self::parse(command).map(Some),
            _ => Ok(None),
        }
    }

    /// Split on whitespace; double quotes group words (and are removed), nothing else is special.
    fn parse(command: &str) -> Result<Self, SinkError> {
        let mut args = Vec::new();
        let mut current = String::new();
        let mut in_word = false;
        let mut in_quotes = false;
        for c in command.chars() {
            match c {
                '"' => {
                    in_quotes = !in_quotes;
                    in_word = true;
                }
                c if c.is_whitespace() && !in_quotes => {
                    if in_word {
                        args.push(std::mem::take(&mut current));
                        in_word = false;
                    }
                }
                c => {
                    current.push(c);
                    in_word = true;
                }
            }
        }
        if in_quotes {
            return Err(SinkError {
                message: format!("audit.archive_command has an unclosed double quote: {command}"),
                retryable: false,
            });
        }
        if in_word {
            args.push(current);
        }
        if args.is_empty() {
            return Err(SinkError {
                message: "audit.archive_command is empty".to_string(),
                retryable: false,
            });
        }
        Ok(ArchiveCommand { args })
    }

    /// The program and arguments for one rolled file.
    fn argv(&self, path: &Path) -> Vec<OsString> {
        self.args
            .iter()
            .map(|arg| {
                let mut out = OsString::new();
                for (i, piece) in arg.split(Self::PLACEHOLDER).enumerate() {
                    if i > 0 {
                        out.push(path.as_os_str());
                    }
                    out.push(piece);
                }
                out
            })
            .collect()
    }
}

impl fmt::Display for ArchiveCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.args.join(" "))
    }
}

/// Runs the archive command on rolled files in one background thread, one file at a time, so a
/// slow or retrying command never holds up writing.
struct Archiver {
    shared: Arc<ArchiveShared>,
    worker: Option<JoinHandle<()>>,
}

struct ArchiveShared {
    state: Mutex<ArchiveState>,
    /// Signals new jobs and `stop` to the worker.
    wake: Condvar,
}

/// What the sink and the worker share. Archived state lives only in memory: after a restart,
/// rolled files still on disk are archived again (as Cassandra's archiver does).
#[derive(Default)]
struct ArchiveState {
    queue: VecDeque<ArchiveJob>,
    in_flight: Option<PathBuf>,
    archived: HashSet<PathBuf>,
    /// Failed after every retry; not tried again until the command changes.
    given_up: HashSet<PathBuf>,
    failures: u64,
    last_error: Option<String>,
    stop: bool,
}

struct ArchiveJob {
    path: PathBuf,
    command: ArchiveCommand,
    max_retries: u32,
}

enum ArchiveOutcome {
    Archived,
    Failed(String),
    /// The file disappeared before (or while) it was archived: someone else dealt with it.
    Vanished,
    Stopped,
}

impl Archiver {
    fn new() -> Self {
        Archiver {
            shared: Arc::new(ArchiveShared {
                state: Mutex::new(ArchiveState::default()),
                wake: Condvar::new(),
            }),
            worker: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, ArchiveState> {
        self.shared.lock()
    }

    /// Queue each of `rolled` that is not archived, queued, running or given up; forget state
    /// about files that are gone.
    fn submit(
        &mut self,
        rolled: &[RolledFile],
        command: &ArchiveCommand,
        max_retries: u32,
    ) -> Result<(), SinkError> {
        {
            let mut state = self.lock();
            let present: HashSet<&Path> = rolled.iter().map(|file| file.path.as_path()).collect();
            state
                .archived
                .retain(|path| present.contains(path.as_path()));
            state
                .given_up
                .retain(|path| present.contains(path.as_path()));
            for file in rolled {
                let known = state.archived.contains(&file.path)
                    || state.given_up.contains(&file.path)
                    || state.in_flight.as_ref() == Some(&file.path)
                    || state.queue.iter().any(|job| job.path == file.path);
                if !known {
                    state.queue.push_back(ArchiveJob {
                        path: file.path.clone(),
                        command: command.clone(),
                        max_retries,
                    });
                }
            }
        }
        self.shared.wake.notify_all();
        self.ensure_worker_if_queued()
    }

    /// Drop queued jobs and give up-ed files (the command changed or was removed).
    fn forget_pending(&self) {
        let mut state = self.lock();
        state.queue.clear();
        state.given_up.clear();
    }

    /// Start the worker if there is work and none runs (never started, or it died).
    fn ensure_worker_if_queued(&mut self) -> Result<(), SinkError> {
        if self.lock().queue.is_empty() || self.worker.as_ref().is_some_and(|w| !w.is_finished()) {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        let worker = thread::Builder::new()
            .name("audit-archive".to_string())
            .spawn(move || archive_worker(&shared))
            .map_err(|e| SinkError {
                message: format!("cannot start the archive thread: {e}"),
                retryable: true,
            })?;
        self.worker = Some(worker);
        Ok(())
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        // Not joined: a running archive command may take long. The worker ends after it.
        self.lock().stop = true;
        self.shared.wake.notify_all();
    }
}

impl ArchiveShared {
    fn lock(&self) -> MutexGuard<'_, ArchiveState> {
        // The state stays consistent at every unlock, so a panic elsewhere does not spoil it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleep for `delay` unless stopped first; true when stopped.
    fn sleep_unless_stopped(&self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        let mut state = self.lock();
        loop {
            if state.stop {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .wake
                .wait_timeout(state, left)
                .map(|(state, _)| state)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }
}

fn archive_worker(shared: &ArchiveShared) {
    loop {
        let job = {
            let mut state = shared.lock();
            loop {
                if state.stop {
                    return;
                }
                if let Some(job) = state.queue.pop_front() {
                    state.in_flight = Some(job.path.clone());
                    break job;
                }
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let outcome = archive_with_retries(shared, &job);
        if let ArchiveOutcome::Failed(message) = &outcome {
            // INFO does not show archive failures: without this line, nothing would ever say
            // that the file missed its archive. Printed before locking, as stderr may block.
            eprintln!(
                "auditor: giving up archiving {} after {} (the file is kept): {message}",
                job.path.display(),
                failed_attempts(u64::from(job.max_retries) + 1)
            );
        }
        let mut state = shared.lock();
        state.in_flight = None;
        match outcome {
            ArchiveOutcome::Archived => {
                state.archived.insert(job.path);
            }
            ArchiveOutcome::Failed(message) => {
                state.failures += 1;
                state.last_error = Some(message);
                state.given_up.insert(job.path);
            }
            ArchiveOutcome::Vanished | ArchiveOutcome::Stopped => {}
        }
    }
}

fn archive_with_retries(shared: &ArchiveShared, job: &ArchiveJob) -> ArchiveOutcome {
    let mut delay = ARCHIVE_FIRST_BACKOFF;
    let mut attempt = 0;
    loop {
        if !job.path.exists() {
            return ArchiveOutcome::Vanished;
        }
        let message = match run_archive_command(&job.command, &job.path) {
            Ok(()) => return ArchiveOutcome::Archived,
            Err(message) => message,
        };
        if attempt >= job.max_retries {
            return ArchiveOutcome::Failed(message);
        }
        attempt += 1;
        if shared.sleep_unless_stopped(delay) {
            return ArchiveOutcome::Stopped;
        }
        delay = (delay * 2).min(ARCHIVE_MAX_BACKOFF);
    }
}

fn run_archive_command(command: &ArchiveCommand, path: &Path) -> Result<(), String> {
    let argv = command.argv(path);
    let Some((program, args)) = argv.split_first() else {
        return Err("audit.archive_command is empty".to_string());
    };
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            format!(
                "cannot run archive command {command} on {}: {e}",
                path.display()
            )
        })?;
    if output.status.success() {
        return Ok(());
    }
    // One line, so that the message stays one line on the daemon's stderr.
    let stderr = String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    let tail_start = stderr
        .char_indices()
        .rev()
        .nth(ARCHIVE_STDERR_TAIL)
        .map_or(0, |(i, _)| i);
    let mut message = format!(
        "archive command {command} failed on {} ({})",
        path.display(),
        output.status
    );
    if !stderr.is_empty() {
        message.push_str(": ");
        message.push_str(&stderr[tail_start..]);
    }
    Err(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A fresh directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let unique = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("filesink-{name}-{}-{unique}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("create temp dir");
            TempDir(dir)
        }

        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_log_path_that_is_another_users_symlink_is_refused() {
        let dir = TempDir::new("symlink");
        let target = dir.join("root-only");
        fs::write(&target, b"").unwrap();
        let link = dir.join("audit.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        // Ours (or root's): followed, as /dev/stdout is.
        assert!(open_append(&link).is_ok());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // (Only root can give the link to another user.)
        }
        let c = std::ffi::CString::new(link.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; lchown changes the link itself.
        assert_eq!(unsafe { libc::lchown(c.as_ptr(), 65534, 65534) }, 0);
        let err = open_append(&link).unwrap_err();
        assert!(
            err.to_string().contains("symbolic link owned by uid 65534"),
            "{err}"
        );
        assert_eq!(fs::read(&target).unwrap(), b"");
        // A plain file is opened as before.
        assert!(open_append(&dir.join("plain.log")).is_ok());
    }

    /// A clock the test moves by hand.
    #[derive(Clone)]
    struct ManualClock(Arc<Mutex<NaiveDateTime>>);

    impl ManualClock {
        fn at(h: u32, m: u32, s: u32) -> Self {
            ManualClock(Arc::new(Mutex::new(time(h, m, s))))
        }

        fn set(&self, h: u32, m: u32, s: u32) {
            self.set_time(time(h, m, s));
        }

        fn set_time(&self, t: NaiveDateTime) {
            *self.0.lock().expect("clock") = t;
        }

        fn boxed(&self) -> Clock {
            let now = Arc::clone(&self.0);
            Box::new(move || *now.lock().expect("clock"))
        }
    }

    fn time(h: u32, m: u32, s: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(2026, 11, 22)
            .and_then(|d| d.and_hms_opt(h, m, s))
            .expect("valid time")
    }

    fn line(n: usize, width: usize) -> Vec<u8> {
        let mut l = format!("record {n:04} ").into_bytes();
        l.resize(width - 1, b'x');
        l.push(b'\n');
        l
    }

    fn write(sink: &mut FileSink, data: &[u8]) {
        sink.write_batch(data, crate::sink::count_lines(data))
            .expect("write batch");
    }

    fn read(path: &Path) -> String {
        fs::read_to_string(path).expect("read file")
    }

    /// The record numbers in the files, in order.
    fn numbers(paths: &[PathBuf]) -> Vec<usize> {
        paths
            .iter()
            .flat_map(|p| {
                read(p)
                    .lines()
                    .map(|l| l[7..11].parse::<usize>().expect("record number"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn file_names(paths: &[PathBuf]) -> Vec<String> {
        paths
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn parses_options_case_insensitively() {
        assert_eq!("HOURLY".parse::<RollCycle>(), Ok(RollCycle::Hourly));
        assert_eq!("never".parse::<RollCycle>(), Ok(RollCycle::Never));
        assert_eq!("Always".parse::<FsyncPolicy>(), Ok(FsyncPolicy::Always));
        for cycle in [
            RollCycle::Never,
            RollCycle::Minutely,
            RollCycle::Hourly,
            RollCycle::Daily,
        ] {
            assert_eq!(cycle.as_str().parse::<RollCycle>(), Ok(cycle));
        }
        for policy in [FsyncPolicy::No, FsyncPolicy::Everysec, FsyncPolicy::Always] {
            assert_eq!(policy.as_str().parse::<FsyncPolicy>(), Ok(policy));
        }
        let error = "weekly".parse::<RollCycle>().expect_err("weekly");
        assert_eq!(
            error.to_string(),
            "invalid audit.roll_cycle \"weekly\" (expected never, minutely, hourly or daily)"
        );
        assert!("sometimes".parse::<FsyncPolicy>().is_err());
        assert_eq!(FileOptions::new("/x").fsync, FsyncPolicy::Everysec);
        assert_eq!(FileOptions::new("/x").max_archive_retries, 10);
    }

    #[test]
    fn cycle_start_truncates_local_time() {
        let t = time(14, 31, 42);
        assert_eq!(RollCycle::Never.cycle_start(t), None);
        assert_eq!(RollCycle::Minutely.cycle_start(t), Some(time(14, 31, 0)));
        assert_eq!(RollCycle::Hourly.cycle_start(t), Some(time(14, 0, 0)));
        assert_eq!(RollCycle::Daily.cycle_start(t), Some(time(0, 0, 0)));
    }

    #[test]
    fn missing_directory_is_a_clear_permanent_error() {
        let dir = TempDir::new("missing");
        let missing = dir.join("nope");
        let error = FileSink::open(FileOptions::new(missing.join("audit.log")))
            .err()
            .expect("open must fail");
        assert_eq!(
            error.message,
            format!("audit log directory {} does not exist", missing.display())
        );
        assert!(!error.retryable);
    }

    #[test]
    fn creates_append_only_file_with_mode_0640() {
        let dir = TempDir::new("create");
        let path = dir.join("audit.log");
        fs::write(&path, "old\n").expect("seed");
        let mut sink = FileSink::open(FileOptions::new(&path)).expect("open");
        write(&mut sink, b"new\n");
        assert_eq!(read(&path), "old\nnew\n");
        assert_eq!(sink.status(), SinkStatus::Connected);
        assert_eq!(sink.kind(), "file");
        assert_eq!(sink.take_loss(), SinkLoss::default());

        let fresh = dir.join("fresh.log");
        let _sink = FileSink::open(FileOptions::new(&fresh)).expect("open");
        let mode = fs::metadata(&fresh).expect("stat").permissions().mode() & 0o777;
        // The umask may only take bits away.
        assert_eq!(mode & !0o640, 0, "mode {mode:o}");
    }

    #[test]
    fn size_roll_keeps_batches_whole_and_names_sorted() {
        let dir = TempDir::new("size");
        let path = dir.join("audit.log");
        let mut opts = FileOptions::new(&path);
        opts.max_file_size = 100;
        let mut sink = FileSink::open(opts).expect("open");
        for n in 0..10 {
            write(&mut sink, &line(n, 40));
        }
        // One batch larger than the limit goes whole into a fresh file.
        let big = [line(10, 40), line(11, 40), line(12, 40)].concat();
        write(&mut sink, &big);
        write(&mut sink, &line(13, 40));

        let rolled = sink.rolled_files();
        // 2 lines per file: 0-1, 2-3, 4-5, 6-7, 8-9, then the big batch alone, 13 live.
        assert_eq!(rolled.len(), 6, "{rolled:?}");
        let sizes: Vec<u64> = rolled
            .iter()
            .map(|p| fs::metadata(p).expect("stat").len())
            .collect();
        assert_eq!(sizes, [80, 80, 80, 80, 80, 120]);
        let mut all = rolled.clone();
        all.push(path.clone());
        assert_eq!(numbers(&all), (0..14).collect::<Vec<_>>());
        assert_eq!(read(&path), String::from_utf8(line(13, 40)).expect("utf8"));

        // Every name follows the pattern; those of one second carry increasing counters.
        let names = file_names(&rolled);
        let naming = RollNaming::for_live(&path);
        let keys: Vec<RollKey> = names
            .iter()
            .map(|n| naming.parse(n.as_bytes()).expect("rolled name"))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        assert!(names[0].starts_with("audit-") && names[0].ends_with(".log"));
        assert_eq!(sink.write_errors(), 0);
    }

    #[test]
    fn time_roll_at_cycle_boundary_only_when_not_empty() {
        let dir = TempDir::new("time");
        let path = dir.join("audit.log");
        let clock = ManualClock::at(14, 29, 50);
        let mut opts = FileOptions::new(&path);
        opts.roll_cycle = RollCycle::Minutely;
        let mut sink = FileSink::open_with_clock(opts, clock.boxed()).expect("open");

        // Empty at the boundary: no roll, the file starts over in the new minute.
        clock.set(14, 30, 0);
        sink.tick().expect("tick");
        assert!(sink.rolled_files().is_empty());

        clock.set(14, 30, 10);
        write(&mut sink, &line(0, 20));
        clock.set(14, 30, 59);
        sink.tick().expect("tick");
        assert!(sink.rolled_files().is_empty());

        clock.set(14, 31, 0);
        sink.tick().expect("tick");
        assert_eq!(
            file_names(&sink.rolled_files()),
            ["audit-20261122-143000-0001.log"]
        );
        assert_eq!(read(&path), "");

        // A write after the boundary rolls first as well.
        write(&mut sink, &line(1, 20));
        clock.set(16, 5, 0);
        write(&mut sink, &line(2, 20));
        let rolled = sink.rolled_files();
        assert_eq!(
            file_names(&rolled),
            [
                "audit-20261122-143000-0001.log",
                "audit-20261122-143100-0001.log"
            ]
        );
        assert_eq!(numbers(&rolled), [0, 1]);
        assert_eq!(numbers(std::slice::from_ref(&path)), [2]);

        // Changing the cycle applies at once.
        let mut opts = sink.options().clone();
        opts.roll_cycle = RollCycle::Daily;
        sink.reconfigure(opts).expect("reconfigure");
        clock.set(23, 59, 59);
        sink.tick().expect("tick");
        assert_eq!(sink.rolled_files().len(), 2);
        clock.set_time(time(0, 0, 1) + chrono::Duration::days(1));
        sink.tick().expect("tick");
        assert_eq!(sink.rolled_files().len(), 3);
    }

    #[test]
    fn rolled_names_without_extension_and_in_order_after_deletion() {
        let dir = TempDir::new("names");
        let naming = RollNaming::for_live(&dir.join("audit"));
        assert_eq!(
            naming.path_for(b"20261122-143000", 1),
            dir.join("audit-20261122-143000-0001")
        );
        assert_eq!(
            naming.path_for(b"20261122-143000", 12),
            dir.join("audit-20261122-143000-0012")
        );
        assert!(naming.parse(b"audit-20261122-143000.gz").is_none());
        assert!(naming.parse(b"audit-20261122-143000-0").is_none());
        assert!(naming.parse(b"audit-20261122-143000-0000").is_none());
        assert!(naming.parse(b"audit-20261122-143000-01").is_none());
        assert!(naming.parse(b"audit-20261122-143000-").is_none());
        assert!(naming.parse(b"audit").is_none());

        let mut naming = RollNaming::for_live(&dir.join("audit.log"));
        assert!(naming.parse(b"audit-20261122-143000-0001.log.gz").is_none());
        assert!(naming.parse(b"other-20261122-143000-0001.log").is_none());
        assert!(naming.parse(b"audit-2026112x-143000-0001.log").is_none());
        assert!(
            naming
                .parse(b"audit-6379-20261122-143000-0001.log")
                .is_none()
        );
        assert!(
            naming.parse(b"audit-20261122-143000-0002.log")
                > naming.parse(b"audit-20261122-143000-0001.log")
        );
        // Names of earlier versions (none, then -1, -2, ... within a second) are still ours, in
        // the order they were rolled, and before ours of a later second.
        let old = |name: &[u8]| naming.parse(name).expect("earlier version's name");
        assert!(old(b"audit-20261122-143000.log") < old(b"audit-20261122-143000-1.log"));
        assert!(old(b"audit-20261122-143000-2.log") < old(b"audit-20261122-143000-10.log"));
        assert!(old(b"audit-20261122-143000-10.log") < old(b"audit-20261122-143001-0001.log"));

        // The first name of the second was deleted by retention, -0002 is still there: the next
        // file must come after it, not take the free name.
        fs::write(dir.join("audit-20261122-143000-0002.log"), "x").expect("seed");
        assert_eq!(
            naming.unused_name("20261122-143000").expect("name"),
            dir.join("audit-20261122-143000-0003.log")
        );
        assert_eq!(
            naming.unused_name("20261122-143001").expect("name"),
            dir.join("audit-20261122-143001-0001.log")
        );
        // After a file an earlier version rolled in the same second, too.
        fs::write(dir.join("audit-20261122-143002.log"), "x").expect("seed");
        assert_eq!(
            naming.unused_name("20261122-143002").expect("name"),
            dir.join("audit-20261122-143002-0001.log")
        );
        fs::write(dir.join("audit-20261122-143003-7.log"), "x").expect("seed");
        assert_eq!(
            naming.unused_name("20261122-143003").expect("name"),
            dir.join("audit-20261122-143003-0008.log")
        );
    }

    #[test]
    fn a_name_is_not_handed_out_twice_after_an_archive_moved_the_files_away() {
        let dir = TempDir::new("roll-archived");
        let mut naming = RollNaming::for_live(&dir.join("audit.log"));
        let first = naming.unused_name("20261206-220325").expect("name");
        fs::write(&first, "x").expect("roll");
        let second = naming.unused_name("20261206-220325").expect("name");
        assert_eq!(second, dir.join("audit-20261206-220325-0002.log"));
        // The archive command moved both away: the next file of that second is still a new name.
        fs::remove_file(&first).expect("archived");
        let third = naming.unused_name("20261206-220325").expect("name");
        assert_eq!(third, dir.join("audit-20261206-220325-0003.log"));
        assert_eq!(
            naming.unused_name("20261206-220326").expect("name"),
            dir.join("audit-20261206-220326-0001.log")
        );
    }

    #[test]
    fn many_rolls_in_one_second_sort_by_name_in_roll_order() {
        let dir = TempDir::new("name-order");
        let path = dir.join("audit.log");
        let clock = ManualClock::at(14, 30, 0);
        let mut opts = FileOptions::new(&path);
        opts.max_file_size = 20;
        let mut sink = FileSink::open_with_clock(opts, clock.boxed()).expect("open");
        // Every line fills a file: each write rolls the one before, all within 14:30:00.
        for n in 0..13 {
            write(&mut sink, &line(n, 20));
        }
        let rolled = sink.rolled_files();
        assert_eq!(numbers(&rolled), (0..12).collect::<Vec<_>>());
        let mut by_name = file_names(&rolled);
        by_name.sort();
        assert_eq!(by_name, file_names(&rolled));
        assert_eq!(by_name[0], "audit-20261122-143000-0001.log");
        assert_eq!(by_name[11], "audit-20261122-143000-0012.log");
        // The live file sorts after its rolled files.
        assert!(by_name.iter().all(|name| name.as_str() < "audit.log"));

        // Retention deletes in that same order, oldest first.
        let mut opts = sink.options().clone();
        opts.max_log_size = 60;
        sink.reconfigure(opts).expect("reconfigure");
        assert_eq!(numbers(&sink.rolled_files()), [9, 10, 11]);
    }

    #[test]
    fn retention_deletes_oldest_rolled_files_beyond_total_size() {
        let dir = TempDir::new("retention");
        let path = dir.join("audit.log");
        // Not ours: never deleted even though it looks similar.
        let foreign = dir.join("audit-20000101-000000.log.gz");
        fs::write(&foreign, vec![b'x'; 1000]).expect("seed");
        let mut opts = FileOptions::new(&path);
        opts.max_file_size = 100;
        opts.max_log_size = 250;
        let mut sink = FileSink::open(opts).expect("open");
        for n in 0..20 {
            write(&mut sink, &line(n, 50));
        }
        let rolled = sink.rolled_files();
        let total: u64 = rolled
            .iter()
            .map(|p| fs::metadata(p).expect("stat").len())
            .sum();
        assert!(total <= 250, "total {total}");
        // The newest are kept, contiguous with the live file.
        let mut all = rolled.clone();
        all.push(path.clone());
        assert_eq!(numbers(&all), (14..20).collect::<Vec<_>>());
        assert!(foreign.exists());

        // Lowering the limit applies at once.
        let mut opts = sink.options().clone();
        opts.max_log_size = 100;
        sink.reconfigure(opts).expect("reconfigure");
        assert_eq!(sink.rolled_files().len(), 1);
    }

    #[test]
    fn archive_command_runs_on_rolled_files_and_nothing_is_deleted() {
        let dir = TempDir::new("archive");
        let dest = dir.join("archive");
        fs::create_dir(&dest).expect("mkdir");
        let path = dir.join("audit.log");
        let mut opts = FileOptions::new(&path);
        opts.max_file_size = 50;
        opts.max_log_size = 1; // ignored while archiving
        opts.archive_command = Some(format!("/bin/cp %path \"{}/\"", dest.display()));
        let mut sink = FileSink::open(opts).expect("open");
        for n in 0..4 {
            write(&mut sink, &line(n, 50));
        }
        let rolled = sink.rolled_files();
        assert_eq!(rolled.len(), 3);
        wait_until("archiving", || {
            sink.tick().is_ok()
                && sink.archive_idle()
                && fs::read_dir(&dest).map_or(0, Iterator::count) == 3
        });
        for file in &rolled {
            let copy = dest.join(file.file_name().expect("name"));
            assert_eq!(read(&copy), read(file));
        }
        assert_eq!(sink.rolled_files(), rolled);
        assert_eq!(sink.archive_failures(), 0);
    }

    #[test]
    fn archive_command_failing_once_succeeds_on_retry() {
        let dir = TempDir::new("archive-retry");
        let dest = dir.join("archive");
        fs::create_dir(&dest).expect("mkdir");
        let marker = dir.join("failed-once");
        let script = dir.join("archive.sh");
        fs::write(
            &script,
            format!(
                "#!/bin/sh\nif [ ! -e '{marker}' ]; then touch '{marker}'; echo busy >&2; exit 1; fi\nexec cp \"$1\" '{dest}/'\n",
                marker = marker.display(),
                dest = dest.display()
            ),
        )
        .expect("script");
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");

        let path = dir.join("audit.log");
        let mut opts = FileOptions::new(&path);
        opts.max_file_size = 50;
        opts.max_archive_retries = 3;
        opts.archive_command = Some(format!("{} %path", script.display()));
        let mut sink = FileSink::open(opts).expect("open");
        write(&mut sink, &line(0, 50));
        write(&mut sink, &line(1, 50));
        let rolled = sink.rolled_files();
        assert_eq!(rolled.len(), 1);
        let copy = dest.join(rolled[0].file_name().expect("name"));
        wait_until("archive retry", || copy.exists() && sink.archive_idle());
        assert!(marker.exists());
        assert_eq!(sink.archive_failures(), 0);
        assert_eq!(read(&copy), read(&rolled[0]));
    }

    #[test]
    fn archive_command_giving_up_is_counted() {
        let dir = TempDir::new("archive-fail");
        let path = dir.join("audit.log");
        let mut opts = FileOptions::new(&path);
        opts.max_file_size = 50;
        opts.max_archive_retries = 1;
        opts.archive_command = Some("/bin/false %path".to_string());
        let mut sink = FileSink::open(opts).expect("open");
        write(&mut sink, &line(0, 50));
        write(&mut sink, &line(1, 50));
        wait_until("giving up", || sink.archive_failures() == 1);
        assert!(
            sink.last_archive_error()
                .is_some_and(|e| e.contains("/bin/false"))
        );
        assert_eq!(sink.rolled_files().len(), 1);
    }

    #[test]
    fn archive_command_that_cannot_run_names_the_file() {
        let dir = TempDir::new("archive-missing");
        let path = dir.join("audit.log");
        let mut opts = FileOptions::new(&path);
        opts.max_file_size = 50;
        opts.max_archive_retries = 0;
        opts.archive_command = Some(format!("{} %path", dir.join("no-such-program").display()));
        let mut sink = FileSink::open(opts).expect("open");
        write(&mut sink, &line(0, 50));
        write(&mut sink, &line(1, 50));
        wait_until("giving up", || sink.archive_failures() == 1);
        let rolled = sink.rolled_files();
        assert_eq!(rolled.len(), 1);
        let error = sink.last_archive_error().expect("archive error");
        assert!(
            error.contains("cannot run archive command")
                && error.contains(&rolled[0].display().to_string()),
            "{error}"
        );
    }

    #[test]
    fn archive_command_parsing() {
        let command =
            ArchiveCommand::parse("  /usr/bin/archive %path  \"--to dir/%path.gz\" \"\" ")
                .expect("parse");
        assert_eq!(
            command.args,
            ["/usr/bin/archive", "%path", "--to dir/%path.gz", ""]
        );
        assert_eq!(
            command.argv(Path::new("/l/a-1.log")),
            [
                "/usr/bin/archive",
                "/l/a-1.log",
                "--to dir//l/a-1.log.gz",
                ""
            ]
        );
        assert!(ArchiveCommand::parse("cp \"%path").is_err());
        assert_eq!(ArchiveCommand::from_option(Some("  ")).ok(), Some(None));
        assert_eq!(ArchiveCommand::from_option(None).ok(), Some(None));
    }

    #[test]
    fn reopen_after_rename_like_logrotate() {
        let dir = TempDir::new("reopen");
        let path = dir.join("audit.log");
        let moved = dir.join("audit.log.1");
        let mut sink = FileSink::open(FileOptions::new(&path)).expect("open");
        write(&mut sink, b"before\n");
        fs::rename(&path, &moved).expect("mv");
        // Until SIGHUP (or the next tick), writes go on into the moved file.
        write(&mut sink, b"late\n");
        sink.reopen().expect("reopen");
        write(&mut sink, b"after\n");
        assert_eq!(read(&moved), "before\nlate\n");
        assert_eq!(read(&path), "after\n");

        // Without SIGHUP, tick notices the move.
        let moved2 = dir.join("audit.log.2");
        fs::rename(&path, &moved2).expect("mv");
        sink.tick().expect("tick");
        write(&mut sink, b"again\n");
        assert_eq!(read(&moved2), "after\n");
        assert_eq!(read(&path), "again\n");

        // And a deleted file.
        fs::remove_file(&path).expect("rm");
        sink.tick().expect("tick");
        write(&mut sink, b"recreated\n");
        assert_eq!(read(&path), "recreated\n");
        assert_eq!(sink.status(), SinkStatus::Connected);
    }

    #[test]
    fn a_deleted_file_is_replaced_before_the_next_batch() {
        let dir = TempDir::new("unlinked");
        let path = dir.join("audit.log");
        let mut sink = FileSink::open(FileOptions::new(&path)).expect("open");
        write(&mut sink, b"before\n");
        fs::remove_file(&path).expect("rm");
        // No tick in between: the batch itself must not go into the deleted file.
        write(&mut sink, b"after\n");
        assert_eq!(read(&path), "after\n");
        assert_eq!(sink.status(), SinkStatus::Connected);
        assert_eq!(sink.write_errors(), 0);
        // Replaced by someone else's new file: that one is the log now.
        fs::remove_file(&path).expect("rm");
        fs::write(&path, "theirs\n").expect("recreate");
        write(&mut sink, b"again\n");
        assert_eq!(read(&path), "theirs\nagain\n");
    }

    #[test]
    fn a_deleted_directory_keeps_the_batch_until_it_is_back() {
        let dir = TempDir::new("unlinked-dir");
        let logs = dir.join("logs");
        fs::create_dir(&logs).expect("mkdir");
        let path = logs.join("audit.log");
        let mut sink = FileSink::open(FileOptions::new(&path)).expect("open");
        write(&mut sink, b"before\n");
        fs::remove_dir_all(&logs).expect("rm -rf");

        let error = sink.write_batch(b"kept\n", 1).expect_err("directory gone");
        assert!(
            error.message.contains("does not exist"),
            "{}",
            error.message
        );
        assert_eq!(sink.status(), SinkStatus::Error);
        // Ticks and retries while it is gone neither write anywhere nor recreate it.
        sink.tick().expect_err("tick");
        sink.write_batch(b"kept\n", 1).expect_err("still gone");
        assert!(!logs.exists());

        fs::create_dir(&logs).expect("mkdir again");
        sink.write_batch(b"kept\n", 1).expect("retry");
        assert_eq!(read(&path), "kept\n");
        assert_eq!(sink.status(), SinkStatus::Connected);
    }

    #[test]
    fn a_failing_roll_shows_until_rolling_works_or_is_not_needed() {
        let dir = TempDir::new("roll-fails");
        let path = dir.join("audit.log");
        let mut opts = FileOptions::new(&path);
        opts.max_file_size = 50;
        let mut sink = FileSink::open(opts).expect("open");
        write(&mut sink, &line(0, 50));
        // Rolled names pointing at a missing directory: every roll fails (as with a read-only
        // directory, which root, running these tests, could still write).
        let naming = std::mem::replace(
            &mut sink.naming,
            RollNaming::for_live(&dir.join("gone").join("audit.log")),
        );
        write(&mut sink, &line(1, 50));
        assert_eq!(sink.status(), SinkStatus::Error);
        assert!(
            sink.last_error().is_some_and(|e| e.contains("gone")),
            "{:?}",
            sink.last_error()
        );
        write(&mut sink, &line(2, 50));
        sink.tick().expect_err("tick rolls too");
        assert_eq!(sink.failed_rolls, 3);
        // Nothing lost meanwhile: the live file took every batch.
        assert_eq!(numbers(std::slice::from_ref(&path)), [0, 1, 2]);

        sink.naming = naming;
        write(&mut sink, &line(3, 50));
        assert_eq!(sink.status(), SinkStatus::Connected);
        assert_eq!(sink.failed_rolls, 0);
        assert_eq!(numbers(&sink.rolled_files()), [0, 1, 2]);
        assert_eq!(numbers(std::slice::from_ref(&path)), [3]);

        // A live file name too long for a rolled name never rolls (ENAMETOOLONG), until the
        // size limit is lifted.
        let long = dir.join(&format!("{}.log", "a".repeat(240)));
        let mut opts = FileOptions::new(&long);
        opts.max_file_size = 50;
        sink.reconfigure(opts).expect("reconfigure");
        write(&mut sink, &line(4, 50));
        write(&mut sink, &line(5, 50));
        assert_eq!(sink.status(), SinkStatus::Error);
        let mut opts = sink.options().clone();
        opts.max_file_size = 0;
        sink.reconfigure(opts).expect("no limit");
        write(&mut sink, &line(6, 50));
        assert_eq!(sink.status(), SinkStatus::Connected);
        assert_eq!(numbers(std::slice::from_ref(&long)), [4, 5, 6]);
    }

    #[test]
    fn reconfigure_moves_to_new_path_or_changes_nothing() {
        let dir = TempDir::new("reconfigure");
        let first = dir.join("first.log");
        let second = dir.join("second.log");
        let mut sink = FileSink::open(FileOptions::new(&first)).expect("open");
        write(&mut sink, b"one\n");

        let mut bad = FileOptions::new(dir.join("missing").join("x.log"));
        bad.max_file_size = 5;
        let error = sink.reconfigure(bad).expect_err("missing dir");
        assert!(error.message.contains("does not exist"));
        let mut bad_command = FileOptions::new(&second);
        bad_command.archive_command = Some("cp \"%path".to_string());
        assert!(sink.reconfigure(bad_command).is_err());
        assert_eq!(sink.options(), &FileOptions::new(&first));
        write(&mut sink, b"two\n");

        sink.reconfigure(FileOptions::new(&second))
            .expect("reconfigure");
        write(&mut sink, b"three\n");
        assert_eq!(read(&first), "one\ntwo\n");
        assert_eq!(read(&second), "three\n");

        // The same path again after a move reopens it (logrotate's postrotate CONFIG SET).
        let moved = dir.join("second.log.1");
        fs::rename(&second, &moved).expect("mv");
        sink.reconfigure(FileOptions::new(&second))
            .expect("reconfigure");
        write(&mut sink, b"four\n");
        assert_eq!(read(&moved), "three\n");
        assert_eq!(read(&second), "four\n");
    }

    #[test]
    fn everysec_syncs_on_the_helper_thread() {
        let dir = TempDir::new("bgsync");
        let path = dir.join("audit.log");
        let mut opts = FileOptions::new(&path);
        opts.fsync = FsyncPolicy::Everysec;
        let mut sink = FileSink::open(opts).expect("open");
        write(&mut sink, &line(1, 20));
        sink.last_sync -= EVERYSEC_INTERVAL;
        sink.flush(false).expect("flush");
        // Handed over: the sink does not wait for it.
        assert!(!sink.unsynced);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.background.busy() {
            assert!(
                Instant::now() < deadline,
                "the background sync never finished"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Its outcome is taken at the next flush.
        sink.flush(false).expect("flush");
        assert!(!sink.sync_failed);
        assert_eq!(sink.status(), SinkStatus::Connected);
        assert_eq!(read(&path), String::from_utf8(line(1, 20)).unwrap());
    }

    #[test]
    fn a_device_is_written_but_never_synced() {
        // fdatasync on a character device fails with EINVAL; a sink pointed at /dev/null (or at
        // a pipe, e.g. a container's stdout) must not report that as an error every second.
        for policy in [FsyncPolicy::Everysec, FsyncPolicy::Always] {
            let mut opts = FileOptions::new("/dev/null");
            opts.fsync = policy;
            let mut sink = FileSink::open(opts).expect("open /dev/null");
            write(&mut sink, &line(1, 20));
            sink.last_sync -= EVERYSEC_INTERVAL;
            sink.flush(false).expect("flush");
            sink.flush(true).expect("forced flush");
            assert_eq!(sink.status(), SinkStatus::Connected, "{policy}");
            assert_eq!(sink.write_errors(), 0, "{policy}");
        }
    }

    #[test]
    fn fsync_policies_do_not_error() {
        for policy in [FsyncPolicy::No, FsyncPolicy::Everysec, FsyncPolicy::Always] {
            let dir = TempDir::new(policy.as_str());
            let path = dir.join("audit.log");
            let mut opts = FileOptions::new(&path);
            opts.fsync = policy;
            opts.max_file_size = 30;
            let mut sink = FileSink::open(opts).expect("open");
            for n in 0..3 {
                write(&mut sink, &line(n, 20));
                sink.flush(false).expect("flush");
                sink.tick().expect("tick");
            }
            match policy {
                FsyncPolicy::No => assert!(sink.unsynced),
                FsyncPolicy::Always => assert!(!sink.unsynced),
                FsyncPolicy::Everysec => {}
            }
            if policy == FsyncPolicy::Everysec {
                sink.last_sync -= EVERYSEC_INTERVAL;
                sink.flush(false).expect("flush");
                assert!(!sink.unsynced);
                write(&mut sink, &line(3, 20));
            }
            sink.flush(true).expect("forced flush");
            assert!(!sink.unsynced);
            assert_eq!(sink.write_errors(), 0);
            let expected_rolls = if policy == FsyncPolicy::Everysec {
                3
            } else {
                2
            };
            assert_eq!(sink.rolled_files().len(), expected_rolls);
        }
    }

    #[test]
    fn full_disk_leaves_no_torn_line_and_the_retry_resumes() {
        let dir = TempDir::new("full");
        let path = dir.join("audit.log");
        let mut sink = FileSink::open(FileOptions::new(&path)).expect("open");
        write(&mut sink, &line(0, 20));

        // Room for one and a half of the next three lines.
        sink.simulated_free_space = Some(30);
        let batch = [line(1, 20), line(2, 20), line(3, 20)].concat();
        let error = sink.write_batch(&batch, 3).expect_err("disk full");
        assert!(error.retryable);
        assert!(
            error.message.contains("No space left on device"),
            "{}",
            error.message
        );
        assert_eq!(read(&path), String::from_utf8(line(0, 20)).expect("utf8"));
        assert_eq!(sink.status(), SinkStatus::Error);
        assert_eq!(sink.write_errors(), 1);
        // Ticks and flushes while full neither fail nor clear the error status.
        sink.tick().expect("tick");
        assert_eq!(sink.status(), SinkStatus::Error);

        // Space returns: the same batch goes in once, whole.
        sink.simulated_free_space = None;
        sink.write_batch(&batch, 3).expect("retry");
        assert_eq!(numbers(std::slice::from_ref(&path)), [0, 1, 2, 3]);
        assert_eq!(sink.status(), SinkStatus::Connected);
        assert_eq!(sink.write_errors(), 1);
    }

    #[test]
    fn a_cut_that_failed_blocks_writes_until_it_succeeds() {
        let dir = TempDir::new("torn");
        let path = dir.join("audit.log");
        let mut sink = FileSink::open(FileOptions::new(&path)).expect("open");
        write(&mut sink, b"whole\n");
        // As if the cut after a failed batch had failed too.
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"tor"))
            .expect("tear");
        sink.torn_at = Some(6);
        write(&mut sink, b"next\n");
        assert_eq!(read(&path), "whole\nnext\n");
    }

    #[test]
    fn dev_full_fails_retryably() {
        let dir = TempDir::new("devfull");
        let path = dir.join("audit.log");
        if std::os::unix::fs::symlink("/dev/full", &path).is_err()
            || !Path::new("/dev/full").exists()
        {
            return;
        }
        let mut opts = FileOptions::new(&path);
        opts.max_file_size = 1;
        opts.roll_cycle = RollCycle::Minutely;
        let mut sink = FileSink::open(opts).expect("open");
        let error = sink.write_batch(b"line\n", 1).expect_err("ENOSPC");
        assert!(error.retryable);
        assert_eq!(sink.status(), SinkStatus::Error);
        // A device is never rolled (renamed) nor cut.
        sink.tick().expect("tick");
        assert!(sink.rolled_files().is_empty());
        assert!(
            fs::symlink_metadata(&path)
                .expect("lstat")
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn existing_file_from_an_earlier_cycle_rolls_at_once() {
        let dir = TempDir::new("restart");
        let path = dir.join("audit.log");
        fs::write(&path, "yesterday\n").expect("seed");
        let yesterday = std::time::SystemTime::now() - Duration::from_secs(2 * 86_400);
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(yesterday))
            .expect("set mtime");
        let mut opts = FileOptions::new(&path);
        opts.roll_cycle = RollCycle::Daily;
        let mut sink = FileSink::open(opts).expect("open");
        sink.tick().expect("tick");
        let rolled = sink.rolled_files();
        assert_eq!(rolled.len(), 1);
        assert_eq!(read(&rolled[0]), "yesterday\n");
        let stamp = DateTime::<Local>::from(yesterday)
            .naive_local()
            .format(STAMP_FORMAT)
            .to_string();
        assert_eq!(file_names(&rolled), [format!("audit-{stamp}-0001.log")]);
    }
}
