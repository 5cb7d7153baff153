//! The BPF edge: load the kernel programs, pick targets, register sockets, attach the tracepoints,
//! and decode what the ring buffer delivers. Nothing here knows about RESP or records.

use anyhow::{Context as _, Result, anyhow, bail};
use auditor_common::{
    AF_INET, AF_INET6, AF_UNIX, AcceptEvent, CFG_CAPTURE_CAP, CFG_REPLY_SCAN, CFG_SK_INO,
    CFG_SK_INO_DEREF, CFG_SKC_DADDR, CFG_SKC_DPORT, CFG_SKC_FAMILY, CFG_SKC_NUM, CFG_SKC_V6_DADDR,
    CFG_WAKEUP_BYTES, CloseEvent, Comm, DATA_FLAG_SEGMENTS, DATA_FLAG_TAIL, DATA_HDR_LEN, DIR_IN,
    DataEvent, EventKind, ProcEvent, SOCK_IGNORED, SOCK_UNREPORTED, STAT_RING_DROP_BYTES,
    STAT_RING_DROPS, STAT_RING_PEAK, SocketState, socket_key, target_hint_slot,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{Program, ProgramError, RawTracePoint, TracePoint, UProbe, uprobe::UProbeScope},
};

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use crate::ring::RingReader;
use crate::session::{CaptureEvent, Peer, ProcessEvent};

/// The eBPF object built by `auditor/build.rs` (aya-build), embedded in the binary.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/auditor"));

/// Loaded and attached kernel programs. Dropping it detaches everything.
pub struct Capture {
    ebpf: Ebpf,
    sockets: HashMap<MapData, u64, SocketState>,
    targets: HashMap<MapData, u32, u32>,
    /// The kernel's prefilter in front of `targets` (see `TARGET_HINTS` in auditor-ebpf).
    target_hints: Array<MapData, u32>,
    comms: HashMap<MapData, Comm, u32>,
    mode: CaptureMode,
    /// `--capture sockets`: the C libraries (device, inode) whose `accept4`/`accept` are watched.
    accept_libcs: Vec<(u64, u64)>,
    /// Of those, the ones whose uprobes are attached.
    watched_libcs: Vec<(u64, u64)>,
}

/// Where the kernel sees the server's client I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureMode {
    /// `sockets` where the kernel has the socket tracepoints and BTF (Linux 6.3+), else `syscalls`.
    Auto,
    /// Syscall exits (accept, read/write family) and close(): every connection from its accept,
    /// but while attached every task on the host takes the slow syscall path.
    Syscalls,
    /// The socket tracepoints: only socket I/O pays. Accepts come from uprobes on the servers'
    /// C library, closes are inferred (auditor-ebpf's `sock_capture`).
    Sockets,
}

impl CaptureMode {
    /// The name operators see (`INFO audit`'s `audit_capture_mode`).
    pub fn name(self) -> &'static str {
        match self {
            CaptureMode::Auto => "auto",
            CaptureMode::Syscalls => "syscalls",
            CaptureMode::Sockets => "sockets",
        }
    }

    /// `Auto` decided for this kernel, with the `struct sock` offsets socket capture needs (read
    /// from the BTF once).
    fn resolve(self) -> Result<(CaptureMode, Vec<(u32, u64)>)> {
        match self {
            CaptureMode::Syscalls => Ok((self, Vec::new())),
            CaptureMode::Sockets => Ok((self, sock_offsets()?)),
            CaptureMode::Auto => {
                let has_tracepoint = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
                    .iter()
                    .any(|t| {
                        std::path::Path::new(t)
                            .join("events/sock/sock_recv_length")
                            .exists()
                    });
                match sock_offsets() {
                    Ok(offsets) if has_tracepoint => Ok((CaptureMode::Sockets, offsets)),
                    _ => {
                        eprintln!(
                            "auditor: no socket tracepoints or BTF offsets on this kernel: capturing at syscalls"
                        );
                        Ok((CaptureMode::Syscalls, Vec::new()))
                    }
                }
            }
        }
    }
}

/// Capture options fixed at load.
pub struct CaptureConfig {
    pub ring_bytes: u32,
    pub capture_cap: u64,
    pub wakeup_bytes: u64,
    /// Scan the reply streams of new connections and leave large bulk payloads out of the ring.
    pub reply_scan: bool,
    pub mode: CaptureMode,
}

