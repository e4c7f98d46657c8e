//! The RBD backend: the disk is an image in a Ceph cluster, reached through librbd.
//!
//! - [`spec`]: `POOL[/NAMESPACE]/IMAGE[@SNAP]`; [`cluster`]: one connection per cluster,
//!   shared by the process's exports; [`queue`]: asynchronous requests completed by librbd
//!   callbacks, one eventfd per queue; [`ffi`]: the librados/librbd calls used, declared by
//!   hand (no maintained crate binds librbd's asynchronous API); [`error`]: opening errors.
//! - One image handle per export, shared by its queues (librbd's calls are thread-safe).
//! - Monitors and keys come from the Ceph config as for every Ceph client (`--rbd-conf`, or
//!   `CEPH_CONF` and the default places; `CEPH_ARGS` is honoured).
//! - A watch on the image header notices `rbd resize` by anyone: the new size is offered
//!   through [`BlockBackend::changed_size`], which the export turns into a capacity change
//!   the driver sees.
//! - `timeout` bounds every request: librados' OSD and monitor op timeouts and the mount
//!   timeout are set to it, so an unreachable cluster gives an I/O error, never a hang.

use std::ffi::c_void;
use std::io;
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::interface::{BlockBackend, QueueBackend};
use super::kit::Capacity;

mod cache;
mod cluster;
mod error;
mod ffi;
mod queue;
mod spec;
mod takeover;
pub use takeover::records_dir;

use cluster::{Cluster, Ioctx};
use error::errno;
pub use error::RbdError;
use spec::c;
pub use spec::RbdSpec;

/// How to reach the cluster.
#[derive(Clone, Debug)]
pub struct RbdOptions {
    /// The Ceph config file; `None`: librados' default search (`CEPH_CONF`, /etc/ceph).
    pub conf: Option<PathBuf>,
    /// The client id, without `client.` (`admin`).
    pub id: String,
    /// How long a request or a monitor call may take before it fails.
    pub timeout: Duration,
}

/// An open image; closed on drop, after every queue (each holds an `Arc`).
pub(crate) struct Image {
    handle: ffi::ImageT,
    /// The header watch: its handle and the flag its callback sets (an `Arc` given to
    /// librbd as a raw pointer, taken back once unwatched).
    watch: Option<(u64, *const AtomicBool)>,
    _io: Ioctx,
}

/// Called by librbd (on one of its threads) when the image header changes: a resize, a
/// snapshot, a lock change. Only marks it; the size is read later, off librbd's thread.
extern "C" fn header_changed(arg: *mut c_void) {
    // SAFETY: `arg` is the AtomicBool of an Arc that the Image keeps alive until the watch
    // is gone (rbd_update_unwatch returns once no callback runs).
    let changed = unsafe { &*arg.cast::<AtomicBool>() };
    changed.store(true, Ordering::Release);
}

// SAFETY: librbd's image calls (I/O, stat, resize) are thread-safe on one handle.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        if let Some((handle, flag)) = self.watch.take() {
            // SAFETY: the watch was registered on this open image with `flag` as its
            // argument; once unwatched no callback runs, so the Arc can be taken back.
            unsafe {
                ffi::rbd_update_unwatch(self.handle, handle);
                drop(Arc::from_raw(flag));
            }
        }
        // SAFETY: opened by rbd_open*; no request is in flight (queues wait for theirs
        // before they drop their Arc).
        unsafe { ffi::rbd_close(self.handle) };
    }
}

/// An RBD image as a block backend.
pub struct RbdBackend {
    spec: RbdSpec,
    image: Arc<Image>,
    capacity: Capacity,
    object_size: u64,
    read_only: bool,
    timeout: Duration,
    /// This connection's name to the cluster (`client.GID`), for messages.
    client: String,
    /// Set when the cluster fences the connection (see `cluster.rs`).
    fenced: Arc<AtomicBool>,
    /// Set by the header watch; `None` for a snapshot (it cannot change).
    changed: Option<Arc<AtomicBool>>,
}

