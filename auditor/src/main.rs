//! `auditor`: an out-of-process audit logger for a running valkey-server.
//!
//! Data flow: kernel (syscall tracepoints) → ring buffer → per-connection streams → RESP parsing →
//! classification → filter → record → format → sink. See ARCHITECTURE.md.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

use auditor::capture::{self, Capture, CaptureConfig, CaptureMode, CaptureStream};
use auditor::clock::{monotonic_ns, wall_now_us, wall_offset_ns};
use auditor::commands::CommandTable;
use auditor::control::{self, ControlBackend};
use auditor::delivery::{Origin, Queue, SHUTDOWN_GRACE, run_sink};
use auditor::metrics::{self, Metrics, TargetInfo};
use auditor::record::{Category, Outcome, Record};
use auditor::ring;
use auditor::scheduling::{self, RateGovernor};
use auditor::session::{self, CaptureEvent, Peer, ProcessEvent, Session};
use auditor::settings::{SETTING_NAMES, Settings, SharedSettings};
use auditor::sinkset::{SettingsSinks, line_format, open_sink_at_start, validate};
use auditor::targets::{self, Target, TargetSpec};
use auditor::{privileges, procscan, prometheus, serverquery};
use auditor_common::LISTEN_FD_UNKNOWN;

/// mimalloc rather than glibc malloc: batches of lines are allocated on the capture thread and
/// released on the sink thread (records themselves were, until they were formatted on the capture
/// thread), and glibc's cross-thread frees cost about a third of the daemon's CPU at high rates
/// (perf, `-P 16`); mimalloc frees them cheaply.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (libmimalloc-sys 0.1.49, pinned).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// While loading: return freed memory to the system at once instead of after mimalloc's default
/// 10 ms. Loading the eBPF object leaves ~20 MB of garbage that would otherwise stay resident.
fn purge_freed_memory_at_once() {
    // SAFETY: sets a process-wide allocator option; valid option number and value.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

/// Once attached: return loading's garbage now, then keep freed pages for `PURGE_DELAY_MS` before
/// returning them. With immediate purging, 1 KiB payloads made the capture thread fault in and
/// zero fresh pages for every batch (perf at `-P 16 -d 1024`: `exc_page_fault`, `clear_page_erms`,
/// `madvise`, ~10% of the auditor); with 50 ms the capture thread's CPU fell by a third, for a few
/// MB of RSS (BENCHMARKS.md).
fn keep_freed_memory_briefly() {
    const PURGE_DELAY_MS: std::ffi::c_long = 50;
    // SAFETY: a full collection of this thread's heap, then a process-wide allocator option with
    // a valid option number and value.
    unsafe {
        libmimalloc_sys::mi_collect(true);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS);
    }
}

