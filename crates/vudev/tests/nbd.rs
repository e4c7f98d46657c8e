//! The NBD backend against real servers: qemu-nbd (the reference) and nbdkit with its error
//! and delay filters for faults, driven through a vhost-user export by the `blkio` client.

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{pattern, scratch, sparse_image, writable_suite, Client, Server, SIZE};

/// A qemu-nbd server on a unix socket (forked; stopped on drop).
struct QemuNbd(i32);

impl QemuNbd {
    fn start(dir: &Path, image: &Path, connections: u32) -> QemuNbd {
        QemuNbd::start_with(dir, image, connections, &[])
    }

    fn start_with(dir: &Path, image: &Path, connections: u32, extra: &[String]) -> QemuNbd {
        let sock = dir.join("nbd.sock").display().to_string();
        QemuNbd::launch(dir, image, connections, &["-k".into(), sock], extra)
    }

    /// A qemu-nbd on TCP loopback, port `port`.
    fn start_tcp(dir: &Path, image: &Path, connections: u32, port: u16) -> QemuNbd {
        let listen = [
            "-b".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ];
        QemuNbd::launch(dir, image, connections, &listen, &[])
    }

    fn launch(
        dir: &Path,
        image: &Path,
        connections: u32,
        listen: &[String],
        extra: &[String],
    ) -> QemuNbd {
        let pid_file = dir.join("qemu-nbd.pid");
        let st = std::process::Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-x", "vol", "--fork"])
            .arg(format!("--shared={connections}"))
            .args(listen)
            .arg("--pid-file")
            .arg(&pid_file)
            .args(extra)
            .arg(image)
            .status()
            .expect("run qemu-nbd");
        assert!(st.success(), "qemu-nbd failed to start");
        QemuNbd(
            std::fs::read_to_string(pid_file)
                .unwrap()
                .trim()
                .parse()
                .unwrap(),
        )
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SAFETY: signalling the qemu-nbd process this test started.
        unsafe { libc::kill(self.0, libc::SIGTERM) };
        // SAFETY: as above; signal 0 only checks the process still exists.
        while unsafe { libc::kill(self.0, 0) } == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[test]
fn vudev_serves_an_nbd_export_of_qemu_nbd() {
    // One connection shared by the queues (qemu-nbd's default), then one per queue
    // (--shared=4 makes qemu-nbd advertise CAN_MULTI_CONN).
    for connections in [1, 4] {
        let dir = scratch(&format!("nbd{connections}"));
        let image = sparse_image(&dir);
        let nbd = QemuNbd::start(&dir, &image, connections);
        let uri = unix_uri(&dir);
        let s = Server::vudev(&dir, &["--nbd", &uri, "--num-queues", "2"]);
        writable_suite(&s.socket, 2);
        drop(s);
        drop(nbd);
        assert_eq!(
            replies_in_log(&dir),
            "Extended",
            "qemu-nbd offers extended headers"
        );
        // What the client wrote is in the server's image.
        let data = std::fs::read(&image).unwrap();
        assert!(data[5 << 20..6 << 20].iter().any(|&b| b != 0));
        let log = std::fs::read_to_string(dir.join("vudev.log")).unwrap();
        assert_eq!(
            log.contains("a connection per queue"),
            connections > 1,
            "{log}"
        );
    }
}

/// Writes 64 KiB blocks `(offset, pattern seed)` with all of them in flight at once (at most
/// 16); every one must succeed.
fn write_batch(c: &mut Client, batch: &[(u64, u64)]) {
    assert!(batch.len() <= 16);
    for (i, &(off, seed)) in batch.iter().enumerate() {
        pattern(&mut c.buf()[i * 65536..(i + 1) * 65536], seed);
        c.start_write(0, i * 65536, off, 65536);
    }
    let codes = c.wait_all(0, batch.len());
    assert!(codes.iter().all(|&r| r == 0), "writes failed: {codes:?}");
}

/// A TCP port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The negotiated reply style vudev logged ("Extended", "Structured" or "Simple").
fn replies_in_log(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("vudev.log")).unwrap();
    let at = log
        .find(" replies,")
        .unwrap_or_else(|| panic!("no reply style in {log}"));
    log[..at].rsplit(' ').next().unwrap().to_string()
}

fn unix_uri(dir: &Path) -> String {
    format!("nbd+unix:///vol?socket={}", dir.join("nbd.sock").display())
}

#[test]
fn an_nbd_server_restarted_mid_write_is_not_seen_by_the_client() {
    let dir = scratch("nbd-restart");
    let image = sparse_image(&dir);
    let nbd = QemuNbd::start(&dir, &image, 1);
    let s = Server::vudev(&dir, &["--nbd", &unix_uri(&dir), "--nbd-timeout", "10"]);
    let mut c = Client::connect(&s.socket, 1).unwrap();
    // While writes stream in, the server is killed and started again.
    let restarter = {
        let (dir, image) = (dir.to_path_buf(), image.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(nbd);
            std::thread::sleep(Duration::from_millis(300));
            QemuNbd::start(&dir, &image, 1)
        })
    };
    // Eight writes in flight at a time, so that the kill catches several unanswered.
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        let batch: Vec<(u64, u64)> = (n..n + 8).map(|k| ((k * 65536) % (SIZE / 2), k)).collect();
        write_batch(&mut c, &batch);
        n += 8;
    }
    let _nbd = restarter.join().unwrap();
    // Every block holds what was written last.
    let last = n - 1;
    for k in last.saturating_sub(7)..=last {
        let off = (k * 65536) % (SIZE / 2);
        assert_eq!(c.read(0, off, 65536), 0);
        let mut want = vec![0u8; 65536];
        pattern(&mut want, k);
        assert!(
            c.buf()[1 << 20..(1 << 20) + 65536] == want[..],
            "block {k} differs"
        );
    }
    let log = std::fs::read_to_string(dir.join("vudev.log")).unwrap();
    assert!(log.contains("NBD server reconnected"), "{log}");
}

