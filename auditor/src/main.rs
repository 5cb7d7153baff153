//! `auditor`: an out-of-process audit logger for a running valkey-server.
//!
//! Data flow: kernel (syscall tracepoints) → ring buffer → per-connection streams → RESP parsing →
//! classification → filter → record → format → sink. See ARCHITECTURE.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

use auditor::capture::{self, Capture, CaptureConfig, CaptureStream};
use auditor::commands::CommandTable;
use auditor::control::{self, ControlBackend};
use auditor::delivery::{Queue, run_sink};
use auditor::metrics::Metrics;
use auditor::record::{Category, Outcome, Record};
use auditor::session::{Peer, Session};
use auditor::settings::{SETTING_NAMES, Settings, SharedSettings};
use auditor::sinkset::{SettingsSinks, open_sink, validate};
use auditor::{procscan, serverquery};

/// Audit a running valkey-server from outside: eBPF capture of its client sockets, records to a file.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Pid of the valkey-server to audit.
    #[arg(long)]
    pid: u32,
    /// Control port (RESP; valkey-cli compatible). Answers PING once auditing has started.
    #[arg(long, default_value = "127.0.0.1:6380")]
    control: SocketAddr,
    /// Password of the control port (same as `audit.control_requirepass`).
    #[arg(long)]
    control_password: Option<String>,
    /// Config file with `audit.<name> <value>` lines; CONFIG REWRITE writes back to it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bytes copied per syscall at most; the rest is skipped using RESP lengths.
    #[arg(long, default_value_t = auditor_common::DEFAULT_CAPTURE_CAP)]
    capture_cap: u64,
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    ring_bytes: u32,
    /// User the auditor authenticates as to ask the server (`CLIENT LIST`) which user each connection
    /// open before attach has. The password comes from AUDITOR_SERVER_PASSWORD or
    /// --server-password-file. Without credentials those connections show `unknown` until they AUTH.
    #[arg(long)]
    server_user: Option<String>,
    /// File holding the password for --server-user (first line).
    #[arg(long)]
    server_password_file: Option<PathBuf>,
    /// Also write every ring-buffer record, as delivered, to this file (for the offline pipeline
    /// benchmark: `u32` little-endian length, then the record's bytes).
    #[arg(long)]
    dump_events: Option<PathBuf>,
    /// Accept a process whose name is not valkey-server (or redis-server).
    #[arg(long)]
    any_process: bool,
    /// Settings in the Valkey Audit Module's syntax: `audit.format json audit.protocol "file /x.log"`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    settings: Vec<String>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("auditor: {e:#}");
        std::process::exit(1);
    }
}

fn check_target(pid: u32, any_process: bool) -> Result<()> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .with_context(|| format!("no process with pid {pid}"))?;
    let comm = comm.trim();
    if !any_process && !comm.starts_with("valkey-server") && !comm.starts_with("redis-server") {
        bail!(
            "process {pid} is '{comm}', not a valkey-server (use --any-process to audit it anyway)"
        );
    }
    Ok(())
}