/// Ring buffer and kernel counters, owned by the capture thread.
pub struct CaptureStream {
    pub ring: RingReader,
    /// The kernel's counters (a field of its own: read while a ring record is borrowed).
    pub stats: KernelStats,
    /// Epoll instance watching the ring edge-triggered (see `wait`).
    wake: OwnedFd,
    /// Handed to the metrics (`take_live_counters`).
    live_counters: Option<LiveKernelCounters>,
}

/// An epoll instance with the ring buffer registered edge-triggered. A plain poll() on the ring
/// returns at once whenever any byte is unread, which would have the consumer chase every record
/// one at a time; edge-triggered, it sleeps until the kernel program actually wakes it (once per
/// `wakeup_bytes` of data) or the timeout passes.
fn edge_triggered_epoll(ring_fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: plain syscalls; the returned descriptor is owned from here on.
    unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        if ep < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_create1");
        }
        let ep = OwnedFd::from_raw_fd(ep);
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        if libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, ring_fd, &mut ev) < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_ctl on the ring buffer");
        }
        Ok(ep)
    }
}

impl Capture {
    pub fn load(cfg: &CaptureConfig) -> Result<(Capture, CaptureStream)> {
        if EBPF_OBJECT.is_empty() {
            bail!("this auditor binary was built with AYA_BUILD_SKIP and carries no eBPF object");
        }
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            bail!(
                "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing); the auditor needs CONFIG_DEBUG_INFO_BTF=y"
            );
        }
        let (mode, offsets) = cfg.mode.resolve()?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("EVENTS", cfg.ring_bytes)
            .load(EBPF_OBJECT)
            .map_err(|e| privilege_hint(anyhow!(e)))
            .context("loading the eBPF programs")?;
        {
            let mut config: Array<_, u64> =
                Array::try_from(ebpf.map_mut("CONFIG").context("CONFIG map")?)?;
            config.set(CFG_CAPTURE_CAP, cfg.capture_cap, 0)?;
            config.set(CFG_WAKEUP_BYTES, cfg.wakeup_bytes, 0)?;
            config.set(CFG_REPLY_SCAN, u64::from(cfg.reply_scan), 0)?;
            for (index, value) in offsets {
                config.set(index, value, 0)?;
            }
        }
        let ring = match ebpf.take_map("EVENTS").context("EVENTS map")? {
            aya::maps::Map::RingBuf(data) => RingReader::new(data, cfg.ring_bytes)?,
            _ => bail!("EVENTS is not a ring buffer map"),
        };
        let stats_map = ebpf.take_map("STATS").context("STATS map")?;
        let live_counters = match &stats_map {
            aya::maps::Map::PerCpuArray(data) => LiveKernelCounters::open(data),
            _ => None,
        };
        let stats = KernelStats(PerCpuArray::try_from(stats_map)?);
        let sockets = HashMap::try_from(ebpf.take_map("SOCKETS").context("SOCKETS map")?)?;
        let targets = HashMap::try_from(ebpf.take_map("TARGETS").context("TARGETS map")?)?;
        let comms = HashMap::try_from(ebpf.take_map("COMMS").context("COMMS map")?)?;
        let target_hints =
            Array::try_from(ebpf.take_map("TARGET_HINTS").context("TARGET_HINTS map")?)?;
        let wake = edge_triggered_epoll(ring.as_raw_fd())?;
        Ok((
            Capture {
                ebpf,
                sockets,
                targets,
                target_hints,
                comms,
                mode,
                accept_libcs: Vec::new(),
                watched_libcs: Vec::new(),
            },
            CaptureStream {
                ring,
                stats,
                wake,
                live_counters,
            },
        ))
    }

    pub fn mode(&self) -> CaptureMode {
        self.mode
    }

    pub fn add_target(&mut self, tgid: u32) -> Result<()> {
        // The prefilter slot first, so the kernel never sees a TARGETS entry its prefilter hides.
        self.target_hints
            .set(target_hint_slot(tgid), 1, 0)
            .context("setting the target's slot in the TARGET_HINTS map")?;
        self.targets
            .insert(tgid, 1, 0)
            .context("adding the target pid to the TARGETS map")?;
        Ok(())
    }

    /// Stop auditing a process (it exited, or is not a server after all) and forget its sockets.
    pub fn remove_target(&mut self, tgid: u32) {
        let _ = self.targets.remove(&tgid);
        let stale: Vec<u64> = self
            .sockets
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| (k >> 32) as u32 == tgid)
            .collect();
        for key in stale {
            let _ = self.sockets.remove(&key);
        }
    }

    /// Stop auditing a process that has no captured sockets.
    pub fn forget_target(&mut self, tgid: u32) {
        let _ = self.targets.remove(&tgid);
    }

    /// Processes that exec with this command name become targets in the kernel at once.
    pub fn watch_comm(&mut self, name: &str) -> Result<()> {
        self.comms
            .insert(Comm::from_name(name.as_bytes()), 1, 0)
            .with_context(|| format!("adding command name {name:?} to the COMMS map"))?;
        Ok(())
    }

    /// Attach every program: the close and sched tracepoints first, then the ones that see
    /// accepts and data, so no connection is half-known.
    pub fn attach(&mut self) -> Result<()> {
        let mut tracepoints = vec![
            ("sched", "sched_process_exec"),
            ("sched", "sched_process_fork"),
            ("sched", "sched_process_exit"),
        ];
        if self.mode == CaptureMode::Syscalls {
            tracepoints.insert(0, ("syscalls", "sys_enter_close"));
        }
        let (raw, needs): (&[&str], &str) = match self.mode {
            // (`Auto` was resolved at load.)
            CaptureMode::Syscalls | CaptureMode::Auto => (&["sys_exit"], ""),
            // Replies before requests: a socket seen between the two attaches then shows an
            // unmatched reply (counted, harmless), never a request whose reply goes unseen, which
            // would shift every later reply onto the wrong request.
            CaptureMode::Sockets => (
                &[
                    "inet_sock_set_state",
                    "sock_send_length",
                    "sock_recv_length",
                ],
                " (--capture sockets needs Linux 6.3 or later)",
            ),
        };
        // Every program through the verifier before the first is attached: loading one takes up
        // to ~0.6 s here (`sock_send_length`), and a target's reads captured that long before its
        // writes (a `--follow-restarts` or `--comm` server exec'd meanwhile becomes a target in
        // the kernel) had their replies matched to requests ~0.6 s older for good.
        for &(_, name) in &tracepoints {
            loaded(&mut self.ebpf, name, TracePoint::load)?;
        }
        for &name in raw {
            loaded(&mut self.ebpf, name, RawTracePoint::load)?;
        }
        if self.mode == CaptureMode::Sockets {
            // Attached per target (`watch_accepts`).
            for name in ["accept_enter", "accept_return"] {
                let _: &mut UProbe = loaded(&mut self.ebpf, name, UProbe::load)?;
            }
        }
        for (category, name) in tracepoints {
            let prog: &mut TracePoint = program(&mut self.ebpf, name)?;
            attached(prog.attach(category, name), || {
                format!(
                    "attaching tracepoint {category}:{name} ({})",
                    tracefs_hint()
                )
            })?;
        }
        for &name in raw {
            let prog: &mut RawTracePoint = program(&mut self.ebpf, name)?;
            attached(prog.attach(name), || {
                format!("attaching raw tracepoint {name}{needs}")
            })?;
        }
        Ok(())
    }

    /// `--capture sockets`: see accepts through uprobes on `accept4` and `accept` of the C library
    /// at `libc`, in every process that uses it (the programs keep only targets' calls), so a
    /// connection is known from its accept, with the listening socket that took it. A server whose
    /// C library is not watched has its sockets registered at their first read or write. Needs
    /// the privileges dropped after attach.
    pub fn watch_accepts(&mut self, libc: &std::path::Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(libc).with_context(|| format!("{}", libc.display()))?;
        let id = (meta.dev(), meta.ino());
        if self.mode != CaptureMode::Sockets || self.accept_libcs.contains(&id) {
            return Ok(());
        }
        // Tried once per library, whether it works or not (one warning per library).
        self.accept_libcs.push(id);
        for (prog_name, symbol) in [
            ("accept_enter", "accept4"),
            ("accept_return", "accept4"),
            ("accept_enter", "accept"),
            ("accept_return", "accept"),
        ] {
            let prog: &mut UProbe = program(&mut self.ebpf, prog_name)?;
            prog.attach(symbol, libc, UProbeScope::AllProcesses)
                .with_context(|| format!("attaching a uprobe to {symbol} in {}", libc.display()))
                .map_err(|e| {
                    // perf_event_open of a uprobe needs CAP_SYS_ADMIN on Linux 6.18.
                    if format!("{e:#}").contains("Permission denied") {
                        e.context(
                            "uprobes need CAP_SYS_ADMIN at start (it is dropped after attach)",
                        )
                    } else {
                        e
                    }
                })?;
        }
        self.watched_libcs.push(id);
        Ok(())
    }

    /// Whether the accepts of `pid` are seen (its C library is watched): then a socket first
    /// seen at a read or write was not accepted after attach.
    pub fn sees_accepts_of(&self, pid: u32) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        self.mode == CaptureMode::Sockets
            && crate::procscan::mapped_libc(pid)
                .and_then(|p| std::fs::metadata(format!("/proc/{pid}/root{p}")).ok())
                .is_some_and(|m| self.watched_libcs.contains(&(m.dev(), m.ino())))
    }

    /// Stop capturing a socket that is not a client connection (the server's own link to its
    /// primary, the cluster bus): `--capture sockets` registers every socket the target uses.
    pub fn ignore_socket(&mut self, tgid: u32, fd: u32) {
        let key = socket_key(tgid, fd);
        if let Ok(mut state) = self.sockets.get(&key, 0) {
            state.flags |= SOCK_IGNORED;
            let _ = self.sockets.insert(key, state, 0);
        }
    }

    /// Register a socket that was open before attach. Returns false when the kernel already knows it
    /// (accepted after attach), in which case its accept event is on its way; true also for one
    /// the kernel holds as `SOCK_UNREPORTED` (its accept report was dropped), now captured.
    /// `ino` is its inode number (0 if unknown).
    pub fn register_existing_socket(&mut self, tgid: u32, fd: u32, ino: u64) -> Result<bool> {
        const BPF_NOEXIST: u64 = 1;
        const BPF_EXIST: u64 = 2;
        let key = socket_key(tgid, fd);
        let state = SocketState {
            ino,
            ..SocketState::default()
        };
        match self.sockets.insert(key, state, BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                let unreported = self
                    .sockets
                    .get(&key, 0)
                    .is_ok_and(|s| s.flags & SOCK_UNREPORTED != 0);
                Ok(unreported && self.sockets.insert(key, state, BPF_EXIST).is_ok())
            }
            Err(e) => Err(e).context("registering an existing socket"),
        }
    }
}

