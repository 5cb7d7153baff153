//! The consumer side of the kernel's BPF ring buffer, with its data pages mapped once.
//!
//! Why not aya's `RingBuf` (or libbpf's consumer): both map the data pages twice, back to back,
//! so that a record crossing the end of the ring reads as one slice. The kernel inserts every page
//! of such a mapping at `mmap` time, so the process's RSS carries the ring twice from the start: an
//! 8 MiB ring cost 16 MB of the 64 MB the auditor may use, and a 16 MiB ring (twice the slack for
//! a capture thread the host stalls) put the auditor over it. Here the data is mapped once and the
//! few records that cross the end are copied into a buffer; everything else (record layout, memory
//! ordering, the wake-up handshake) follows the kernel's `kernel/bpf/ringbuf.c` as aya does.

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering, fence};

use anyhow::{Context as _, Result};
use aya::maps::MapData;

/// Bits of a record header's length word (`BPF_RINGBUF_BUSY_BIT`, `BPF_RINGBUF_DISCARD_BIT`).
const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
/// `BPF_RINGBUF_HDR_SZ`: the length word and the page offset the kernel keeps for itself.
const HEADER_LEN: usize = 8;

/// The smallest ring: one record of a full 16,000-byte chunk (the kernel's header, ours, the
/// bytes) must fit, or every syscall larger than the ring is lost while the ring is empty.
pub const MIN_RING_BYTES: u32 = 32 * 1024;

/// `--ring-bytes` and `--wakeup-bytes` as the kernel and this reader need them, checked before
/// anything is created: a power of two, a multiple of the page size, at least `MIN_RING_BYTES`;
/// a wake-up threshold below the ring's size (0: the kernel wakes the reader itself).
pub fn check_sizes(ring_bytes: u32, wakeup_bytes: u64) -> Result<(), String> {
    let page = page_size();
    if ring_bytes < MIN_RING_BYTES
        || !ring_bytes.is_power_of_two()
        || !(ring_bytes as usize).is_multiple_of(page)
    {
        return Err(format!(
            "--ring-bytes {ring_bytes}: the ring buffer size must be a power of two, a multiple of \
             the page size ({page}) and at least {MIN_RING_BYTES} (one 16,000-byte capture record)"
        ));
    }
    if wakeup_bytes >= u64::from(ring_bytes) {
        return Err(format!(
            "--wakeup-bytes {wakeup_bytes}: must be below the ring buffer size ({ring_bytes}), or \
             the ring fills before the capture thread is woken"
        ));
    }
    Ok(())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).map_or(4096, |p| p.max(4096))
}

/// One `mmap` of the ring map, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(fd: i32, len: usize, prot: i32, offset: usize) -> Result<Mapping> {
        let offset = libc::off_t::try_from(offset).context("ring mapping offset")?;
        // SAFETY: a fresh shared mapping of a descriptor we own; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the ring buffer");
        }
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no slice into it outlives the reader (records borrow it).
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Where the positions and the data live: the kernel's pages, or (tests) plain memory laid out the
/// same way.
struct Layout {
    consumer: *const AtomicUsize,
    producer: *const AtomicUsize,
    data: *const u8,
    size: usize,
}

/// Reads the records of one ring buffer map in order.
pub struct RingReader {
    layout: Layout,
    /// The kernel position of the next record to read (a byte count that only grows).
    pos: usize,
    /// The producer position last read: records up to it are there without reading it again.
    producer_cache: usize,
    /// A record was consumed since the producer position was last read (see `next`).
    needs_wakeup: bool,
    /// A record crossing the end of the data pages, copied whole.
    wrapped: Vec<u8>,
    /// What the layout points into (none for tests' plain memory), unmapped and closed on drop.
    mappings: Vec<Mapping>,
    map: Option<MapData>,
}

// SAFETY: the reader owns its mappings and the map; the raw pointers point into them and are only
// used through `&mut self`, so moving the reader to the capture thread moves sole access with it.
unsafe impl Send for RingReader {}

/// A record, consumed (its room handed back to the kernel) when dropped.
pub struct RingRecord<'a> {
    bytes: &'a [u8],
    pos: &'a mut usize,
    consumer: *const AtomicUsize,
    needs_wakeup: &'a mut bool,
}