/// False once the process has exited (a zombie waiting for its parent counts as exited).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself contain ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let mut settings = Settings::default();
    if let Some(path) = &cli.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        settings
            .apply_config_text(&text)
            .map_err(anyhow::Error::msg)?;
    }
    settings
        .apply_args(&cli.settings)
        .map_err(anyhow::Error::msg)?;
    if let Some(pw) = &cli.control_password {
        settings.control_requirepass = pw.clone();
    }
    check_target(cli.pid, cli.any_process)?;
    if cli.capture_cap == 0 {
        bail!("--capture-cap must be at least 1");
    }

    let metrics = Arc::new(Metrics::new(vec![cli.pid]));
    let sink = open_sink(&settings).map_err(|e| anyhow::anyhow!("{e}"))?;
    let table = CommandTable::builtin().context("loading the command table")?;

    let (mut capture, stream) = Capture::load(&CaptureConfig {
        ring_bytes: cli.ring_bytes,
        capture_cap: cli.capture_cap,
        wakeup_bytes: 64 * 1024,
    })?;
    capture.add_target(cli.pid)?;
    capture.attach()?;

    let host = hostname();
    let wall_offset = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC);
    let mut session = Session::new(
        table,
        settings.clone(),
        host.clone(),
        wall_offset,
        cli.capture_cap,
    );
    let mut initial = Vec::new();
    let now = clock_ns(libc::CLOCK_MONOTONIC) as u64;
    let users = existing_users(&cli, &mut session)?;
    for conn in procscan::existing_connections(cli.pid)? {
        if session.is_ignored(&conn.peer) {
            continue;
        }
        if capture.register_existing_socket(cli.pid, conn.fd)? {
            let user = users.get(&conn.fd).cloned();
            session.add_existing(cli.pid, conn.fd, conn.peer, user, now, &mut initial);
        }
    }

    let queue = Queue::new(
        settings.delivery.max_queue_size as usize,
        settings.delivery.overflow,
        metrics.clone(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let start = audit_record(&host, wall_offset, b"start", start_args(&settings, cli.pid));
    let mut first = vec![start];
    first.append(&mut initial);
    let initial = first;
    let format = settings.format;
    let shared = Arc::new(SharedSettings::new(settings));
    let backend = Arc::new(Backend {
        settings: shared.clone(),
        metrics: metrics.clone(),
        config_path: cli.config.clone(),
        queue: queue.clone(),
        stop: stop.clone(),
        hostname: host.clone(),
        wall_offset,
    });

    // SIGHUP reopens the log file (logrotate), like Valkey's own log.
    let reopen = Arc::new(AtomicBool::new(false));
    let sink_thread = {
        let provider = SettingsSinks::new(shared.clone(), sink, host.clone(), wall_offset);
        let queue = queue.clone();
        let metrics = metrics.clone();
        let reopen = reopen.clone();
        std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                run_sink(
                    queue,
                    format,
                    Box::new(provider),
                    metrics,
                    reopen,
                    Arc::new(AtomicU64::new(1)),
                )
            })?
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = rt.block_on(control::bind(cli.control))?;

    let pid = cli.pid;
    let dump = match &cli.dump_events {
        Some(p) => Some(std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let worker = {
        let stop = stop.clone();
        let shared = shared.clone();
        let metrics = metrics.clone();
        let queue = queue.clone();
        std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || {
                CaptureLoop {
                    pid,
                    stream,
                    session,
                    queue,
                    shared,
                    metrics,
                    stop,
                    dump,
                }
                .run(initial)
            })?
    };

    eprintln!(
        "auditor: auditing pid {} → {} (control port {})",
        cli.pid,
        backend.settings.get().protocol_string(),
        cli.control
    );
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let reopen_on_hup = async {
            while hup.recv().await.is_some() {
                reopen.store(true, Ordering::Release);
            }
        };
        let worker_done = async {
            while !worker.is_finished() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = control::serve(listener, backend) => {},
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
            _ = worker_done => {},
            _ = reopen_on_hup => {},
        }
        anyhow::Ok(())
    })?;
    stop.store(true, Ordering::SeqCst);
    let result = worker
        .join()
        .map_err(|_| anyhow::anyhow!("capture thread panicked"));
    drop(capture);
    // A clean stop flushes everything: the stop record goes last, then the queue is drained.
    let stop_rec = audit_record(
        &host,
        wall_offset,
        b"stop",
        format!("version={} pid={}", env!("CARGO_PKG_VERSION"), cli.pid).into_bytes(),
    );
    queue.push_all(&mut vec![stop_rec], &stop);
    queue.close();
    let _ = sink_thread.join();
    result?
}

fn start_args(s: &Settings, pid: u32) -> Vec<u8> {
    let mut out = format!("version={} pid={pid}", env!("CARGO_PKG_VERSION"));
    for name in SETTING_NAMES {
        if let Some(v) = s.get(name)
            && !auditor::settings::is_secret(name)
        {
            out.push_str(&format!(" {}={}", name.trim_start_matches("audit."), v));
        }
    }
    out.into_bytes()
}

fn audit_record(host: &str, wall_offset: i64, command: &[u8], args: Vec<u8>) -> Record {
    let now = clock_ns(libc::CLOCK_MONOTONIC);
    let mut rec = Record::event(Category::Audit, command, (now + wall_offset) / 1000, host);
    rec.command_args = args;
    rec.pid = std::process::id();
    rec
}

/// With operator credentials, ask the server which user each open connection has (by fd). The
/// auditor's own connection is registered as ignored before its accept event is processed.
fn existing_users(cli: &Cli, session: &mut Session) -> Result<HashMap<u32, Vec<u8>>> {
    let password = match (
        &cli.server_password_file,
        std::env::var("AUDITOR_SERVER_PASSWORD"),
    ) {
        (Some(path), _) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        ),
        (None, Ok(p)) => Some(p),
        (None, Err(_)) => None,
    };
    let Some(password) = password else {
        return Ok(HashMap::new());
    };
    let addr = procscan::tcp_listen_addrs(cli.pid)
        .into_iter()
        .next()
        .context("the server has no TCP listener to ask CLIENT LIST on")?;
    let mut conn = serverquery::ServerConn::connect(addr, cli.server_user.as_deref(), &password)?;
    session.ignore_peer(Peer {
        ip: match conn.local.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(|v| v.to_string())
                .unwrap_or_else(|| v6.to_string()),
            ip => ip.to_string(),
        },
        port: conn.local.port(),
    });
    conn.users_by_fd()
}

