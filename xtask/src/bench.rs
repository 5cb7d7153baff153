//! `cargo xtask bench`: the cost of auditing, measured with redis-benchmark against a real
//! valkey-server, interleaving runs without (A) and with (B) the auditor attached, then the offline
//! pipeline benchmark on a capture recorded during the B runs.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub struct Options {
    pub rounds: usize,
    pub seconds: f64,
    pub pipelines: Vec<u32>,
    pub data_sizes: Vec<u32>,
    /// Also run a third variant per round: the auditor attached with `--bench-capture-only` (the
    /// kernel side and the ring's draining, no pipeline), to split the cost in two.
    pub capture_only: bool,
    /// The auditor's `--capture` mode.
    pub capture: String,
    pub root: PathBuf,
}

const VALKEY_PORT: u16 = 7390;
const CONTROL_PORT: u16 = 7391;

/// One redis-benchmark result line.
#[derive(Clone, Debug)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// What one auditor run cost and wrote.
#[derive(Clone, Debug, Default)]
struct AuditorRun {
    cpu_s: f64,
    peak_rss_kb: u64,
    records: u64,
    expected: u64,
    losses: u64,
}

fn wait_port(port: u16, deadline: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on port {port} after {deadline:?}")
}

fn start_valkey(root: &Path, dir: &Path) -> Result<Child> {
    // Another server on the port (one scripts/ab-bench.sh leaves running) would answer for ours,
    // which then fails to bind and exits: the runs would measure that server, unaudited.
    if TcpStream::connect(("127.0.0.1", VALKEY_PORT)).is_ok() {
        bail!(
            "port {VALKEY_PORT} is already in use (a server left by scripts/ab-bench.sh? `redis-cli -p {VALKEY_PORT} shutdown nosave`)"
        );
    }
    let bin = root.join(".venv/bin/valkey-server");
    let child = Command::new(&bin)
        .args([
            "--port",
            &VALKEY_PORT.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (run scripts/setup.sh first)", bin.display()))?;
    wait_port(VALKEY_PORT, Duration::from_secs(10))?;
    Ok(child)
}

fn redis_benchmark(
    test: &str,
    n: u64,
    pipeline: u32,
    data: u32,
) -> Result<BTreeMap<String, Sample>> {
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &VALKEY_PORT.to_string(),
            "-t",
            test,
            "-c",
            "50",
            "-r",
            "100000",
            "--csv",
        ])
        .args([
            "-n",
            &n.to_string(),
            "-P",
            &pipeline.to_string(),
            "-d",
            &data.to_string(),
        ])
        .stderr(Stdio::null())
        .output()
        .context("running redis-benchmark (apt package redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut res = BTreeMap::new();
    for line in text.lines().skip(1) {
        let cols: Vec<String> = line
            .split(',')
            .map(|c| c.trim_matches('"').to_string())
            .collect();
        if cols.len() >= 7 {
            res.insert(
                cols[0].clone(),
                Sample {
                    rps: cols[1].parse().unwrap_or(0.0),
                    p50_ms: cols[4].parse().unwrap_or(0.0),
                    p99_ms: cols[6].parse().unwrap_or(0.0),
                },
            );
        }
    }
    if res.is_empty() {
        bail!("redis-benchmark printed no results: {text}");
    }
    Ok(res)
}

fn proc_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // Clock ticks: USER_HZ is 100 on Linux.
    ticks / 100.0
}

fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Count the SET/GET records and loss records in a JSON audit log.
fn count_records(log: &Path) -> Result<(u64, u64)> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut cmds = 0;
    let mut losses = 0;
    let mut causes: BTreeMap<&str, u64> = BTreeMap::new();
    for line in text.lines() {
        if line.contains(r#""category":"AUDIT_LOSS""#) {
            losses += 1;
            let cause = line
                .split("cause=")
                .nth(1)
                .and_then(|rest| rest.split([' ', '"']).next())
                .unwrap_or("?");
            *causes.entry(cause).or_default() += 1;
        } else if line.contains(r#""command":"set""#) || line.contains(r#""command":"get""#) {
            cmds += 1;
        }
    }
    if !causes.is_empty() {
        eprintln!("loss records by cause: {causes:?}");
    }
    Ok((cmds, losses))
}

