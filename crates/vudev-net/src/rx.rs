//! The receive queue: frames from the TAP into the driver's buffers.
//!
//! Chains the driver makes available are held until a frame comes. A frame is read by one
//! `readv` straight into the held buffers (with mergeable receive buffers, into as many
//! chains as the largest frame could need), with a small overflow buffer after them: a frame
//! that reaches into it did not fit and is dropped and counted, and the chains stay for the
//! next one. When the held mergeable buffers are too few for the largest frame, the next
//! frame is read aside instead and copied in once it fits, so that neither a frame is lost
//! to a driver still refilling its ring nor the queue stalls on one that posts little.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use vudev_core::{Chain, Completions, Memory, QueueHandler};

use crate::buffers::{Buffers, MAX_IOVECS};
use crate::stats::NetStats;
use crate::tap::{Offloads, Tap, VNET_HDR_LEN};

/// Where the byte count `num_buffers` sits in the virtio-net header.
const NUM_BUFFERS_AT: u64 = 10;

/// The most receive chains held, and buffers among them: a ring holds at most 32768 chains,
/// and a driver that posts the same descriptors under many heads must not make the held
/// list grow past that (beyond, chains are given back empty and counted).
const MAX_HELD_CHAINS: usize = 32768;
const MAX_HELD_SEGMENTS: usize = 65536;

/// One receive queue.
pub(crate) struct RxQueue {
    tap: Tap,
    /// The TAP's readability, edge-triggered: the worker waits on this, so that a TAP holding
    /// frames while there are no buffers for them does not wake it again and again.
    ready: OwnedFd,
    held: VecDeque<Buffers>,
    held_len: u64,
    /// Buffers (descriptors) of the held chains.
    held_segments: usize,
    mergeable: bool,
    /// The largest frame the TAP may hand over, with its header.
    need: u64,
    /// Catches the part of a frame that did not fit the buffers it was read into.
    overflow: Vec<u8>,
    /// A frame read aside (its length), waiting for enough buffers.
    aside: Vec<u8>,
    aside_len: Option<usize>,
    iov: Vec<libc::iovec>,
    /// A frame may be waiting in the TAP for buffers.
    starved: bool,
    /// The kind of the last read error logged (each kind is logged once in a row).
    logged: Option<io::ErrorKind>,
    /// The offloads the driver takes, told to the TAP from this queue's own thread before
    /// its first read (see [`RxQueue::new`]).
    offloads: Option<Offloads>,
    stats: Arc<NetStats>,
    /// Detach the TAP queue when this receive queue goes (a pair beyond the first).
    detach: bool,
}

// SAFETY: the raw pointers in `iov` are scratch, rebuilt for every system call and never
// used across calls; everything else is Send.
unsafe impl Send for RxQueue {}

