//! Builds the sink the settings ask for (`audit.protocol` and the delivery settings) and follows
//! changes: options of the same kind of sink are applied in place (a TCP backlog survives), a change
//! of kind replaces the sink.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::delivery::{LineFormat, SinkProvider};
use crate::record::ServerFile;
use crate::settings::{Protocol, Settings, SharedSettings};
use crate::sink::file::{FileOptions, FileSink};
use crate::sink::syslog::{SyslogOptions, SyslogSink, parse_facility};
use crate::sink::tcp::{TcpOptions, TcpSink};
use crate::sink::{Sink, SinkError};

pub enum ActiveSink {
    File(FileSink),
    /// `file` with `%port%` in the path: one file per audited server.
    PerServer(Box<PerServerFiles>),
    Syslog(SyslogSink),
    Tcp(TcpSink),
}

impl ActiveSink {
    fn as_sink(&mut self) -> &mut dyn Sink {
        match self {
            ActiveSink::File(s) => s,
            ActiveSink::PerServer(s) => s.as_mut(),
            ActiveSink::Syslog(s) => s,
            ActiveSink::Tcp(s) => s,
        }
    }
}

fn bad(message: String) -> SinkError {
    SinkError {
        message,
        retryable: false,
    }
}

pub fn file_options(s: &Settings, path: &std::path::Path) -> Result<FileOptions, SinkError> {
    let d = &s.delivery;
    Ok(FileOptions {
        path: path.to_path_buf(),
        roll_cycle: d.roll_cycle.parse().map_err(|e| bad(format!("{e}")))?,
        max_file_size: d.max_file_size,
        max_log_size: d.max_log_size,
        archive_command: if d.archive_command.is_empty() {
            None
        } else {
            Some(d.archive_command.clone())
        },
        max_archive_retries: d.max_archive_retries.min(u32::MAX as u64) as u32,
        fsync: d.fsync.parse().map_err(|e| bad(format!("{e}")))?,
    })
}

fn syslog_options(s: &Settings, facility: &str) -> Result<SyslogOptions, SinkError> {
    Ok(SyslogOptions {
        facility: parse_facility(facility).map_err(bad)?,
        facility_name: facility.to_string(),
        format: s
            .delivery
            .syslog_format
            .parse()
            .map_err(|_| bad("bad syslog format".into()))?,
        target: s
            .delivery
            .syslog_target
            .parse()
            .map_err(|_| bad("bad syslog target".into()))?,
        ident: "valkey-audit".into(),
        local_socket: None,
    })
}

fn tcp_options(s: &Settings) -> TcpOptions {
    TcpOptions {
        host: s.tcp.host.clone(),
        port: s.tcp.port,
        timeout_ms: s.tcp.timeout_ms,
        retry_interval_ms: s.tcp.retry_interval_ms,
        max_retries: s.tcp.max_retries,
        reconnect_on_failure: s.tcp.reconnect_on_failure,
        buffer_on_disconnect: s.tcp.buffer_on_disconnect,
        spool_dir: s.delivery.spool_dir.clone(),
        spool_max_size: s.delivery.spool_max_size,
        memory_limit: s.delivery.max_queue_size,
    }
}

/// Open the sink for `s` (used at start, so an unusable destination stops the daemon with a clear
/// error, see `open_sink_at_start`, and by CONFIG SET to refuse one).
pub fn open_sink(s: &Settings) -> Result<ActiveSink, SinkError> {
    Ok(match &s.protocol {
        Protocol::File(path) if is_per_server(path) => {
            file_options(s, path)?;
            ActiveSink::PerServer(Box::new(PerServerFiles {
                settings: s.clone(),
                template: path.clone(),
                files: BTreeMap::new(),
                selected: ServerFile::Auditor,
            }))
        }
        Protocol::File(path) => ActiveSink::File(FileSink::open(file_options(s, path)?)?),
        Protocol::Syslog(f) => ActiveSink::Syslog(SyslogSink::open(syslog_options(s, f)?)?),
        Protocol::Tcp => ActiveSink::Tcp(TcpSink::open(tcp_options(s))),
    })
}

/// Open the sink for `s` at start. As `open_sink`, except that a syslog server or socket that does
/// not answer yet (a remote rsyslog restarting, a local one not started yet) is not a reason to
/// leave the server unaudited: the sink starts in the `error` state and keeps trying while records
/// wait in the queue. The reason is returned for a warning.
pub fn open_sink_at_start(s: &Settings) -> Result<(ActiveSink, Option<SinkError>), SinkError> {
    match &s.protocol {
        Protocol::Syslog(f) => {
            let (sink, error) = SyslogSink::open_or_retry(syslog_options(s, f)?);
            Ok((ActiveSink::Syslog(sink), error))
        }
        _ => open_sink(s).map(|sink| (sink, None)),
    }
}