/// Audit running valkey-servers from outside: eBPF capture of their client sockets, records to a file.
#[derive(Parser, Debug)]
#[command(version, about)]
#[command(group(clap::ArgGroup::new("targets").required(true).multiple(true).args(["pids", "comms", "all"])))]
struct Cli {
    /// Pid of a valkey-server to audit (repeatable). The auditor ends when the last one exits,
    /// unless --follow-restarts (or --comm/--all) is given.
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Audit every process with this command name (repeatable), including ones started later.
    #[arg(long = "comm", value_name = "NAME")]
    comms: Vec<String>,
    /// Audit every valkey-server and redis-server on the host, including ones started later.
    #[arg(long)]
    all: bool,
    /// Keep running when a --pid target exits, and audit its successor (the same executable
    /// listening on the same port, e.g. the server restarted by systemd) from its first
    /// connection.
    #[arg(long)]
    follow_restarts: bool,
    /// Prometheus metrics endpoint (text format, GET /metrics), e.g. 0.0.0.0:9464.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Control port (RESP; valkey-cli compatible). Answers PING once auditing has started.
    #[arg(long, default_value = "127.0.0.1:6380")]
    control: SocketAddr,
    /// Password of the control port (same as `audit.control_requirepass`).
    #[arg(long, env = "AUDITOR_CONTROL_PASSWORD", hide_env_values = true)]
    control_password: Option<String>,
    /// Who may change, with CONFIG SET, the settings that make the auditor (root) run a program
    /// or write a file where it is told (`audit.archive_command`, `audit.protocol` naming another
    /// file, `audit.spool_dir`), and the control password: `root` (a client authenticated with
    /// the control password, or one on this host whose socket belongs to root), `yes` (any
    /// client), `no` (set at start only).
    #[arg(long, value_enum, default_value = "root")]
    enable_protected_configs: control::ProtectedConfigs,
    /// Config file with `audit.<name> <value>` lines; CONFIG REWRITE writes back to it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bytes copied per syscall at most; the rest is skipped using RESP lengths.
    #[arg(long, default_value_t = auditor_common::DEFAULT_CAPTURE_CAP)]
    capture_cap: u64,
    /// Scan the replies of connections accepted after attach in the kernel and copy only the
    /// first 64 bytes of a bulk payload longer than 256 (records never show reply payloads): a
    /// write of several large replies is then covered whole, however far past --capture-cap.
    /// Off by default: it costs the server a little CPU per reply (BENCHMARKS.md, session 9).
    #[arg(long)]
    reply_scan: bool,
    /// Nice value of the auditor's threads, set once the programs are attached. Below 0 needs
    /// CAP_SYS_NICE (root has it) or a unit's `Nice=`; without them the auditor warns and keeps its
    /// nice value. -5 lets the capture thread drain the ring before it fills at `-P 16` on saturated
    /// CPUs (BENCHMARKS.md).
    #[arg(long, default_value_t = DEFAULT_NICE, allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    nice: i32,
    /// Where the kernel sees client I/O (also AUDITOR_CAPTURE). `sockets`: the socket tracepoints
    /// (Linux 6.3+ with BTF), so only socket I/O pays; accepts come from uprobes on the servers' C
    /// library. `syscalls`: the syscall exits, but while attached every task on the host takes the
    /// slow syscall path. `auto` (default): `sockets` where the kernel has them, else `syscalls`.
    #[arg(long, value_enum, env = "AUDITOR_CAPTURE", default_value_t = CaptureMode::Auto)]
    capture: CaptureMode,
    /// Ring buffer size in bytes (a power of two, multiple of the page size). The auditor's RSS
    /// carries it once, from the start.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    ring_bytes: u32,
    /// Unread ring bytes at which the kernel wakes the capture thread (it also polls every
    /// 10 ms, which bounds the records' delay at low rates). Default: 1/64 of the ring (256 KiB).
    #[arg(long)]
    wakeup_bytes: Option<u64>,
    /// User the auditor authenticates as to ask the server (`CLIENT LIST`) which user each connection
    /// open before attach has. The password comes from AUDITOR_SERVER_PASSWORD or
    /// --server-password-file. Without credentials those connections show `unknown` until they AUTH.
    #[arg(long)]
    server_user: Option<String>,
    /// File holding the password for --server-user (first line).
    #[arg(long)]
    server_password_file: Option<PathBuf>,
    /// Also write every ring-buffer record, as delivered, to this file (for the offline pipeline
    /// benchmark: `u32` little-endian length, then the record's bytes). It holds every byte the
    /// clients sent, passwords included: created owner-only (0600).
    #[arg(long)]
    dump_events: Option<PathBuf>,
    /// Accept a process whose name is not valkey-server (or redis-server).
    #[arg(long)]
    any_process: bool,
    /// Benchmarking only (`cargo xtask bench --capture-only`): attach and drain the ring buffer
    /// but process nothing and write no records, so the kernel side's cost can be measured apart
    /// from the pipeline's. Never audits anything.
    #[arg(long, hide = true)]
    bench_capture_only: bool,
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

/// See `--nice`.
const DEFAULT_NICE: i32 = -5;

/// Block or unblock SIGHUP in the calling thread (threads started later inherit the mask).
///
/// SIGHUP's default action ends the process: one that logrotate (or the unit's `ExecReload`)
/// sends while the auditor starts stays pending until the runtime listens for it, and is acted
/// on then (QA: a HUP 0.2 s after start killed it with an empty log). Blocked, not caught: a
/// caught signal interrupts the verifier, and the program load fails with EAGAIN.
fn hold_hangups(hold: bool) {
    // SAFETY: plain libc calls on a local, initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let how = if hold {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

fn run() -> Result<()> {
    hold_hangups(true);
    purge_freed_memory_at_once();
    let cli = Cli::parse();
    let mut settings = Settings::default();
    let mut warnings = Vec::new();
    if let Some(path) = &cli.config {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        // Only `audit.*` lines matter; a shared valkey.conf may hold other bytes elsewhere.
        warnings = settings
            .apply_config_text(&String::from_utf8_lossy(&bytes))
            .with_context(|| format!("config file {}", path.display()))?;
    }
    warnings.extend(
        settings
            .apply_args(&cli.settings)
            .map_err(anyhow::Error::msg)?,
    );
    for w in warnings {
        eprintln!("auditor: warning: {w}");
    }
    if let Some(pw) = &cli.control_password {
        settings.control_requirepass = pw.clone();
    }
    if cli.capture_cap == 0 {
        bail!("--capture-cap must be at least 1");
    }
    let wakeup_bytes = cli.wakeup_bytes.unwrap_or(u64::from(cli.ring_bytes) / 64);
    ring::check_sizes(cli.ring_bytes, wakeup_bytes).map_err(anyhow::Error::msg)?;
    for &pid in &cli.pids {
        check_target(pid, cli.any_process)?;
    }
    privileges::check_required()?;
    let spec = TargetSpec {
        pids: cli.pids.clone(),
        comms: cli.comms.clone(),
        all: cli.all,
        follow_restarts: cli.follow_restarts,
    };

    let metrics = Arc::new(Metrics::new(Vec::new()));
    let (sink, unreachable) = open_sink_at_start(&settings).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(e) = unreachable {
        eprintln!(
            "auditor: {}; records wait in the queue until it answers",
            e.message
        );
    }
    let table = CommandTable::builtin().context("loading the command table")?;

    let (mut capture, mut stream) = Capture::load(&CaptureConfig {
        ring_bytes: cli.ring_bytes,
        capture_cap: cli.capture_cap,
        reply_scan: cli.reply_scan,
        mode: cli.capture,
        // Fewer, larger batches: every wake-up costs the server an irq_work in its own syscall
        // and preempts it for the capture thread (nice -5). At 64 KiB, `-P 1 -d 1024` woke the
        // thread ~3000 times a second. Larger batches cost less CPU but each one preempts the
        // server for longer: at an eighth of the ring (1 MiB) the auditor used 15-20% less CPU
        // but the `-P 1` p99 grew; 256 KiB kept most of the saving with the lowest p99 of the
        // three (BENCHMARKS.md, session 8).
        wakeup_bytes,
    })?;
    if let Some(live) = stream.take_live_counters() {
        metrics.set_kernel_counters_source(Box::new(move || live.read()));
    }
    for name in spec.watched_comms() {
        capture.watch_comm(&name)?;
    }
    if spec.follow_restarts {
        // A restarted server is caught at exec by its name; its command line decides.
        for &pid in &spec.pids {
            capture.watch_comm(&targets::comm_of(pid))?;
        }
    }
    if capture.mode() == CaptureMode::Syscalls {
        // Targets before attach: none of their accepts is missed. Socket tracepoints register a
        // target's socket at its first read or write, so there the connections open now must be
        // registered first (`Registry::register` adds the target after them): a client sending
        // meanwhile would be taken for a new connection in mid-conversation.
        for &pid in &spec.pids {
            capture.add_target(pid)?;
        }
    }
    capture.attach()?;
    // Before the capabilities are dropped (a lower nice value may need CAP_SYS_NICE); the threads
    // started from here on inherit it.
    if let Err(e) = scheduling::set_nice(cli.nice) {
        eprintln!(
            "auditor: cannot set nice {} ({e}; needs CAP_SYS_NICE or the unit's Nice=); keeping nice {}",
            cli.nice,
            scheduling::nice()
        );
    }
    let _ = metrics.capture_mode.set(capture.mode().name());
    // Scanned after attach: a server started meanwhile is caught by both, and registered once.
    let mut found = spec.pids.clone();
    found.extend(targets::scan_matching(&spec));
    if capture.mode() == CaptureMode::Sockets {
        // Attaching a uprobe needs privileges that are dropped next: the C libraries of the
        // servers known now and the host's own are watched from the start, for every process
        // that uses them (other processes pay a trap per accept call; most never accept).
        let mut libcs: Vec<PathBuf> = found
            .iter()
            .filter_map(|&pid| {
                procscan::mapped_libc(pid).map(|p| format!("/proc/{pid}/root{p}").into())
            })
            .collect();
        libcs.extend(procscan::mapped_libc(std::process::id()).map(PathBuf::from));
        for libc in libcs {
            if let Err(e) = capture.watch_accepts(&libc) {
                eprintln!(
                    "auditor: {e:#}; connections of servers using it are seen from their first read or write"
                );
            }
        }
    }
    privileges::drop_after_attach()?;
    warn_if_log_directory_needs_dac_override(&settings);
    keep_freed_memory_briefly();

    let host = hostname();
    let mut session = Session::new(
        table,
        settings.clone(),
        host.clone(),
        wall_offset_ns(),
        cli.capture_cap,
    );
    let mut registry = Registry {
        node_name: std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()),
        host: host.clone(),
        targets: HashMap::new(),
        awaited: Vec::new(),
        audited: Vec::new(),
        rejected: HashSet::new(),
        last_describe: HashMap::new(),
        spec: spec.clone(),
    };
    let mut initial = Vec::new();
    let password = server_password(&cli)?;
    for pid in found {
        let explicit = spec.pids.contains(&pid);
        let users = match &password {
            // A server that cannot be asked (in its own network namespace, on a unix socket only,
            // another password) must not stop the others from being audited: its connections open
            // before attach show `unknown` until they AUTH, as without credentials.
            Some(pw) => existing_users(pid, cli.server_user.as_deref(), pw, &mut session)
                .unwrap_or_else(|e| {
                    eprintln!(
                        "auditor: pid {pid}: cannot ask the server for its connections' users \
                         ({e:#}); they show as unknown until they AUTH"
                    );
                    HashMap::new()
                }),
            None => HashMap::new(),
        };
        let registered = registry.register(
            pid,
            explicit,
            &users,
            &mut capture,
            &mut session,
            &metrics,
            &mut initial,
        );
        match registered {
            // A server named with --pid must be audited, or the auditor says so and stops.
            Err(e) if explicit => return Err(e.context(format!("cannot audit server {pid}"))),
            // One found by name must not stop the others.
            Err(e) => eprintln!("auditor: cannot audit server {pid}: {e:#}"),
            Ok(()) => {}
        }
    }

    let queue = Queue::new(
        settings.delivery.max_queue_size as usize,
        settings.delivery.overflow,
        line_format(&settings),
        Origin {
            hostname: host.clone(),
        },
        metrics.clone(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let start = audit_record(
        &host,
        b"start",
        settings_args(&settings, &pid_list(&registry.pids())),
    );
    let mut first = vec![start];
    first.append(&mut initial);
    let initial = first;
    let shared = Arc::new(SharedSettings::new(settings));
    let backend = Arc::new(Backend {
        settings: shared.clone(),
        metrics: metrics.clone(),
        config_path: cli.config.clone(),
        rewrite_lock: std::sync::Mutex::new(()),
        queue: queue.clone(),
        hostname: host.clone(),
    });

    // SIGHUP reopens the log file (logrotate), like Valkey's own log.
    let reopen = Arc::new(AtomicBool::new(false));
    // The sink thread's id, so the capture thread can set its scheduling policy too.
    let sink_tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
    let sink_thread = {
        let sink_tid = sink_tid.clone();
        let provider = SettingsSinks::new(shared.clone(), sink);
        let queue = queue.clone();
        let metrics = metrics.clone();
        let reopen = reopen.clone();
        std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                sink_tid.store(scheduling::current_tid(), Ordering::SeqCst);
                run_sink(queue, Box::new(provider), metrics, reopen)
            })?
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = rt.block_on(control::bind(cli.control))?;
    let metrics_endpoint = match cli.metrics {
        Some(addr) => {
            let listener = rt.block_on(prometheus::bind(addr))?;
            let backend = backend.clone();
            let page: Arc<dyn Fn() -> String + Send + Sync> = Arc::new(move || {
                let s = backend.settings.get();
                prometheus::render(
                    &backend.metrics,
                    &s.protocol_string(),
                    s.format.as_str(),
                    backend.queue.len_bytes(),
                )
            });
            Some((listener, page))
        }
        None => None,
    };

    let ring_bytes = cli.ring_bytes;
    let pids_text = pid_list(&registry.pids());
    let dump = match &cli.dump_events {
        Some(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            // The raw bytes of every connection, passwords included: owner-only, like a key.
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("creating {}", p.display()))?;
            // (`mode` applies to a new file only.)
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .with_context(|| format!("making {} owner-only", p.display()))?;
            Some(std::io::BufWriter::with_capacity(1 << 20, file))
        }
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
                    governor: RateGovernor::new(u64::from(ring_bytes), monotonic_ns()),
                    sink_tid,
                    capture,
                    ring_bytes: u64::from(ring_bytes),
                    registry,
                    stream,
                    session,
                    queue,
                    shared,
                    metrics,
                    stop,
                    dump,
                    capture_only: cli.bench_capture_only,
                }
                .run(initial)
            })?
    };

    eprintln!(
        "auditor: auditing {} → {} (control port {})",
        match (pids_text.is_empty(), spec.explicit_only()) {
            (true, _) => "no process yet".to_string(),
            (false, true) => format!("pid {pids_text}"),
            (false, false) => format!("pid {pids_text} and new matching processes"),
        },
        backend.settings.get().protocol_string(),
        cli.control
    );
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        // (This thread runs the runtime: a HUP held since start is delivered now.)
        hold_hangups(false);
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
            _ = control::serve(listener, backend, cli.enable_protected_configs) => {},
            _ = async {
                match metrics_endpoint {
                    Some((listener, page)) => prometheus::serve(listener, page).await,
                    None => std::future::pending().await,
                }
            } => {},
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
            _ = worker_done => {},
            _ = reopen_on_hup => {},
        }
        anyhow::Ok(())
    })?;
    stop.store(true, Ordering::SeqCst);
    // The stop record names every server audited in this run (restarts and servers found
    // later included); the start list if the capture thread ended early.
    let (result, pids_text) = match worker.join() {
        Ok(Ok(audited)) => (Ok(()), pid_list(&audited)),
        Ok(Err(e)) => (Err(e), pids_text),
        Err(_) => (Err(anyhow::anyhow!("capture thread panicked")), pids_text),
    };
    // A clean stop flushes everything: the stop record goes last, then the queue is drained.
    // With the settings in force at the end, as the start record has them at the start (QA:
    // what was changed at run time showed nowhere at the end of the run).
    let stop_rec = audit_record(&host, b"stop", settings_args(&shared.get(), &pids_text));
    queue.release_placed(u64::MAX);
    queue.push_final(&mut vec![stop_rec]);
    queue.close();
    // The sink gives up on a destination that refuses everything after a grace period, but a
    // write can also block for good (a pipe nobody reads, a hung NFS server): once the sink has
    // written nothing for longer than it may legitimately take, the process exits without it,
    // saying what was not written. A slow sink that keeps writing is waited for.
    let grace = SHUTDOWN_GRACE
        + Duration::from_millis(shared.get().tcp.timeout_ms)
        + Duration::from_secs(5);
    let mut written = metrics.bytes_written.load(Ordering::Relaxed);
    let mut deadline = Instant::now() + grace;
    while !sink_thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        let now_written = metrics.bytes_written.load(Ordering::Relaxed);
        if now_written != written {
            written = now_written;
            deadline = Instant::now() + grace;
        }
    }
    if sink_thread.is_finished() {
        let _ = sink_thread.join();
    } else {
        let unwritten = queue.unwritten_records();
        metrics.lost_sink.fetch_add(unwritten, Ordering::Relaxed);
        eprintln!(
            "auditor: giving up at shutdown: the sink wrote nothing for {} s (a write that never \
             returns: a pipe nobody reads?); {unwritten} records are not written",
            grace.as_secs()
        );
    }
    // The log may not hold every loss record (a sink that never recovered, a loss counted after
    // its last record): stderr, the last place left, gets the totals.
    if let Some(summary) = metrics.snapshot().loss_summary() {
        eprintln!(
            "auditor: losses (INFO audit, since start or the last CONFIG RESETSTAT): {summary}"
        );
    }
    result
}