impl RbdBackend {
    /// Opens the image `spec` names (a snapshot read-only), connecting to its cluster
    /// unless this process already is.
    pub fn open(spec: &str, read_only: bool, opts: &RbdOptions) -> Result<RbdBackend, RbdError> {
        let spec = RbdSpec::parse(spec).map_err(RbdError::Spec)?;
        let cluster = Cluster::get(opts.conf.as_deref(), &opts.id, opts.timeout)?;
        let failed = |why: String| RbdError::Image {
            spec: spec.to_string(),
            why,
        };
        let io = cluster
            .ioctx(&spec.pool, &spec.namespace)
            .map_err(|ret| match -ret {
                libc::ENOENT => failed(format!(
                    "pool '{}' does not exist: create it (ceph osd pool create {0}; rbd pool \
                     init {0})",
                    spec.pool
                )),
                _ => failed(format!(
                    "cannot open pool '{}': {}",
                    spec.pool,
                    errno(ret.into())
                )),
            })?;
        let read_only = read_only || spec.snapshot.is_some();
        let (name, snap) = (c(&spec.image), spec.snapshot.as_deref().map(c));
        let snap_ptr = snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut handle: ffi::ImageT = ptr::null_mut();
        // SAFETY: `io` is a live I/O context; the strings are NUL-terminated; `handle` is a
        // valid out-pointer. A snapshot opens read-only (no header watch: it cannot change).
        let mut ret = unsafe {
            if spec.snapshot.is_some() {
                ffi::rbd_open_read_only(io.handle, name.as_ptr(), &mut handle, snap_ptr)
            } else {
                ffi::rbd_open(io.handle, name.as_ptr(), &mut handle, ptr::null())
            }
        };
        if read_only && spec.snapshot.is_none() && matches!(-ret, libc::EPERM | libc::EACCES) {
            // A client with read-only caps cannot set the header watch an ordinary open sets;
            // a read-only open needs none (and then a resize by others goes unseen).
            tracing::warn!(
                spec = %spec,
                "client.{} may not watch the image: opened read-only, without following \
                 resizes",
                cluster.id
            );
            // SAFETY: as above.
            ret = unsafe {
                ffi::rbd_open_read_only(io.handle, name.as_ptr(), &mut handle, ptr::null())
            };
        }
        if ret < 0 {
            let why = match -ret {
                libc::ENOENT if spec.snapshot.is_some() => format!(
                    "no such image or snapshot (list them: rbd snap ls {}/{})",
                    spec.pool, spec.image
                ),
                libc::ENOENT => format!(
                    "no such image: create it (rbd create {} --size 1G)",
                    RbdSpec {
                        snapshot: None,
                        ..spec.clone()
                    }
                ),
                libc::EACCES | libc::EPERM => format!(
                    "permission denied for client.{}: its caps must allow the pool \
                     (ceph auth caps client.{0} mon 'profile rbd' osd 'profile rbd pool={}')",
                    cluster.id, spec.pool
                ),
                libc::ESHUTDOWN => {
                    // No use any more: the next open makes a new connection.
                    cluster.fenced.store(true, Ordering::Release);
                    "the cluster has fenced (blocklisted) this process's connection to it: try \
                     again, which makes a new one (if that is fenced too, see `ceph osd \
                     blocklist ls`)"
                        .to_string()
                }
                _ => format!("cannot open: {}", errno(ret.into())),
            };
            return Err(failed(why));
        }
        let mut image = Image {
            handle,
            watch: None,
            _io: io,
        };
        if !read_only {
            cache::check_off(handle, &spec).map_err(failed)?;
            takeover::from_dead_vudev(handle, &cluster.fsid, &spec.to_string());
        }
        let changed = if spec.snapshot.is_none() {
            let flag = Arc::new(AtomicBool::new(false));
            let arg = Arc::into_raw(flag.clone());
            let mut watch = 0u64;
            // SAFETY: the image is open; `arg` stays valid until Image::drop unwatches and
            // takes it back (or just below if the watch is refused).
            let ret = unsafe {
                ffi::rbd_update_watch(handle, &mut watch, header_changed, arg as *mut c_void)
            };
            if ret < 0 {
                // SAFETY: librbd did not keep `arg`.
                drop(unsafe { Arc::from_raw(arg) });
                tracing::warn!(
                    spec = %spec,
                    "cannot watch the image ({}): a resize by another client will not be seen",
                    errno(ret.into())
                );
                None
            } else {
                image.watch = Some((watch, arg));
                Some(flag)
            }
        } else {
            None
        };
        let image = Arc::new(image);
        // SAFETY: a zeroed rbd_image_info_t is a valid out-buffer of the size passed.
        let mut info: ffi::ImageInfo = unsafe { std::mem::zeroed() };
        // SAFETY: the image is open; `info` is writable for its size.
        let ret = unsafe {
            ffi::rbd_stat(
                image.handle,
                &mut info,
                std::mem::size_of::<ffi::ImageInfo>(),
            )
        };
        if ret < 0 {
            return Err(failed(format!("cannot stat: {}", errno(ret.into()))));
        }
        tracing::debug!(
            spec = %spec,
            size = info.size,
            object_size = info.obj_size,
            "RBD image opened"
        );
        Ok(RbdBackend {
            spec,
            image,
            capacity: Capacity::new(info.size),
            object_size: info.obj_size,
            read_only,
            timeout: opts.timeout,
            client: format!("client.{}", cluster.gid),
            fenced: cluster.fenced.clone(),
            changed,
        })
    }

