//! The few librados and librbd calls the RBD backend makes, declared by hand from Debian's
//! `rados/librados.h` and `rbd/librbd.h` (librbd 1.16, Ceph 16.2). No maintained crate binds
//! librbd's asynchronous API; binding only what is used keeps the unsafe surface small.
//!
//! The libraries are loaded when the first RBD export opens ([`load`]), not linked: vudev
//! runs where Ceph's client libraries are not installed, and a process without an RBD export
//! does not carry them (their static constructors alone took an idle `vudev serve` from
//! 7 to 23 MiB resident). Each function below forwards to the loaded library.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

/// Declares a library's functions: a table of them, filled by `dlopen`/`dlsym` from the
/// library `$soname`, and a function of the same name and signature for each, which calls
/// through the table.
macro_rules! library {
    (
        $(#[$doc:meta])* $table:ident, $slot:ident, $soname:literal;
        $(pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*
    ) => {
        $(#[$doc])*
        struct $table {
            $($name: unsafe extern "C" fn($($ty),*) $(-> $ret)?,)*
            /// Keeps the library mapped (for good: the table lives in a static).
            _lib: libloading::Library,
        }

        static $slot: OnceLock<$table> = OnceLock::new();

        impl $table {
            fn open() -> Result<$table, String> {
                let failed = |e: libloading::Error| {
                    format!(
                        "cannot load {} ({e}): the RBD backend needs Ceph's client libraries \
                         (Debian: apt install librbd1)",
                        $soname
                    )
                };
                // SAFETY: loading the library runs its initialisers, which need nothing
                // from us; Debian's Ceph 16.2 libraries are what the declarations follow.
                let lib = unsafe { libloading::Library::new($soname) }.map_err(failed)?;
                Ok($table {
                    // SAFETY: each symbol has the C signature declared for it (from the
                    // library's header); the pointers stay valid while `_lib` is loaded.
                    $($name: *unsafe { lib.get(concat!(stringify!($name), "\0").as_bytes()) }
                        .map_err(failed)?,)*
                    _lib: lib,
                })
            }

            /// Loads the library unless it is already (a failure is tried again next time:
            /// the library may have been installed since).
            fn load() -> Result<(), String> {
                if $slot.get().is_none() {
                    // Two threads loading at once: one table is kept, the other dropped.
                    let _ = $slot.set($table::open()?);
                }
                Ok(())
            }

            fn get() -> &'static $table {
                // Every path to these calls goes through `load` first (the cluster
                // connection does), so this is a bug, not a missing library.
                $slot
                    .get()
                    .unwrap_or_else(|| panic!("{} used before it was loaded", $soname))
            }
        }

        $(
            /// Calls the library's function of this name.
            ///
            /// # Safety
            /// As for the C function: the caller meets its header's contract.
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: forwarded as it is; the caller meets the function's contract.
                unsafe { ($table::get().$name)($($arg),*) }
            }
        )*
    };
}

/// Loads librados and librbd (once per process, once it works).
pub fn load() -> Result<(), String> {
    Rados::load()?;
    Rbd::load()
}

/// A cluster handle (`rados_t`).
pub type RadosT = *mut c_void;
/// A pool I/O context (`rados_ioctx_t`).
pub type IoctxT = *mut c_void;
/// An open image (`rbd_image_t`).
pub type ImageT = *mut c_void;
/// An asynchronous request's completion (`rbd_completion_t`).
pub type CompletionT = *mut c_void;
/// `rbd_callback_t`: called once, from a librbd thread, when a request completes.
pub type Callback = extern "C" fn(CompletionT, *mut c_void);

/// `rbd_update_callback_t`: called from a librbd thread when the image header changes.
pub type UpdateCallback = extern "C" fn(*mut c_void);

/// `rbd_image_info_t`.
#[repr(C)]
pub struct ImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

/// `RBD_LOCK_MODE_EXCLUSIVE` (`rbd_lock_mode_t`).
pub const LOCK_MODE_EXCLUSIVE: c_int = 0;

/// `rbd_config_option_t`: one option of an image's effective configuration.
#[repr(C)]
pub struct ConfigOption {
    pub name: *mut c_char,
    pub value: *mut c_char,
    /// `rbd_config_source_t`: 0 the client's config, 1 the pool, 2 the image.
    pub source: c_int,
}

library! {
    /// librados: cluster connections and pool contexts.
    Rados, RADOS, "librados.so.2";
    pub fn rados_create(cluster: *mut RadosT, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    pub fn rados_conf_parse_env(cluster: RadosT, var: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: RadosT) -> c_int;
    pub fn rados_shutdown(cluster: RadosT);
    pub fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, io: *mut IoctxT) -> c_int;
    pub fn rados_ioctx_set_namespace(io: IoctxT, nspace: *const c_char);
    pub fn rados_ioctx_destroy(io: IoctxT);
    pub fn rados_cluster_fsid(cluster: RadosT, buf: *mut c_char, len: usize) -> c_int;
    pub fn rados_get_instance_id(cluster: RadosT) -> u64;
    pub fn rados_getaddrs(cluster: RadosT, addrs: *mut *mut c_char) -> c_int;
}

library! {
    /// librbd: images and their asynchronous requests.
    Rbd, RBD, "librbd.so.1";
    pub fn rbd_open(
        io: IoctxT,
        name: *const c_char,
        image: *mut ImageT,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_open_read_only(
        io: IoctxT,
        name: *const c_char,
        image: *mut ImageT,
        snap: *const c_char,
    ) -> c_int;
    pub fn rbd_close(image: ImageT) -> c_int;
    pub fn rbd_stat(image: ImageT, info: *mut ImageInfo, infosize: usize) -> c_int;
    pub fn rbd_get_size(image: ImageT, size: *mut u64) -> c_int;
    pub fn rbd_resize2(
        image: ImageT,
        size: u64,
        allow_shrink: bool,
        cb: *const c_void,
        cbdata: *mut c_void,
    ) -> c_int;
    pub fn rbd_update_watch(
        image: ImageT,
        handle: *mut u64,
        cb: UpdateCallback,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_update_unwatch(image: ImageT, handle: u64) -> c_int;
    pub fn rbd_lock_get_owners(
        image: ImageT,
        mode: *mut c_int,
        owners: *mut *mut c_char,
        max_owners: *mut usize,
    ) -> c_int;
    pub fn rbd_lock_get_owners_cleanup(owners: *mut *mut c_char, count: usize);
    pub fn rbd_lock_break(image: ImageT, mode: c_int, owner: *const c_char) -> c_int;
    pub fn rbd_config_image_list(
        image: ImageT,
        options: *mut ConfigOption,
        max_options: *mut c_int,
    ) -> c_int;
    pub fn rbd_config_image_list_cleanup(options: *mut ConfigOption, count: c_int);
    pub fn rbd_aio_create_completion(
        arg: *mut c_void,
        cb: Callback,
        completion: *mut CompletionT,
    ) -> c_int;
    pub fn rbd_aio_get_return_value(completion: CompletionT) -> isize;
    pub fn rbd_aio_release(completion: CompletionT);
    pub fn rbd_aio_read(
        image: ImageT,
        off: u64,
        len: usize,
        buf: *mut c_char,
        completion: CompletionT,
    ) -> c_int;
    pub fn rbd_aio_writev(
        image: ImageT,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        completion: CompletionT,
    ) -> c_int;
    pub fn rbd_aio_flush(image: ImageT, completion: CompletionT) -> c_int;
    pub fn rbd_aio_discard(image: ImageT, off: u64, len: u64, completion: CompletionT) -> c_int;
    pub fn rbd_aio_write_zeroes(
        image: ImageT,
        off: u64,
        len: usize,
        completion: CompletionT,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
}
