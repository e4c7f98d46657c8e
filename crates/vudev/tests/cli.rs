//! The command line refuses what it cannot honour, with the reason, before it creates
//! anything.

mod common;

use std::process::Command;

fn refused(args: &[&str]) -> String {
    let dir = std::env::temp_dir().join(format!("vudev-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("never.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["export", "vhost-user", "--socket"])
        .arg(&socket)
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(!socket.exists(), "{args:?} left a socket behind");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn options_of_another_backend_are_refused_with_the_reason() {
    for (args, opt, only) in [
        (&["--null", "1M", "--aio", "sync"][..], "--aio", "--file"),
        (&["--null", "1M", "--direct"][..], "--direct", "--file"),
        (
            &["--memory", "1M", "--nbd-timeout", "5"][..],
            "--nbd-timeout",
            "--nbd",
        ),
        (
            &["--nbd", "nbd://127.0.0.1:1/x", "--aio", "io_uring"][..],
            "--aio",
            "--file",
        ),
    ] {
        let e = refused(args);
        assert!(
            e.contains(&format!("{opt} applies to {only} only")) && e.contains("drop"),
            "{args:?}: {e}"
        );
    }
}

#[test]
fn a_net_export_refuses_what_only_a_disk_or_vhost_user_has() {
    for (args, says) in [
        (
            &["--net-tap", "vnetx", "--readonly"][..],
            "--readonly applies to disks",
        ),
        (
            &["--net-tap", "vnetx", "--serial", "s1"][..],
            "--serial applies to disks",
        ),
        (&["--net-tap", "vnetx", "--mtu", "60"][..], "invalid MTU 60"),
        (
            &["--net-tap", "vnetx", "--num-queues", "17"][..],
            "queue pairs 17",
        ),
        (
            &["--net-tap", "vnetx", "--mac", "01:00:00:00:00:01"][..],
            "MAC",
        ),
        (&["--net-tap", "a/b"][..], "invalid interface name"),
    ] {
        let e = refused(args);
        assert!(e.contains(says), "{args:?}: {e}");
    }
    // VDUSE: one queue pair (the kernel refuses the control queue more would need).
    let out = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["export", "vduse", "--name", "never", "--net-tap", "vnetx"])
        .args(["--num-queues", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("a VDUSE net device has one queue pair"), "{e}");
}

#[test]
fn nbd_uris_that_cannot_be_right_are_refused() {
    let e = refused(&["--nbd", "nbd://127.0.0.1:99999/x"]);
    assert!(e.contains("port is out of range"), "{e}");
    let e = refused(&["--nbd", "nbd+unix:///x?socket=/tmp/s&tiemout=5"]);
    assert!(e.contains("unknown query key 'tiemout'"), "{e}");
}

#[test]
fn vudev_serves_and_stops_cleanly_when_its_stderr_is_gone() {
    use std::os::unix::net::UnixStream;
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = std::env::temp_dir().join(format!("vudev-cli-nolog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vu.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["export", "vhost-user", "--socket"])
        .arg(&socket)
        .args(["--null", "1M", "-v"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads vudev's log any more: every write to it fails (EPIPE).
    drop(child.stderr.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "vudev died with its log gone"
        );
        assert!(Instant::now() < deadline, "vudev never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A frontend comes and goes (more log lines), then vudev is asked to stop.
    for _ in 0..3 {
        let s = UnixStream::connect(&socket).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(s);
    }
    let status = common::terminate(
        &mut child,
        Duration::from_secs(10),
        "vudev did not stop on SIGTERM with its log gone",
    );
    assert!(status.success(), "{status}");
    assert!(!socket.exists());
}

#[test]
fn a_socket_in_a_directory_that_does_not_exist_yet_is_served() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let dir = std::env::temp_dir().join(format!("vudev-cli-newdir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let socket = dir.join("run").join("vudev").join("disk0.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["export", "vhost-user", "--socket"])
        .arg(&socket)
        .args(["--null", "1M"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("no socket in the new directory");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_in_the_sockets_place_is_refused_naming_it_once() {
    let dir = std::env::temp_dir().join(format!("vudev-cli-notsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("not-a-socket");
    std::fs::write(&path, b"data").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["export", "vhost-user", "--socket"])
        .arg(&path)
        .args(["--null", "1M"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    let p = path.display().to_string();
    assert_eq!(e.matches(&p).count(), 1, "{e}");
    assert!(
        e.contains("is not a socket: remove it or pick another path"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"data",
        "the file was touched"
    );
}

#[test]
fn version_names_the_build() {
    let out = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .arg("--version")
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    // "vudev 0.1.0 (git 0123456789ab)", or "(built 2026-12-01)" outside a git checkout.
    let ok = v.starts_with(&format!("vudev {} (", env!("CARGO_PKG_VERSION")))
        && (v.contains("(git ") || v.contains("(built 20"));
    assert!(ok, "{v}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};
    let dir = std::env::temp_dir().join(format!("vudev-cli-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("j.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["--log-format", "json", "export", "vhost-user", "--socket"])
        .arg(&socket)
        .args(["--null", "1M"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = common::terminate(&mut child, Duration::from_secs(10), "vudev ignored SIGTERM");
    assert!(st.success());
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.len() >= 2, "{err}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(
        err.contains("\"socket\":"),
        "fields are JSON members: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn man_pages_and_completions_come_from_the_command_line() {
    let dir = std::env::temp_dir().join(format!("vudev-cli-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .arg("man")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(dir.join("vudev-serve.1")).unwrap();
    assert!(
        page.starts_with(".ie \\n(.g .ds Aq") || page.contains(".TH vudev-serve"),
        "{page}"
    );
    assert!(
        page.contains("control\\-group"),
        "the page documents the options: {page}"
    );
    for name in ["vudev.1", "vudev-export-vduse.1", "vudev-ctl-resize.1"] {
        assert!(dir.join(name).exists(), "{name} missing");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && script.contains("_vudev()") && script.contains("--nbd-timeout"),
        "{script}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
