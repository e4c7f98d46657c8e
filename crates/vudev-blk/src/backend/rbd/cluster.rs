//! Connections to Ceph clusters: one per process for each (config, client id, timeout),
//! shared by every export on that cluster and closed with the last of them.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::error::{errno, RbdError};
use super::ffi;
use super::spec::c;
use super::takeover::ClientRecord;

/// What tells one cluster connection from another.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Key {
    conf: Option<PathBuf>,
    id: String,
    timeout: Duration,
}

/// The connections made so far; a dead `Weak` is a connection whose exports have all gone.
static CLUSTERS: Mutex<Vec<(Key, Weak<Cluster>)>> = Mutex::new(Vec::new());

/// A connected cluster handle.
pub(super) struct Cluster {
    handle: ffi::RadosT,
    /// The client id (without `client.`), for messages.
    pub(super) id: String,
    /// The cluster's fsid, once connected.
    pub(super) fsid: String,
    /// The number the monitors gave this connection (it is `client.GID` to the cluster).
    pub(super) gid: u64,
    /// Set once the cluster has fenced (blocklisted) this connection: no new export uses it.
    pub(super) fenced: Arc<AtomicBool>,
    /// This host's record that this process is the client at this connection's address
    /// (see `takeover.rs`).
    _record: Option<ClientRecord>,
}

