//! Offline benchmark of the userspace pipeline alone.
//!
//! Replays a capture written by `auditor --dump-events <file>` (repeated `[u32 LE length][ring
//! record]`, each record exactly what the BPF ring buffer delivered) through the same stages the
//! daemon runs on its capture and sink threads: decode → `Session::handle` (reassembly, RESP parsing,
//! classification, filter) → `delivery::Queue` (room, seq, formatting into batches of lines) → the
//! daemon's file sink (`sink::file::FileSink` with the default settings: one `write()` per batch, the
//! page-cache drop-behind on its helper thread). The pipeline runs on one thread, so records/s (by
//! that thread's CPU time) is records per second per core; the CPU time of all threads (the
//! drop-behind helper's too) is shown beside it.
//!
//! The file is loaded and split into ring records before timing. Allocations are counted by a
//! counting global allocator (this binary only).
//!
//! Usage: `pipeline-bench <capture-file> [--format text|json|csv] [--out <file>] [--iterations N]`

use std::alloc::{GlobalAlloc, Layout};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use auditor::capture;
use auditor::commands::CommandTable;
use auditor::delivery::{LineFormat, Origin, Queue};
use auditor::format::Format;
use auditor::metrics::Metrics;
use auditor::record::Record;
use auditor::session::Session;
use auditor::settings::{Overflow, Settings};
use auditor::sink::Sink;
use auditor::sink::file::FileSink;
use auditor::sinkset::file_options;
use mimalloc::MiMalloc;

/// `MiMalloc` (the daemon's allocator), counting every allocation (realloc counts as one, with its
/// new size).
///
/// The counters are bumped with a plain load and store rather than a locked read-modify-write: the
/// pipeline runs on this one thread, and a `lock xadd` per allocation would itself cost more than a
/// fast-path malloc. (Allocations on other threads, if any, may be undercounted, never miscounted
/// for this thread.)
struct Counting;

fn count(bytes: usize) {
    ALLOCS.store(ALLOCS.load(Relaxed) + 1, Relaxed);
    ALLOC_BYTES.store(ALLOC_BYTES.load(Relaxed) + bytes as u64, Relaxed);
}

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to `MiMalloc`; the counters have no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { MiMalloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Options {
    capture: String,
    format: Format,
    out: String,
    iterations: usize,
}

fn usage() -> String {
    "usage: pipeline-bench <capture-file> [--format text|json|csv] [--out <file>] [--iterations N]"
        .to_string()
}

fn parse_args() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut capture = None;
    let mut format = Format::Json;
    let mut out = "/tmp/pipeline-bench.out".to_string();
    let mut iterations = 5usize;
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--format" => {
                format = value("--format")?
                    .parse()
                    .map_err(|e: auditor::format::UnknownFormat| e.to_string())?
            }
            "--out" => out = value("--out")?,
            "--iterations" => {
                iterations = value("--iterations")?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or("--iterations needs a positive number")?
            }
            "-h" | "--help" => return Err(usage()),
            s if s.starts_with("--") => return Err(format!("unknown option {s}\n{}", usage())),
            s if capture.is_none() => capture = Some(s.to_string()),
            s => return Err(format!("unexpected argument {s}\n{}", usage())),
        }
    }
    Ok(Options {
        capture: capture.ok_or_else(usage)?,
        format,
        out,
        iterations,
    })
}

/// Split the dump into ring records.
fn split_records(data: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or("truncated length prefix")?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(format!(
                "truncated record: {len} bytes announced, {} left",
                tail.len()
            ));
        }
        let (record, tail) = tail.split_at(len);
        records.push(record);
        rest = tail;
    }
    Ok(records)
}

