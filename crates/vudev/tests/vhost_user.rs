//! The vhost-user export driven by an independent client, the `blkio` crate's
//! virtio-blk-vhost-user driver. The same client suite runs against qemu-storage-daemon's
//! vhost-user-blk export, which proves the suite itself.

mod common;

use std::path::Path;

use common::{pattern, scratch, sparse_image, writable_suite, Client, Server};

fn read_only_suite(socket: &Path) {
    // A read-only device refuses a read-write client...
    let err = Client::connect(socket, 1)
        .err()
        .expect("read-write open of a read-only device");
    assert!(err.contains("read-only"), "{err}");
    // ...and serves a read-only one.
    let mut c = Client::open(socket, 1, true).unwrap();
    assert!(c.read_only());
    assert_eq!(c.read(0, 0, 4096), 0);
    // blkio refuses writes to a read-only device itself, or the device answers IOERR.
    assert_ne!(c.write(0, 0, 4096), 0);
}

#[test]
fn vudev_serves_blkio() {
    let dir = scratch("basic");
    let image = sparse_image(&dir);
    let file = image.to_str().unwrap();
    let _s = Server::vudev(&dir, &["--file", file, "--num-queues", "2"]);
    writable_suite(&dir.join("vudev.sock"), 2);
    // Once the client is gone, the data is in the image file.
    let data = std::fs::read(&image).unwrap();
    assert!(data[5 << 20..6 << 20].iter().any(|&b| b != 0));
}

