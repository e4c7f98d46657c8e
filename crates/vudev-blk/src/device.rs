//! The virtio-blk device: config space from [`BlockConfig`], one [`BlockQueue`] per queue
//! turning validated requests into backend operations.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};
use vudev_core::memory::{one_slice, read_bytes, write_bytes};
use vudev_core::{Chain, Completions, Device, Memory, QueueHandler};

use crate::backend::{BlockBackend, Capacity, IoDone, IoOp, QueueBackend};
use crate::config::{BlockConfig, MAX_DISCARD_SECTORS};
use crate::request::{Kind, ParseError, Request};
use crate::stats::QueueStats;

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// A virtio-blk device over a [`BlockBackend`].
pub struct BlockDevice {
    cfg: Arc<BlockConfig>,
    backend: Arc<dyn BlockBackend>,
    capacity: Capacity,
    stats: Vec<Arc<QueueStats>>,
}

impl BlockDevice {
    /// A device exporting `backend` as `cfg` describes.
    pub fn new(cfg: BlockConfig, backend: Arc<dyn BlockBackend>) -> Self {
        BlockDevice {
            capacity: Capacity::new(cfg.size),
            stats: (0..cfg.num_queues)
                .map(|_| Arc::new(QueueStats::default()))
                .collect(),
            cfg: Arc::new(cfg),
            backend,
        }
    }

    /// The device's configuration (its size as it was at start: see [`BlockDevice::size`]).
    pub fn config(&self) -> &BlockConfig {
        &self.cfg
    }

    /// Each queue's counters (they keep counting across driver resets).
    pub fn stats(&self) -> &[Arc<QueueStats>] {
        &self.stats
    }

    /// Takes on a size the backend's storage took by other hands (see
    /// [`BlockBackend::changed_size`]), rounded down to whole blocks, without asking the
    /// backend to resize anything (that could undo a second resize made meanwhile): the new
    /// capacity if it changed, for the caller to tell the driver. A shrink is taken as it is:
    /// the data beyond is gone already.
    pub fn adopt_changed_size(&self) -> Option<u64> {
        let block = u64::from(self.cfg.logical_block_size);
        let bytes = self.backend.changed_size()? / block * block;
        if bytes == 0 || bytes == self.capacity.get() {
            return None;
        }
        self.capacity.set(bytes);
        Some(bytes)
    }

    /// The backend's event counts (see [`BlockBackend::events`]).
    pub fn backend_events(&self) -> Vec<(&'static str, u64)> {
        self.backend.events()
    }

    /// The backend, in one line (its size as it is now).
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The capacity now, in bytes.
    pub fn size(&self) -> u64 {
        self.capacity.get()
    }

    /// Changes the capacity while the queues run: the backend first when it grows (so that
    /// no request reaches past its end), the requests' bound first when it shrinks. Refused
    /// unless `bytes` is a non-zero multiple of the block size; a shrink that would cut data
    /// the backend holds is refused unless `force`. The transport then tells the driver
    /// (its config space now says `bytes`).
    pub fn resize(&self, bytes: u64, force: bool) -> io::Result<()> {
        let block = u64::from(self.cfg.logical_block_size);
        if bytes == 0 || !bytes.is_multiple_of(block) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{bytes} is not a non-zero multiple of the {block}-byte block size"),
            ));
        }
        let now = self.capacity.get();
        if bytes < now {
            if !force && self.backend.has_data_beyond(bytes) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "the disk holds data beyond {bytes} bytes, which shrinking would lose: \
                         pass --force to shrink anyway"
                    ),
                ));
            }
            self.capacity.set(bytes);
            if let Err(e) = self.backend.resize(bytes) {
                self.capacity.set(now);
                return Err(e);
            }
        } else {
            self.backend.resize(bytes)?;
            self.capacity.set(bytes);
        }
        Ok(())
    }
}

impl Device for BlockDevice {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn features(&self) -> u64 {
        self.cfg.features()
    }
    fn config(&self) -> Vec<u8> {
        self.cfg.config_space(self.capacity.get())
    }
    fn num_queues(&self) -> u16 {
        self.cfg.num_queues
    }
    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }
    fn queue_handler(&self, index: u16, features: u64) -> io::Result<Box<dyn QueueHandler>> {
        let backend = self.backend.queue()?;
        let stats = self
            .stats
            .get(usize::from(index))
            .cloned()
            .unwrap_or_default();
        Ok(Box::new(BlockQueue {
            index,
            cfg: self.cfg.clone(),
            capacity: self.capacity.clone(),
            stats,
            clock: None,
            epoch: Instant::now(),
            features,
            asynchronous: backend.completion_fd().is_some(),
            backend,
            req: Request::default(),
            pending: (0..self.cfg.queue_size).map(|_| None).collect(),
            in_flight: 0,
            results: Vec::new(),
            errors: 0,
        }))
    }
}