fn thread_cpu_time() -> Duration {
    cpu_time(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn cpu_time(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Run {
    records: u64,
    wall: Duration,
    cpu: Duration,
    /// All threads: the drop-behind helper's writeback and page drops too.
    cpu_all: Duration,
    bytes_written: u64,
    allocs: u64,
    alloc_bytes: u64,
}

impl Run {
    fn per_sec(&self) -> f64 {
        self.records as f64 / self.cpu.as_secs_f64()
    }
}

fn run_once(
    events: &[&[u8]],
    table: &CommandTable,
    opts: &Options,
    file: &mut FileSink,
) -> Result<Run, String> {
    let settings = Settings {
        format: opts.format,
        ..Settings::default()
    };
    let mut session = Session::new(table.clone(), settings, "bench-host".into(), 0, 65536);
    let mut records: Vec<Record> = Vec::with_capacity(1024);
    let queue = Queue::new(
        16 << 20,
        Overflow::Block,
        LineFormat {
            format: opts.format,
            per_server: false,
        },
        Origin {
            hostname: "bench-host".into(),
        },
        Arc::new(Metrics::new(Vec::new())),
    );
    let stop = AtomicBool::new(false);
    let mut lines = 0u64;
    let mut bytes_written = 0u64;
    let mut last_ts = 0u64;
    let no_unix = |_: u32, _: u32| None;

    let allocs0 = ALLOCS.load(Relaxed);
    let bytes0 = ALLOC_BYTES.load(Relaxed);
    let cpu0 = thread_cpu_time();
    let cpu_all0 = cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID);
    let wall0 = Instant::now();

    // The sink thread's part, on this thread: write each batch the queue has ready.
    let mut write_ready = |file: &mut FileSink| -> Result<(), auditor::sink::SinkError> {
        while let Some(batch) = queue.pop(Duration::ZERO) {
            file.write_batch(&batch.bytes, batch.count)?;
            bytes_written += batch.bytes.len() as u64;
            lines += batch.count as u64;
            queue.recycle(batch);
        }
        Ok(())
    };
    for bytes in events {
        if let Some(ev) = capture::decode(bytes, &no_unix) {
            if let auditor::session::CaptureEvent::Data { ts_ns, .. }
            | auditor::session::CaptureEvent::Segments { ts_ns, .. } = &ev
            {
                last_ts = *ts_ns;
            }
            // Formatted at once, as the daemon's capture thread does.
            session.handle(ev, &mut queue.appender(&stop));
        }
        write_ready(file).map_err(|e| e.to_string())?;
    }
    // Requests still waiting for a reply at the end of the capture.
    session.flush_all(last_ts, &mut records);
    queue.push_all(&mut records, &stop);
    write_ready(file).map_err(|e| e.to_string())?;

    let wall = wall0.elapsed();
    let cpu = thread_cpu_time().saturating_sub(cpu0);
    let cpu_all = cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(cpu_all0);
    let allocs = ALLOCS.load(Relaxed) - allocs0;
    let alloc_bytes = ALLOC_BYTES.load(Relaxed) - bytes0;
    drop(session);
    Ok(Run {
        records: lines,
        wall,
        cpu,
        cpu_all,
        bytes_written,
        allocs,
        alloc_bytes,
    })
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipeline-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<(), String> {
    let opts = parse_args()?;
    let data =
        std::fs::read(&opts.capture).map_err(|e| format!("reading {}: {e}", opts.capture))?;
    let events = split_records(&data).map_err(|e| format!("{}: {e}", opts.capture))?;
    let table = CommandTable::builtin().map_err(|e| e.to_string())?;
    println!(
        "capture: {} ({} ring records, {} bytes), format {}, output {}",
        opts.capture,
        events.len(),
        data.len(),
        opts.format,
        opts.out
    );
    let mut runs = Vec::with_capacity(opts.iterations);
    for i in 0..opts.iterations {
        let _ = std::fs::remove_file(&opts.out);
        let mut file = file_options(&Settings::default(), std::path::Path::new(&opts.out))
            .and_then(FileSink::open)
            .map_err(|e| format!("opening {}: {e}", opts.out))?;
        let run = run_once(&events, &table, &opts, &mut file)?;
        file.flush(true).map_err(|e| e.to_string())?;
        println!(
            "run {}: {} records in {:.3} s (cpu {:.3} s, all threads {:.3} s): {:.0} records/s, \
             {:.0} ns/record, {} bytes written, {:.1} allocs/record, {:.1} bytes allocated/record",
            i + 1,
            run.records,
            run.wall.as_secs_f64(),
            run.cpu.as_secs_f64(),
            run.cpu_all.as_secs_f64(),
            run.per_sec(),
            1e9 / run.per_sec(),
            run.bytes_written,
            run.allocs as f64 / run.records.max(1) as f64,
            run.alloc_bytes as f64 / run.records.max(1) as f64,
        );
        runs.push(run);
    }
    runs.sort_by(|a, b| a.per_sec().total_cmp(&b.per_sec()));
    let m = &runs[runs.len() / 2];
    let n = m.records.max(1) as f64;
    println!("median of {} runs (by thread CPU time):", runs.len());
    println!("  records            {}", m.records);
    println!(
        "  elapsed            {:.3} s wall, {:.3} s cpu ({:.3} s all threads)",
        m.wall.as_secs_f64(),
        m.cpu.as_secs_f64(),
        m.cpu_all.as_secs_f64()
    );
    println!("  records/s/core     {:.0}", m.per_sec());
    println!(
        "  records/s (wall)   {:.0}",
        m.records as f64 / m.wall.as_secs_f64()
    );
    println!("  ns/record          {:.1}", 1e9 / m.per_sec());
    println!(
        "  bytes written      {} ({:.1} per record)",
        m.bytes_written,
        m.bytes_written as f64 / n
    );
    let best = &runs[runs.len() - 1];
    println!(
        "  best run           {:.0} records/s/core, {:.1} ns/record",
        best.per_sec(),
        1e9 / best.per_sec()
    );
    println!("  allocs/record      {:.2}", m.allocs as f64 / n);
    println!("  bytes alloc/record {:.1}", m.alloc_bytes as f64 / n);
    Ok(())
}