#[test]
fn polling_pinned_queues_serve_blkio() {
    let dir = scratch("poll");
    let image = sparse_image(&dir);
    let file = image.to_str().unwrap();
    let args = [
        "--file",
        file,
        "--num-queues",
        "2",
        "--poll-us",
        "200",
        "--queue-cpus",
        "0",
    ];
    let s = Server::vudev(&dir, &args);
    writable_suite(&s.socket, 2);
    drop(s);
    let log = std::fs::read_to_string(dir.join("vudev.log")).unwrap();
    assert_eq!(log.matches("queue worker pinned").count(), 2, "{log}");
    // A CPU that does not exist is refused with the range that does.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["export", "vhost-user", "--socket"])
        .arg(dir.join("bad.sock"))
        .args(["--null", "1M", "--queue-cpus", "4096"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CPU 4096 does not exist"), "{err}");
}

#[test]
fn vudev_memory_and_read_only() {
    let dir = scratch("mem");
    let s = Server::vudev(&dir, &["--memory", "64M"]);
    writable_suite(&s.socket, 1);
    drop(s);
    let dir = scratch("ro");
    let s = Server::vudev(&dir, &["--null", "64M", "--readonly"]);
    read_only_suite(&s.socket);
}

#[test]
fn vudev_serves_one_frontend_after_another() {
    let dir = scratch("cycles");
    let s = Server::vudev(&dir, &["--memory", "64M"]);
    for i in 0..50u64 {
        let mut c = Client::connect(&s.socket, 1).unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        pattern(&mut c.buf()[..4096], i);
        assert_eq!(c.write(0, i * 4096, 4096), 0, "cycle {i}");
        assert_eq!(c.read(0, i * 4096, 4096), 0, "cycle {i}");
        let b = c.buf();
        assert!(b[..4096] == b[1 << 20..(1 << 20) + 4096], "cycle {i}");
    }
}

#[test]
fn a_second_concurrent_frontend_is_refused() {
    let dir = scratch("second");
    let s = Server::vudev(&dir, &["--memory", "64M"]);
    let mut first = Client::connect(&s.socket, 1).unwrap();
    assert!(Client::connect(&s.socket, 1).is_err());
    assert_eq!(
        first.read(0, 0, 4096),
        0,
        "the first frontend keeps working"
    );
}

#[test]
fn a_frontend_that_arrives_as_the_first_leaves_is_served() {
    let dir = scratch("overlap");
    let s = Server::vudev(&dir, &["--memory", "64M"]);
    let first = Client::connect(&s.socket, 1).unwrap();
    let socket = s.socket.clone();
    let second = std::thread::spawn(move || Client::connect(&socket, 1));
    // The second connection is made while the first frontend is still there.
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(first);
    let mut second = second
        .join()
        .unwrap()
        .expect("served once the first has gone");
    assert_eq!(second.read(0, 0, 4096), 0);
}

#[test]
fn the_socket_mode_is_applied() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("mode");
    let s = Server::vudev(&dir, &["--null", "1M"]);
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(s);
    let s = Server::vudev(&dir, &["--null", "1M", "--socket-mode", "0660"]);
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
}

/// vudev (root here) gives its socket to a user and group: a client running as a member of
/// the group may connect with mode 0660, and not with the default 0600. A user that does not
/// exist is refused before anything listens.
#[test]
fn the_socket_is_given_to_a_user_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // This test run again as nobody:nogroup (through setpriv) is the client: it exits 0 if
    // it connected and read, 3 if it could not connect. First thing: it makes nothing.
    if let Ok(socket) = std::env::var("VUDEV_TEST_CLIENT_OF") {
        let read = Client::connect(Path::new(&socket), 1).map(|mut c| c.read(0, 0, 4096));
        std::process::exit(match read {
            Ok(0) => 0,
            Ok(_) => 4,
            Err(_) => 3,
        });
    }
    common::require_root("this test gives sockets away");
    let dir = scratch("owner");
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |socket: &Path| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "the_socket_is_given_to_a_user_and_group",
                "--nocapture",
            ])
            .env("VUDEV_TEST_CLIENT_OF", socket)
            .output()
            .unwrap()
    };
    let serve = |access: &[&str]| {
        let mut args = vec!["--null", "64M"];
        args.extend_from_slice(access);
        let s = Server::vudev(&dir, &args);
        let meta = std::fs::metadata(&s.socket).unwrap();
        let got = (meta.uid(), meta.gid(), meta.permissions().mode() & 0o777);
        let client = as_nobody(&s.socket);
        (
            got,
            client.status.code(),
            String::from_utf8_lossy(&client.stderr).into_owned(),
        )
    };
    // Root's own, 0600: nobody may not connect.
    let (got, code, e) = serve(&[]);
    assert_eq!((got, code), ((0, 0, 0o600), Some(3)), "{e}");
    // Given to nobody's group, 0660: it may.
    let (got, code, e) = serve(&["--socket-mode", "0660", "--socket-group", "nogroup"]);
    assert_eq!((got, code), ((0, 65534, 0o660), Some(0)), "{e}");
    // Given to nobody, 0600: it may, as the owner.
    let (got, code, e) = serve(&["--socket-user", "nobody"]);
    assert_eq!((got, code), ((65534, 0, 0o600), Some(0)), "{e}");
    // A user that does not exist: refused before anything listens.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["export", "vhost-user", "--null", "1M", "--socket"])
        .arg(dir.join("x.sock"))
        .args(["--socket-user", "no-such-user-here"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !dir.join("x.sock").exists(), "{e}");
    assert!(
        e.contains("--socket-user") && e.contains("no such user 'no-such-user-here'"),
        "{e}"
    );
    // Nothing of the private directory the socket was made in is left behind.
    let left: Vec<_> = std::fs::read_dir(&*dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with(".vu"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn the_suite_passes_against_qemu_storage_daemon() {
    let dir = scratch("qsd");
    let image = sparse_image(&dir);
    let s = Server::qsd(&dir, &image, true, 2).unwrap();
    writable_suite(&s.socket, 2);
    drop(s);
    let s = Server::qsd(&dir, &image, false, 1).unwrap();
    read_only_suite(&s.socket);
}

#[test]
fn runs_as_an_unprivileged_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = scratch("nobody");
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let image = sparse_image(&dir);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let cmd = if root {
        // Only the socket directory and the image need permissions for the user.
        std::os::unix::fs::chown(&image, Some(65534), Some(65534)).unwrap();
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_vudev"));
        c
    } else {
        std::process::Command::new(env!("CARGO_BIN_EXE_vudev"))
    };
    let s = Server::vudev_with(&dir, &["--file", image.to_str().unwrap()], cmd);
    if root {
        assert_eq!(std::fs::metadata(&s.socket).unwrap().uid(), 65534);
    }
    writable_suite(&s.socket, 1);
}

/// CPU time (user + system, in clock ticks) process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses: utime is the 14th
    // field of the line, stime the 15th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn an_idle_export_polls_no_more_once_its_requests_stop() {
    // Default settings: adaptive polling, which spins while requests come and not after.
    let dir = scratch("idle");
    let s = Server::vudev(&dir, &["--null", "64M", "--num-queues", "2"]);
    let mut c = Client::connect(&s.socket, 2).unwrap();
    for i in 0..2000u64 {
        assert_eq!(c.read((i % 2) as usize, (i % 1024) * 4096, 4096), 0);
    }
    // The client stays connected, silent. A worker still spinning would burn a whole CPU
    // (100 ticks a second); an idle one uses none.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = cpu_ticks(s.pid());
    std::thread::sleep(std::time::Duration::from_secs(1));
    let used = cpu_ticks(s.pid()) - before;
    assert!(
        used <= 2,
        "an idle export used {used} ticks of CPU in a second"
    );
    drop(c);
}