/// A request handed to the backend, waiting for its result.
struct Pending {
    status: u64,
    /// Request type (an index of `stats::OPS`), bytes it moves, and when it started (in
    /// nanoseconds since the queue's epoch).
    op: usize,
    bytes: u64,
    at: u64,
    /// Bytes written into driver buffers on success (data read + status).
    used_ok: u32,
    /// For asynchronous backends: the memory snapshot the request's buffers live in, kept
    /// mapped until the backend is done with them.
    _mem: Option<Memory>,
}

/// The per-queue request handler.
///
/// Dropped, it lets go of its backend before the memory snapshots of the requests still in
/// flight (see the `Drop` impl): the backend detaches or finishes those requests, and only then
/// may their buffers be unmapped.
pub(crate) struct BlockQueue {
    index: u16,
    cfg: Arc<BlockConfig>,
    capacity: Capacity,
    stats: Arc<QueueStats>,
    /// When the current batch of requests started, in nanoseconds since `epoch`: one clock
    /// read per batch, not per request (reset by every `poll`, which ends a batch).
    clock: Option<u64>,
    epoch: Instant,
    features: u64,
    /// The backend completes requests later (so in-flight buffers must stay mapped).
    asynchronous: bool,
    backend: Box<dyn QueueBackend>,
    req: Request,
    pending: Vec<Option<Pending>>,
    in_flight: usize,
    results: Vec<IoDone>,
    errors: u64,
}

/// Nanoseconds since `epoch` (wrapping after 584 years).
fn nanos_since(epoch: Instant) -> u64 {
    let d = epoch.elapsed();
    d.as_secs()
        .wrapping_mul(1_000_000_000)
        .wrapping_add(u64::from(d.subsec_nanos()))
}

/// The index in `stats::OPS` of a request type (`None`: a request that could not be parsed,
/// counted as "other").
fn op_index(kind: Option<Kind>) -> usize {
    match kind {
        Some(Kind::Read) => 0,
        Some(Kind::Write) => 1,
        Some(Kind::Flush) => 2,
        Some(Kind::Discard) => 3,
        Some(Kind::WriteZeroes) => 4,
        Some(Kind::GetId) => 5,
        Some(Kind::Other(_)) | None => 6,
    }
}

/// The index in `stats::ERRORS` of an error status, `None` for OK.
fn error_index(code: u8) -> Option<usize> {
    match u32::from(code) {
        VIRTIO_BLK_S_OK => None,
        VIRTIO_BLK_S_UNSUPP => Some(1),
        _ => Some(0),
    }
}

/// What a [`BlockQueue`] holds in place of its backend while it is being dropped.
struct Gone;

impl QueueBackend for Gone {
    fn submit(&mut self, cookie: u64, _op: crate::backend::IoOp<'_>) {
        tracing::error!(cookie, "request submitted to a queue being dropped");
    }
    fn reap(&mut self, _out: &mut Vec<IoDone>) {}
    fn in_flight(&self) -> usize {
        0
    }
}

impl Drop for BlockQueue {
    fn drop(&mut self) {
        // The backend goes first, whatever the field order: requests it still holds point
        // into the memory snapshots in `pending`, which are dropped after it.
        drop(std::mem::replace(&mut self.backend, Box::new(Gone)));
    }
}

impl BlockQueue {
    fn finish(
        &mut self,
        mem: &Memory,
        head: u16,
        status: u64,
        code: u8,
        used: u32,
        done: &mut Completions,
    ) {
        // The status address was in driver memory when parsed; if it vanished since, the
        // driver unmapped its own buffer and can only see a zero-length completion.
        let used = if write_bytes(mem, status, &[code]) {
            used
        } else {
            0
        };
        done.push(head, used);
    }

    fn log_error(&mut self, what: &str) {
        self.errors += 1;
        if self.errors <= 10 {
            tracing::warn!(queue = self.index, "{what}");
        } else {
            tracing::debug!(queue = self.index, "{what}");
        }
    }

