//! The two clocks records need: the kernel's monotonic clock, which stamps every capture event
//! (`bpf_ktime_get_ns`), and the wall clock records show.

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` uses for event stamps.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

/// The wall clock now, in µs since the epoch: the time of the auditor's own records.
pub fn wall_now_us() -> i64 {
    clock_ns(libc::CLOCK_REALTIME) / 1000
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC in ns: added to an event's stamp it gives the wall time.
/// Read afresh for every batch of events, never once at start: a step of the wall clock (NTP,
/// a VM resumed or migrated, an operator's `date -s`) moves it, and records must show the time
/// the host's other logs show.
pub fn wall_offset_ns() -> i64 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}