/// Rolling, reopening after logrotate's `mv` and retention create, rename and delete files in the
/// log's directory, which needs write permission there without `CAP_DAC_OVERRIDE` (dropped after
/// attach). A directory owned by another user (`/var/log/valkey` owned by `valkey`) would let the
/// first roll fail much later; say so now.
fn warn_if_log_directory_needs_dac_override(settings: &Settings) {
    use std::os::unix::ffi::OsStrExt as _;
    let auditor::settings::Protocol::File(path) = &settings.protocol else {
        return;
    };
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return;
    };
    let Ok(c_dir) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a valid NUL-terminated path; AT_EACCESS checks with the effective ids and caps.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c_dir.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if rc != 0 {
        eprintln!(
            "auditor: warning: {} is not writable without CAP_DAC_OVERRIDE ({}): new files, rolls \
             and reopening after logrotate will fail there; make the directory the auditor's \
             user's (root's), or writable by its group",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
}

fn pid_list(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `command_args` of the start and stop records: version, pids and the settings (no secret).
fn settings_args(s: &Settings, pids: &str) -> Vec<u8> {
    let mut out = format!("version={} pids={pids}", env!("CARGO_PKG_VERSION"));
    for name in SETTING_NAMES {
        if let Some(v) = s.get(name)
            && !auditor::settings::is_secret(name)
        {
            out.push_str(&format!(" {}={}", name.trim_start_matches("audit."), v));
        }
    }
    out.into_bytes()
}

fn audit_record(host: &str, command: &[u8], args: Vec<u8>) -> Record {
    let mut rec = Record::event(Category::Audit, command, wall_now_us(), host);
    rec.command_args = args;
    rec.pid = std::process::id();
    rec
}

/// An address as records show it: IPv4 clients of a dual-stack socket as IPv4.
fn display_ip(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V6(v6) => Peer::from_v6(v6.octets(), 0).ip,
        ip => ip.to_string(),
    }
}

/// The password for --server-user: --server-password-file, else AUDITOR_SERVER_PASSWORD.
fn server_password(cli: &Cli) -> Result<Option<String>> {
    Ok(
        match (
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
        },
    )
}

/// With operator credentials, ask the server which user each open connection has (by fd). The
/// auditor's own connection is registered as ignored before its accept event is processed.
fn existing_users(
    pid: u32,
    user: Option<&str>,
    password: &str,
    session: &mut Session,
) -> Result<HashMap<u32, Vec<u8>>> {
    let addr = procscan::tcp_listen_addrs(pid)
        .into_iter()
        .next()
        .with_context(|| format!("server {pid} has no TCP listener to ask CLIENT LIST on"))?;
    let mut conn = serverquery::ServerConn::connect(addr, user, password)?;
    session.ignore_peer(Peer {
        ip: display_ip(conn.local.ip()),
        port: conn.local.port(),
    });
    conn.users_by_fd()
}

/// Register the client connections `pid` has open now with the kernel; those it did not know
/// already go to `open`.
fn register_open(
    pid: u32,
    capture: &mut Capture,
    session: &Session,
    open: &mut Vec<procscan::ExistingConn>,
) -> Result<()> {
    // A process that exited meanwhile has nothing to scan: it is dropped by the exit check.
    for conn in procscan::existing_connections(pid).unwrap_or_default() {
        // A connection the session knows whose close is still in the ring is not a new one; a
        // socket on the fd of one whose close was lost is.
        if session.is_ignored(&conn.peer) || session.knows_socket(pid, conn.fd, conn.ino) {
            continue;
        }
        if capture.register_existing_socket(pid, conn.fd, conn.ino)? {
            open.push(conn);
        }
    }
    Ok(())
}

/// The daemon's side of the control port.
struct Backend {
    settings: Arc<SharedSettings>,
    metrics: Arc<Metrics>,
    config_path: Option<PathBuf>,
    /// Held by CONFIG REWRITE.
    rewrite_lock: std::sync::Mutex<()>,
    /// CONFIG records go straight to the delivery queue, never waiting for room (forced in).
    queue: Queue,
    hostname: String,
}

impl ControlBackend for Backend {
    fn setting_names(&self) -> Vec<String> {
        SETTING_NAMES.iter().map(|s| s.to_string()).collect()
    }

    fn get_settings(&self, names: &[String]) -> Vec<Option<String>> {
        let settings = self.settings.get();
        names.iter().map(|name| settings.get(name)).collect()
    }

    fn set_settings(&self, pairs: &[(String, String)]) -> Result<(), String> {
        self.settings
            .update(|current| {
                let next = current.apply_all(pairs).map_err(|e| e.to_string())?;
                if pairs
                    .iter()
                    .any(|(name, _)| name.eq_ignore_ascii_case("audit.events"))
                    && let Some(name) = next.filter.undefined_event()
                {
                    // (At start, `events` may come before the `custom_category` it names.)
                    return Err(format!(
                        "CONFIG SET failed (possibly related to argument 'audit.events') - \
                         unknown event type '{name}': use connections, auth, config, keys, \
                         other, all, none or a category audit.custom_category defines"
                    ));
                }
                if next.protocol != current.protocol || next.delivery != current.delivery {
                    // Refuse a destination that cannot be used: the running one stays in use.
                    // Named after the first setting given that changes the destination.
                    let culprit = pairs
                        .iter()
                        .find(|pair| {
                            current
                                .apply_all(std::slice::from_ref(*pair))
                                .is_ok_and(|one| {
                                    one.protocol != current.protocol
                                        || one.delivery != current.delivery
                                })
                        })
                        .map_or_else(
                            || "audit.protocol".into(),
                            |(name, _)| name.to_ascii_lowercase(),
                        );
                    validate(&next).map_err(|e| {
                        format!(
                            "CONFIG SET failed (possibly related to argument '{culprit}') - {e}"
                        )
                    })?;
                }
                // The format from this moment on, in the records' order (see Queue::configure_at).
                self.queue.configure_at(
                    monotonic_ns(),
                    next.delivery.max_queue_size as usize,
                    next.delivery.overflow,
                    line_format(&next),
                );
                Ok(next)
            })
            .map(|_| ())
    }

    fn rewrite_config(&self) -> Result<(), String> {
        let Some(path) = &self.config_path else {
            return Err("The server is running without a config file".into());
        };
        // One rewrite at a time: two at once read each other's half-written results.
        let _one = self
            .rewrite_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let fail = |e: &dyn std::fmt::Display| format!("Rewriting config file: {e}");
        // A file that cannot be read is never taken for an empty one (it would be replaced by the
        // audit lines alone); only a missing one is, as Valkey does.
        let (original, meta) = match std::fs::read(path) {
            Ok(bytes) => (bytes, std::fs::metadata(path).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), None),
            Err(e) => return Err(fail(&e)),
        };
        let text = self.settings.get().rewrite_config_text(&original);
        // Atomically: a temporary file next to it, then rename, like Valkey.
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            use std::os::unix::fs::MetadataExt as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            // Owner-only from its creation (it may hold the control password); the original's
            // mode is set once the whole text is in. A stale one of an earlier crash goes first.
            let _ = std::fs::remove_file(&tmp);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
            if let Some(meta) = &meta {
                f.set_permissions(meta.permissions())?;
                // Its owner stays (the server may read it as its own user); if that is not
                // allowed the rewrite fails rather than hand the file to root.
                if f.metadata()?.uid() != meta.uid() || f.metadata()?.gid() != meta.gid() {
                    std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid())).map_err(
                        |e| {
                            std::io::Error::new(
                                e.kind(),
                                format!(
                                    "cannot keep its owner {}:{} ({e}; the auditor keeps no \
                                     CAP_CHOWN once attached): the file is left as it was",
                                    meta.uid(),
                                    meta.gid()
                                ),
                            )
                        },
                    )?;
                }
            }
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
                let _ = dir.sync_all();
            }
            Ok(())
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(&e)
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
            metrics::FilterSizes {
                prefix_filters: s.filter.prefix_filter.len(),
                custom_categories: s.filter.custom.len(),
            },
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
        let mut rec = Record::event(
            control::control_event_category(command),
            command.as_bytes(),
            wall_now_us(),
            &self.hostname,
        );
        rec.command_args = args.as_bytes().to_vec();
        rec.result = if success {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        rec.username = user.as_bytes().into();
        rec.client_ip = display_ip(client.ip()).into();
        rec.client_port = client.port();
        rec.error = error.as_bytes().to_vec();
        rec.pid = std::process::id();
        // Written in its place among the commands' records, which the pipeline writes a little
        // later than they happen.
        self.queue.push_at(monotonic_ns(), rec);
    }
}