/// Program `name` of the object, loaded into the kernel (checked by the verifier).
fn loaded<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &str,
    load: impl FnOnce(&mut T) -> Result<(), ProgramError>,
) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let prog: &mut T = program(ebpf, name)?;
    load(prog)
        .map_err(|e| privilege_hint(anyhow!(e)))
        .with_context(|| format!("loading {name} (verifier)"))?;
    Ok(prog)
}

/// Program `name` of the object, as type `T`.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()?)
}

/// An attach result, with the operator's hint on failure.
fn attached<L>(result: Result<L, ProgramError>, what: impl FnOnce() -> String) -> Result<()> {
    result
        .map(drop)
        .map_err(|e| privilege_hint(anyhow!(e)))
        .with_context(what)
}

/// The `struct sock` offsets the socket tracepoints read (`CFG_SK*`), from the kernel's BTF.
fn sock_offsets() -> Result<Vec<(u32, u64)>> {
    let btf = crate::btf::Btf::from_kernel().context("--capture sockets needs the kernel's BTF")?;
    let common = |field: &str| {
        btf.offset("sock", &["__sk_common", field])
            .with_context(|| format!("the kernel's struct sock has no {field}"))
    };
    let mut out = vec![
        (CFG_SKC_FAMILY, common("skc_family")?),
        (CFG_SKC_DADDR, common("skc_daddr")?),
        (CFG_SKC_DPORT, common("skc_dport")?),
        (CFG_SKC_NUM, common("skc_num")?),
        (CFG_SKC_V6_DADDR, common("skc_v6_daddr")?),
    ];
    // Linux 6.18 caches the inode number in the sock; before, it is the socket's inode's.
    if let Some(off) = btf.offset("sock", &["sk_ino"]) {
        out.extend([(CFG_SK_INO, off), (CFG_SK_INO_DEREF, 0)]);
    } else {
        let socket = btf.offset("sock", &["sk_socket"]);
        let inode = btf.offset("socket_alloc", &["vfs_inode"]);
        let ino = btf.offset("inode", &["i_ino"]);
        let (Some(socket), Some(inode), Some(ino)) = (socket, inode, ino) else {
            bail!(
                "the kernel's BTF has neither sock.sk_ino nor sock.sk_socket and socket_alloc.vfs_inode"
            );
        };
        // socket_alloc starts with the struct socket that sk_socket points to.
        out.extend([(CFG_SK_INO, socket), (CFG_SK_INO_DEREF, inode + ino)]);
    }
    Ok(out)
}

