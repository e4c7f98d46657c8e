//! The memory map: driver addresses (IOVAs for VDUSE, guest physical addresses for vhost-user)
//! to our own mappings, as a `vm-memory` [`GuestMemoryMmap`] that queue workers read lock-free.
//!
//! Workers take a snapshot with [`MemoryMap::memory`]; updates build a new collection and swap
//! it in, so a worker never sees a region disappear under it (the old mmap lives until the
//! last snapshot holding it is dropped). Where the transport can look mappings up on demand
//! (VDUSE's `IOTLB_GET_FD`), [`MemoryMap::fault_in`] fills holes from a [`MappingSource`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, Weak};

use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vmm_sys_util::eventfd::EventFd;

use crate::fault_guard::{sealed_against_shrinking, FaultGuard};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic,
    GuestMemoryBackend, GuestMemoryLoadGuard, GuestMemoryRegion, GuestRegionMmap, Permissions,
    VolatileSlice,
};

/// The memory type every worker and device reads: regions placed at driver addresses.
pub type Memory = vm_memory::GuestMemoryMmap<()>;

/// A snapshot of the memory map.
pub type MemoryGuard = GuestMemoryLoadGuard<Memory>;

/// One range of driver address space backed by a file.
#[derive(Debug)]
pub struct Mapping {
    /// File to mmap.
    pub file: File,
    /// Offset of `start` in the file.
    pub offset: u64,
    /// First driver address.
    pub start: u64,
    /// Last driver address (inclusive).
    pub last: u64,
    /// mmap protection (PROT_READ / PROT_WRITE).
    pub prot: i32,
}

/// Where missing mappings can be looked up (VDUSE: the kernel's IOTLB).
pub trait MappingSource: Send + Sync {
    /// The first mapping overlapping `[start, last]`, if any.
    fn lookup(&self, start: u64, last: u64) -> io::Result<Option<Mapping>>;
}

/// Maps `size` bytes at `offset` of a peer's `file` shared and writable (a dirty log, an
/// in-flight area), after checking the range lies inside the file: a mapping past its end
/// would fault (SIGBUS) on first use. `what` names the area in errors.
pub(crate) fn map_shared_file(
    file: File,
    offset: u64,
    size: u64,
    what: &str,
) -> io::Result<vm_memory::mmap::MmapRegion<()>> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
    let end = offset
        .checked_add(size)
        .ok_or_else(|| invalid(format!("{what}: offset + size wraps")))?;
    let meta = file.metadata()?;
    if size == 0 || !meta.file_type().is_file() || end > meta.len() {
        return Err(invalid(format!(
            "{what} {offset:#x}+{size:#x} is not inside its file ({} bytes)",
            meta.len()
        )));
    }
    MmapRegionBuilder::new(size as usize)
        .with_file_offset(FileOffset::new(file, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .map_err(|e| io::Error::other(format!("cannot map the {what}: {e}")))
}

/// `len` bytes at `addr` as one slice, when a single region holds them all: the usual case,
/// and several times cheaper than vm-memory's general walk over regions (`get_slices`), which
/// callers fall back to on `None`.
pub fn one_slice(mem: &Memory, addr: u64, len: usize) -> Option<VolatileSlice<'_>> {
    mem.get_slice(GuestAddress(addr), len).ok()
}

/// Driver memory as the rings see it: the same regions as [`Memory`], but every access tries
/// [`one_slice`] before vm-memory's general walk over regions. virtio-queue reads and writes
/// the rings and descriptors through this; each access then costs a region lookup and a copy
/// instead of the walk (about a fifth of a request's instructions before).
#[derive(Clone, Copy, Debug)]
pub struct RingMemory<'a>(pub &'a Memory);

impl GuestMemory for RingMemory<'_> {
    type PhysicalMemory = Memory;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        in_memory(self.0, addr.0, count)
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> vm_memory::GuestMemoryResult<impl GuestMemorySliceIterator<'a, ()>> {
        if count > 0 {
            if let Some(s) = one_slice(self.0, addr.0, count) {
                return Ok(Slices::One(Some(s)));
            }
        }
        Ok(Slices::Walk(GuestMemoryBackend::get_slices(
            self.0, addr, count,
        )))
    }

    fn physical_memory(&self) -> Option<&Memory> {
        Some(self.0)
    }
}

/// The slices of a [`RingMemory`] access: one, or vm-memory's walk.
enum Slices<'a> {
    One(Option<VolatileSlice<'a>>),
    Walk(GuestMemoryBackendSliceIterator<'a, Memory>),
}

impl<'a> Iterator for Slices<'a> {
    type Item = vm_memory::GuestMemoryResult<VolatileSlice<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Slices::One(s) => s.take().map(Ok),
            Slices::Walk(w) => w.next(),
        }
    }
}