/// Ring records one pass of the capture loop takes at most; a pass that took fewer emptied the
/// ring.
const PASS_RECORDS: usize = 65536;

/// The capture thread: drain the ring, run the pipeline, write records. Wakes at least every 10 ms so
/// records reach the file within tens of milliseconds even when the kernel batches wake-ups.
struct CaptureLoop {
    /// The loaded programs and maps; dropping it (when the loop ends) detaches everything.
    capture: Capture,
    ring_bytes: u64,
    /// SCHED_BATCH for the sink thread while the data rate is low and the queue shallow (this
    /// thread, which drains the ring, always keeps the normal policy).
    governor: RateGovernor,
    sink_tid: Arc<std::sync::atomic::AtomicI32>,
    registry: Registry,
    stream: CaptureStream,
    session: Session,
    queue: Queue,
    shared: Arc<SharedSettings>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    dump: Option<std::io::BufWriter<std::fs::File>>,
    /// `--bench-capture-only`: ring records are consumed unread.
    capture_only: bool,
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
    /// `--capture sockets` sees no close() of a unix socket, nor of a TCP socket that another
    /// process (a snapshot child) still holds, and a close whose report the full ring dropped is
    /// seen by neither mode: a connection whose fd no longer holds its socket has ended. Checked
    /// once a second, so its disconnection record is at most that late.
    fn close_ended(&mut self, seen_version: &mut u64, records: &mut Vec<Record>) {
        let ended: Vec<(u32, u32, u64)> = self
            .session
            .open_sockets()
            .into_iter()
            .filter(|&(tgid, fd, ino)| !procscan::fd_holds_socket(tgid, fd, ino))
            .collect();
        if ended.is_empty() {
            return;
        }
        // What the ring still holds of these connections (their last replies) goes first.
        self.drain_ring(seen_version, records, usize::MAX);
        let now = monotonic_ns();
        for (tgid, fd, ino) in ended {
            self.session.close_ended(tgid, fd, ino, now, records);
        }
    }