/// Turn permission failures into the one line an operator needs.
fn privilege_hint(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Operation not permitted")
        || text.contains("EPERM")
        || text.contains("permission denied")
    {
        e.context(
            "missing privileges: run as root, or with CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE and \
             CAP_DAC_READ_SEARCH",
        )
    } else {
        e
    }
}

impl CaptureStream {
    /// Sleep until the kernel wakes the consumer (a batch is ready) or `timeout_ms` passes.
    pub fn wait(&self, timeout_ms: i32) {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: one valid epoll_event buffer.
        unsafe { libc::epoll_wait(self.wake.as_raw_fd(), &mut ev, 1, timeout_ms) };
    }

    /// Failed ring-buffer writes summed over CPUs: (records, bytes).
    /// The most unread bytes the ring held since the last call (max over CPUs); resets it.
    pub fn take_ring_peak(&mut self) -> u64 {
        let Ok(values) = self.stats.0.get(&STAT_RING_PEAK, 0) else {
            return 0;
        };
        let peak = values.iter().copied().max().unwrap_or(0);
        if let Ok(zeros) = aya::maps::PerCpuValues::try_from(vec![0u64; values.len()]) {
            let _ = self.stats.0.set(STAT_RING_PEAK, zeros, 0);
        }
        peak
    }