impl std::iter::FusedIterator for Slices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, ()> for Slices<'a> {}

/// Reads `buf.len()` bytes at `addr`; false if they are not all in driver memory.
pub fn read_bytes(mem: &Memory, addr: u64, buf: &mut [u8]) -> bool {
    match one_slice(mem, addr, buf.len()) {
        Some(s) => s.copy_to(buf) == buf.len(),
        None => mem.read_slice(buf, GuestAddress(addr)).is_ok(),
    }
}

/// Writes `buf` at `addr`; false if it does not all fit in driver memory.
pub fn write_bytes(mem: &Memory, addr: u64, buf: &[u8]) -> bool {
    match one_slice(mem, addr, buf.len()) {
        Some(s) => {
            s.copy_from(buf);
            true
        }
        None => mem.write_slice(buf, GuestAddress(addr)).is_ok(),
    }
}

/// True if `[addr, addr + len)` is all in driver memory.
pub fn in_memory(mem: &Memory, addr: u64, len: usize) -> bool {
    one_slice(mem, addr, len).is_some()
        || GuestMemoryBackend::check_range(mem, GuestAddress(addr), len)
}

/// Largest single mapping we accept from a peer (1 TiB): bounds what a bad peer can make us map.
const MAX_MAPPING: u64 = 1 << 40;

/// The shared, swappable memory map.
pub struct MemoryMap {
    atomic: GuestMemoryAtomic<Memory>,
    source: Option<Box<dyn MappingSource>>,
    update: Mutex<()>,
    /// Where a peer's file may shrink under us (vhost-user): the alarm a SIGBUS in one of
    /// its mappings raises, and the guards of those mappings, each kept until its mapping is
    /// gone (see `fault_guard.rs`).
    fault: Mutex<Faults>,
}

#[derive(Default)]
struct Faults {
    alarm: Option<Arc<EventFd>>,
    guards: Vec<(Weak<MmapRegion<()>>, FaultGuard)>,
}

impl Faults {
    /// Drops the guards of mappings that no snapshot holds any more (they are unmapped).
    fn sweep(&mut self) {
        self.guards.retain(|(region, _)| region.strong_count() > 0);
    }
}

impl std::fmt::Debug for MemoryMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryMap")
            .field("regions", &self.memory().num_regions())
            .finish()
    }
}

impl MemoryMap {
    /// An empty map; `source` (if any) is asked for mappings on a miss.
    pub fn new(source: Option<Box<dyn MappingSource>>) -> Self {
        MemoryMap {
            atomic: GuestMemoryAtomic::new(Memory::default()),
            source,
            update: Mutex::new(()),
            fault: Mutex::new(Faults::default()),
        }
    }