    /// Runs until stopped or the last target is gone; returns the pids audited meanwhile.
    fn run(mut self, initial: Vec<Record>) -> Result<Vec<u32>> {
        let mut records = initial;
        self.metrics.set_ring_usage(0, self.ring_bytes);
        self.write_all(&mut records);
        let mut seen_version = self.shared.version();
        let mut reported_drops = (0u64, 0u64);
        let mut published = [0u64; 11];
        let mut last_check = Instant::now();
        let mut last_sweep = Instant::now();
        let mut target_gone = false;
        loop {
            let (drained, drained_bytes) =
                self.drain_ring(&mut seen_version, &mut records, PASS_RECORDS);
            let now = monotonic_ns();
            let (queue_bytes, queue_max) = self.queue.fill();
            if let Some(batch) =
                self.governor
                    .after_pass(drained_bytes, queue_bytes as u64, queue_max as u64, now)
            {
                let sink = self.sink_tid.load(Ordering::SeqCst);
                if sink != 0 {
                    scheduling::set_policy(sink, batch);
                }
            }
            refresh_timeline(&self.shared, &mut self.session, &mut seen_version);
            if last_check.elapsed() >= Duration::from_millis(100) {
                last_check = Instant::now();
                self.publish_stats(&mut published);
                self.report_kernel_drops(&mut reported_drops, &mut records);
                // Exits the kernel could not report (ring full) are found here.
                for pid in self.registry.pids() {
                    if !process_alive(pid) {
                        let now = monotonic_ns();
                        self.drain_ring(&mut seen_version, &mut records, usize::MAX);
                        self.session.close_all(pid, now, &mut records);
                        self.session.remove_server(pid);
                        self.registry
                            .unregister(pid, &mut self.capture, &self.metrics);
                    }
                }
                if last_sweep.elapsed() >= Duration::from_secs(1) {
                    last_sweep = Instant::now();
                    self.close_ended(&mut seen_version, &mut records);
                }
                if drained < PASS_RECORDS {
                    // The ring was emptied: every event up to about now has been seen.
                    let now = monotonic_ns();
                    self.session.settle_quiet(now, &mut records);
                }
                self.write_all(&mut records);
            }
            if self.registry.all_explicit_gone() {
                target_gone = true;
                break;
            }
            if drained == 0 && self.stop.load(Ordering::SeqCst) {
                break;
            }
            // A nearly empty ring: sleep until the kernel signals a batch (or 10 ms pass) rather
            // than handle records one by one as they trickle in.
            if drained < 64 {
                self.stream.wait(10);
            }
        }
        let now = monotonic_ns();
        if target_gone {
            // Everything the kernel still holds (the exit already closed the connections).
            self.drain_ring(&mut seen_version, &mut records, usize::MAX);
            eprintln!(
                "auditor: pid {} exited; stopping",
                pid_list(&self.registry.spec.pids)
            );
        }
        if !target_gone {
            // Stopping: the kernel stops capturing first, then what it holds is read, so every
            // drop it counted is in the count below (it kept capturing, and dropping, until the
            // programs were detached after this loop, and those drops had no loss record).
            let tgids: Vec<u32> = self.registry.targets.keys().copied().collect();
            for tgid in tgids {
                self.capture.remove_target(tgid);
            }
            self.drain_ring(&mut seen_version, &mut records, usize::MAX);
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
        Ok(self.registry.audited)
    }

    /// Process up to `max` ring records; returns how many there were and their bytes.
    fn drain_ring(
        &mut self,
        seen_version: &mut u64,
        records: &mut Vec<Record>,
        max: usize,
    ) -> (usize, u64) {
        let mut drained = 0usize;
        let mut bytes = 0u64;
        let pass_start = monotonic_ns();
        // Events of this pass get the wall clock as it is now, steps of it included.
        self.session.set_wall_offset(wall_offset_ns());
        while drained < max
            && let Some(item) = self.stream.ring.next_record()
        {
            // A CONFIG SET applies from the very next command: one atomic load per event.
            if self.capture_only {
                bytes += item.len() as u64;
                drained += 1;
                continue;
            }
            refresh_timeline(&self.shared, &mut self.session, seen_version);
            if let Some(dump) = &mut self.dump {
                use std::io::Write as _;
                let _ = dump.write_all(&(item.len() as u32).to_le_bytes());
                let _ = dump.write_all(&item);
            }
            let registry = &self.registry;
            if let Some(mut ev) = capture::decode(&item, &|tgid, fd| registry.unix_path(tgid, fd)) {
                // A socket first seen at a read or write may be one whose accept report the full
                // ring dropped: only once the ring has dropped anything.
                let ring_lost = matches!(
                    ev,
                    CaptureEvent::Accept {
                        listen_fd: LISTEN_FD_UNKNOWN,
                        ..
                    }
                ) && self
                    .stream
                    .stats
                    .ring_drops()
                    .is_ok_and(|(records, _)| records > 0);
                let not_audited = self.registry.before_event(
                    &mut ev,
                    &mut self.capture,
                    &mut self.session,
                    &self.metrics,
                    ring_lost,
                    records,
                );
                // The auditor's own records of earlier moments go first.
                let ts = match &ev {
                    CaptureEvent::Accept { ts_ns, .. }
                    | CaptureEvent::Data { ts_ns, .. }
                    | CaptureEvent::Segments { ts_ns, .. }
                    | CaptureEvent::Close { ts_ns, .. }
                    | CaptureEvent::Process { ts_ns, .. } => *ts_ns,
                };
                if self.queue.placed_due(ts) {
                    self.queue.release_placed(ts);
                }
                let exited = match ev {
                    CaptureEvent::Process {
                        kind: ProcessEvent::Exit,
                        tgid,
                        ..
                    } => Some(tgid),
                    _ => None,
                };
                // What the registry wrote first (descriptions, closes), then the event's records,
                // formatted at once while they are in this core's cache; the batch goes to the
                // sink when full, or at the end of the pass.
                self.queue.append(records, &self.stop);
                if !not_audited {
                    self.session
                        .handle(ev, &mut self.queue.appender(&self.stop));
                    // CONFIG SET port succeeded: the records of the events after it carry the new
                    // `server_port`.
                    for pid in self.session.take_listener_changes().into_iter().flatten() {
                        self.registry
                            .describe_again(pid, &mut self.session, &self.metrics);
                    }
                }
                if let Some(tgid) = exited {
                    self.registry
                        .unregister(tgid, &mut self.capture, &self.metrics);
                }
            }
            bytes += item.len() as u64;
            drop(item);
            drained += 1;
        }
        // The ring held everything that happened before this pass began.
        if drained < max && self.queue.placed_due(pass_start) {
            self.queue.release_placed(pass_start);
        }
        self.queue.flush();
        (drained, bytes)
    }

    /// Turn drops the kernel counted since the last report into an AUDIT_LOSS record.
    fn report_kernel_drops(&mut self, reported: &mut (u64, u64), records: &mut Vec<Record>) {
        if let Ok(drops) = self.stream.kernel_drops()
            && drops.0 > reported.0
        {
            let now = monotonic_ns();
            self.session
                .kernel_loss(drops.0 - reported.0, drops.1 - reported.1, now, records);
            *reported = drops;
            self.adopt_unreported(now, records);
            self.write_all(records);
        }
    }

    /// With syscall tracepoints, a connection whose accept report the full ring dropped is held by
    /// the kernel as `SOCK_UNREPORTED`, its data counted as ring loss (it would otherwise reach a
    /// user space that does not know it, or be taken for another connection on a reused fd).
    /// After ring drops, the targets' client sockets the session does not know are registered
    /// again and audited like the connections open at attach, from their next command. (Socket
    /// tracepoints register such a socket at its next read or write by themselves.)
    fn adopt_unreported(&mut self, now: u64, records: &mut Vec<Record>) {
        if self.capture.mode() != CaptureMode::Syscalls {
            return;
        }
        for pid in self.registry.pids() {
            let mut found = Vec::new();
            if let Err(e) = register_open(pid, &mut self.capture, &self.session, &mut found) {
                eprintln!("auditor: looking for connections of {pid} whose accept was lost: {e:#}");
                continue;
            }
            for conn in found {
                self.session
                    .add_unseen(pid, conn.fd, conn.ino, conn.peer, now, records);
            }
        }
    }

    /// Hand records to the delivery queue (blocks in `overflow block` mode while it is full, which
    /// stops ring-buffer reads: the kernel then drops and counts, the server is never slowed).
    fn write_all(&mut self, records: &mut Vec<Record>) {
        self.queue.push_all(records, &self.stop);
    }

    /// Add what happened since the last call to the shared counters (deltas, so CONFIG RESETSTAT
    /// can zero them at any time).
    fn publish_stats(&mut self, last: &mut [u64; 11]) {
        use std::sync::atomic::Ordering::Relaxed;
        let st = &self.session.stats;
        if let Ok(drops) = self.stream.kernel_drops() {
            self.metrics.observe_kernel_drops(drops);
        }
        // Each counter is the sum of its loss records' `count`s.
        let now = [
            st.request_resyncs + st.guesses_dropped,
            st.reply_resync_commands,
            st.bytes_skipped,
            st.filtered,
            st.protocol_errors,
            st.bytes_elided,
            st.filter_lookups.prefix_filter_checks,
            st.filter_lookups.prefix_filter_matches,
            st.filter_lookups.custom_category_matches,
            st.commands_not_captured,
            st.tls_connections,
        ];
        let m = &self.metrics;
        let targets = [
            &m.request_resyncs,
            &m.reply_resyncs,
            &m.bytes_skipped,
            &m.filtered,
            &m.protocol_errors,
            &m.bytes_elided,
            &m.prefix_filter_checks,
            &m.prefix_filter_matches,
            &m.custom_category_matches,
            &m.commands_not_captured,
            &m.tls_connections,
        ];
        for ((t, n), l) in targets.iter().zip(now).zip(last.iter_mut()) {
            t.fetch_add(n.saturating_sub(*l), Relaxed);
            *l = n;
        }
        m.connections
            .store(self.session.connection_count() as u64, Relaxed);
        m.set_ring_usage(self.stream.take_ring_peak(), self.ring_bytes);
    }
}

/// The audited processes: registration (description, existing connections, counters) and the
/// lifecycle events the kernel reports (exec of a watched name, fork, exit).
struct Registry {
    spec: TargetSpec,
    host: String,
    node_name: Option<String>,
    targets: HashMap<u32, Target>,
    /// Explicit targets that exited, awaiting a successor (--follow-restarts): executable, port.
    awaited: Vec<(Vec<u8>, u16)>,
    /// Every pid audited since start, in the order they became targets (the stop record's).
    audited: Vec<u32>,
    /// Processes taken for a restarted server that turned out to be other servers: their
    /// connections accepted before that was known are not audited either (until the pid execs
    /// again).
    rejected: HashSet<u32>,
    /// When each target was last described (a port is learnt at the first accept, at most once a
    /// second per target).
    last_describe: HashMap<u32, Instant>,
}

impl Registry {
    fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.targets.keys().copied().collect();
        v.sort_unstable();
        v
    }