/// Check that `s` names a usable destination (CONFIG SET validation), so that a destination the
/// sink thread could not open is refused with an error and the running one stays in use, rather
/// than accepted and then silently not switched to.
pub fn validate(s: &Settings) -> Result<(), String> {
    match &s.protocol {
        Protocol::File(path) => {
            file_options(s, path).map_err(|e| e.message)?;
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(format!(
                    "audit log directory {} does not exist",
                    dir.display()
                ));
            }
            if is_per_server(path) {
                // Files are made per server later: the directory must take new files.
                let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
                    .map_err(|_| format!("bad audit log directory {}", dir.display()))?;
                // SAFETY: a valid NUL-terminated path.
                if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK) } != 0 {
                    return Err(format!(
                        "audit log directory {} is not writable: {}",
                        dir.display(),
                        std::io::Error::last_os_error()
                    ));
                }
            } else {
                // Opened as the sink opens it (append, created 0640): a directory, a read-only
                // file or directory fails here.
                use std::os::unix::fs::OpenOptionsExt as _;
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o640)
                    .open(path)
                    .map_err(|e| format!("cannot open audit log {}: {e}", path.display()))?;
            }
            Ok(())
        }
        Protocol::Syslog(f) => {
            let options = syslog_options(s, f).map_err(|e| e.message)?;
            // The same open the switch does (a socket; for TCP a connection, closed again).
            SyslogSink::open(options).map(drop).map_err(|e| e.message)
        }
        // The TCP sink never fails to open: it connects, buffers and spools in the background.
        Protocol::Tcp => Ok(()),
    }
}

/// The sink thread's view of the settings.
pub struct SettingsSinks {
    shared: Arc<SharedSettings>,
    version: u64,
    current: Arc<Settings>,
    active: ActiveSink,
    /// Sinks replaced by a switch of `audit.protocol`, oldest first: what they took and did not
    /// deliver (a TCP collector's backlog) goes to the active sink before any new batch, and
    /// their losses are reported, before they are dropped (QA: a switch lost it unreported).
    retired: std::collections::VecDeque<ActiveSink>,
}

/// Bytes handed over from a retired sink per step.
const HAND_OVER_CHUNK: usize = 1 << 20;

impl SettingsSinks {
    pub fn new(shared: Arc<SharedSettings>, active: ActiveSink) -> Self {
        let version = shared.version();
        let current = shared.get();
        SettingsSinks {
            shared,
            version,
            current,
            active,
            retired: std::collections::VecDeque::new(),
        }
    }

    fn apply(&mut self, next: Arc<Settings>) {
        let same_kind = matches!(
            (&self.active, &next.protocol),
            (ActiveSink::File(_), Protocol::File(_)) | (ActiveSink::Tcp(_), Protocol::Tcp)
        ) && !matches!(&next.protocol, Protocol::File(p) if is_per_server(p));
        let result = match (&mut self.active, &next.protocol) {
            (ActiveSink::File(f), Protocol::File(path)) if same_kind => {
                file_options(&next, path).and_then(|o| f.reconfigure(o))
            }
            (ActiveSink::Tcp(t), Protocol::Tcp) if same_kind => {
                t.reconfigure(tcp_options(&next));
                Ok(())
            }
            _ if next.protocol == self.current.protocol
                && next.delivery == self.current.delivery =>
            {
                Ok(())
            }
            _ => open_sink(&next).map(|s| {
                let mut old = std::mem::replace(&mut self.active, s);
                old.as_sink().retire();
                self.retired.push_back(old);
            }),
        };
        if let Err(e) = result {
            eprintln!("auditor: switching audit.protocol: {e}");
        }
        self.current = next;
    }
}

impl SinkProvider for SettingsSinks {
    fn sink(&mut self) -> &mut dyn Sink {
        self.active.as_sink()
    }

    fn retired(&mut self) -> Option<&mut dyn Sink> {
        self.retired.front_mut().map(ActiveSink::as_sink)
    }

    fn hand_over(&mut self) -> Result<bool, SinkError> {
        let Some(old) = self.retired.front_mut() else {
            return Ok(false);
        };
        let old = old.as_sink();
        let lines = old.undelivered(HAND_OVER_CHUNK);
        if lines.is_empty() {
            return Ok(false);
        }
        let (n, count) = (lines.len(), crate::sink::count_lines(lines));
        if let ActiveSink::PerServer(p) = &mut self.active {
            // Whose they were is not known any more: the auditor's own file takes them.
            p.selected = ServerFile::Auditor;
        }
        self.active.as_sink().write_batch(lines, count)?;
        old.release_undelivered(n);
        Ok(true)
    }

    fn drop_retired(&mut self) {
        self.retired.pop_front();
    }