    /// From now on, guards the mappings of files that are not sealed against shrinking: a
    /// SIGBUS in one zero-fills it and makes `alarm` readable, instead of killing the process.
    pub fn set_fault_alarm(&self, alarm: Arc<EventFd>) {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).alarm = Some(alarm);
    }

    /// True if missing mappings can be looked up on demand ([`MemoryMap::fault_in`] may help).
    pub(crate) fn maps_on_demand(&self) -> bool {
        self.source.is_some()
    }

    /// A consistent snapshot of the current map.
    pub fn memory(&self) -> MemoryGuard {
        self.atomic.memory()
    }

    /// Drops every mapping.
    pub fn clear(&self) {
        let _g = self.update.lock().unwrap_or_else(|e| e.into_inner());
        self.atomic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(Memory::default());
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).sweep();
    }

    /// Replaces the whole map with `mappings` (vhost-user's memory table).
    pub fn replace(&self, mappings: Vec<Mapping>) -> io::Result<()> {
        let _g = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let mut faults = self.fault.lock().unwrap_or_else(|e| e.into_inner());
        faults.sweep();
        let mut regions = Vec::with_capacity(mappings.len());
        for m in mappings {
            let sealed = sealed_against_shrinking(m.file.as_raw_fd());
            let region = map_region(m)?;
            if let (Some(alarm), false) = (&faults.alarm, sealed) {
                let mmap = region.get_mmap();
                let guard = FaultGuard::new(mmap.as_ptr(), mmap.size(), alarm)?;
                faults.guards.push((Arc::downgrade(&mmap), guard));
            }
            regions.push(Arc::new(region));
        }
        drop(faults);
        let mem = build(regions)?;
        self.atomic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mem);
        // The mappings just replaced are gone unless a snapshot still holds them.
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).sweep();
        Ok(())
    }

    /// Forgets every mapping that overlaps `[start, last]` (they are looked up again on use).
    pub fn invalidate(&self, start: u64, last: u64) {
        let _g = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.memory();
        let kept: Vec<Arc<GuestRegionMmap>> = cur
            .iter()
            .filter(|r| r.last_addr().0 < start || r.start_addr().0 > last)
            .map(|r| Arc::new(GuestRegionMmap::with_arc(r.get_mmap(), r.start_addr()).unwrap()))
            .collect();
        if kept.len() != cur.num_regions() {
            if let Ok(mem) = build(kept) {
                self.atomic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .replace(mem);
            }
        }
    }

    /// Makes `[addr, addr + len)` mapped if the source has it; true if all of it is mapped
    /// afterwards. `len == 0` checks the single byte at `addr`.
    pub fn fault_in(&self, addr: u64, len: u64) -> bool {
        let Some(last) = addr.checked_add(len.max(1) - 1) else {
            return false;
        };
        let Some(source) = &self.source else {
            return self.covered(addr, last);
        };
        let _g = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let mut cur = addr;
        let mut added: Vec<GuestRegionMmap> = Vec::new();
        loop {
            let mem = self.memory();
            let next = match mem.find_region(GuestAddress(cur)) {
                Some(r) => r.last_addr().0,
                None => match added
                    .iter()
                    .find(|r| r.start_addr().0 <= cur && cur <= r.last_addr().0)
                {
                    Some(r) => r.last_addr().0,
                    None => {
                        let m = match source.lookup(cur, last) {
                            Ok(Some(m)) if m.start <= cur && m.last >= cur => m,
                            Ok(_) => return false,
                            Err(e) => {
                                tracing::warn!("memory lookup at {cur:#x} failed: {e}");
                                return false;
                            }
                        };
                        let end = m.last;
                        match map_region(m) {
                            Ok(r) => added.push(r),
                            Err(e) => {
                                tracing::warn!("cannot map driver memory at {cur:#x}: {e}");
                                return false;
                            }
                        }
                        end
                    }
                },
            };
            if next >= last {
                break;
            }
            cur = next + 1;
        }
        if added.is_empty() {
            return true;
        }
        let cur = self.memory();
        let mut regions: Vec<Arc<GuestRegionMmap>> = added.into_iter().map(Arc::new).collect();
        for r in cur.iter() {
            let overlaps = regions
                .iter()
                .any(|n| !(r.last_addr() < n.start_addr() || r.start_addr() > n.last_addr()));
            if !overlaps {
                // Stale regions that overlap a fresh lookup are dropped.
                regions.push(Arc::new(
                    GuestRegionMmap::with_arc(r.get_mmap(), r.start_addr()).unwrap(),
                ));
            }
        }
        match build(regions) {
            Ok(mem) => {
                self.atomic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .replace(mem);
                true
            }
            Err(e) => {
                tracing::warn!("cannot update the memory map: {e}");
                false
            }
        }
    }

    /// Maps every range the source has inside `[start, last]` (used after an invalidation so
    /// that workers rarely miss).
    pub fn populate(&self, start: u64, last: u64) {
        let Some(source) = &self.source else { return };
        let mut cur = start;
        // Bounded: each round moves past one distinct mapping, and there are at most a few
        // thousand; stop anyway after 65536 rounds.
        for _ in 0..65536 {
            let found = match source.lookup(cur, last) {
                Ok(Some(m)) => m,
                _ => return,
            };
            let (s, l) = (found.start.max(cur), found.last);
            drop(found);
            self.fault_in(s, l - s + 1);
            if l >= last {
                return;
            }
            cur = l + 1;
        }
    }

    fn covered(&self, addr: u64, last: u64) -> bool {
        let mem = self.memory();
        let mut cur = addr;
        loop {
            match mem.find_region(GuestAddress(cur)) {
                Some(r) if r.last_addr().0 >= last => return true,
                Some(r) => cur = r.last_addr().0 + 1,
                None => return false,
            }
        }
    }
}

fn map_region(m: Mapping) -> io::Result<GuestRegionMmap> {
    let size = m
        .last
        .checked_sub(m.start)
        .and_then(|s| s.checked_add(1))
        .filter(|s| *s <= MAX_MAPPING)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "mapping [{:#x}, {:#x}] is empty or too large",
                    m.start, m.last
                ),
            )
        })?;
    let region = MmapRegionBuilder::new(size as usize)
        .with_file_offset(FileOffset::new(m.file, m.offset))
        .with_mmap_prot(m.prot)
        .with_mmap_flags(libc::MAP_SHARED)
        .build()
        .map_err(|e| io::Error::other(format!("mmap of [{:#x}, {:#x}]: {e}", m.start, m.last)))?;
    GuestRegionMmap::new(region, GuestAddress(m.start)).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "mapping wraps the address space",
        )
    })
}

