//! The serving process confined: `--user` (no capabilities, another uid), no_new_privs and the
//! seccomp allowlist, checked in /proc/PID/status of a running export while an independent
//! client (blkio) reads and writes through it. The VDUSE side (the privileged helper, and
//! `--device-fd`) needs the VDUSE kernel: its tests are VM scenarios.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{scratch, sparse_image, writable_suite, Server};

/// The `Name:` field of /proc/PID/status.
fn status(pid: u32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// A scratch directory nobody may create the socket in.
fn dir_for_nobody(name: &str) -> common::Scratch {
    let dir = scratch(name);
    std::os::unix::fs::chown(&*dir, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn an_export_serves_as_nobody_with_nothing_left_to_gain() {
    common::require_root("this test changes users");
    let dir = dir_for_nobody("nobody");
    // A file only root may open: the export opens it before it gives root up.
    let image = sparse_image(&dir);
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file = image.to_str().unwrap();
    let s = Server::vudev(&dir, &["--file", file, "--user", "nobody"]);
    let pid = s.pid();
    assert!(status(pid, "Uid").split_whitespace().all(|u| u == "65534"));
    assert!(status(pid, "Gid").split_whitespace().all(|g| g == "65534"));
    assert_eq!(status(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status(pid, "NoNewPrivs"), "1");
    assert_eq!(status(pid, "Seccomp"), "2");
    // Every thread, those started after the filter too.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().file_name();
        let st = std::fs::read_to_string(format!(
            "/proc/{pid}/task/{}/status",
            task.to_string_lossy()
        ))
        .unwrap();
        assert!(st.contains("Seccomp:\t2"), "thread {task:?} unconfined");
    }
    // It serves, on every path the suite takes (reads, writes, flush, discard, write-zeroes).
    writable_suite(&s.socket, 1);
    drop(s);
    let data = std::fs::read(&image).unwrap();
    assert!(data[5 << 20..6 << 20].iter().any(|&b| b != 0));
    let log = std::fs::read_to_string(dir.join("vudev.log")).unwrap();
    assert!(log.contains("serving as an unprivileged user"), "{log}");
}

#[test]
fn seccomp_is_on_by_default_and_off_when_asked() {
    common::require_root("this test changes users");
    let dir = scratch("default");
    let s = Server::vudev(&dir, &["--memory", "64M"]);
    assert_eq!(status(s.pid(), "Seccomp"), "2");
    assert_eq!(status(s.pid(), "Uid").split_whitespace().next(), Some("0"));
    writable_suite(&s.socket, 1);
    drop(s);
    let dir = dir_for_nobody("off");
    let s = Server::vudev(
        &dir,
        &["--memory", "64M", "--user", "nobody", "--sandbox", "off"],
    );
    assert_eq!(status(s.pid(), "Seccomp"), "0");
    assert_eq!(status(s.pid(), "CapEff"), "0000000000000000");
    writable_suite(&s.socket, 1);
}

/// `vudev export vhost-user … EXTRA` run through `prefix` (empty: directly): its error.
fn refused(prefix: &[&str], extra: &[&str]) -> String {
    let vudev = env!("CARGO_BIN_EXE_vudev");
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(vudev);
            c
        }
        None => Command::new(vudev),
    };
    let out = cmd
        .args([
            "export",
            "vhost-user",
            "--socket",
            "/tmp/vudev-never.sock",
            "--null",
            "1M",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn what_cannot_be_done_is_refused_with_the_reason() {
    common::require_root("this test changes users");
    let err = refused(&[], &["--user", "no-such-user-here"]);
    assert!(err.contains("no such user 'no-such-user-here'"), "{err}");
    // A uid with no entry in the user database has no primary group to take.
    let err = refused(&[], &["--user", "4000000"]);
    assert!(err.contains("name its group with --group"), "{err}");
    let err = refused(&[], &["--group", "nogroup"]);
    assert!(err.contains("--user"), "{err}");
    // Only root can become another user.
    let setpriv = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--",
    ];
    let err = refused(&setpriv, &["--user", "nobody"]);
    assert!(err.contains("--user needs vudev started as root"), "{err}");
    assert!(!Path::new("/tmp/vudev-never.sock").exists());
}