    pub fn kernel_drops(&self) -> Result<(u64, u64)> {
        self.stats.ring_drops()
    }

    /// A reader of the kernel's drop counters for other threads (`None` if the map could not be
    /// opened a second time).
    pub fn take_live_counters(&mut self) -> Option<LiveKernelCounters> {
        self.live_counters.take()
    }
}

/// The kernel's per-CPU `STATS` map.
pub struct KernelStats(PerCpuArray<MapData, u64>);

impl KernelStats {
    /// `(records, bytes)` the kernel could not put in the ring, summed over CPUs.
    pub fn ring_drops(&self) -> Result<(u64, u64)> {
        ring_drops(&self.0)
    }
}

/// `(records, bytes)` the kernel could not put in the ring, summed over CPUs.
fn ring_drops(stats: &PerCpuArray<MapData, u64>) -> Result<(u64, u64)> {
    let events: u64 = stats.get(&STAT_RING_DROPS, 0)?.iter().sum();
    let bytes: u64 = stats.get(&STAT_RING_DROP_BYTES, 0)?.iter().sum();
    Ok((events, bytes))
}

/// The kernel's ring-drop counters and ring fill, read through a second handle of the STATS map,
/// so that `INFO audit` and `/metrics` show ring losses and a filling ring while they happen: the
/// capture thread reads them only between passes, and it may be waiting for room in the queue
/// (`overflow block`, a stuck sink) exactly while the ring overflows.
pub struct LiveKernelCounters(PerCpuArray<MapData, u64>);

impl LiveKernelCounters {
    fn open(data: &MapData) -> Option<LiveKernelCounters> {
        // Before the capabilities are dropped: getting a map by id needs CAP_BPF.
        let id = data.info().ok()?.id();
        let second = MapData::from_id(id).ok()?;
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(second))
            .ok()
            .map(LiveKernelCounters)
    }

    /// The drop counters and the ring's peak fill since the capture loop last reset it (not
    /// reset here).
    pub fn read(&self) -> Option<crate::metrics::KernelCounters> {
        let drops = ring_drops(&self.0).ok()?;
        let ring_peak = self
            .0
            .get(&STAT_RING_PEAK, 0)
            .ok()
            .and_then(|v| v.iter().copied().max())
            .unwrap_or(0);
        Some(crate::metrics::KernelCounters { drops, ring_peak })
    }
}