// SAFETY: a connected rados_t may be used from any thread; librados locks internally.
unsafe impl Send for Cluster {}
// SAFETY: as above: librados' calls on one cluster handle are thread-safe.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// The process's connection to the cluster `conf` describes (librados' default search,
    /// `CEPH_CONF` included, when `None`), as client `id`, made now if there is none.
    /// Every request and monitor call is bounded by `timeout`.
    pub(super) fn get(
        conf: Option<&Path>,
        id: &str,
        timeout: Duration,
    ) -> Result<Arc<Cluster>, RbdError> {
        ffi::load().map_err(RbdError::Library)?;
        let key = Key {
            conf: conf.map(Path::to_path_buf),
            id: id.to_string(),
            timeout,
        };
        let known = |all: &mut Vec<(Key, Weak<Cluster>)>| {
            all.retain(|(_, w)| w.strong_count() > 0);
            all.iter()
                .filter(|(k, _)| *k == key)
                .filter_map(|(_, w)| w.upgrade())
                .find(|c| !c.fenced.load(Ordering::Acquire))
        };
        let lock = || CLUSTERS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = known(&mut lock()) {
            return Ok(c);
        }
        // Not under the lock: a cluster that does not answer (for up to the timeout) must
        // not hold up the exports of other clusters.
        let cluster = Arc::new(Cluster::connect(&key)?);
        let mut all = lock();
        // Two exports of one cluster that connected at the same time: the first one kept
        // serves both, the other connection is shut down.
        if let Some(c) = known(&mut all) {
            return Ok(c);
        }
        all.push((key, Arc::downgrade(&cluster)));
        Ok(cluster)
    }

    fn connect(key: &Key) -> Result<Cluster, RbdError> {
        let conf_name = key.conf.as_ref().map_or_else(
            || "(CEPH_CONF or /etc/ceph/ceph.conf)".to_string(),
            |p| p.display().to_string(),
        );
        let mut handle: ffi::RadosT = ptr::null_mut();
        let id = c(&key.id);
        // SAFETY: `handle` is a valid out-pointer; `id` is a NUL-terminated string.
        let ret = unsafe { ffi::rados_create(&mut handle, id.as_ptr()) };
        if ret < 0 {
            return Err(RbdError::Connect {
                id: key.id.clone(),
                conf: conf_name,
                why: format!("rados_create: {}", errno(ret.into())),
            });
        }
        // From here on, dropping `cluster` shuts the handle down.
        let mut cluster = Cluster {
            handle,
            id: key.id.clone(),
            fsid: String::new(),
            gid: 0,
            fenced: Arc::new(AtomicBool::new(false)),
            _record: None,
        };
        let path = key
            .conf
            .as_ref()
            .map(|p| CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default());
        // SAFETY: the handle is live and not connected; the path is NUL-terminated or NULL.
        let ret = unsafe {
            ffi::rados_conf_read_file(handle, path.as_ref().map_or(ptr::null(), |p| p.as_ptr()))
        };
        if ret < 0 {
            return Err(RbdError::Config {
                conf: conf_name,
                source: errno(ret.into()),
            });
        }
        // SAFETY: as above; NULL means CEPH_ARGS.
        let ret = unsafe { ffi::rados_conf_parse_env(handle, ptr::null()) };
        if ret < 0 {
            return Err(RbdError::Option {
                option: "CEPH_ARGS".into(),
                source: errno(ret.into()),
            });
        }
        // No write cache in our memory: it would acknowledge writes that die with vudev (a
        // kill -9 after the driver's first flush lost them), and crash recovery relies on
        // every completed write being in the cluster.
        cluster.set("rbd_cache", "false")?;
        // librbd copies a write's data when it starts (queue.rs relies on it: the driver's
        // buffers are not read after a reset). This is librbd's default; it is set, not assumed.
        cluster.set("rbd_disable_zero_copy_writes", "true")?;
        let secs = key.timeout.as_secs().max(1).to_string();
        for option in [
            "rados_osd_op_timeout",
            "rados_mon_op_timeout",
            "client_mount_timeout",
        ] {
            cluster.set(option, &secs)?;
        }
        // SAFETY: the handle is live, configured and not connected yet.
        let ret = unsafe { ffi::rados_connect(handle) };
        if ret < 0 {
            let e = errno(ret.into());
            let why = match -ret {
                libc::EACCES | libc::EPERM => format!(
                    "{e}: the monitors refused client.{}'s key: check the keyring the config \
                     names (or --rbd-id)",
                    key.id
                ),
                libc::ENOENT => format!(
                    "{e}: no key for client.{}: put its keyring where the config says",
                    key.id
                ),
                libc::ETIMEDOUT | libc::EINTR => format!(
                    "no monitor answered within {} s: is the cluster up, and is mon_host \
                     in the config right?",
                    key.timeout.as_secs()
                ),
                _ => e.to_string(),
            };
            return Err(RbdError::Connect {
                id: key.id.clone(),
                conf: conf_name,
                why,
            });
        }
        let mut fsid = [0u8; 64];
        // SAFETY: the handle is connected; `fsid` is writable for the length passed.
        let len = unsafe { ffi::rados_cluster_fsid(handle, fsid.as_mut_ptr().cast(), fsid.len()) };
        let len = usize::try_from(len).unwrap_or(0).min(fsid.len());
        cluster.fsid = String::from_utf8_lossy(&fsid[..len])
            .trim_end_matches('\0')
            .to_string();
        // SAFETY: the handle is connected.
        cluster.gid = unsafe { ffi::rados_get_instance_id(handle) };
        cluster._record = cluster
            .address()
            .and_then(|a| ClientRecord::write(&cluster.fsid, &a));
        Ok(cluster)
    }

    /// This connection's address, as the cluster names it in locks and blocklists
    /// (`IP:PORT/NONCE`).
    fn address(&self) -> Option<String> {
        let mut addrs: *mut std::ffi::c_char = ptr::null_mut();
        // SAFETY: the handle is connected; `addrs` is a valid out-pointer.
        let ret = unsafe { ffi::rados_getaddrs(self.handle, &mut addrs) };
        if ret < 0 || addrs.is_null() {
            return None;
        }
        // SAFETY: librados returned a NUL-terminated string of its own (strdup'ed), freed
        // once here.
        unsafe {
            let a = std::ffi::CStr::from_ptr(addrs)
                .to_string_lossy()
                .into_owned();
            libc::free(addrs.cast());
            Some(a)
        }
    }

    fn set(&self, option: &str, value: &str) -> Result<(), RbdError> {
        let (o, v) = (c(option), c(value));
        // SAFETY: the handle is live; both strings are NUL-terminated.
        let ret = unsafe { ffi::rados_conf_set(self.handle, o.as_ptr(), v.as_ptr()) };
        if ret < 0 {
            return Err(RbdError::Option {
                option: format!("{option}={value}"),
                source: errno(ret.into()),
            });
        }
        Ok(())
    }

    /// An I/O context on `pool`, in `namespace` ("" for the default one).
    pub(super) fn ioctx(self: &Arc<Self>, pool: &str, namespace: &str) -> Result<Ioctx, i32> {
        let mut io: ffi::IoctxT = ptr::null_mut();
        let p = c(pool);
        // SAFETY: the handle is connected; `io` is a valid out-pointer.
        let ret = unsafe { ffi::rados_ioctx_create(self.handle, p.as_ptr(), &mut io) };
        if ret < 0 {
            return Err(ret);
        }
        if !namespace.is_empty() {
            let ns = c(namespace);
            // SAFETY: `io` was just created; the string is NUL-terminated (copied by librados).
            unsafe { ffi::rados_ioctx_set_namespace(io, ns.as_ptr()) };
        }
        Ok(Ioctx {
            handle: io,
            _cluster: self.clone(),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create; every ioctx holds an Arc of us, so none
        // is left.
        unsafe { ffi::rados_shutdown(self.handle) };
    }
}

/// A pool I/O context; keeps its cluster connected.
pub(super) struct Ioctx {
    pub(super) handle: ffi::IoctxT,
    _cluster: Arc<Cluster>,
}

// SAFETY: librados I/O contexts are thread-safe for the calls made here (image opens).
unsafe impl Send for Ioctx {}
// SAFETY: as above.
unsafe impl Sync for Ioctx {}

impl Drop for Ioctx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; images opened on it hold an Arc of it and
        // are closed first.
        unsafe { ffi::rados_ioctx_destroy(self.handle) };
    }
}