    fn unix_path(&self, tgid: u32, listen_fd: u32) -> Option<String> {
        let paths = &self.targets.get(&tgid)?.unix_paths;
        if listen_fd == LISTEN_FD_UNKNOWN {
            // Seen first at a read or write: Valkey has one unix listener.
            return paths
                .iter()
                .min_by_key(|(fd, _)| **fd)
                .map(|(_, p)| p.clone());
        }
        paths.get(&listen_fd).cloned()
    }

    /// Whether a TCP socket of `pid` first seen at a read or write was accepted from one of its
    /// listeners (its local port is one they listen on), rather than opened by the server itself.
    fn accepted_on(&mut self, pid: u32, local_port: u16) -> bool {
        let Some(t) = self.targets.get_mut(&pid) else {
            return false;
        };
        if !t.listen_ports.contains(&local_port) {
            // A listener opened since (CONFIG SET port).
            t.listen_ports = procscan::tcp_listen_ports(pid);
        }
        t.listen_ports.contains(&local_port)
    }

    /// Only --pid targets were asked for, none follows restarts, and none is left.
    fn all_explicit_gone(&self) -> bool {
        self.spec.explicit_only() && !self.spec.follow_restarts && self.targets.is_empty()
    }

    /// Start auditing `pid` (idempotent): describe it, give its open connections to the session.
    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        pid: u32,
        explicit: bool,
        users: &HashMap<u32, Vec<u8>>,
        capture: &mut Capture,
        session: &mut Session,
        metrics: &Metrics,
        out: &mut Vec<Record>,
    ) -> Result<()> {
        if self.targets.contains_key(&pid) {
            return Ok(());
        }
        if let Err(e) = procscan::fd_access(pid)
            && e.kind() == std::io::ErrorKind::PermissionDenied
        {
            // Nothing of it could be audited: its listening ports are unknown.
            bail!(
                "cannot read /proc/{pid}/fd ({e}): its listening ports and open connections \
                 cannot be found (a server run by another user needs CAP_SYS_PTRACE and \
                 CAP_DAC_READ_SEARCH)"
            );
        }
        // With socket tracepoints the kernel registers a target's socket at its first read or
        // write and takes it for a new connection: the connections open now are registered
        // first. With syscall tracepoints it registers sockets at accept: the pid becomes a
        // target first, so that none accepted meanwhile is missed.
        let sockets_mode = capture.mode() == CaptureMode::Sockets;
        let mut open_conns = Vec::new();
        if sockets_mode {
            register_open(pid, capture, session, &mut open_conns)?;
        }
        capture.add_target(pid)?;
        if !sockets_mode {
            register_open(pid, capture, session, &mut open_conns)?;
        }
        let target = Target {
            explicit,
            exe: targets::exe_of(pid),
            succeeds_port: 0,
            succeeds_unix: false,
            info: Arc::new(targets::describe(
                pid,
                &self.host,
                self.node_name.as_deref(),
            )),
            unix_paths: procscan::unix_listeners(pid),
            listen_ports: procscan::tcp_listen_ports(pid),
        };
        self.announce(pid, &target, session, metrics);
        if target.info.port != 0 {
            // Otherwise (a server that has just exec'd) its first accept describes it again.
            self.last_describe.insert(pid, Instant::now());
        }
        self.targets.insert(pid, target);
        if !self.audited.contains(&pid) {
            self.audited.push(pid);
        }
        let now = monotonic_ns();
        for conn in open_conns {
            let user = users.get(&conn.fd).cloned();
            session.add_existing(pid, conn.fd, conn.ino, conn.peer, user, now, out);
        }
        Ok(())
    }

    fn announce(&self, pid: u32, target: &Target, session: &mut Session, metrics: &Metrics) {
        let info = &target.info;
        session.set_server(pid, info.clone());
        metrics.target_added(TargetInfo {
            pid,
            ns_pid: info.ns_pid,
            port: info.port,
            comm: targets::comm_of(pid),
            container_id: info.container_id.clone(),
            pod_name: info.pod_name.clone(),
            pod_namespace: info.pod_namespace.clone(),
        });
    }

    /// Stop auditing `pid` (it exited): its sockets leave the kernel map, its counters stay.
    fn unregister(&mut self, pid: u32, capture: &mut Capture, metrics: &Metrics) {
        self.last_describe.remove(&pid);
        if !self.targets.contains_key(&pid) {
            // A forked child that never accepted (a snapshot child): it has no sockets to forget.
            capture.forget_target(pid);
            return;
        }
        capture.remove_target(pid);
        if let Some(t) = self.targets.remove(&pid) {
            metrics.target_removed(pid);
            if t.explicit && self.spec.follow_restarts && (t.succeeds_port != 0 || t.succeeds_unix)
            {
                // A candidate that never showed it was the successor: the slot is still awaited.
                eprintln!("auditor: pid {pid} exited");
            } else if t.explicit && self.spec.follow_restarts {
                eprintln!("auditor: pid {pid} exited; waiting for its restart");
                self.awaited.push((t.exe, t.info.port));
            } else if !self.all_explicit_gone() {
                // (The last one is reported by the capture loop, which stops then.)
                eprintln!("auditor: pid {pid} exited");
            }
        }
    }

    /// Target bookkeeping before the session sees an event: new processes, late descriptions.
    /// Returns true when the event is not to be audited: the accept of a process taken for a
    /// restarted server that turns out to be another server.
    fn before_event(
        &mut self,
        ev: &mut CaptureEvent<'_>,
        capture: &mut Capture,
        session: &mut Session,
        metrics: &Metrics,
        ring_lost: bool,
        out: &mut Vec<Record>,
    ) -> bool {
        match ev {
            CaptureEvent::Process {
                kind: ProcessEvent::Exec,
                tgid,
                comm,
                ..
            } => {
                let pid = *tgid;
                self.rejected.remove(&pid);
                let name = String::from_utf8_lossy(comm)
                    .trim_end_matches('\0')
                    .to_string();
                let exe = targets::exe_of(pid);
                // Every process of the awaited executable is a candidate until one listens on
                // the port (QA: another server started in the same instant took the only slot,
                // and the real successor was never audited); for a server without a TCP port,
                // until one listens on a unix socket only.
                let successor = self
                    .awaited
                    .iter()
                    .find(|(e, _)| *e == exe)
                    .map(|(_, p)| *p);
                let explicit = successor.is_some();
                let mut succeeds_port = 0;
                if let Some(port) = successor {
                    succeeds_port = port;
                    eprintln!("auditor: pid {pid} may be the restarted server; auditing it");
                } else if !self.spec.matches_comm(&name) {
                    // Watched only as a possible successor, and it is not one.
                    capture.remove_target(pid);
                    return false;
                }
                if let Err(e) = self.register(
                    pid,
                    explicit,
                    &HashMap::new(),
                    capture,
                    session,
                    metrics,
                    out,
                ) {
                    eprintln!("auditor: cannot audit new process {pid}: {e:#}");
                }
                if let Some(t) = self.targets.get_mut(&pid) {
                    t.succeeds_port = succeeds_port;
                    t.succeeds_unix = successor == Some(0);
                }
                // Already listening when registered (this event was handled late): the port
                // decides at once.
                self.not_the_successor(pid, capture, metrics);
            }
            // A server that daemonizes forks and its parent exits: audit the child process.
            // Snapshot children are in the kernel map too but accept nothing.
            CaptureEvent::Process {
                kind: ProcessEvent::Fork,
                tgid,
                child,
                ..
            } if self.targets.contains_key(tgid) && targets::is_process(*child) => {
                let _ = capture.add_target(*child);
            }
            CaptureEvent::Accept {
                tgid,
                fd,
                listen_fd,
                local_port,
                peer,
                ino,
                ts_ns,
            } => {
                let pid = *tgid;
                if *ino == 0 {
                    // Accepted through the uprobe or the accept syscall, neither of which sees the
                    // socket: its inode lets the once-a-second check find its end if the kernel
                    // does not report it (a unix socket the server closes with socket tracepoints;
                    // a close whose report the full ring dropped). Already closed: that check ends
                    // it too.
                    *ino = match procscan::socket_at(pid, *fd) {
                        Ok(Some(ino)) => ino,
                        Ok(None) => session::GONE_WHEN_SEEN,
                        Err(_) => 0,
                    };
                }
                if self.rejected.contains(&pid) {
                    return true;
                }
                // Seen first at a read or write (`--capture sockets`): a TCP socket the server
                // opened itself (to its primary, the cluster bus) is not a client connection,
                // and neither is a socket a snapshot child writes to (a diskless sync's RDB).
                // A closed TCP socket has lost its local port (a MIGRATE whose connect was
                // refused): where accepts are seen, one not seen at accept is the server's own.
                if *listen_fd == LISTEN_FD_UNKNOWN
                    && ((!self.targets.contains_key(&pid)
                        && self.targets.contains_key(&targets::parent_of(pid)))
                        || (*local_port != 0 && !self.accepted_on(pid, *local_port))
                        || (*local_port == 0 && !peer.is_unix() && capture.sees_accepts_of(pid)))
                {
                    capture.ignore_socket(pid, *fd);
                    return true;
                }
                let unnamed_unix = peer.ip == "unix" && peer.port == 0;
                let stale = self
                    .targets
                    .get(&pid)
                    .is_none_or(|t| t.info.port == 0 || unnamed_unix);
                // A process taken for a restarted server is checked at every accept until its port
                // is known: another server of the same executable must not be audited at all.
                let candidate = self
                    .targets
                    .get(&pid)
                    .is_some_and(|t| (t.succeeds_port != 0 || t.succeeds_unix) && t.info.port == 0);
                let due = candidate
                    || self
                        .last_describe
                        .get(&pid)
                        .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
                if stale && due {
                    self.describe_again(pid, session, metrics);
                    if self.not_the_successor(pid, capture, metrics) {
                        return true;
                    }
                }
                if unnamed_unix && let Some(path) = self.unix_path(pid, *listen_fd) {
                    // The listener was created after the target was registered.
                    *peer = Peer::unix(&path);
                }
                if *listen_fd == LISTEN_FD_UNKNOWN
                    && ring_lost
                    && !session.is_ignored(peer)
                    && capture.sees_accepts_of(pid)
                {
                    // This server's accepts are seen and the ring has dropped reports: one first
                    // seen at a read or write had its accept report dropped, and what it sent
                    // until now is part of that loss (an AUTH perhaps: QA). Audited like a
                    // connection open at attach.
                    session.add_unseen(pid, *fd, *ino, peer.clone(), *ts_ns, out);
                    return true;
                }
            }
            _ => {}
        }
        false
    }

    /// A process taken for a restarted server listens on another port: it is another server of
    /// the same executable. Stop auditing it and keep waiting.
    fn not_the_successor(&mut self, pid: u32, capture: &mut Capture, metrics: &Metrics) -> bool {
        let Some(t) = self.targets.get(&pid) else {
            return false;
        };
        let (port, expected) = (t.info.port, t.succeeds_port);
        if t.succeeds_unix {
            if port == 0 {
                if !t.info.unix_socket.is_empty() {
                    // Listening on a unix socket only, as its predecessor: the successor.
                    self.confirm_successor(pid, 0);
                }
                return false;
            }
            // Listening on a TCP port where its predecessor had none: another server (QA).
            self.reject_candidate(pid, capture, metrics);
            eprintln!(
                "auditor: pid {pid} listens on port {port}, its predecessor on none: not audited"
            );
            return true;
        }
        if expected == 0 || port == 0 {
            return false;
        }
        if port == expected {
            self.confirm_successor(pid, expected);
            return false;
        }
        if self.spec.matches_comm(&targets::comm_of(pid)) {
            return false;
        }
        self.reject_candidate(pid, capture, metrics);
        eprintln!("auditor: pid {pid} listens on port {port}, not {expected}: not audited");
        true
    }

    /// The candidate is the successor: the slot it fills (its executable, `port`) is no longer
    /// awaited.
    fn confirm_successor(&mut self, pid: u32, port: u16) {
        let Some(t) = self.targets.get_mut(&pid) else {
            return;
        };
        t.succeeds_port = 0;
        t.succeeds_unix = false;
        let exe = t.exe.clone();
        if let Some(i) = self
            .awaited
            .iter()
            .position(|(e, p)| *e == exe && *p == port)
        {
            self.awaited.remove(i);
        }
    }

    /// The candidate is another server: not audited.
    fn reject_candidate(&mut self, pid: u32, capture: &mut Capture, metrics: &Metrics) {
        capture.remove_target(pid);
        self.targets.remove(&pid);
        // Not audited after all: not in the stop record's list either (QA).
        self.audited.retain(|&p| p != pid);
        self.last_describe.remove(&pid);
        metrics.target_removed(pid);
        self.rejected.insert(pid);
    }

    /// Read a target's description again (its port once it listens); a forked child that
    /// accepts its first client is registered here.
    fn describe_again(&mut self, pid: u32, session: &mut Session, metrics: &Metrics) {
        self.last_describe.insert(pid, Instant::now());
        let info = Arc::new(targets::describe(
            pid,
            &self.host,
            self.node_name.as_deref(),
        ));
        let target = self.targets.entry(pid).or_insert_with(|| Target {
            explicit: false,
            exe: targets::exe_of(pid),
            succeeds_port: 0,
            succeeds_unix: false,
            info: info.clone(),
            unix_paths: HashMap::new(),
            listen_ports: Vec::new(),
        });
        target.info = info;
        target.unix_paths = procscan::unix_listeners(pid);
        target.listen_ports = procscan::tcp_listen_ports(pid);
        let target = target.clone();
        self.announce(pid, &target, session, metrics);
    }
}