fn run_with_auditor(
    opts: &Options,
    valkey_pid: u32,
    dir: &Path,
    dump: Option<&Path>,
    capture_only: bool,
    work: impl FnOnce() -> Result<BTreeMap<String, Sample>>,
) -> Result<(BTreeMap<String, Sample>, AuditorRun)> {
    let log = dir.join("audit.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new(opts.root.join("target/release/auditor"));
    cmd.args([
        "--pid",
        &valkey_pid.to_string(),
        "--control",
        &format!("127.0.0.1:{CONTROL_PORT}"),
        "--capture",
        &opts.capture,
    ]);
    if let Some(d) = dump {
        cmd.arg("--dump-events").arg(d);
    }
    if capture_only {
        cmd.arg("--bench-capture-only");
    }
    cmd.arg("audit.protocol")
        .arg(format!("file {}", log.display()))
        .args([
            "audit.format",
            "json",
            "audit.events",
            "all",
            "audit.command_result_mode",
            "all",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .context("starting target/release/auditor (cargo build --release)")?;
    wait_port(CONTROL_PORT, Duration::from_secs(30))?;
    let result = work();
    let pid = child.id();
    let cpu = proc_cpu_seconds(pid);
    let rss = peak_rss_kb(pid);
    // SAFETY: signalling our own child.
    unsafe { libc_kill(pid as i32, 15) };
    let status = child.wait()?;
    if !status.success() {
        bail!("auditor exited with {status}");
    }
    let (records, losses) = count_records(&log)?;
    let samples = result?;
    Ok((
        samples,
        AuditorRun {
            cpu_s: cpu,
            peak_rss_kb: rss,
            records,
            expected: 0,
            losses,
        },
    ))
}

/// SET + GET calls the server has executed (INFO commandstats): the requests really sent.
fn server_set_get_calls() -> Result<u64> {
    let out = Command::new("redis-cli")
        .args(["-p", &VALKEY_PORT.to_string(), "INFO", "commandstats"])
        .output()
        .context("redis-cli INFO commandstats")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0;
    for line in text.lines() {
        if let Some(rest) = line
            .strip_prefix("cmdstat_set:calls=")
            .or_else(|| line.strip_prefix("cmdstat_get:calls="))
        {
            total += rest
                .split(',')
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// The bench's scratch directory (audit logs of several GB, the capture), removed however the
/// bench ends: failed runs used to leave theirs behind until the disk filled.
struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(opts: &Options) -> Result<()> {
    let scratch =
        ScratchDir(std::env::temp_dir().join(format!("auditor-bench-{}", std::process::id())));
    let dir = scratch.0.clone();
    std::fs::create_dir_all(&dir)?;
    let status = Command::new("cargo")
        .args(["build", "--release", "--quiet"])
        .current_dir(&opts.root)
        .status()?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let mut valkey = start_valkey(&opts.root, &dir)?;
    let valkey_pid = valkey.id();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "# auditor bench (--capture {}): valkey-server 9.1.2 (pid {valkey_pid}), redis-benchmark -c 50 -r 100000, {cpus} cpus, {} rounds, ~{}s per test",
        opts.capture, opts.rounds, opts.seconds
    );
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    let mut kernel_rows = Vec::new();
    let capture = dir.join("capture.bin");
    for &p in &opts.pipelines {
        for &d in &opts.data_sizes {
            // Calibrate the request count for about `seconds` per test, without the auditor.
            let probe = redis_benchmark("set,get", if p > 1 { 400_000 } else { 50_000 }, p, d)?;
            let rps = probe
                .values()
                .map(|s| s.rps)
                .fold(f64::MAX, f64::min)
                .max(1000.0);
            let n = ((rps * opts.seconds) as u64).max(10_000);
            let mut a: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
            let mut b: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
            let mut runs = Vec::new();
            // `--capture-only`: the third variant's samples and auditor CPU seconds.
            let mut c: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
            let mut c_cpu = Vec::new();
            for round in 0..opts.rounds {
                for (k, v) in redis_benchmark("set,get", n, p, d)? {
                    a.entry(k).or_default().push(v);
                }
                let dump = (round == 0 && p == 16 && d == 3).then_some(capture.as_path());
                let before = server_set_get_calls()?;
                let (samples, mut run) =
                    run_with_auditor(opts, valkey_pid, &dir, dump, false, || {
                        redis_benchmark("set,get", n, p, d)
                    })?;
                run.expected = server_set_get_calls()? - before;
                if run.records != run.expected || run.losses != 0 {
                    failures.push(format!(
                        "P{p} d{d} round {round}: {} records for {} requests, {} loss records",
                        run.records, run.expected, run.losses
                    ));
                }
                for (k, v) in samples {
                    b.entry(k).or_default().push(v);
                }
                runs.push(run);
                if opts.capture_only {
                    let (samples, run) =
                        run_with_auditor(opts, valkey_pid, &dir, None, true, || {
                            redis_benchmark("set,get", n, p, d)
                        })?;
                    for (k, v) in samples {
                        c.entry(k).or_default().push(v);
                    }
                    c_cpu.push(run.cpu_s);
                }
            }
            for test in ["SET", "GET"] {
                let (Some(sa), Some(sb)) = (a.get(test), b.get(test)) else {
                    continue;
                };
                let ra = median(sa.iter().map(|s| s.rps).collect());
                let rb = median(sb.iter().map(|s| s.rps).collect());
                rows.push(format!(
                    "| {test} | {p} | {d} | {ra:.0} | {rb:.0} | {:.2} | {:.3} / {:.3} | {:.3} / {:.3} | {:.1} | {} | {} / {} |",
                    rb / ra,
                    median(sa.iter().map(|s| s.p50_ms).collect()),
                    median(sa.iter().map(|s| s.p99_ms).collect()),
                    median(sb.iter().map(|s| s.p50_ms).collect()),
                    median(sb.iter().map(|s| s.p99_ms).collect()),
                    median(runs.iter().map(|r| r.cpu_s).collect()),
                    runs.iter().map(|r| r.peak_rss_kb).max().unwrap_or(0) / 1024,
                    runs.iter().map(|r| r.records).sum::<u64>(),
                    runs.iter().map(|r| r.expected).sum::<u64>(),
                ));
                if let Some(sc) = c.get(test) {
                    let rc = median(sc.iter().map(|s| s.rps).collect());
                    kernel_rows.push(format!(
                        "| {test} | {p} | {d} | {ra:.0} | {rc:.0} | {:.2} | {:.3} / {:.3} | {:.3} / {:.3} | {:.1} |",
                        rc / ra,
                        median(sa.iter().map(|s| s.p50_ms).collect()),
                        median(sa.iter().map(|s| s.p99_ms).collect()),
                        median(sc.iter().map(|s| s.p50_ms).collect()),
                        median(sc.iter().map(|s| s.p99_ms).collect()),
                        median(c_cpu.clone()),
                    ));
                }
            }
            println!("done: P{p} d{d} ({n} requests per test)");
        }
    }
    let _ = valkey.kill();
    let _ = valkey.wait();
    println!();
    println!(
        "| test | -P | -d | ops/s without | ops/s with | ratio | p50/p99 ms without | p50/p99 ms with | auditor CPU s (per run, SET+GET) | auditor peak RSS MB | records written / requests sent (SET+GET, all rounds) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    if !kernel_rows.is_empty() {
        println!();
        println!(
            "## kernel side alone (`--capture-only`: programs attached, ring drained, no pipeline)"
        );
        println!(
            "| test | -P | -d | ops/s without | ops/s capture only | ratio | p50/p99 ms without | p50/p99 ms capture only | auditor CPU s (per run) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for r in &kernel_rows {
            println!("{r}");
        }
    }
    if capture.exists() {
        println!();
        println!(
            "## offline pipeline (capture of the first P16 d3 run: {})",
            capture.display()
        );
        // The live runs leave gigabytes of log being written back: let the disk finish, so the
        // offline figure measures the pipeline rather than the previous phase's writeback
        // (measured: 1.6-1.9 M records/s/core under a concurrent `dd`, 2.5-2.7 M without).
        let _ = Command::new("sync").status();
        let status = Command::new(opts.root.join("target/release/pipeline-bench"))
            .arg(&capture)
            .arg("--out")
            .arg(dir.join("pipeline-bench.out"))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => failures.push(format!("pipeline-bench exited with {s}")),
            Err(e) => println!("pipeline-bench not available: {e}"),
        }
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        bail!("{} bench runs lost records", failures.len());
    }
    Ok(())
}
