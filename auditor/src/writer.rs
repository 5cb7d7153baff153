//! The file sink: numbers records (`seq`, gapless over what is written), formats them into one reused
//! buffer and appends them to the audit log with large buffered writes.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::format::{Format, write_record};
use crate::record::Record;

/// Bytes buffered before a write is forced even while the ring still has data.
const FLUSH_BYTES: usize = 256 * 1024;

pub struct FileWriter {
    path: PathBuf,
    file: File,
    format: Format,
    buf: Vec<u8>,
    next_seq: u64,
    pub records_written: u64,
    pub bytes_written: u64,
}

/// Open (create, 0640, append) the audit log; its directory must exist.
pub fn open_log(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.is_dir()
    {
        bail!("audit log directory {} does not exist", dir.display());
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .with_context(|| format!("opening audit log {}", path.display()))
}

impl FileWriter {
    pub fn open(path: &Path, format: Format) -> Result<Self> {
        Ok(FileWriter {
            path: path.to_path_buf(),
            file: open_log(path)?,
            format,
            buf: Vec::with_capacity(2 * FLUSH_BYTES),
            next_seq: 1,
            records_written: 0,
            bytes_written: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn set_format(&mut self, format: Format) {
        self.format = format;
    }

    /// Number, format and buffer one record; writes out once enough is buffered.
    pub fn write(&mut self, mut rec: Record) -> Result<()> {
        rec.seq = self.next_seq;
        self.next_seq += 1;
        write_record(self.format, &rec, &mut self.buf);
        self.records_written += 1;
        if self.buf.len() >= FLUSH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Write out everything buffered. Lines are never split across a failed write: on error the
    /// buffer is kept and retried at the next flush.
    pub fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.buf)
            .with_context(|| format!("writing audit log {}", self.path.display()))?;
        self.bytes_written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }
}
