//! Taking over from a vudev that died. Its exclusive lock on an image lingers until the
//! cluster gives up on it (the OSDs' watch timeout, 30 s by default), and a restarted
//! vudev's first write waits that long: a stall its driver would see after every crash.
//!
//! So every cluster connection leaves a record on this host, [`RECORDS`]`/FSID.NONCE`
//! (NONCE: the random part of the connection's address, `IP:PORT/NONCE`, which is how the
//! cluster names a lock's owner), naming its process: pid, start time and boot. A vudev that opens an image locked by a client whose record names a
//! process that is gone breaks that lock at once; librbd blocklists the dead client, so
//! nothing it might still have had on the wire can land later. A lock held by any other
//! client, or by a process still alive, is left alone: librbd hands it over cooperatively.

use std::ffi::CStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::ptr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::error::errno;
use super::ffi;
use super::spec::c;

/// Where the records live (tmpfs: a reboot clears them).
pub(super) const RECORDS: &str = "/run/vudev/rbd";

/// This process's record of one cluster connection, removed when the connection closes.
pub(super) struct ClientRecord {
    path: PathBuf,
}

impl ClientRecord {
    /// Records that the client at `address` in cluster `fsid` is this process. Without a
    /// writable record directory there is no record (and a restart waits for the cluster).
    pub(super) fn write(fsid: &str, address: &str) -> Option<ClientRecord> {
        let path = record_path(Path::new(RECORDS), fsid, address)?;
        let me = process(std::process::id())?;
        clean_up(Path::new(RECORDS));
        let written = fs::create_dir_all(RECORDS).and_then(|()| fs::write(&path, me));
        if let Err(e) = written {
            tracing::debug!(
                "cannot record this RBD client in {RECORDS} ({e}): after a crash, the next \
                 vudev waits for the cluster to drop this one's locks"
            );
            return None;
        }
        Some(ClientRecord { path })
    }
}

impl Drop for ClientRecord {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
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

/// "PID START BOOT": a process, told apart from a later one that reuses its pid.
fn process(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (start time); the command name (field 2) may hold spaces, so count from
    // the parenthesis that closes it.
    let start = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?;
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(format!("{pid} {start} {}", boot.trim()))
}

/// How long the record of a process seen gone is kept: far longer than the cluster keeps
/// a dead client's watch (after that, librbd breaks its locks without our help).
const KEEP_GONE: Duration = Duration::from_secs(3600);

/// The pid of the process that left the record at `path`, if that process is gone. The
/// first look that finds it gone marks the record with the time, for [`clean_up`].
fn gone_recorder(path: &Path) -> Option<u32> {
    let record = fs::read_to_string(path).ok()?;
    let mut words = record.split_whitespace();
    let (pid, start, boot) = (words.next()?, words.next()?, words.next()?);
    let who = format!("{pid} {start} {boot}");
    let pid: u32 = pid.parse().ok()?;
    if process(pid).as_deref() == Some(who.as_str()) {
        return None;
    }
    if words.next() != Some("gone") {
        let _ = fs::write(path, format!("{who} gone {}", unix_now()));
    }
    Some(pid)
}

/// Removes the records of processes seen gone over [`KEEP_GONE`] ago, and marks those
/// that are newly gone. Only crashes leave records behind (a connection that closes
/// removes its own), so this keeps the directory small under a crash loop.
fn clean_up(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        let gone_at = fs::read_to_string(&path).ok().and_then(|r| {
            let (_, at) = r.split_once(" gone ")?;
            at.trim().parse::<u64>().ok()
        });
        match gone_at {
            Some(at) if unix_now().saturating_sub(at) > KEEP_GONE.as_secs() => {
                let _ = fs::remove_file(&path);
            }
            Some(_) => {}
            None => {
                gone_recorder(&path);
            }
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The clients holding `image`'s exclusive lock (none: empty).
fn lock_owners(image: ffi::ImageT) -> Result<Vec<String>, std::io::Error> {
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
        let recorded = record_path(Path::new(RECORDS), fsid, &owner);
        let Some(pid) = recorded.as_deref().and_then(gone_recorder) else {
            continue;
        };
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
    fn a_record_names_this_process_until_it_is_gone() {
        let dir = std::env::temp_dir().join(format!("vudev-takeover-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let fsid = "0b7a33e2-5c9e-4f43-9d57-1c1a7e2d1f00";
        let path = |n: u32| record_path(&dir, fsid, &format!("127.0.0.1:0/{n}")).unwrap();
        // This process is alive: its record is not a gone one's.
        let me = process(std::process::id()).unwrap();
        fs::write(path(41), &me).unwrap();
        assert_eq!(gone_recorder(&path(41)), None);
        // The same pid with another start time: a process that is gone, seen so twice (a
        // second export of the same dead process takes over too).
        let (pid, rest) = me.split_once(' ').unwrap();
        let (_, boot) = rest.split_once(' ').unwrap();
        fs::write(path(42), format!("{pid} 1 {boot}")).unwrap();
        let pid: u32 = pid.parse().unwrap();
        assert_eq!(gone_recorder(&path(42)), Some(pid));
        assert_eq!(gone_recorder(&path(42)), Some(pid));
        // Cleaning up keeps what was seen gone lately, and the living.
        clean_up(&dir);
        assert!(path(41).exists() && path(42).exists());
        let old = unix_now() - KEEP_GONE.as_secs() - 1;
        fs::write(path(42), format!("{pid} 1 {boot} gone {old}")).unwrap();
        clean_up(&dir);
        assert!(path(41).exists() && !path(42).exists());
        // No record, or an owner that is not an address: nobody to take over from.
        assert_eq!(gone_recorder(&path(43)), None);
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