/// Decode one ring record. Unix peers are named by the listening socket's path when known.
pub fn decode<'a>(
    bytes: &'a [u8],
    unix_path: &dyn Fn(u32, u32) -> Option<String>,
) -> Option<CaptureEvent<'a>> {
    let kind = *bytes.first()?;
    if kind == EventKind::Data as u8 {
        if bytes.len() < DATA_HDR_LEN {
            return None;
        }
        // SAFETY: length checked; DataEvent is plain old data and read unaligned.
        let h: DataEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let end = DATA_HDR_LEN
            .checked_add(h.chunk_len as usize)?
            .min(bytes.len());
        if h.flags & DATA_FLAG_SEGMENTS != 0 {
            return Some(CaptureEvent::Segments {
                tgid: h.tgid,
                fd: h.fd,
                ts_ns: h.ts_ns,
                stream_pos: h.stream_pos,
                total_len: h.total_len,
                captured_len: h.captured_len,
                tail: h.flags & DATA_FLAG_TAIL != 0,
                body: &bytes[DATA_HDR_LEN..end],
            });
        }
        Some(CaptureEvent::Data {
            tgid: h.tgid,
            fd: h.fd,
            ts_ns: h.ts_ns,
            inbound: h.dir == DIR_IN,
            stream_pos: h.stream_pos,
            total_len: h.total_len,
            chunk_off: h.chunk_off,
            captured_len: h.captured_len,
            bytes: &bytes[DATA_HDR_LEN..end],
        })
    } else if kind == EventKind::Accept as u8 {
        if bytes.len() < std::mem::size_of::<AcceptEvent>() {
            return None;
        }
        // SAFETY: as above.
        let a: AcceptEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let peer = match a.family {
            AF_INET => Peer::from_v4([a.addr[0], a.addr[1], a.addr[2], a.addr[3]], a.port),
            AF_INET6 => Peer::from_v6(a.addr, a.port),
            AF_UNIX => Peer::unix(&unix_path(a.tgid, a.listen_fd).unwrap_or_default()),
            _ => Peer::unix(""),
        };
        Some(CaptureEvent::Accept {
            tgid: a.tgid,
            fd: a.fd,
            listen_fd: a.listen_fd,
            local_port: a.local_port,
            ino: a.ino,
            ts_ns: a.ts_ns,
            peer,
        })
    } else if kind == EventKind::Exec as u8
        || kind == EventKind::Fork as u8
        || kind == EventKind::Exit as u8
    {
        if bytes.len() < std::mem::size_of::<ProcEvent>() {
            return None;
        }
        // SAFETY: as above.
        let p: ProcEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let kind = if kind == EventKind::Exec as u8 {
            ProcessEvent::Exec
        } else if kind == EventKind::Fork as u8 {
            ProcessEvent::Fork
        } else {
            ProcessEvent::Exit
        };
        Some(CaptureEvent::Process {
            kind,
            tgid: p.tgid,
            child: p.child,
            ts_ns: p.ts_ns,
            comm: p.comm,
        })
    } else if kind == EventKind::Close as u8 {
        if bytes.len() < std::mem::size_of::<CloseEvent>() {
            return None;
        }
        // SAFETY: as above.
        let c: CloseEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Some(CaptureEvent::Close {
            tgid: c.tgid,
            fd: c.fd,
            ts_ns: c.ts_ns,
        })
    } else {
        None
    }
}

/// Why tracepoints may not attach: tracefs missing, or there but not readable by this user (it is
/// mode 0700 root on most systems, whatever capabilities a non-root user holds).
fn tracefs_hint() -> String {
    const TRACEFS: &str = "/sys/kernel/tracing";
    let events = std::path::Path::new(TRACEFS).join("events");
    if !std::path::Path::new(TRACEFS).exists() {
        return format!("is tracefs mounted at {TRACEFS}?");
    }
    match std::fs::read_dir(&events) {
        Ok(_) => format!("tracefs at {TRACEFS} is readable"),
        Err(e) => format!(
            "tracefs at {TRACEFS} is not readable by this user: {e}; run as root, or make \
             {TRACEFS} readable for the auditor's user"
        ),
    }
}