    fn select(&mut self, file: &ServerFile) {
        if let ActiveSink::PerServer(p) = &mut self.active
            && p.selected != *file
        {
            p.selected = file.clone();
        }
    }

    fn refresh(&mut self) {
        let v = self.shared.version();
        if v != self.version {
            self.version = v;
            let next = self.shared.get();
            if next.protocol != self.current.protocol
                || next.delivery != self.current.delivery
                || next.tcp != self.current.tcp
            {
                self.apply(next);
            } else {
                self.current = next;
            }
        }
    }
}

/// The placeholder that makes a file path per server.
pub const PORT_PLACEHOLDER: &str = "%port%";

/// How the settings want records written as lines: their format, and one file per server or not.
pub fn line_format(s: &Settings) -> LineFormat {
    LineFormat {
        format: s.format,
        per_server: matches!(&s.protocol, Protocol::File(p) if is_per_server(p)),
    }
}

fn is_per_server(path: &Path) -> bool {
    path.to_string_lossy().contains(PORT_PLACEHOLDER)
}

/// The file of one server: `%port%` replaced by its port; for a server with no TCP port, by
/// `unix` and the path of its socket with `/` as `-` (`/run/valkey.sock`: `unix-run-valkey.sock`);
/// by `auditor` for the daemon's own records (start/stop, CONFIG changes, losses not tied to a
/// server).
pub fn per_server_path(template: &Path, file: &ServerFile) -> PathBuf {
    let key = match file {
        ServerFile::Auditor => "auditor".to_string(),
        ServerFile::Port(port) => port.to_string(),
        ServerFile::Unix(path) => {
            let name = path.trim_start_matches('/').replace('/', "-");
            format!("unix-{name}")
        }
    };
    PathBuf::from(template.to_string_lossy().replace(PORT_PLACEHOLDER, &key))
}

/// One file sink per server port, opened at the first record for it; each rolls and is retained on
/// its own. The sink thread selects the server before each batch (`SinkProvider::select`).
pub struct PerServerFiles {
    settings: Settings,
    template: PathBuf,
    files: BTreeMap<ServerFile, FileSink>,
    selected: ServerFile,
}

impl PerServerFiles {
    fn selected_file(&mut self) -> Result<&mut FileSink, SinkError> {
        if !self.files.contains_key(&self.selected) {
            let path = per_server_path(&self.template, &self.selected);
            let sink = FileSink::open(file_options(&self.settings, &path)?)?;
            self.files.insert(self.selected.clone(), sink);
        }
        self.files
            .get_mut(&self.selected)
            .ok_or_else(|| bad("no file".into()))
    }

    fn each(
        &mut self,
        mut f: impl FnMut(&mut FileSink) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        let mut first = Ok(());
        for sink in self.files.values_mut() {
            if let Err(e) = f(sink)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

impl Sink for PerServerFiles {
    fn write_batch(&mut self, lines: &[u8], line_count: usize) -> Result<(), SinkError> {
        self.selected_file()?.write_batch(lines, line_count)
    }

    fn flush(&mut self, force: bool) -> Result<(), SinkError> {
        self.each(|s| s.flush(force))
    }

    fn tick(&mut self) -> Result<(), SinkError> {
        self.each(|s| s.tick())
    }

    fn reopen(&mut self) -> Result<(), SinkError> {
        self.each(|s| s.reopen())
    }

    fn status(&self) -> crate::sink::SinkStatus {
        use crate::sink::SinkStatus;
        if self.files.values().any(|s| s.status() == SinkStatus::Error) {
            SinkStatus::Error
        } else {
            SinkStatus::Connected
        }
    }

    fn take_loss(&mut self) -> crate::sink::SinkLoss {
        let mut total = crate::sink::SinkLoss::default();
        for s in self.files.values_mut() {
            let l = s.take_loss();
            total.records += l.records;
            total.bytes += l.bytes;
        }
        total
    }

    fn pending_loss(&self) -> u64 {
        self.files.values().map(|s| s.pending_loss()).sum()
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_server_paths() {
        let t = Path::new("/var/log/valkey/audit-%port%.log");
        assert!(is_per_server(t));
        assert_eq!(
            per_server_path(t, &ServerFile::Port(6379)),
            PathBuf::from("/var/log/valkey/audit-6379.log")
        );
        assert_eq!(
            per_server_path(t, &ServerFile::Auditor),
            PathBuf::from("/var/log/valkey/audit-auditor.log")
        );
        assert_eq!(
            per_server_path(t, &ServerFile::Unix(Arc::from("/run/valkey/valkey.sock"))),
            PathBuf::from("/var/log/valkey/audit-unix-run-valkey-valkey.sock.log")
        );
        assert!(!is_per_server(Path::new("/var/log/audit.log")));
    }
}