/// The daemon's side of the control port.
struct Backend {
    settings: Arc<SharedSettings>,
    metrics: Arc<Metrics>,
    config_path: Option<PathBuf>,
    /// CONFIG records go straight to the delivery queue (the sink thread numbers everything).
    queue: Queue,
    stop: Arc<AtomicBool>,
    hostname: String,
    wall_offset: i64,
}

impl ControlBackend for Backend {
    fn setting_names(&self) -> Vec<String> {
        SETTING_NAMES.iter().map(|s| s.to_string()).collect()
    }

    fn get_setting(&self, name: &str) -> Option<String> {
        self.settings.get().get(name)
    }

    fn set_settings(&self, pairs: &[(String, String)]) -> Result<(), String> {
        self.settings
            .update(|current| {
                let next = current.apply_all(pairs).map_err(|e| e.to_string())?;
                if next.protocol != current.protocol || next.delivery != current.delivery {
                    // Refuse a destination that cannot be used: the running one stays in use.
                    validate(&next).map_err(|e| {
                        format!("CONFIG SET failed (possibly related to argument 'audit.protocol') - {e}")
                    })?;
                }
                self.queue
                    .configure(next.delivery.max_queue_size as usize, next.delivery.overflow);
                Ok(next)
            })
            .map(|_| ())
    }

    fn rewrite_config(&self) -> Result<(), String> {
        let Some(path) = &self.config_path else {
            return Err("The server is running without a config file".into());
        };
        let original = std::fs::read_to_string(path).unwrap_or_default();
        let text = self.settings.get().rewrite_config_text(&original);
        // Atomically: a temporary file next to it, then rename, like Valkey.
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            if let Ok(meta) = std::fs::metadata(path) {
                std::fs::set_permissions(&tmp, meta.permissions())?;
            }
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("Rewriting config file: {e}")
        })
    }

    fn reset_stats(&self) {
        self.metrics.reset();
    }

    fn info_audit(&self) -> Vec<(String, String)> {
        let s = self.settings.get();
        self.metrics.info_fields(
            &s.protocol_string(),
            s.format.as_str(),
            self.queue.len_bytes(),
        )
    }

    fn control_password(&self) -> Option<String> {
        let pw = self.settings.get().control_requirepass.clone();
        if pw.is_empty() { None } else { Some(pw) }
    }

    fn audit_control_event(
        &self,
        command: &str,
        args: &str,
        client: SocketAddr,
        user: &str,
        success: bool,
        error: &str,
    ) {
        // Setting names only: a value never reaches a record, and secret settings are named only.
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        let mut rec = Record::event(
            Category::Config,
            command.as_bytes(),
            (now + self.wall_offset) / 1000,
            &self.hostname,
        );
        rec.command_args = args.as_bytes().to_vec();
        rec.result = if success {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        rec.username = user.as_bytes().to_vec();
        rec.client_ip = match client.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(|v| v.to_string())
                .unwrap_or_else(|| v6.to_string()),
            ip => ip.to_string(),
        };
        rec.client_port = client.port();
        rec.error = error.as_bytes().to_vec();
        rec.pid = std::process::id();
        self.queue.push_all(&mut vec![rec], &self.stop);
    }
}

/// The capture thread: drain the ring, run the pipeline, write records. Wakes at least every 10 ms so
/// records reach the file within tens of milliseconds even when the kernel batches wake-ups.
struct CaptureLoop {
    pid: u32,
    stream: CaptureStream,
    session: Session,
    queue: Queue,
    shared: Arc<SharedSettings>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    dump: Option<std::io::BufWriter<std::fs::File>>,
}

/// Give the session the settings history when it changed (each command is then judged by the
/// settings in force when it was read).
fn refresh_timeline(shared: &SharedSettings, session: &mut Session, seen_version: &mut u64) {
    let version = shared.version();
    if version != *seen_version {
        *seen_version = version;
        session.set_timeline(shared.history());
    }
}