impl std::ops::Deref for RingRecord<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl Drop for RingRecord<'_> {
    fn drop(&mut self) {
        *self.pos += (HEADER_LEN + self.bytes.len()).next_multiple_of(8);
        // Publish after reading: the kernel reuses the room only after an acquire load of it.
        // SAFETY: `consumer` points into the reader's mapping, alive while this record borrows it.
        unsafe { &*self.consumer }.store(*self.pos, Ordering::Release);
        *self.needs_wakeup = true;
    }
}

impl RingReader {
    /// Map the ring buffer map `map` (`BPF_MAP_TYPE_RINGBUF`, `size` data bytes, as
    /// `check_sizes` passed it): the consumer page read-write, the producer page and the data
    /// pages once, read-only.
    pub fn new(map: MapData, size: u32) -> Result<RingReader> {
        check_sizes(size, 0).map_err(anyhow::Error::msg)?;
        let (page, size) = (page_size(), size as usize);
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + size, libc::PROT_READ, page)?;
        let layout = Layout {
            consumer: consumer.ptr.cast(),
            producer: producer.ptr.cast(),
            // SAFETY: the mapping is `page + size` long.
            data: unsafe { producer.ptr.cast::<u8>().add(page) },
            size,
        };
        let mut reader = RingReader::with_layout(layout);
        reader.mappings = vec![consumer, producer];
        reader.map = Some(map);
        Ok(reader)
    }

    fn with_layout(layout: Layout) -> RingReader {
        // SAFETY: both point to live, aligned words (the caller's layout).
        let pos = unsafe { &*layout.consumer }.load(Ordering::Acquire);
        let producer_cache = unsafe { &*layout.producer }.load(Ordering::Acquire);
        RingReader {
            layout,
            pos,
            producer_cache,
            needs_wakeup: false,
            wrapped: Vec::new(),
            mappings: Vec::new(),
            map: None,
        }
    }

    /// The map's descriptor (for epoll).
    pub fn as_raw_fd(&self) -> i32 {
        self.map.as_ref().map_or(-1, |m| m.fd().as_fd().as_raw_fd())
    }

    /// The next committed record, if any.
    pub fn next_record(&mut self) -> Option<RingRecord<'_>> {
        let Layout {
            consumer,
            producer,
            data,
            size,
        } = self.layout;
        let mask = size - 1;
        loop {
            if self.pos == self.producer_cache {
                if self.needs_wakeup {
                    // Either this load sees a new record, or its producer sees our consumer
                    // position and wakes us (the kernel's pairing, as in aya and libbpf).
                    fence(Ordering::SeqCst);
                    self.needs_wakeup = false;
                }
                // SAFETY: the producer word of the layout.
                self.producer_cache = unsafe { &*producer }.load(Ordering::Acquire);
                if self.pos == self.producer_cache {
                    return None;
                }
            }
            let offset = self.pos & mask;
            // SAFETY: records are 8-aligned and the ring a multiple of 8, so the header lies whole
            // inside the data; the kernel commits it with a fully ordered exchange, paired here.
            let header = unsafe { &*data.add(offset).cast::<AtomicU32>() }.load(Ordering::Acquire);
            if header & BUSY_BIT != 0 {
                if !self.needs_wakeup {
                    return None;
                }
                fence(Ordering::SeqCst);
                self.needs_wakeup = false;
                continue;
            }
            let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if header & DISCARD_BIT != 0 || len > size {
                // (A length past the ring cannot be a record: skip it rather than read past.)
                self.pos += (HEADER_LEN + len.min(size)).next_multiple_of(8);
                // SAFETY: the consumer word of the layout.
                unsafe { &*consumer }.store(self.pos, Ordering::Release);
                self.needs_wakeup = true;
                continue;
            }
            let start = (offset + HEADER_LEN) & mask;
            let first = len.min(size - start);
            // SAFETY: `start + first <= size` and the rest wraps to the beginning; the producer
            // wrote these bytes before committing the header read above.
            let bytes: &[u8] = unsafe {
                if first == len {
                    std::slice::from_raw_parts(data.add(start), len)
                } else {
                    self.wrapped.clear();
                    self.wrapped
                        .extend_from_slice(std::slice::from_raw_parts(data.add(start), first));
                    self.wrapped
                        .extend_from_slice(std::slice::from_raw_parts(data, len - first));
                    &self.wrapped
                }
            };
            return Some(RingRecord {
                bytes,
                pos: &mut self.pos,
                consumer,
                needs_wakeup: &mut self.needs_wakeup,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring in plain memory, laid out like the kernel's: consumer word, producer word, data.
    struct FakeRing {
        words: Vec<u64>,
        size: usize,
        produced: usize,
    }

    impl FakeRing {
        fn new(size: usize) -> FakeRing {
            FakeRing {
                words: vec![0; 2 + size / 8],
                size,
                produced: 0,
            }
        }

        fn reader(&mut self) -> RingReader {
            let base = self.words.as_mut_ptr();
            // SAFETY: the vector outlives every reader of the tests and is never reallocated.
            RingReader::with_layout(unsafe {
                Layout {
                    consumer: base.cast(),
                    producer: base.add(1).cast(),
                    data: base.add(2).cast(),
                    size: self.size,
                }
            })
        }

        fn data(&mut self) -> &mut [u8] {
            let size = self.size;
            // SAFETY: the data words seen as bytes.
            unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().add(2).cast(), size) }
        }

        /// Write a record at the producer position with `flags` in its header; publish it.
        fn produce(&mut self, bytes: &[u8], flags: u32) {
            let (size, at) = (self.size, self.produced);
            let header = (bytes.len() as u32 | flags).to_le_bytes();
            let data = self.data();
            for (i, b) in header.iter().chain(&[0u8; 4]).chain(bytes).enumerate() {
                data[(at + i) % size] = *b;
            }
            self.produced += (HEADER_LEN + bytes.len()).next_multiple_of(8);
            self.words[1] = self.produced as u64;
        }

        fn consumer(&self) -> u64 {
            self.words[0]
        }
    }

    #[test]
    fn ring_sizes_are_checked_before_anything_is_created() {
        assert!(check_sizes(16 << 20, 256 << 10).is_ok());
        assert!(check_sizes(MIN_RING_BYTES, 0).is_ok());
        for bad in [0, 4096, 16384, 12288, 5000, 3 << 30, u32::MAX] {
            let e = check_sizes(bad, 0).unwrap_err();
            assert!(e.contains("power of two"), "{bad}: {e}");
        }
        let e = check_sizes(1 << 16, 1 << 16).unwrap_err();
        assert!(e.contains("--wakeup-bytes 65536"), "{e}");
    }

    #[test]
    fn records_come_in_order_and_are_consumed_when_dropped() {
        let mut ring = FakeRing::new(64);
        ring.produce(b"first", 0);
        ring.produce(b"second!", 0);
        let mut reader = ring.reader();
        assert_eq!(&*reader.next_record().unwrap(), b"first");
        assert_eq!(&*reader.next_record().unwrap(), b"second!");
        assert!(reader.next_record().is_none());
        assert_eq!(ring.consumer(), 32);
    }

    #[test]
    fn a_record_crossing_the_end_is_read_whole() {
        let mut ring = FakeRing::new(64);
        ring.produce(&[1; 40], 0);
        let mut reader = ring.reader();
        drop(reader.next_record().unwrap());
        assert!(reader.next_record().is_none());
        // Header at 48, its 20 bytes from 56 to the end (64) and on from 0 to 12.
        ring.produce(b"abcdefghijklmnopqrst", 0);
        assert_eq!(&*reader.next_record().unwrap(), b"abcdefghijklmnopqrst");
        assert_eq!(ring.consumer(), 48 + 32);
    }

    #[test]
    fn busy_records_wait_and_discarded_ones_are_skipped() {
        let mut ring = FakeRing::new(128);
        ring.produce(b"gone", DISCARD_BIT);
        ring.produce(b"kept", 0);
        ring.produce(b"pending", BUSY_BIT);
        let mut reader = ring.reader();
        assert_eq!(&*reader.next_record().unwrap(), b"kept");
        assert!(
            reader.next_record().is_none(),
            "a busy record is not committed yet"
        );
        assert_eq!(ring.consumer(), 32);
        // Committed: the busy bit cleared.
        let at = 32;
        ring.data()[at + 3] &= 0x7f;
        assert_eq!(&*reader.next_record().unwrap(), b"pending");
        assert!(reader.next_record().is_none());
    }
}
