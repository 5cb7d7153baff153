//! `auditor`: an out-of-process audit logger for a running valkey-server.
//!
//! Data flow: kernel (syscall tracepoints) → ring buffer → per-connection streams → RESP parsing →
//! classification → filter → record → format → sink. See ARCHITECTURE.md.

use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

use auditor::capture::{self, Capture, CaptureConfig, CaptureStream};
use auditor::commands::CommandTable;
use auditor::record::Record;
use auditor::session::Session;
use auditor::settings::{Protocol, Settings};
use auditor::writer::FileWriter;
use auditor::{control, procscan};

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
    /// Config file with `audit.<name> <value>` lines.
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
    check_target(cli.pid, cli.any_process)?;
    if cli.capture_cap == 0 {
        bail!("--capture-cap must be at least 1");
    }

    let Protocol::File(log_path) = &settings.protocol;
    let writer = FileWriter::open(log_path, settings.format)?;
    let table = CommandTable::builtin().context("loading the command table")?;

    let (mut capture, stream) = Capture::load(&CaptureConfig {
        ring_bytes: cli.ring_bytes,
        capture_cap: cli.capture_cap,
        wakeup_bytes: 64 * 1024,
    })?;
    capture.add_target(cli.pid)?;
    capture.attach()?;

    let wall_offset = clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC);
    let mut session = Session::new(
        table,
        settings.clone(),
        hostname(),
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

    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = rt.block_on(control::bind(cli.control))?;

    let pid = cli.pid;
    let stop_c = stop.clone();
    let worker = std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || capture_loop(pid, stream, session, writer, initial, &stop_c))?;

    eprintln!(
        "auditor: auditing pid {} → {} (control port {})",
        cli.pid,
        log_path.display(),
        cli.control
    );
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let worker_done = async {
            while !worker.is_finished() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = control::serve(listener) => {},
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
            _ = worker_done => {},
        }
        anyhow::Ok(())
    })?;
    stop.store(true, Ordering::SeqCst);
    let result = worker
        .join()
        .map_err(|_| anyhow::anyhow!("capture thread panicked"))?;
    drop(capture);
    result
}

/// With operator credentials, ask the server which user each open connection has (by fd). The
/// auditor's own connection is registered as ignored before its accept event is processed.
fn existing_users(
    cli: &Cli,
    session: &mut Session,
) -> Result<std::collections::HashMap<u32, Vec<u8>>> {
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
        return Ok(Default::default());
    };
    let addr = procscan::tcp_listen_addrs(cli.pid)
        .into_iter()
        .next()
        .context("the server has no TCP listener to ask CLIENT LIST on")?;
    let mut conn =
        auditor::serverquery::ServerConn::connect(addr, cli.server_user.as_deref(), &password)?;
    session.ignore_peer(auditor::session::Peer {
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

/// The capture thread: drain the ring, run the pipeline, write records. Wakes at least every 10 ms so
/// records reach the file within tens of milliseconds even when the kernel batches wake-ups.
fn capture_loop(
    pid: u32,
    mut stream: CaptureStream,
    mut session: Session,
    mut writer: FileWriter,
    initial: Vec<Record>,
    stop: &AtomicBool,
) -> Result<()> {
    let unix_paths = procscan::unix_listeners(pid);
    let unix_path = |_tgid: u32, listen_fd: u32| unix_paths.get(&listen_fd).cloned();
    for rec in initial {
        writer.write(rec)?;
    }
    writer.flush()?;
    let mut records = Vec::with_capacity(1024);
    let mut reported_drops = (0u64, 0u64);
    let mut last_check = Instant::now();
    let ring_fd = stream.ring.as_raw_fd();
    loop {
        let mut drained = 0usize;
        while let Some(item) = stream.ring.next() {
            if let Some(ev) = capture::decode(&item, &unix_path) {
                session.handle(ev, &mut records);
            }
            drop(item);
            for rec in records.drain(..) {
                writer.write(rec)?;
            }
            drained += 1;
            if drained >= 65536 {
                break;
            }
        }
        if last_check.elapsed() >= Duration::from_millis(100) || drained == 0 {
            last_check = Instant::now();
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                // Drain what the kernel still holds, then close the target's connections.
                while let Some(item) = stream.ring.next() {
                    if let Some(ev) = capture::decode(&item, &unix_path) {
                        session.handle(ev, &mut records);
                    }
                }
                let now = clock_ns(libc::CLOCK_MONOTONIC) as u64;
                session.close_all(pid, now, &mut records);
                for rec in records.drain(..) {
                    writer.write(rec)?;
                }
                writer.flush()?;
                eprintln!("auditor: pid {pid} exited; stopping");
                return Ok(());
            }
            if let Ok(drops) = stream.kernel_drops()
                && drops.0 > reported_drops.0
            {
                let now = clock_ns(libc::CLOCK_MONOTONIC) as u64;
                session.kernel_loss(
                    drops.0 - reported_drops.0,
                    drops.1 - reported_drops.1,
                    now,
                    &mut records,
                );
                reported_drops = drops;
                for rec in records.drain(..) {
                    writer.write(rec)?;
                }
            }
        }
        if drained == 0 {
            writer.flush()?;
            if stop.load(Ordering::SeqCst) {
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
    session.flush_all(now, &mut records);
    for rec in records.drain(..) {
        writer.write(rec)?;
    }
    writer.flush()
}
