//! Taking over from a vudev that died. Its exclusive lock on an image lingers until the
//! cluster gives up on it (the OSDs' watch timeout, 30 s by default), and a restarted
//! vudev's first write waits that long: a stall its driver would see after every crash.
//!
//! So every cluster connection leaves a record on this host, [`records_dir`]`/FSID.NONCE`
//! (NONCE: the random part of the connection's address `IP:PORT/NONCE`, which is how the
//! cluster names a lock's owner). The record holds the full address and the pid, and the
//! process keeps it open under an exclusive `flock` for as long as the connection lives:
//! the kernel drops that lock when the process dies, whatever its pid namespace, so a free
//! lock is proof that the recorder is gone. A vudev that opens an image locked by a client
//! whose record is free (and names exactly that address) breaks the lock at once; librbd
//! blocklists the dead client, so nothing it might still have had on the wire can land
//! later. A lock held by any other client, or by a process still alive, is left alone:
//! librbd hands it over cooperatively.

use std::ffi::CStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::error::errno;
use super::ffi;
use super::spec::c;

/// Where the records of the processes running as `uid` live (tmpfs: a reboot clears them):
/// a directory per user, which only that user may write, so that nobody can plant a record
/// that would make another user's vudev break a lock. A process that gives up root for
/// another user needs that user's directory made for it (the binary's helper does that).
pub fn records_dir(uid: u32) -> PathBuf {
    match uid {
        0 => PathBuf::from("/run/vudev/rbd"),
        uid => PathBuf::from(format!("/run/vudev/rbd-{uid}")),
    }
}

/// This process's record directory.
fn records() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    records_dir(unsafe { libc::geteuid() })
}

/// How long the record of a process seen gone is kept: far longer than the cluster keeps
/// a dead client's watch (after that, librbd breaks its locks without our help).
const KEEP_GONE: Duration = Duration::from_secs(3600);

/// This process's record of one cluster connection: held open under an exclusive flock,
/// removed when the connection closes.
pub(super) struct ClientRecord {
    path: PathBuf,
    _file: File,
}

impl ClientRecord {
    /// Records that the client at `address` in cluster `fsid` is this process. Without a
    /// writable record directory there is no record (and a restart waits for the cluster).
    pub(super) fn write(fsid: &str, address: &str) -> Option<ClientRecord> {
        let dir = records();
        let path = record_path(&dir, fsid, address)?;
        clean_up(&dir);
        match create(&dir, &path, address) {
            Ok(file) => Some(ClientRecord { path, _file: file }),
            Err(e) => {
                tracing::debug!(
                    "cannot record this RBD client in {} ({e}): after a crash, the next \
                     vudev waits for the cluster to drop this one's locks",
                    dir.display()
                );
                None
            }
        }
    }
}

impl Drop for ClientRecord {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Creates the record at `path` (replacing a stale one), locked for as long as it is open.
fn create(dir: &Path, path: &Path, address: &str) -> io::Result<File> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // Blocking: a vudev looking at records holds its shared lock for a moment only.
    flock(&file, libc::LOCK_EX)?;
    write!(file, "{address} {}", std::process::id())?;
    Ok(file)
}

fn flock(file: &File, how: i32) -> io::Result<()> {
    // SAFETY: flock(2) on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), how) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `DIR/FSID.NONCE` for a client address `IP:PORT/NONCE` (perhaps in brackets, with a
/// `v1:`/`v2:` prefix); `None` for anything else. The address comes from the cluster: it
/// never names a path of its own choosing.
fn record_path(dir: &Path, fsid: &str, address: &str) -> Option<PathBuf> {
    let nonce = address.rsplit_once('/')?.1.trim_end_matches(']');
    let plain = |s: &str, ok: fn(char) -> bool| !s.is_empty() && s.chars().all(ok);
    if !plain(nonce, |ch| ch.is_ascii_digit())
        || !plain(fsid, |ch| ch.is_ascii_hexdigit() || ch == '-')
    {
        return None;
    }
    Some(dir.join(format!("{fsid}.{nonce}")))
}

/// What a record says: its address and pid, and when it was first seen gone.
struct Record {
    address: String,
    pid: u32,
    gone_since: Option<u64>,
}

/// Reads the record at `path` if its process is gone (its flock is free); `None` if it is
/// alive, or the record cannot be read (then nobody is taken for dead). The first look
/// that finds it gone marks it with the time, for [`clean_up`].
fn gone(path: &Path) -> Option<Record> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    // Held by a live process (in any pid namespace): not ours to take over. Shared, so
    // two vudevs looking at once both see the dead one.
    flock(&file, libc::LOCK_SH | libc::LOCK_NB).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    let mut words = text.split_whitespace();
    let (address, pid) = (words.next()?.to_string(), words.next()?.parse().ok()?);
    let gone_since = match (words.next(), words.next()) {
        (Some("gone"), Some(at)) => at.parse().ok(),
        _ => {
            let _ = write!(file, " gone {}", unix_now());
            None
        }
    };
    Some(Record {
        address,
        pid,
        gone_since,
    })
}

