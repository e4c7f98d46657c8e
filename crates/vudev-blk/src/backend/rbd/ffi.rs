//! The few librados and librbd calls the RBD backend makes, declared by hand from Debian's
//! `rados/librados.h` and `rbd/librbd.h` (librbd 1.16, Ceph 16.2). No maintained crate binds
//! librbd's asynchronous API; binding only what is used keeps the unsafe surface small.

use std::ffi::{c_char, c_int, c_void};

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

#[link(name = "rados")]
extern "C" {
    pub fn rados_create(cluster: *mut RadosT, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    pub fn rados_conf_parse_env(cluster: RadosT, var: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: RadosT) -> c_int;
    pub fn rados_shutdown(cluster: RadosT);
    pub fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, io: *mut IoctxT) -> c_int;
    pub fn rados_ioctx_set_namespace(io: IoctxT, nspace: *const c_char);
    pub fn rados_ioctx_destroy(io: IoctxT);
}

#[link(name = "rbd")]
extern "C" {
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