fn build(mut regions: Vec<Arc<GuestRegionMmap>>) -> io::Result<Memory> {
    if regions.is_empty() {
        return Ok(Memory::default());
    }
    regions.sort_by_key(|r| r.start_addr());
    Memory::from_arc_regions(regions)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("memory regions: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn byte_helpers_take_one_region_or_span_two_and_refuse_holes() {
        // Two adjacent regions, then a hole from 0x2000.
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap();
        assert!(one_slice(&mem, 0xff0, 0x10).is_some());
        assert!(one_slice(&mem, 0xff0, 0x20).is_none(), "spans two regions");
        let data: Vec<u8> = (0..32).collect();
        assert!(
            write_bytes(&mem, 0xff0, &data),
            "written across the boundary"
        );
        let mut back = [0u8; 32];
        assert!(read_bytes(&mem, 0xff0, &mut back));
        assert_eq!(&back[..], &data[..]);
        assert!(in_memory(&mem, 0xff0, 0x20));
        assert!(!in_memory(&mem, 0x1ff0, 0x20), "runs into the hole");
        assert!(!read_bytes(&mem, 0x1ff0, &mut back));
        assert!(!write_bytes(&mem, 0x1ff0, &data));
        assert!(!write_bytes(&mem, u64::MAX, &data[..2]), "wraps");

        // The rings' view reads and writes the same bytes, within a region or across two.
        let ring = RingMemory(&mem);
        let across: u64 = ring.read_obj(GuestAddress(0xffc)).unwrap();
        assert_eq!(across, mem.read_obj::<u64>(GuestAddress(0xffc)).unwrap());
        ring.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0xffc))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0xffc)).unwrap(),
            0x1122_3344_5566_7788
        );
        ring.store(
            7u16,
            GuestAddress(0x10),
            std::sync::atomic::Ordering::Release,
        )
        .unwrap();
        assert_eq!(
            ring.load::<u16>(GuestAddress(0x10), std::sync::atomic::Ordering::Acquire)
                .unwrap(),
            7
        );
        assert!(ring.read_obj::<u64>(GuestAddress(0x1ffc)).is_err(), "hole");
        assert!(ring.write_obj(1u64, GuestAddress(0x1ffc)).is_err(), "hole");
        assert!(GuestMemory::check_range(
            &ring,
            GuestAddress(0xff0),
            0x20,
            Permissions::Read
        ));
        assert!(!GuestMemory::check_range(
            &ring,
            GuestAddress(0x1ff0),
            0x20,
            Permissions::Read
        ));
    }

    struct FileSource {
        path: std::path::PathBuf,
        ranges: Vec<(u64, u64)>,
    }

    impl MappingSource for FileSource {
        fn lookup(&self, start: u64, last: u64) -> io::Result<Option<Mapping>> {
            for &(s, l) in &self.ranges {
                if s <= last && l >= start {
                    return Ok(Some(Mapping {
                        file: File::options().read(true).write(true).open(&self.path)?,
                        offset: s,
                        start: s,
                        last: l,
                        prot: libc::PROT_READ | libc::PROT_WRITE,
                    }));
                }
            }
            Ok(None)
        }
    }

    fn source() -> (FileSource, tempfile_path::TempPath) {
        let tmp = tempfile_path::TempPath::new();
        let mut f = File::create(&tmp.0).unwrap();
        f.write_all(&vec![0u8; 0x4000]).unwrap();
        (
            FileSource {
                path: tmp.0.clone(),
                ranges: vec![(0, 0xfff), (0x1000, 0x1fff), (0x3000, 0x3fff)],
            },
            tmp,
        )
    }

    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                TempPath(std::env::temp_dir().join(format!("vudev-mem-{}-{n}", std::process::id())))
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn faults_in_on_demand_and_invalidates() {
        let (src, _tmp) = source();
        let map = MemoryMap::new(Some(Box::new(src)));
        assert_eq!(map.memory().num_regions(), 0);
        assert!(map.fault_in(0x10, 8));
        assert_eq!(map.memory().num_regions(), 1);
        // A range spanning two adjacent mappings.
        assert!(map.fault_in(0xff0, 0x20));
        assert_eq!(map.memory().num_regions(), 2);
        // A hole is not mapped.
        assert!(!map.fault_in(0x2000, 1));
        assert!(!map.fault_in(0x1ff0, 0x20));
        // Overflowing ranges are refused.
        assert!(!map.fault_in(u64::MAX, 2));
        map.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        map.invalidate(0x1000, 0x1000);
        assert_eq!(map.memory().num_regions(), 1);
        map.populate(0, u64::MAX);
        assert_eq!(map.memory().num_regions(), 3);
        // The data is in the file, so it is still there after the remap.
        let v: u32 = map.memory().read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        map.clear();
        assert_eq!(map.memory().num_regions(), 0);
    }
}
