//! The command line refuses what it cannot honour, with the reason, before it creates
//! anything.

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
fn nbd_uris_that_cannot_be_right_are_refused() {
    let e = refused(&["--nbd", "nbd://127.0.0.1:99999/x"]);
    assert!(e.contains("port is out of range"), "{e}");
    let e = refused(&["--nbd", "nbd+unix:///x?socket=/tmp/s&tiemout=5"]);
    assert!(e.contains("unknown query key 'tiemout'"), "{e}");
}
