//! librbd's cache must stay off for an image vudev writes to. A write it acknowledges from
//! memory dies with vudev, and crash recovery relies on every completed write being in the
//! cluster. `cluster.rs` turns it off for the connection, but a pool or an image may turn it
//! back on (`rbd config pool|image set … rbd_cache true`), and those win: such an image is
//! refused, with the command that undoes the setting.

use std::ffi::CStr;
use std::ptr;

use super::error::errno;
use super::ffi;
use super::spec::RbdSpec;

/// Where an effective option's value comes from (`rbd_config_source_t`).
const FROM_POOL: i32 = 1;
const FROM_IMAGE: i32 = 2;

/// `Err(what to do)` if librbd would cache writes to `image`.
pub(super) fn check_off(image: ffi::ImageT, spec: &RbdSpec) -> Result<(), String> {
    let (value, source) = match option(image, "rbd_cache") {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(()),
        Err(e) => {
            return Err(format!(
                "cannot read the image's configuration to check that librbd's write cache is \
                 off ({e}): the client's caps must let it read the pool's and the image's \
                 settings, or export the image --readonly"
            ))
        }
    };
    match ceph_bool(&value) {
        Some(false) => return Ok(()),
        Some(true) => {}
        None => {
            return Err(format!(
                "rbd_cache is set to '{value}', which is not a yes or no: set it to false, \
                 or export the image --readonly"
            ))
        }
    }
    let undo = match source {
        FROM_IMAGE => format!(
            "rbd config image remove {} rbd_cache",
            RbdSpec {
                snapshot: None,
                ..spec.clone()
            }
        ),
        FROM_POOL => format!("rbd config pool remove {} rbd_cache", spec.pool),
        _ => "set rbd_cache = false in the Ceph config".into(),
    };
    Err(format!(
        "the {} turns librbd's write cache on (rbd_cache = true): writes it acknowledged would \
         be lost if vudev died; undo it ({undo}) or export the image --readonly",
        match source {
            FROM_IMAGE => "image's configuration",
            FROM_POOL => "pool's configuration",
            _ => "Ceph config",
        }
    ))
}

/// A boolean as Ceph reads one: `true` or `false` in any case, or a whole number (non-zero
/// is true).
fn ceph_bool(value: &str) -> Option<bool> {
    let v = value.trim();
    if v.eq_ignore_ascii_case("true") {
        Some(true)
    } else if v.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        v.parse::<i64>().ok().map(|n| n != 0)
    }
}

/// The effective value of option `name` for `image`, and where it comes from.
fn option(image: ffi::ImageT, name: &str) -> std::io::Result<Option<(String, i32)>> {
    let mut count = 0;
    // SAFETY: the image is open; a zero-length array asks how many options there are.
    let ret = unsafe { ffi::rbd_config_image_list(image, ptr::null_mut(), &mut count) };
    if ret < 0 && ret != -libc::ERANGE {
        return Err(errno(ret.into()));
    }
    let mut options = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    // SAFETY: `options` has room for `count` entries; librbd fills them with strings of
    // its own, freed below by the matching cleanup call.
    let ret = unsafe { ffi::rbd_config_image_list(image, options.as_mut_ptr(), &mut count) };
    if ret < 0 {
        return Err(errno(ret.into()));
    }
    let filled = usize::try_from(count).unwrap_or(0).min(options.capacity());
    // SAFETY: librbd initialised the first `filled` entries.
    unsafe { options.set_len(filled) };
    let found = options.iter().find_map(|o: &ffi::ConfigOption| {
        // SAFETY: the entries' strings are NUL-terminated, owned by librbd until cleanup.
        let (n, v) = unsafe { (CStr::from_ptr(o.name), CStr::from_ptr(o.value)) };
        (n.to_bytes() == name.as_bytes()).then(|| (v.to_string_lossy().into_owned(), o.source))
    });
    // SAFETY: the entries came from rbd_config_image_list; freed once, and `options` only
    // drops its (plain-data) storage afterwards.
    unsafe { ffi::rbd_config_image_list_cleanup(options.as_mut_ptr(), count) };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::ceph_bool;

    #[test]
    fn booleans_read_as_ceph_reads_them() {
        for on in ["true", "TRUE", "True", "1", "-1", "7"] {
            assert_eq!(ceph_bool(on), Some(true), "{on}");
        }
        for off in ["false", "FALSE", "0"] {
            assert_eq!(ceph_bool(off), Some(false), "{off}");
        }
        for neither in ["yes", "", "on", "1.5"] {
            assert_eq!(ceph_bool(neither), None, "{neither}");
        }
    }
}