/// Removes the records of processes seen gone over [`KEEP_GONE`] ago, and marks those
/// newly gone. Only crashes leave records behind (a connection that closes removes its
/// own), so this keeps the directory small under a crash loop.
fn clean_up(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        let Some(record) = gone(&path) else {
            continue;
        };
        if record
            .gone_since
            .is_some_and(|at| unix_now().saturating_sub(at) > KEEP_GONE.as_secs())
        {
            let _ = fs::remove_file(&path);
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The clients holding `image`'s exclusive lock (none: empty), by address.
fn lock_owners(image: ffi::ImageT) -> io::Result<Vec<String>> {
    let mut mode = 0;
    let mut owners = [ptr::null_mut(); 4];
    let mut count = owners.len();
    // SAFETY: the image is open; `owners` has room for `count` pointers, which librbd fills
    // with strings of its own, freed below by the matching cleanup call.
    let ret =
        unsafe { ffi::rbd_lock_get_owners(image, &mut mode, owners.as_mut_ptr(), &mut count) };
    if ret == -libc::ENOENT {
        return Ok(Vec::new());
    }
    if ret < 0 {
        return Err(errno(ret.into()));
    }
    let count = count.min(owners.len());
    let names = owners[..count]
        .iter()
        // SAFETY: each of the first `count` entries is a NUL-terminated string from librbd.
        .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .collect();
    // SAFETY: the first `count` entries came from rbd_lock_get_owners.
    unsafe { ffi::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), count) };
    Ok(names)
}

/// Breaks `image`'s lock if a vudev on this host that died holds it. `spec` is for messages.
pub(super) fn from_dead_vudev(image: ffi::ImageT, fsid: &str, spec: &str) {
    let owners = match lock_owners(image) {
        Ok(o) => o,
        Err(e) => {
            tracing::debug!(spec, "cannot list the image's lock owners: {e}");
            return;
        }
    };
    for owner in owners {
        let recorded = record_path(&records(), fsid, &owner);
        let Some(record) = recorded.as_deref().and_then(gone) else {
            continue;
        };
        if record.address != owner {
            continue;
        }
        let pid = record.pid;
        let name = c(&owner);
        // SAFETY: the image is open; `name` is NUL-terminated.
        let ret = unsafe { ffi::rbd_lock_break(image, ffi::LOCK_MODE_EXCLUSIVE, name.as_ptr()) };
        if ret < 0 {
            tracing::warn!(
                spec,
                "cannot break the lock {owner} held (vudev pid {pid}, which is gone): {}; the \
                 first write waits until the cluster drops it",
                errno(ret.into())
            );
        } else {
            tracing::info!(
                spec,
                "broke the image's lock, held by {owner} of vudev pid {pid}, which is gone"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_gone_once_its_holder_is() {
        let dir = std::env::temp_dir().join(format!("vudev-takeover-{}", std::process::id()));
        let fsid = "0b7a33e2-5c9e-4f43-9d57-1c1a7e2d1f00";
        let addr = |n: u32| format!("127.0.0.1:0/{n}");
        let path = |n: u32| record_path(&dir, fsid, &addr(n)).unwrap();
        // Held open (as a live connection holds its own): not gone.
        let held = create(&dir, &path(41), &addr(41)).unwrap();
        assert!(gone(&path(41)).is_none());
        // Closed (as the kernel closes a dead process's files): gone, with its address and
        // pid, and still so on a second look (a second export of the same dead process).
        drop(held);
        let r = gone(&path(41)).unwrap();
        assert_eq!(
            (r.address.as_str(), r.pid),
            (addr(41).as_str(), std::process::id())
        );
        assert!(r.gone_since.is_none());
        assert!(gone(&path(41)).unwrap().gone_since.is_some());
        // Cleaning up keeps what was seen gone lately, and the living.
        let live = create(&dir, &path(42), &addr(42)).unwrap();
        clean_up(&dir);
        assert!(path(41).exists() && path(42).exists());
        let old = unix_now() - KEEP_GONE.as_secs() - 1;
        fs::write(path(41), format!("{} 7 gone {old}", addr(41))).unwrap();
        clean_up(&dir);
        assert!(!path(41).exists() && path(42).exists());
        drop(live);
        // No record, or an owner that is not an address: nobody to take over from.
        assert!(gone(&path(43)).is_none());
        assert_eq!(
            record_path(&dir, fsid, "[v2:10.0.0.1:0/77]"),
            Some(dir.join(format!("{fsid}.77")))
        );
        assert_eq!(record_path(&dir, fsid, "10.0.0.1:0/../../etc"), None);
        assert_eq!(record_path(&dir, "../x", "10.0.0.1:0/1"), None);
        assert_eq!(record_path(&dir, fsid, "client.4122"), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
