//! The RBD backend against a real Ceph cluster that the test starts (tests/ceph/cluster.sh:
//! one monitor, one OSD on 127.0.0.1), served over vhost-user to the `blkio` client.
//! No scenario is skipped: a cluster that cannot start fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use common::{pattern, scratch, writable_suite, Client, Server, SIZE};

/// A running cluster, stopped (its daemons killed, its directory removed) on drop.
struct Cluster {
    dir: PathBuf,
    conf: String,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        Cluster::start_with(dir, 1)
    }

    /// A cluster of `osds` OSDs (pool size min(osds, 3)).
    fn start_with(dir: &Path, osds: u32) -> Cluster {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/ceph/cluster.sh");
        let out = Command::new(script)
            .arg("start")
            .arg(dir)
            .arg(osds.to_string())
            .output()
            .expect("run tests/ceph/cluster.sh");
        assert!(
            out.status.success(),
            "the Ceph cluster did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster {
            dir: dir.to_path_buf(),
            conf: String::from_utf8(out.stdout).unwrap().trim().to_string(),
        }
    }

    /// Runs `rbd -c CONF ARGS` (bounded), panicking with its stderr if it fails.
    fn rbd(&self, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["60", "rbd", "-c", &self.conf])
            .args(args)
            .output()
            .expect("run rbd");
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The pid of OSD `n`.
    fn osd_pid(&self, n: u32) -> i32 {
        std::fs::read_to_string(self.dir.join(format!("osd.{n}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Kills OSD `n` with SIGKILL and waits until it is gone.
    fn kill_osd(&self, n: u32) {
        let pid = self.osd_pid(n);
        // SAFETY: kill(2) on a daemon the test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let t = Instant::now();
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|st| !st.contains(") Z "))
        {
            assert!(t.elapsed() < Duration::from_secs(10), "OSD {n} did not die");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts OSD `n` again (as tests/ceph/README.md says).
    fn restart_osd(&self, n: u32) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.join(format!("log/osd.{n}.out")))
            .unwrap();
        // Stopped by cluster.sh (by its pid file), which takes a zombie for gone; the test
        // process reaps it when it ends.
        #[allow(clippy::zombie_processes)]
        let child = Command::new("ceph-osd")
            .args(["-c", &self.conf, "-f", "-i", &n.to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        std::fs::write(
            self.dir.join(format!("osd.{n}.pid")),
            child.id().to_string(),
        )
        .unwrap();
    }

    /// The bytes `rbd du` says `image` uses.
    fn used(&self, image: &str) -> u64 {
        let out = self.rbd(&["du", "--format", "json", image]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["images"][0]["used_size"].as_u64().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/ceph/cluster.sh");
        let _ = Command::new(script).arg("stop").arg(&self.dir).status();
    }
}

/// vudev serving `image` over vhost-user with `extra` options.
fn serve(dir: &Path, c: &Cluster, image: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--rbd", image, "--rbd-conf", &c.conf];
    args.extend_from_slice(extra);
    Server::vudev(dir, &args)
}

/// What vudev says when it cannot open `image` with `extra` options.
fn refusal(c: &Cluster, image: &str, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["export", "vhost-user", "--socket", "/nonexistent/x.sock"])
        .args(["--rbd", image, "--rbd-conf", &c.conf, "--rbd-timeout", "5"])
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{image} {extra:?} was served");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `vudev ctl ARGS` against the daemon at `control`: its stdout, or its stderr as the error.
fn ctl(control: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .unwrap();
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// The size `vudev ctl show` gives for `name`.
fn shown_size(control: &Path, name: &str) -> u64 {
    let out = ctl(control, &["show", name, "--json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["size"].as_u64().unwrap()
}

/// An RBD export added to `vudev serve` at run time: resized through the API (the image
/// grows in the cluster) and by `rbd resize` (the daemon follows).
fn serve_daemon_follows_resizes(cluster: &Cluster) {
    let dir = scratch("rbd-serve");
    cluster.rbd(&["create", "rbd/vol2", "--size", "64M"]);
    let control = dir.join("control.sock");
    let mut daemon = Reaped(
        Command::new(env!("CARGO_BIN_EXE_vudev"))
            .arg("serve")
            .arg("--control")
            .arg(&control)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while !control.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A cluster that never answers (its monitor address has no one behind it) is being
    // connected to while another export is added: that one must not wait for it.
    let silent = dir.join("silent.conf");
    std::fs::write(
        &silent,
        "[global]\nmon host = v2:127.0.0.1:9\nauth client required = none\n",
    )
    .unwrap();
    let (control2, silent_conf) = (control.clone(), silent.to_str().unwrap().to_string());
    let silent_sock = dir.join("silent.sock").to_str().unwrap().to_string();
    let stuck = std::thread::spawn(move || {
        ctl(
            &control2,
            &[
                "add",
                "vhost-user",
                "--name",
                "silent",
                "--socket",
                &silent_sock,
                "--rbd",
                "rbd/x",
                "--rbd-conf",
                &silent_conf,
                "--rbd-timeout",
                "8",
            ],
        )
    });
    // Let its request reach the daemon first.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let socket = dir.join("vol2.sock");
    ctl(
        &control,
        &[
            "add",
            "vhost-user",
            "--name",
            "vol2",
            "--socket",
            socket.to_str().unwrap(),
            "--rbd",
            "rbd/vol2",
            "--rbd-conf",
            &cluster.conf,
            "--rbd-timeout",
            "5",
        ],
    )
    .unwrap();
    let took = t.elapsed();
    assert!(!stuck.is_finished(), "the silent cluster's add ended early");
    assert!(
        took < Duration::from_secs(5),
        "an add waited {took:?} for another cluster"
    );
    let e = stuck.join().unwrap().unwrap_err();
    assert!(e.contains("no monitor answered within 8 s"), "{e}");
    assert_eq!(Client::connect(&socket, 1).unwrap().capacity(), 64 << 20);
    ctl(&control, &["resize", "vol2", "96M"]).unwrap();
    let info = cluster.rbd(&["info", "--format", "json", "rbd/vol2"]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        v["size"].as_u64(),
        Some(96 << 20),
        "the image in the cluster"
    );
    assert_eq!(Client::connect(&socket, 1).unwrap().capacity(), 96 << 20);
    cluster.rbd(&["resize", "rbd/vol2", "--size", "128M"]);
    let t = Instant::now();
    while shown_size(&control, "vol2") != 128 << 20 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the daemon missed an rbd resize"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(Client::connect(&socket, 1).unwrap().capacity(), 128 << 20);
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    assert!(
        log.contains("the storage of vol2 was resized from 100663296 to 134217728 bytes"),
        "{log}"
    );

    // A resize the cluster does not answer (its OSD stopped) holds up no other call to the
    // daemon; a second resize of the same export meanwhile is told to wait.
    let stopped = Stopped::new(cluster.osd_pid(0));
    let control2 = control.clone();
    let stuck = std::thread::spawn(move || ctl(&control2, &["resize", "vol2", "160M"]));
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let list = ctl(&control, &["list"]).unwrap();
    let took = t.elapsed();
    assert!(list.contains("vol2"), "{list}");
    assert!(
        !stuck.is_finished(),
        "the resize ended early: {:?}",
        stuck.join()
    );
    assert!(
        took < Duration::from_secs(2),
        "a list waited {took:?} for a resize"
    );
    let e = ctl(&control, &["resize", "vol2", "192M"]).unwrap_err();
    assert!(e.contains("vol2 is being resized"), "{e}");
    drop(stopped);
    let t = Instant::now();
    let r = stuck.join().unwrap();
    eprintln!(
        "a resize across a stopped OSD: {r:?}, {:?} after SIGCONT",
        t.elapsed()
    );
    let status = common::terminate(
        &mut daemon.0,
        Duration::from_secs(20),
        "vudev serve did not stop",
    );
    assert!(status.success(), "vudev serve exited with {status}");
}

/// A daemon stopped with SIGSTOP, continued on drop (so a failing test leaves it running).
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        // SAFETY: kill(2) on a daemon the test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A child process killed (and reaped) on drop, so that a failing test leaves none behind.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A write completed after the driver's first flush is in the cluster, not in a cache that
/// dies with vudev: SIGKILL, start again, read it back.
fn completed_writes_survive_a_kill(cluster: &Cluster) {
    let dir = scratch("rbd-kill");
    // An image of its own: the killed vudev's lock and watch linger on it for a while.
    cluster.rbd(&["create", "rbd/killed", "--size", "64M"]);
    let socket = dir.join("kill.sock");
    let start = || {
        Reaped(
            Command::new(env!("CARGO_BIN_EXE_vudev"))
                .args(["export", "vhost-user", "--socket"])
                .arg(&socket)
                .args(["--rbd", "rbd/killed", "--rbd-conf", &cluster.conf])
                .stderr(std::fs::File::create(dir.join("kill.log")).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let wait_socket = || {
        let t = Instant::now();
        while !socket.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let vudev = start();
    wait_socket();
    let mut c = Client::connect(&socket, 1).unwrap();
    assert_eq!(c.flush(0), 0);
    pattern(&mut c.buf()[..65536], 77);
    let written = c.buf()[..65536].to_vec();
    assert_eq!(c.write(0, 20 << 20, 65536), 0);
    drop(vudev);
    drop(c);
    let _ = std::fs::remove_file(&socket);
    let mut vudev = start();
    wait_socket();
    let mut c = Client::connect(&socket, 1).unwrap();
    assert_eq!(c.read(0, 20 << 20, 65536), 0);
    assert!(
        c.buf()[1 << 20..(1 << 20) + 65536] == written[..],
        "a completed write was lost with the process"
    );
    // The dead vudev's lock is broken at once (this host recorded it as vudev's): the first
    // write does not wait for the cluster to give up on the dead client (10 s here).
    let t = Instant::now();
    assert_eq!(c.write(0, 24 << 20, 4096), 0);
    let took = t.elapsed();
    let log = std::fs::read_to_string(dir.join("kill.log")).unwrap();
    assert!(
        took < Duration::from_secs(5),
        "the first write after a restart took {took:?}"
    );
    assert!(log.contains("broke the image's lock"), "{log}");
    drop(c);
    let status = common::terminate(&mut vudev.0, Duration::from_secs(20), "vudev did not stop");
    assert!(status.success(), "vudev exited with {status}");
}

/// Another client writing to the image takes the lock cooperatively and hands it back: no
/// error either way. A client that breaks vudev's lock (`rbd lock rm`) has it blocklisted:
/// vudev's requests then fail with an error that says so, and vudev lives on.
fn a_broken_lock_fences_the_export_with_a_clear_error(cluster: &Cluster) {
    let dir = scratch("rbd-fenced");
    cluster.rbd(&["create", "rbd/fenced", "--size", "64M"]);
    let s = serve(&dir, cluster, "rbd/fenced", &["--rbd-timeout", "5"]);
    let mut c = Client::connect(&s.socket, 1).unwrap();
    pattern(&mut c.buf()[..4096], 21);
    assert_eq!(c.write(0, 0, 4096), 0);
    // Another writer in between: `rbd bench` takes the lock, vudev takes it back.
    cluster.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "4K",
        "--io-total",
        "64K",
        "rbd/fenced",
    ]);
    assert_eq!(c.write(0, 4096, 4096), 0, "a write after another client's");
    // vudev's lock broken by hand: its connection is blocklisted.
    let locks: serde_json::Value =
        serde_json::from_str(&cluster.rbd(&["lock", "ls", "--format", "json", "rbd/fenced"]))
            .unwrap();
    let lock = &locks[0];
    let (id, locker) = (
        lock["id"].as_str().unwrap(),
        lock["locker"].as_str().unwrap(),
    );
    cluster.rbd(&["lock", "rm", "rbd/fenced", id, locker]);
    let t = Instant::now();
    let res = c.write(0, 8192, 4096);
    assert_eq!(res, -libc::EIO, "a write after the lock was broken");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    let log = std::fs::read_to_string(dir.join("vudev.log")).unwrap();
    assert!(
        log.contains("the cluster fenced (blocklisted) rbd/fenced (client.")
            && log.contains("another client broke its lock"),
        "{log}"
    );
    drop(c);
    let mut c = Client::connect(&s.socket, 1).expect("vudev went away after being fenced");
    assert_eq!(c.read(0, 0, 4096), -libc::EIO);
}

/// A pool or image setting that turns librbd's write cache back on makes a writable export
/// unsafe: refused, with the command that undoes it; a read-only export is fine.
fn a_write_cache_set_on_the_image_is_refused(cluster: &Cluster) {
    cluster.rbd(&["create", "rbd/cached", "--size", "16M"]);
    cluster.rbd(&["config", "image", "set", "rbd/cached", "rbd_cache", "true"]);
    let e = refusal(cluster, "rbd/cached", &[]);
    assert!(
        e.contains("turns librbd's write cache on")
            && e.contains("rbd config image remove rbd/cached rbd_cache"),
        "{e}"
    );
    // As Ceph reads a boolean: any case, or a non-zero number.
    for on in ["TRUE", "1"] {
        cluster.rbd(&["config", "image", "set", "rbd/cached", "rbd_cache", on]);
        let e = refusal(cluster, "rbd/cached", &[]);
        assert!(e.contains("turns librbd's write cache on"), "{on}: {e}");
    }
    let dir = scratch("rbd-cached");
    let s = serve(&dir, cluster, "rbd/cached", &["--readonly"]);
    let mut c = Client::open(&s.socket, 1, true).unwrap();
    assert_eq!(c.read(0, 0, 4096), 0);
    drop(c);
    drop(s);
    // Set on the pool: every image in it (removed again at once: the pool is shared).
    cluster.rbd(&["config", "pool", "set", "rbd", "rbd_cache", "true"]);
    let e = refusal(cluster, "rbd/vol1", &[]);
    cluster.rbd(&["config", "pool", "remove", "rbd", "rbd_cache"]);
    assert!(
        e.contains("the pool's configuration turns librbd's write cache on")
            && e.contains("rbd config pool remove rbd rbd_cache"),
        "{e}"
    );
    cluster.rbd(&["config", "image", "set", "rbd/cached", "rbd_cache", "false"]);
    let s = serve(&dir, cluster, "rbd/cached", &[]);
    let mut c = Client::connect(&s.socket, 1).unwrap();
    assert_eq!(
        c.write(0, 0, 4096),
        0,
        "a write with the cache set off again"
    );
}

/// Two live vudevs exporting one image (as during a migration) pass its lock back and forth:
/// neither takes the other for dead, and both write.
fn two_live_vudevs_share_an_image(cluster: &Cluster) {
    cluster.rbd(&["create", "rbd/shared", "--size", "16M"]);
    let (da, db) = (scratch("rbd-share-a"), scratch("rbd-share-b"));
    let a = serve(&da, cluster, "rbd/shared", &[]);
    let mut ca = Client::connect(&a.socket, 1).unwrap();
    assert_eq!(ca.write(0, 0, 4096), 0);
    let b = serve(&db, cluster, "rbd/shared", &[]);
    let mut cb = Client::connect(&b.socket, 1).unwrap();
    for round in 0..3 {
        assert_eq!(cb.write(0, 4096, 4096), 0, "b's write, round {round}");
        assert_eq!(ca.write(0, 8192, 4096), 0, "a's write, round {round}");
    }
    for d in [&da, &db] {
        let log = std::fs::read_to_string(d.join("vudev.log")).unwrap();
        assert!(
            !log.contains("broke"),
            "a live vudev's lock was broken: {log}"
        );
    }
}

#[test]
fn rbd_images_are_served_on_a_real_cluster() {
    let dir = scratch("rbd");
    let cluster = Cluster::start(&dir.join("ceph"));
    let size = format!("{}M", SIZE >> 20);
    cluster.rbd(&["create", "rbd/vol1", "--size", &size]);

    // Data, flush, discard, write-zeroes, past the end, on two queues.
    let s = serve(&dir, &cluster, "rbd/vol1", &["--num-queues", "2"]);
    writable_suite(&s.socket, 2);

    // Discarded objects go away (the image's objects are 4 MiB).
    let mut c = Client::connect(&s.socket, 1).unwrap();
    pattern(&mut c.buf()[..1 << 20], 3);
    for k in 0..8u64 {
        assert_eq!(c.write(0, (16 << 20) + (k << 20), 1 << 20), 0);
    }
    assert_eq!(c.flush(0), 0);
    let before = cluster.used("rbd/vol1");
    c.queues[0].discard(16 << 20, 8 << 20, 0, ReqFlags::empty());
    assert_eq!(c.wait(0), 0);
    let after = cluster.used("rbd/vol1");
    eprintln!("rbd du of vol1: {before} bytes used before the discard, {after} after");
    assert!(
        after + (8 << 20) <= before,
        "discard freed nothing: {before} → {after} bytes"
    );
    // `rbd resize` by another client: the running queue takes I/O past the old end within
    // a few seconds, and the next frontend reads the new size.
    assert_ne!(c.read(0, SIZE, 4096), 0, "past the end before the resize");
    cluster.rbd(&[
        "resize",
        "rbd/vol1",
        "--size",
        &format!("{}M", (SIZE >> 20) + 32),
    ]);
    let t = Instant::now();
    while c.read(0, SIZE, 4096) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the resize was not seen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "rbd resize seen by the running export after {:?}",
        t.elapsed()
    );
    // A write-zeroes that must stay allocated reads back as zeros too.
    pattern(&mut c.buf()[..65536], 9);
    assert_eq!(c.write(0, 40 << 20, 65536), 0);
    c.queues[0].write_zeroes(40 << 20, 65536, 0, ReqFlags::NO_UNMAP);
    assert_eq!(c.wait(0), 0);
    assert_eq!(c.read(0, 40 << 20, 65536), 0);
    assert!(c.buf()[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0));

    drop(c);
    let c = Client::connect(&s.socket, 1).unwrap();
    assert_eq!(
        c.capacity(),
        SIZE + (32 << 20),
        "the next frontend's capacity"
    );
    let mut c = c;
    // A snapshot is served read-only with the data it was taken with.
    pattern(&mut c.buf()[..4096], 42);
    assert_eq!(c.write(0, 0, 4096), 0);
    let written = c.buf()[..4096].to_vec();
    assert_eq!(c.flush(0), 0);
    cluster.rbd(&["snap", "create", "rbd/vol1@s1"]);
    pattern(&mut c.buf()[..4096], 43);
    assert_eq!(c.write(0, 0, 4096), 0);
    drop(c);
    drop(s);
    let snap_dir = scratch("rbd-snap");
    let s = serve(&snap_dir, &cluster, "rbd/vol1@s1", &[]);
    let err = Client::connect(&s.socket, 1)
        .err()
        .expect("a writable snapshot");
    assert!(err.contains("read-only"), "{err}");
    let mut c = Client::open(&s.socket, 1, true).unwrap();
    assert_eq!(c.read(0, 0, 4096), 0);
    assert!(
        c.buf()[1 << 20..(1 << 20) + 4096] == written[..],
        "snapshot data differs"
    );
    drop(c);
    drop(s);

    // A restricted client (caps for the rbd pool only) is served.
    let user_dir = scratch("rbd-user");
    let s = serve(&user_dir, &cluster, "rbd/vol1", &["--rbd-id", "vudev"]);
    let mut c = Client::connect(&s.socket, 1).unwrap();
    assert_eq!(c.read(0, 0, 4096), 0);
    drop(c);
    drop(s);

    serve_daemon_follows_resizes(&cluster);

    completed_writes_survive_a_kill(&cluster);

    a_broken_lock_fences_the_export_with_a_clear_error(&cluster);

    a_write_cache_set_on_the_image_is_refused(&cluster);

    two_live_vudevs_share_an_image(&cluster);

    // What cannot be opened is refused with the fix.
    let e = refusal(&cluster, "rbd/missing", &[]);
    assert!(
        e.contains("no such image: create it (rbd create rbd/missing"),
        "{e}"
    );
    let e = refusal(&cluster, "nopool/vol1", &[]);
    assert!(e.contains("pool 'nopool' does not exist"), "{e}");
    let e = refusal(&cluster, "rbd/vol1@nosnap", &[]);
    assert!(e.contains("no such image or snapshot"), "{e}");
    let e = refusal(&cluster, "rbd/vol1", &["--rbd-id", "stranger"]);
    assert!(e.contains("client.stranger"), "{e}");
    // CEPH_ARGS is honoured: a monitor address given there (where nothing listens) is used.
    let out = Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["export", "vhost-user", "--socket", "/nonexistent/x.sock"])
        .args([
            "--rbd",
            "rbd/vol1",
            "--rbd-conf",
            &cluster.conf,
            "--rbd-timeout",
            "3",
        ])
        .env("CEPH_ARGS", "--mon-host=v2:127.0.0.1:9")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "served with a bad monitor from CEPH_ARGS"
    );
    assert!(e.contains("no monitor answered within 3 s"), "{e}");
    let e = refusal(&cluster, "rbd", &[]);
    assert!(e.contains("POOL/IMAGE"), "{e}");

    // An OSD that stops answering: requests fail with an I/O error within the timeout (not
    // a hang), vudev lives on, and once the OSD is back new requests work.
    let fault_dir = scratch("rbd-fault");
    let s = serve(&fault_dir, &cluster, "rbd/vol1", &["--rbd-timeout", "3"]);
    let mut c = Client::connect(&s.socket, 1).unwrap();
    assert_eq!(c.read(0, 0, 4096), 0);
    let osd = cluster.osd_pid(0);
    // SAFETY: kill(2) on the OSD the test started.
    assert_eq!(unsafe { libc::kill(osd, libc::SIGSTOP) }, 0);
    let t = Instant::now();
    pattern(&mut c.buf()[..4096], 5);
    let res = c.write(0, 8 << 20, 4096);
    let took = t.elapsed();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(osd, libc::SIGCONT) }, 0);
    eprintln!("a write to the stopped OSD: {res} after {took:?}");
    assert_eq!(res, -libc::EIO, "a write to a stopped OSD");
    assert!(took < Duration::from_secs(9), "the error took {took:?}");
    let t = Instant::now();
    loop {
        // The OSD catching up may hold a request past the client's usual 10 s wait; what
        // counts is that writes work again, within a minute.
        c.start_write(0, 0, 8 << 20, 4096);
        let r = c.wait_within(0, Duration::from_secs(60));
        if r == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no write works after SIGCONT: {r}"
        );
    }
    assert_eq!(c.read(0, 8 << 20, 4096), 0);
    let b = c.buf();
    assert!(b[..4096] == b[1 << 20..(1 << 20) + 4096]);
    drop(c);
    drop(s);

    // The OSD killed and started again within the timeout: the guest sees no error.
    let restart_dir = scratch("rbd-restart");
    let s = serve(&restart_dir, &cluster, "rbd/vol1", &[]);
    let mut c = Client::connect(&s.socket, 1).unwrap();
    assert_eq!(c.read(0, 0, 4096), 0);
    cluster.kill_osd(0);
    pattern(&mut c.buf()[..65536], 11);
    c.start_write(0, 0, 12 << 20, 65536);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    cluster.restart_osd(0);
    assert_eq!(c.wait_all(0, 1), [0], "a write across an OSD restart");
    eprintln!(
        "a write across an OSD restart completed {:?} after the restart",
        t.elapsed()
    );
    c.start_read(0, 1 << 20, 12 << 20, 65536);
    assert_eq!(c.wait_all(0, 1), [0]);
    let b = c.buf();
    assert!(
        b[..65536] == b[1 << 20..(1 << 20) + 65536],
        "data across an OSD restart"
    );
}

/// Three OSDs, pool size 3: one OSD killed under a write-and-verify load on two queues costs
/// the client nothing (the cluster's replication, seen through vudev).
#[test]
fn an_osd_lost_under_load_costs_a_replicated_pool_nothing() {
    let dir = scratch("rbd3");
    let cluster = Cluster::start_with(&dir.join("ceph"), 3);
    cluster.rbd(&["create", "rbd/vol3", "--size", "64M"]);
    let s = serve(&dir, &cluster, "rbd/vol3", &["--num-queues", "2"]);
    let mut c = Client::connect(&s.socket, 2).unwrap();
    const N: usize = 16;
    const LEN: usize = 16384;
    let mut killed = false;
    for round in 0..24u64 {
        let q = (round % 2) as usize;
        // N writes in flight at once, then N reads of them, compared.
        for k in 0..N {
            let at = k * LEN;
            pattern(&mut c.buf()[at..at + LEN], round * 100 + k as u64);
            c.start_write(
                q,
                at,
                ((round * N as u64 + k as u64) * LEN as u64) % SIZE,
                LEN,
            );
        }
        if round == 8 {
            // With the writes in flight.
            cluster.kill_osd(1);
            killed = true;
        }
        assert!(
            c.wait_all(q, N).iter().all(|&r| r == 0),
            "round {round}: a write failed"
        );
        for k in 0..N {
            let off = ((round * N as u64 + k as u64) * LEN as u64) % SIZE;
            c.start_read(q, (1 << 20) + k * LEN, off, LEN);
        }
        assert!(
            c.wait_all(q, N).iter().all(|&r| r == 0),
            "round {round}: a read failed"
        );
        let b = c.buf();
        assert!(
            b[..N * LEN] == b[1 << 20..(1 << 20) + N * LEN],
            "round {round}: bad data"
        );
    }
    assert!(killed);
}

/// Where Ceph's libraries are missing (hidden here in a mount namespace of vudev's own),
/// vudev still serves other backends, and an RBD export is refused with what to install.
#[test]
fn vudev_runs_where_librbd_is_missing() {
    let hide = r#"set -e
for so in librbd.so.1 librados.so.2; do
    p=$(ldconfig -p | awk -v n="$so" '$1 == n && /x86-64/ && !f {print $NF; f = 1}')
    [ -n "$p" ] || { echo "$so is not installed here: nothing to hide" >&2; exit 1; }
    mount --bind /dev/null "$p"
done
exec "$0" "$@""#;
    let without_librbd = || {
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c", hide])
            .arg(env!("CARGO_BIN_EXE_vudev"));
        cmd
    };
    // An export of another kind does not load librbd at all.
    let dir = scratch("no-librbd-loaded");
    let s = Server::vudev(&dir, &["--memory", "16M"]);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", s.pid())).unwrap();
    assert!(maps.contains("libc.so"), "{maps}");
    assert!(
        !maps.contains("librbd") && !maps.contains("librados"),
        "{maps}"
    );
    drop(s);
    let dir = scratch("no-librbd");
    let s = Server::vudev_with(&dir, &["--memory", "16M"], without_librbd());
    let mut c = Client::connect(&s.socket, 1).unwrap();
    pattern(&mut c.buf()[..4096], 8);
    assert_eq!(c.write(0, 0, 4096), 0);
    drop(c);
    drop(s);
    let out = without_librbd()
        .args(["export", "vhost-user", "--socket", "/nonexistent/x.sock"])
        .args(["--rbd", "rbd/vol1"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an RBD export without librbd: {e}");
    assert!(
        e.contains("cannot load librados.so.2") && e.contains("apt install librbd1"),
        "{e}"
    );
}