#[test]
fn an_nbd_server_gone_for_good_gives_io_errors_not_a_hang() {
    let dir = scratch("nbd-gone");
    let image = sparse_image(&dir);
    let nbd = QemuNbd::start(&dir, &image, 1);
    let s = Server::vudev(&dir, &["--nbd", &unix_uri(&dir), "--nbd-timeout", "2"]);
    let mut c = Client::connect(&s.socket, 1).unwrap();
    assert_eq!(c.read(0, 0, 4096), 0);
    drop(nbd);
    let t = Instant::now();
    assert_ne!(c.read(0, 0, 4096), 0, "a read with no server succeeded");
    assert!(t.elapsed() < Duration::from_secs(15));
    // vudev is still serving, and works again once the server is back.
    let _nbd = QemuNbd::start(&dir, &image, 1);
    assert_eq!(c.read(0, 0, 4096), 0);
}

/// An nbdkit server with a memory disk behind `filters` on a unix socket (stopped on drop).
struct Nbdkit(Child);

impl Nbdkit {
    fn start(dir: &Path, filters: &[&str], args: &[&str]) -> Nbdkit {
        let sock = dir.join("nbd.sock").display().to_string();
        Nbdkit::start_with(dir, &["-U".into(), sock], filters, args)
    }

    /// `options` come before the plugin: where to listen (`-U PATH`, or `-i ADDR -p PORT`),
    /// TLS, `--no-sr`…
    fn start_with(dir: &Path, options: &[String], filters: &[&str], args: &[&str]) -> Nbdkit {
        let pid_file = dir.join("nbdkit.pid");
        let _ = std::fs::remove_file(&pid_file);
        let mut cmd = Command::new("nbdkit");
        cmd.arg("-f").args(options);
        cmd.arg("-P").arg(&pid_file);
        for f in filters {
            cmd.arg(format!("--filter={f}"));
        }
        cmd.args(["memory", &SIZE.to_string()]).args(args);
        let child = cmd.spawn().expect("run nbdkit (apt-get install nbdkit)");
        // nbdkit writes its pid file once it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pid_file.exists() {
            assert!(Instant::now() < deadline, "nbdkit did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Nbdkit(child)
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn nbdkit_serves_and_its_errors_become_io_errors() {
    let dir = scratch("nbdkit-errors");
    let inject = dir.join("inject");
    let rule = format!("error-pwrite-file={}", inject.display());
    let _kit = Nbdkit::start(
        &dir,
        &["error"],
        &["error=EIO", "error-pwrite-rate=100%", &rule],
    );
    let s = Server::vudev(&dir, &["--nbd", &unix_uri(&dir), "--num-queues", "2"]);
    writable_suite(&s.socket, 2);
    // While the error filter fires, writes fail (no retry: the server answered); reads work.
    let mut c = Client::connect(&s.socket, 1).unwrap();
    std::fs::write(&inject, b"").unwrap();
    pattern(&mut c.buf()[..4096], 3);
    assert_ne!(
        c.write(0, 8192, 4096),
        0,
        "a write the server failed succeeded"
    );
    assert_eq!(c.read(0, 8192, 4096), 0);
    std::fs::remove_file(&inject).unwrap();
    assert_eq!(c.write(0, 8192, 4096), 0);
    let log = std::fs::read_to_string(dir.join("vudev.log")).unwrap();
    assert!(log.contains("input/output error (EIO)"), "{log}");
}

#[test]
fn an_nbd_server_that_stops_answering_times_out() {
    let dir = scratch("nbdkit-delay");
    // Reads take 30 s; the timeout is 2 s.
    let _kit = Nbdkit::start(&dir, &["delay"], &["rdelay=30"]);
    let s = Server::vudev(&dir, &["--nbd", &unix_uri(&dir), "--nbd-timeout", "2"]);
    let mut c = Client::connect(&s.socket, 1).unwrap();
    let t = Instant::now();
    assert_ne!(
        c.read(0, 0, 4096),
        0,
        "a read the server never answered succeeded"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    // vudev goes on: writes are not delayed.
    pattern(&mut c.buf()[..4096], 5);
    assert_eq!(c.write(0, 0, 4096), 0);
    // A connection that owes only replies to failed requests, silent for a whole timeout, is
    // replaced (so that such requests cannot pile up).
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = || std::fs::read_to_string(dir.join("vudev.log")).unwrap();
    while !log().contains("has not answered for the whole timeout") {
        assert!(Instant::now() < deadline, "{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Makes a CA, a server certificate for "localhost" and a client certificate with openssl,
/// in `dir/server` (qemu's server layout) and `dir/client` (ca-cert.pem, client-*.pem).
fn make_certificates(dir: &Path) {
    let (server, client) = (dir.join("server"), dir.join("client"));
    std::fs::create_dir_all(&server).unwrap();
    std::fs::create_dir_all(&client).unwrap();
    let run = |args: &[&str]| {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run openssl");
        assert!(st.success(), "openssl {args:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "30",
            "-subj",
            "/CN=vudev test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ]
    .concat());
    for (who, usage, san) in [
        (
            "server",
            "serverAuth",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        ),
        ("client", "clientAuth", ""),
    ] {
        let ext = format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n{san}"
        );
        std::fs::write(dir.join(format!("{who}.ext")), ext).unwrap();
        let (key, csr, cert) = (
            format!("{who}/{who}-key.pem"),
            format!("{who}.csr"),
            format!("{who}/{who}-cert.pem"),
        );
        run(&[
            &["req"][..],
            &ec,
            &["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            &format!("{who}.ext"),
            "-out",
            &cert,
        ]);
    }
    for d in [&server, &client] {
        std::fs::copy(dir.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
    }
}

#[test]
fn vudev_speaks_tls_to_qemu_nbd() {
    let dir = scratch("nbd-tls");
    let image = sparse_image(&dir);
    make_certificates(&dir);
    let tls_server = |verify: &str| {
        vec![
            "--object".to_string(),
            format!(
                "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer={verify}",
                dir.join("server").display()
            ),
            "--tls-creds".into(),
            "tls0".into(),
        ]
    };
    let tls_uri = |certs: &Path| {
        format!(
            "nbds+unix:///vol?socket={}&tls-certificates={}&tls-hostname=localhost",
            dir.join("nbd.sock").display(),
            certs.display()
        )
    };
    // The server checks the client's certificate too.
    let nbd = QemuNbd::start_with(&dir, &image, 1, &tls_server("on"));
    let s = Server::vudev(&dir, &["--nbd", &tls_uri(&dir.join("client"))]);
    writable_suite(&s.socket, 1);
    drop(s);
    // Without TLS, or trusting another CA, the export does not start, and says why.
    let refused = |uri: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_vudev"))
            .args(["export", "vhost-user", "--socket"])
            .arg(dir.join("refused.sock"))
            .args(["--nbd", uri])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{uri} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let plain = refused(&unix_uri(&dir));
    assert!(plain.contains("the server requires TLS"), "{plain}");
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(
        dir.join("client/client-cert.pem"),
        other.join("ca-cert.pem"),
    )
    .unwrap();
    let untrusted = refused(&tls_uri(&other));
    assert!(
        untrusted.to_lowercase().contains("certificate"),
        "{untrusted}"
    );
    drop(nbd);
    let data = std::fs::read(&image).unwrap();
    assert!(data[5 << 20..6 << 20].iter().any(|&b| b != 0));
}

#[test]
fn vudev_reaches_qemu_nbd_over_tcp() {
    let dir = scratch("nbd-tcp");
    let image = sparse_image(&dir);
    let port = free_port();
    let nbd = QemuNbd::start_tcp(&dir, &image, 4, port);
    let uri = format!("nbd://127.0.0.1:{port}/vol");
    let s = Server::vudev(&dir, &["--nbd", &uri, "--num-queues", "2"]);
    writable_suite(&s.socket, 2);
    drop(s);
    drop(nbd);
    let data = std::fs::read(&image).unwrap();
    assert!(data[5 << 20..6 << 20].iter().any(|&b| b != 0));
    let log = std::fs::read_to_string(dir.join("vudev.log")).unwrap();
    assert!(log.contains("a connection per queue"), "{log}");
}

#[test]
fn nbdkit_with_tls_over_tcp_uses_structured_replies() {
    let dir = scratch("nbdkit-tls");
    make_certificates(&dir);
    let port = free_port();
    let options = [
        "-i".to_string(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "--tls=require".into(),
        format!("--tls-certificates={}", dir.join("server").display()),
    ];
    let _kit = Nbdkit::start_with(&dir, &options, &[], &[]);
    let uri = format!(
        "nbds://localhost:{port}/?tls-certificates={}",
        dir.join("client").display()
    );
    let s = Server::vudev(&dir, &["--nbd", &uri, "--num-queues", "2"]);
    writable_suite(&s.socket, 2);
    // nbdkit 1.32 has structured replies but not extended headers.
    assert_eq!(replies_in_log(&dir), "Structured");
}

#[test]
fn nbdkit_without_structured_replies_gets_simple_requests() {
    let dir = scratch("nbdkit-simple");
    let sock = dir.join("nbd.sock").display().to_string();
    let _kit = Nbdkit::start_with(&dir, &["--no-sr".into(), "-U".into(), sock], &[], &[]);
    let s = Server::vudev(&dir, &["--nbd", &unix_uri(&dir), "--num-queues", "2"]);
    writable_suite(&s.socket, 2);
    assert_eq!(replies_in_log(&dir), "Simple");
}

#[test]
fn many_requests_are_in_flight_on_one_connection() {
    let dir = scratch("nbdkit-inflight");
    // Every read takes 500 ms in the server, which runs up to 16 at a time.
    let _kit = Nbdkit::start(&dir, &["delay"], &["rdelay=500ms"]);
    let s = Server::vudev(&dir, &["--nbd", &unix_uri(&dir)]);
    let mut c = Client::connect(&s.socket, 1).unwrap();
    let t = Instant::now();
    for i in 0..16 {
        c.start_read(0, i * 4096, i as u64 * 4096, 4096);
    }
    let codes = c.wait_all(0, 16);
    assert!(codes.iter().all(|&r| r == 0), "{codes:?}");
    // One at a time would take 8 s (and the delay is real: at least 500 ms).
    let took = t.elapsed();
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(took >= Duration::from_millis(450), "took {took:?}");
}

#[test]
fn sigterm_stops_vudev_while_an_nbd_server_stalls_the_first_handshake() {
    let dir = scratch("nbd-slow-hello");
    // A server that accepts and never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let socket = dir.join("vu.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vudev"))
        .args(["export", "vhost-user", "--socket"])
        .arg(&socket)
        .args([
            "--nbd",
            &format!("nbd://127.0.0.1:{port}/x"),
            "--nbd-timeout",
            "60",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("vudev.log")).unwrap())
        .spawn()
        .unwrap();
    // Once vudev has connected, it waits for the greeting.
    let (_conn, _) = listener.accept().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let status = common::terminate(
        &mut child,
        Duration::from_secs(5),
        "vudev ignored SIGTERM during the NBD handshake",
    );
    let log = std::fs::read_to_string(dir.join("vudev.log")).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("nothing was created"), "{log}");
    assert!(!socket.exists());
}