    /// The image's object size: the unit in which RBD allocates and discards.
    pub fn object_size(&self) -> u64 {
        self.object_size
    }

    /// The size the cluster reports now.
    pub fn current_size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: the image is open; `size` is a valid out-pointer.
        let ret = unsafe { ffi::rbd_get_size(self.image.handle, &mut size) };
        if ret < 0 {
            return Err(errno(ret.into()));
        }
        Ok(size)
    }
}

impl BlockBackend for RbdBackend {
    fn size(&self) -> u64 {
        self.capacity.get()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn resize(&self, bytes: u64) -> io::Result<()> {
        if self.current_size()? == bytes {
            // Resized already (by `rbd resize`, seen through the watch): nothing to ask.
            self.capacity.set(bytes);
            return Ok(());
        }
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{} is read-only: it cannot change size", self.describe()),
            ));
        }
        // SAFETY: the image is open; no progress callback.
        let ret = unsafe {
            ffi::rbd_resize2(self.image.handle, bytes, true, ptr::null(), ptr::null_mut())
        };
        if ret < 0 {
            return Err(errno(ret.into()));
        }
        self.capacity.set(bytes);
        Ok(())
    }
    fn changed_size(&self) -> Option<u64> {
        let changed = self.changed.as_ref()?;
        if !changed.swap(false, Ordering::AcqRel) {
            return None;
        }
        match self.current_size() {
            Ok(size) if size != self.capacity.get() => {
                self.capacity.set(size);
                Some(size)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(spec = %self.spec, "cannot read the image size: {e}");
                // Looked at again next time.
                changed.store(true, Ordering::Release);
                None
            }
        }
    }
    fn optimal_io_size(&self) -> Option<u64> {
        Some(self.object_size)
    }
    fn queue(&self) -> io::Result<Box<dyn QueueBackend>> {
        // Every request ends within the op timeout; a little more covers librbd's own work.
        let settle = self.timeout + Duration::from_secs(5);
        Ok(Box::new(queue::RbdQueue::new(
            self.image.clone(),
            self.capacity.clone(),
            self.read_only,
            settle,
            format!("{} ({})", self.spec, self.client),
            self.fenced.clone(),
        )?))
    }
    fn describe(&self) -> String {
        format!("rbd {}", self.spec)
    }
}