impl RxQueue {
    /// A receive queue reading frames of at most `max_frame` bytes (header not included)
    /// from `tap`, which is told `offloads` on this queue's thread: TUNSETOFFLOAD takes the
    /// kernel's network lock, which the virtio-net driver may hold while it waits for the
    /// device to start (under VDUSE, for our answer): told from the thread that starts the
    /// queue, the two would wait for each other.
    pub(crate) fn new(
        tap: Tap,
        offloads: Offloads,
        mergeable: bool,
        max_frame: u32,
        stats: Arc<NetStats>,
    ) -> io::Result<RxQueue> {
        // SAFETY: epoll_create1 has no memory effects; the fd is owned below.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nothing else owns.
        let ready = unsafe { OwnedFd::from_raw_fd(ep) };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: 0,
        };
        // SAFETY: `ev` is a valid epoll_event; both fds are open.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, tap.as_raw_fd(), &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let need = VNET_HDR_LEN as u64 + u64::from(max_frame);
        Ok(RxQueue {
            tap,
            ready,
            held: VecDeque::new(),
            held_len: 0,
            held_segments: 0,
            mergeable,
            need,
            overflow: vec![0; need as usize + 1],
            aside: Vec::new(),
            aside_len: None,
            iov: Vec::new(),
            // Frames may have come before the driver started the queue.
            starved: true,
            logged: None,
            offloads: Some(offloads),
            stats,
            detach: false,
        })
    }

    /// Detaches the TAP queue when this receive queue is dropped: the TAP then hands its
    /// flows to the queues still read.
    pub(crate) fn detached_on_drop(mut self, detach: bool) -> RxQueue {
        self.detach = detach;
        self
    }

    /// Takes the TAP's edge, so that `ready` is quiet until the next frame.
    fn take_edge(&self) {
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
        // SAFETY: `ev` has room for the one event asked for; a zero timeout never blocks.
        unsafe { libc::epoll_wait(self.ready.as_raw_fd(), ev.as_mut_ptr(), 1, 0) };
    }

    /// Delivers frames while there are frames and buffers.
    fn receive(&mut self, mem: &Memory, done: &mut Completions) {
        if let Some(o) = self.offloads.take() {
            if let Err(e) = self.tap.set_offloads(o) {
                // The TAP accepted these at start: it then hands over plain frames only.
                tracing::warn!(tap = self.tap.name(), "{e}");
            }
        }
        loop {
            if let Some(len) = self.aside_len {
                if !self.deliver_aside(mem, len, done) {
                    self.starved = true;
                    return;
                }
                continue;
            }
            if self.held.is_empty() {
                self.starved = true;
                return;
            }
            let result = if self.mergeable && self.held_len < self.need {
                self.read_aside()
            } else {
                self.read_direct(mem, done)
            };
            match result {
                Ok(true) => {}
                Ok(false) => {
                    self.starved = false;
                    return;
                }
                Err(e) => {
                    if self.logged != Some(e.kind()) {
                        tracing::warn!(tap = self.tap.name(), "reading a frame from the TAP: {e}");
                        self.logged = Some(e.kind());
                    }
                    self.starved = false;
                    return;
                }
            }
        }
    }

    /// Reads the next frame into the held buffers; false when none waits.
    fn read_direct(&mut self, mem: &Memory, done: &mut Completions) -> io::Result<bool> {
        self.iov.clear();
        let mut cap = 0u64;
        let mut chains = 0;
        while chains < self.held.len() && (chains == 0 || (self.mergeable && cap < self.need)) {
            let b = &self.held[chains];
            let before = self.iov.len();
            if !b.iovecs(mem, b.len, &mut self.iov) {
                if chains > 0 && self.iov.len() >= MAX_IOVECS {
                    // As many buffers as one call takes: the frame gets those.
                    self.iov.truncate(before);
                    break;
                }
                self.refuse_held(chains, done);
                return Ok(true);
            }
            cap += b.len;
            chains += 1;
        }
        self.iov.push(libc::iovec {
            iov_base: self.overflow.as_mut_ptr().cast(),
            iov_len: self.overflow.len(),
        });
        let Some(n) = self.tap.read_frame(&self.iov)? else {
            return Ok(false);
        };
        if n as u64 > cap || n as u64 > self.need || n < VNET_HDR_LEN {
            // Larger than the buffers or than the MTU allows: the chains stay for the next.
            NetStats::add(&self.stats.rx_dropped, 1);
            return Ok(true);
        }
        self.complete_frame(mem, n as u64, done);
        Ok(true)
    }

    /// Reads the next frame aside, when the held buffers may be too few for it; false when
    /// none waits.
    fn read_aside(&mut self) -> io::Result<bool> {
        self.aside.resize(self.need as usize + 1, 0);
        let iov = [libc::iovec {
            iov_base: self.aside.as_mut_ptr().cast(),
            iov_len: self.aside.len(),
        }];
        let Some(n) = self.tap.read_frame(&iov)? else {
            return Ok(false);
        };
        if n as u64 > self.need || n < VNET_HDR_LEN {
            NetStats::add(&self.stats.rx_dropped, 1);
        } else {
            self.aside_len = Some(n);
        }
        Ok(true)
    }

    /// Copies the frame read aside into the held buffers once they hold it; false until then.
    fn deliver_aside(&mut self, mem: &Memory, len: usize, done: &mut Completions) -> bool {
        if self.held_len < len as u64 {
            return false;
        }
        let mut at = 0usize;
        let mut i = 0;
        while at < len {
            let b = &self.held[i];
            let n = (b.len as usize).min(len - at);
            if !b.write_at(mem, 0, &self.aside[at..at + n]) {
                // Not in driver memory: that chain goes, the frame waits for others.
                self.refuse_held(i, done);
                return !self.held.is_empty();
            }
            at += n;
            i += 1;
        }
        self.aside_len = None;
        self.complete_frame(mem, len as u64, done);
        true
    }

    /// Completes the chains a frame of `n` bytes (header included) filled, front first, with
    /// their count in the header's `num_buffers`.
    fn complete_frame(&mut self, mem: &Memory, n: u64, done: &mut Completions) {
        let mut left = n;
        let mut used = 0usize;
        while left > 0 {
            let len = self.held[used].len.min(left);
            left -= len;
            used += 1;
        }
        let count = used as u16;
        // The header is in the first chain, which holds at least its 12 bytes.
        let _ = self.held[0].write_at(mem, NUM_BUFFERS_AT, &count.to_le_bytes());
        let mut left = n;
        for _ in 0..used {
            let Some(b) = self.held.pop_front() else {
                break;
            };
            let len = b.len.min(left);
            left -= len;
            self.held_len -= b.len;
            self.held_segments -= b.segment_count();
            done.push(b.head, len as u32);
        }
        NetStats::add(&self.stats.rx_packets, 1);
        NetStats::add(&self.stats.rx_bytes, n - VNET_HDR_LEN as u64);
    }

    /// Gives back held chain `i`, whose buffers are not in driver memory, empty.
    fn refuse_held(&mut self, i: usize, done: &mut Completions) {
        if let Some(b) = self.held.remove(i) {
            self.held_len -= b.len;
            self.held_segments -= b.segment_count();
            NetStats::add(&self.stats.rx_bad_chains, 1);
            done.push(b.head, 0);
        }
    }
}

impl Drop for RxQueue {
    fn drop(&mut self) {
        if self.detach {
            if let Err(e) = self.tap.set_attached(false) {
                tracing::warn!("{e}");
            }
        }
    }
}

impl QueueHandler for RxQueue {
    fn handle(&mut self, mem: &Memory, chain: Chain<'_>, done: &mut Completions) {
        match Buffers::of_chain(chain.head, chain.descs, true) {
            Ok(b)
                if b.len >= VNET_HDR_LEN as u64
                    && self.held.len() < MAX_HELD_CHAINS
                    && self.held_segments + b.segment_count() <= MAX_HELD_SEGMENTS =>
            {
                self.held_len += b.len;
                self.held_segments += b.segment_count();
                self.held.push_back(b);
                if self.starved {
                    self.receive(mem, done);
                }
            }
            Ok(_) | Err(_) => {
                NetStats::add(&self.stats.rx_bad_chains, 1);
                done.push(chain.head, 0);
            }
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.ready.as_raw_fd())
    }

    fn poll(&mut self, mem: &Memory, done: &mut Completions) {
        self.take_edge();
        self.receive(mem, done);
    }

    fn has_completions(&mut self) -> bool {
        // While the worker spins with buffers held, a read that finds nothing is the cost
        // of seeing a frame at once.
        !self.held.is_empty() && !self.starved
    }
}