impl CaptureLoop {
    fn run(mut self, initial: Vec<Record>) -> Result<()> {
        let unix_paths = procscan::unix_listeners(self.pid);
        let unix_path = |_tgid: u32, listen_fd: u32| unix_paths.get(&listen_fd).cloned();
        let mut records = initial;
        self.write_all(&mut records);
        let mut seen_version = self.shared.version();
        let mut reported_drops = (0u64, 0u64);
        let mut published = [0u64; 6];
        let mut last_check = Instant::now();
        let ring_fd = self.stream.ring.as_raw_fd();
        let mut target_gone = false;
        loop {
            let drained = self.drain_ring(&unix_path, &mut seen_version, &mut records, 65536);
            refresh_timeline(&self.shared, &mut self.session, &mut seen_version);
            if last_check.elapsed() >= Duration::from_millis(100) {
                last_check = Instant::now();
                self.publish_stats(&mut published);
                self.report_kernel_drops(&mut reported_drops, &mut records);
                if !process_alive(self.pid) {
                    target_gone = true;
                    break;
                }
            }
            if drained == 0 {
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut pfd = libc::pollfd {
                    fd: ring_fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 10) };
            }
        }
        let now = clock_ns(libc::CLOCK_MONOTONIC) as u64;
        if target_gone {
            // Everything the kernel still holds, then the connections that closed with the process.
            self.drain_ring(&unix_path, &mut seen_version, &mut records, usize::MAX);
            self.session.close_all(self.pid, now, &mut records);
            eprintln!("auditor: pid {} exited; stopping", self.pid);
        }
        // Drops the kernel counted since the last check still get their loss record.
        self.report_kernel_drops(&mut reported_drops, &mut records);
        self.publish_stats(&mut published);
        self.session.flush_all(now, &mut records);
        self.write_all(&mut records);
        if let Some(dump) = &mut self.dump {
            use std::io::Write as _;
            dump.flush()?;
        }
        Ok(())
    }

    /// Process up to `max` ring records; returns how many there were.
    fn drain_ring(
        &mut self,
        unix_path: &dyn Fn(u32, u32) -> Option<String>,
        seen_version: &mut u64,
        records: &mut Vec<Record>,
        max: usize,
    ) -> usize {
        let mut drained = 0usize;
        while drained < max
            && let Some(item) = self.stream.ring.next()
        {
            // A CONFIG SET applies from the very next command: one atomic load per event.
            refresh_timeline(&self.shared, &mut self.session, seen_version);
            if let Some(dump) = &mut self.dump {
                use std::io::Write as _;
                let _ = dump.write_all(&(item.len() as u32).to_le_bytes());
                let _ = dump.write_all(&item);
            }
            if let Some(ev) = capture::decode(&item, unix_path) {
                self.session.handle(ev, records);
            }
            drop(item);
            self.queue.push_all(records, &self.stop);
            drained += 1;
        }
        drained
    }

    /// Turn drops the kernel counted since the last report into an AUDIT_LOSS record.
    fn report_kernel_drops(&mut self, reported: &mut (u64, u64), records: &mut Vec<Record>) {
        if let Ok(drops) = self.stream.kernel_drops()
            && drops.0 > reported.0
        {
            let now = clock_ns(libc::CLOCK_MONOTONIC) as u64;
            self.session
                .kernel_loss(drops.0 - reported.0, drops.1 - reported.1, now, records);
            *reported = drops;
            self.write_all(records);
        }
    }

    /// Hand records to the delivery queue (blocks in `overflow block` mode while it is full, which
    /// stops ring-buffer reads: the kernel then drops and counts, the server is never slowed).
    fn write_all(&mut self, records: &mut Vec<Record>) {
        self.queue.push_all(records, &self.stop);
    }

    /// Add what happened since the last call to the shared counters (deltas, so CONFIG RESETSTAT
    /// can zero them at any time).
    fn publish_stats(&mut self, last: &mut [u64; 6]) {
        use std::sync::atomic::Ordering::Relaxed;
        let st = &self.session.stats;
        let (ring_events, ring_bytes) = self.stream.kernel_drops().unwrap_or((last[4], last[5]));
        let now = [
            st.request_resyncs,
            st.reply_resyncs,
            st.bytes_skipped,
            st.filtered,
            ring_events,
            ring_bytes,
        ];
        let m = &self.metrics;
        let targets = [
            &m.request_resyncs,
            &m.reply_resyncs,
            &m.bytes_skipped,
            &m.filtered,
            &m.lost_ring_events,
            &m.lost_ring_bytes,
        ];
        for ((t, n), l) in targets.iter().zip(now).zip(last.iter_mut()) {
            t.fetch_add(n.saturating_sub(*l), Relaxed);
            *l = n;
        }
        m.connections
            .store(self.session.connection_count() as u64, Relaxed);
    }
}