    fn has_feature(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    /// Checks a byte range of the disk; IOERR if it is past the end or overflows.
    fn in_capacity(&self, sector: u64, len: u64) -> bool {
        sector
            .checked_mul(512)
            .and_then(|o| o.checked_add(len))
            .is_some_and(|end| end <= self.capacity.get())
    }

    /// Validates and starts the parsed request. Returns a status to complete with at once,
    /// or None when it went to the backend.
    fn start(&mut self, mem: &Memory, head: u16) -> Result<Option<(u8, u32)>, &'static str> {
        let kind = self.req.kind.unwrap_or(Kind::Other(u32::MAX));
        let status = self.req.status;
        let data_len = self.req.data_len;
        let sector = self.req.sector;
        let ioerr = VIRTIO_BLK_S_IOERR as u8;
        match kind {
            Kind::Read | Kind::Write => {
                if kind == Kind::Write && self.cfg.read_only {
                    return Ok(Some((ioerr, 1)));
                }
                if !data_len.is_multiple_of(512) {
                    return Err("data length is not a multiple of 512 bytes");
                }
                if data_len > u64::from(u32::MAX) {
                    return Err("request larger than 4 GiB");
                }
                if !self.in_capacity(sector, data_len) {
                    return Err("request goes past the end of the disk");
                }
                if self.req.data.len() > self.cfg.seg_max() as usize {
                    return Err("more data segments than the seg_max the device offers");
                }
                let access = if kind == Kind::Read {
                    Permissions::Write
                } else {
                    Permissions::Read
                };
                // On the stack for the usual few segments: no allocation per request.
                let mut bufs: SmallVec<[VolatileSlice<'_>; 8]> = SmallVec::new();
                for &(addr, len) in &self.req.data {
                    if let Some(s) = one_slice(mem, addr, len as usize) {
                        bufs.push(s);
                        continue;
                    }
                    let slices = mem
                        .get_slices(GuestAddress(addr), len as usize, access)
                        .map_err(|_| "data buffer is outside driver memory")?;
                    for s in slices {
                        match s {
                            Ok(s) => bufs.push(s),
                            Err(_) => return Err("data buffer is outside driver memory"),
                        }
                    }
                }
                let offset = sector * 512;
                let op = if kind == Kind::Read {
                    IoOp::Read {
                        offset,
                        bufs: &bufs,
                    }
                } else {
                    IoOp::Write {
                        offset,
                        bufs: &bufs,
                    }
                };
                let used_ok = if kind == Kind::Read {
                    data_len as u32 + 1
                } else {
                    1
                };
                self.submit(mem, head, status, used_ok, op);
                Ok(None)
            }
            Kind::Flush => {
                self.submit(mem, head, status, 1, IoOp::Flush);
                Ok(None)
            }
            Kind::GetId => {
                let id = self.cfg.id_bytes();
                let mut written = 0usize;
                for &(addr, len) in &self.req.data {
                    let n = (len as usize).min(id.len() - written);
                    if n == 0 {
                        break;
                    }
                    if mem
                        .write_slice(&id[written..written + n], GuestAddress(addr))
                        .is_err()
                    {
                        return Err("GET_ID buffer is outside driver memory");
                    }
                    written += n;
                }
                Ok(Some((VIRTIO_BLK_S_OK as u8, written as u32 + 1)))
            }
            Kind::Discard | Kind::WriteZeroes => {
                let feature = if kind == Kind::Discard {
                    VIRTIO_BLK_F_DISCARD
                } else {
                    VIRTIO_BLK_F_WRITE_ZEROES
                };
                if !self.has_feature(feature) {
                    return Ok(Some((VIRTIO_BLK_S_UNSUPP as u8, 1)));
                }
                if self.cfg.read_only {
                    return Ok(Some((ioerr, 1)));
                }
                if data_len != 16 || self.req.data.len() != 1 {
                    return Err("discard/write-zeroes needs exactly one 16-byte segment");
                }
                let (addr, _) = self.req.data[0];
                let mut seg = [0u8; 16];
                if !read_bytes(mem, addr, &mut seg) {
                    return Err("discard segment is outside driver memory");
                }
                let seg_sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                let num = u32::from_le_bytes(seg[8..12].try_into().unwrap());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
                let flags_ok = if kind == Kind::Discard {
                    flags == 0
                } else {
                    flags & !unmap == 0
                };
                if !flags_ok {
                    return Ok(Some((VIRTIO_BLK_S_UNSUPP as u8, 1)));
                }
                if num > MAX_DISCARD_SECTORS {
                    return Err("discard/write-zeroes larger than the advertised maximum");
                }
                let len = u64::from(num) * 512;
                if !self.in_capacity(seg_sector, len) {
                    return Err("discard/write-zeroes goes past the end of the disk");
                }
                let offset = seg_sector * 512;
                let op = if kind == Kind::Discard {
                    IoOp::Discard { offset, len }
                } else {
                    IoOp::WriteZeroes {
                        offset,
                        len,
                        may_unmap: flags & unmap != 0,
                    }
                };
                self.submit(mem, head, status, 1, op);
                Ok(None)
            }
            Kind::Other(_) => Ok(Some((VIRTIO_BLK_S_UNSUPP as u8, 1))),
        }
    }

    fn submit(&mut self, mem: &Memory, head: u16, status: u64, used_ok: u32, op: IoOp<'_>) {
        let keep = self.asynchronous.then(|| mem.clone());
        let bytes = match &op {
            IoOp::Read { .. } | IoOp::Write { .. } => self.req.data_len,
            IoOp::Flush => 0,
            IoOp::Discard { len, .. } | IoOp::WriteZeroes { len, .. } => *len,
        };
        self.pending[usize::from(head)] = Some(Pending {
            status,
            op: op_index(self.req.kind),
            bytes,
            at: *self.clock.get_or_insert_with(|| nanos_since(self.epoch)),
            used_ok,
            _mem: keep,
        });
        self.in_flight += 1;
        self.backend.submit(u64::from(head), op);
    }

    /// Counts a request of type `kind` (`None`: not parsed) answered without the backend.
    fn count_now(&self, kind: Option<Kind>, code: u8, bytes: u64) {
        self.stats
            .complete(op_index(kind), bytes, error_index(code), None);
    }
}

impl QueueHandler for BlockQueue {
    fn handle(&mut self, mem: &Memory, chain: Chain<'_>, done: &mut Completions) {
        let head = chain.head;
        if self
            .pending
            .get(usize::from(head))
            .is_none_or(|p| p.is_some())
        {
            // A head already in flight (or out of range) again: the driver broke the ring
            // rules; completing it twice would corrupt its state, so drop it.
            self.log_error(&format!(
                "request {head} submitted while already in flight; ignored"
            ));
            return;
        }
        match self.req.parse(mem, chain.descs) {
            Err(ParseError::NoStatus) => {
                self.log_error(&format!("request {head} has no writable status byte"));
                self.count_now(None, VIRTIO_BLK_S_IOERR as u8, 0);
                done.push(head, 0);
            }
            Err(ParseError::Malformed { status, why }) => {
                self.log_error(&format!("request {head}: {why}"));
                self.count_now(None, VIRTIO_BLK_S_IOERR as u8, 0);
                self.finish(mem, head, status, VIRTIO_BLK_S_IOERR as u8, 1, done);
            }
            Ok(()) => {
                let status = self.req.status;
                match self.start(mem, head) {
                    Ok(None) => {}
                    Ok(Some((code, used))) => {
                        self.count_now(self.req.kind, code, u64::from(used.saturating_sub(1)));
                        self.finish(mem, head, status, code, used, done)
                    }
                    Err(why) => {
                        self.log_error(&format!("request {head}: {why}"));
                        self.count_now(self.req.kind, VIRTIO_BLK_S_IOERR as u8, 0);
                        self.finish(mem, head, status, VIRTIO_BLK_S_IOERR as u8, 1, done);
                    }
                }
            }
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.backend.completion_fd()
    }

    fn poll(&mut self, mem: &Memory, done: &mut Completions) {
        self.clock = None;
        let mut results = std::mem::take(&mut self.results);
        self.backend.reap(&mut results);
        if results.is_empty() {
            // A backend that holds requests and gives nothing back shows them in flight.
            self.stats.set_in_flight(self.in_flight);
            self.results = results;
            return;
        }
        let now = nanos_since(self.epoch);
        for (cookie, res) in results.drain(..) {
            let head = cookie as u16;
            let Some(p) = self
                .pending
                .get_mut(usize::from(head))
                .and_then(Option::take)
            else {
                continue;
            };
            self.in_flight -= 1;
            let took = Some(now.saturating_sub(p.at));
            match res {
                Ok(()) => {
                    self.stats.complete(p.op, p.bytes, None, took);
                    self.finish(mem, head, p.status, VIRTIO_BLK_S_OK as u8, p.used_ok, done)
                }
                Err(e) => {
                    self.log_error(&format!("I/O error on request {head}: {e}"));
                    self.stats.complete(p.op, p.bytes, Some(0), took);
                    self.finish(mem, head, p.status, VIRTIO_BLK_S_IOERR as u8, 1, done);
                }
            }
        }
        self.stats.set_in_flight(self.in_flight);
        self.results = results;
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn has_completions(&mut self) -> bool {
        self.in_flight > 0 && self.backend.has_results()
    }

    fn set_polling(&mut self, on: bool) {
        self.backend.set_polling(on);
    }
}
