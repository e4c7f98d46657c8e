//! `vudev serve` and its control API, on this host with vhost-user exports and the blkio
//! client: exports added and removed while others serve data, clients that send anything,
//! permissions, a restart that serves the run-time exports again, sd_notify.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, scratch, terminate, Client, SIZE};
use serde_json::{json, Value};

const VUDEV: &str = env!("CARGO_BIN_EXE_vudev");

/// A `vudev serve` process; SIGTERM on drop must end it with status 0 and remove the
/// control socket.
struct Daemon {
    child: Option<Child>,
    control: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, config: Option<&str>, extra: &[&str]) -> Daemon {
        let control = dir.join("control.sock");
        let mut cmd = Command::new(VUDEV);
        cmd.arg("serve")
            .arg("--control")
            .arg(&control)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .stdin(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("serve.log"))
                    .unwrap(),
            );
        if let Some(text) = config {
            let path = dir.join("vudev.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd.spawn().expect("start vudev serve");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&control).is_err() {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("vudev serve exited with {st}: {}", log(dir));
            }
            assert!(Instant::now() < deadline, "no control socket: {}", log(dir));
            std::thread::sleep(Duration::from_millis(10));
        }
        // The control socket answers once the config's exports are set up.
        let list = json!({"jsonrpc": "2.0", "id": 0, "method": "list"}).to_string();
        assert!(exchange(&control, &list)["result"].is_array());
        Daemon {
            child: Some(child),
            control,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// One call: the reply's `result`, or `Err((code, message))`.
    fn call(&self, method: &str, params: Value) -> Result<Value, (i64, String)> {
        let line = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params});
        let reply = exchange(&self.control, &line.to_string());
        assert_eq!(reply["id"], 7, "{reply}");
        match reply.get("error") {
            Some(e) => Err((
                e["code"].as_i64().unwrap(),
                e["message"].as_str().unwrap().into(),
            )),
            None => Ok(reply["result"].clone()),
        }
    }

    fn names(&self) -> Vec<String> {
        let list = self.call("list", json!({})).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let st = terminate(
                &mut child,
                Duration::from_secs(20),
                "vudev serve ignored SIGTERM",
            );
            if !std::thread::panicking() {
                assert!(st.success(), "vudev serve exited with {st}");
                assert!(!self.control.exists(), "control socket left behind");
            }
        }
    }
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
}

/// Sends `line` and reads one reply line.
fn exchange(control: &Path, line: &str) -> Value {
    let s = UnixStream::connect(control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    writeln!(&s, "{line}").unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("reply {reply:?}: {e}"))
}

fn memory_export(dir: &Path, name: &str) -> String {
    format!(
        "[[export]]\ntransport = \"vhost-user\"\nname = \"{name}\"\nsocket = \"{}\"\nmemory = \"{}\"\n",
        dir.join(format!("{name}.sock")).display(),
        SIZE
    )
}

/// A file export on an image of its own (its data is not in the daemon's RSS).
fn file_export(dir: &Path, name: &str) -> String {
    let image = dir.join(format!("{name}.img"));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    format!(
        "[[export]]\ntransport = \"vhost-user\"\nname = \"{name}\"\nsocket = \"{}\"\nfile = \"{}\"\n",
        dir.join(format!("{name}.sock")).display(),
        image.display()
    )
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Writes and reads back patterns on `socket` until `stop`; the rounds done.
fn verify_until(socket: &Path, stop: &AtomicBool) -> usize {
    let mut c = Client::connect(socket, 1).unwrap();
    let mut rounds = 0;
    while !stop.load(Ordering::Relaxed) {
        let off = (rounds as u64 * 65536 * 7) % (SIZE - 65536);
        pattern(&mut c.buf()[..65536], off + 1);
        assert_eq!(c.write(0, off, 65536), 0, "write at {off}");
        assert_eq!(c.read(0, off, 65536), 0, "read at {off}");
        let b = c.buf();
        assert!(
            b[..65536] == b[1 << 20..(1 << 20) + 65536],
            "data differs at {off}"
        );
        rounds += 1;
    }
    rounds
}

#[test]
fn exports_come_and_go_while_the_others_serve_data() {
    let dir = scratch("serve-churn");
    let config = file_export(&dir, "m1") + &file_export(&dir, "m2");
    let d = Daemon::start(&dir, Some(&config), &[]);
    assert_eq!(d.names(), ["m1", "m2"]);
    let stop = Arc::new(AtomicBool::new(false));
    let verifiers: Vec<_> = ["m1", "m2"]
        .iter()
        .map(|n| {
            let (socket, stop) = (dir.join(format!("{n}.sock")), stop.clone());
            std::thread::spawn(move || verify_until(&socket, &stop))
        })
        .collect();
    let socket = dir.join("tmp.sock");
    let add = json!({"transport": "vhost-user", "socket": socket, "null": "1G", "num-queues": 2});
    let (mut fds_before, mut rss_before) = (0, 0);
    for cycle in 0..500 {
        if cycle == 50 {
            (fds_before, rss_before) = (fds(d.pid()), rss_kib(d.pid()));
        }
        let added = d.call("add", add.clone()).unwrap();
        assert_eq!(added["name"], "tmp");
        assert_eq!(added["state"], "waiting");
        assert_eq!(added["size"], 1u64 << 30);
        if cycle % 100 == 0 {
            // A connected frontend is disconnected by the remove.
            let mut c = Client::connect(&socket, 2).unwrap();
            assert_eq!(c.read(1, 0, 4096), 0);
            assert_eq!(
                d.call("show", json!({"name": "tmp"})).unwrap()["state"],
                "connected"
            );
            d.call("remove", json!({"name": "tmp"})).unwrap();
            drop(c);
        } else {
            d.call("remove", json!({"name": "tmp"})).unwrap();
        }
        assert!(
            !socket.exists(),
            "cycle {cycle}: the socket outlived its export"
        );
    }
    let (fds_after, rss_after) = (fds(d.pid()), rss_kib(d.pid()));
    stop.store(true, Ordering::Relaxed);
    for v in verifiers {
        let rounds = v
            .join()
            .expect("a verifier failed while exports came and went");
        assert!(rounds > 10, "only {rounds} rounds of verified I/O");
    }
    // A control connection may be closing as the fds are counted: a leak shows as hundreds.
    assert!(
        fds_after <= fds_before + 4,
        "file descriptors leak per add/remove: {fds_before} after 50 cycles, {fds_after} after 500"
    );
    assert!(
        rss_after < rss_before + 8192,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over 450 add/remove cycles"
    );
    assert_eq!(d.names(), ["m1", "m2"]);
}

#[test]
fn the_control_api_answers_anything_with_an_error_and_changes_nothing() {
    let dir = scratch("serve-bad");
    let d = Daemon::start(&dir, Some(&memory_export(&dir, "m1")), &[]);
    let before = d.call("list", json!({})).unwrap();
    let cases: &[(&str, i64)] = &[
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"list\"", -32700),
        ("not json at all", -32700),
        ("\u{0}\u{1}\u{2}", -32700),
        ("42", -32600),
        ("[]", -32600),
        ("{\"id\": 1, \"method\": \"list\"}", -32600),
        ("{\"jsonrpc\": \"1.0\", \"id\": 1, \"method\": \"list\"}", -32600),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": 5}", -32600),
        ("{\"jsonrpc\": \"2.0\", \"id\": {}, \"method\": \"list\"}", -32600),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"list\", \"extra\": 1}", -32600),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"format_disk\"}", -32601),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"list\", \"params\": [1]}", -32602),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"list\", \"params\": {\"all\": true}}", -32602),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"show\"}", -32602),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"show\", \"params\": {\"name\": 3}}", -32602),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"show\", \"params\": {\"name\": \"nope\"}}", 1),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"remove\", \"params\": {\"name\": \"m1\", \"force\": \"yes\"}}", -32602),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"add\", \"params\": {\"transport\": \"vhost-user\", \"name\": \"m1\", \"socket\": \"/nonexistent/x.sock\", \"null\": \"1G\"}}", 2),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"add\", \"params\": {\"transport\": \"vhost-user\", \"socket\": \"/tmp/q.sock\", \"null\": \"1G\", \"num-queues\": 1000}}", -32602),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"add\", \"params\": {\"transport\": \"vhost-user\", \"socket\": \"/tmp/q.sock\", \"file\": \"/nonexistent.img\"}}", 3),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"add\", \"params\": {\"transport\": \"vhost-user\", \"socket\": \"/proc/q.sock\", \"null\": \"1G\"}}", 4),
        ("{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"add\", \"params\": {\"transport\": \"vhost-user\", \"socket\": \"/tmp/q.sock\", \"null\": \"1G\", \"nbd-timeout\": 5}}", -32602),
    ];
    for (line, code) in cases {
        let reply = exchange(&d.control, line);
        assert_eq!(reply["error"]["code"], *code, "{line} gave {reply}");
        assert!(reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // A batch larger than the bound is refused whole.
    let one = "{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"version\"}";
    let batch = format!("[{}]", vec![one; 65].join(","));
    assert_eq!(exchange(&d.control, &batch)["error"]["code"], -32600);
    let batch = format!("[{}]", vec![one; 64].join(","));
    assert_eq!(
        exchange(&d.control, &batch).as_array().map(Vec::len),
        Some(64)
    );
    // A notification gets no reply; the request after it on the same connection does.
    let s = UnixStream::connect(&d.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(&s, "{{\"jsonrpc\": \"2.0\", \"method\": \"version\"}}").unwrap();
    writeln!(
        &s,
        "{{\"jsonrpc\": \"2.0\", \"id\": \"b\", \"method\": \"version\"}}"
    )
    .unwrap();
    writeln!(
        &s,
        "[{{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": \"version\"}}, 5]"
    )
    .unwrap();
    let mut r = BufReader::new(&s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&line).unwrap()["id"],
        "b",
        "{line}"
    );
    line.clear();
    r.read_line(&mut line).unwrap();
    let batch: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        batch[0]["result"]["version"],
        env!("CARGO_PKG_VERSION"),
        "{batch}"
    );
    assert_eq!(batch[1]["error"]["code"], -32600, "{batch}");
    // A request larger than the bound: an error, and the connection is closed.
    let big = UnixStream::connect(&d.control).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let writer = {
        let big = big.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b' '; 1 << 16];
            for _ in 0..64 {
                if (&big).write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let mut reply = String::new();
    BufReader::new(&big).read_line(&mut reply).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&reply).unwrap()["error"]["code"],
        -32600
    );
    let mut rest = Vec::new();
    let _ = (&big).read_to_end(&mut rest);
    writer.join().unwrap();
    // A client that connects and sends nothing does not hold up the others.
    let _idle = UnixStream::connect(&d.control).unwrap();
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let (control, dir) = (d.control.clone(), dir.to_path_buf());
            std::thread::spawn(move || {
                let socket = dir.join(format!("c{i}.sock"));
                for _ in 0..20 {
                    let add = json!({"jsonrpc": "2.0", "id": i, "method": "add",
                                     "params": {"transport": "vhost-user", "socket": socket, "null": "1M"}});
                    assert!(exchange(&control, &add.to_string())["result"].is_object());
                    let rm = json!({"jsonrpc": "2.0", "id": i, "method": "remove",
                                    "params": {"name": format!("c{i}")}});
                    assert!(exchange(&control, &rm.to_string())["result"].is_object());
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(d.call("list", json!({})).unwrap(), before);
    common::writable_suite(&dir.join("m1.sock"), 1);
}

#[test]
fn the_control_socket_is_the_owners_unless_a_group_is_let_in() {
    let dir = scratch("serve-perm");
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctl_as_nobody = |control: &Path| {
        let mut cmd = Command::new(VUDEV);
        cmd.args(["ctl", "--control"]).arg(control).arg("list");
        // SAFETY: setgid/setuid between fork and exec touch no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(65534) != 0
                    || libc::setuid(65534) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        cmd.output().unwrap()
    };
    let d = Daemon::start(&dir, None, &[]);
    let mode = std::fs::metadata(&d.control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let out = ctl_as_nobody(&d.control);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(d
        .call("list", json!({}))
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    drop(d);
    // With --control-group, that group's members get in.
    let d = Daemon::start(&dir, None, &["--control-group", "65534"]);
    let meta = std::fs::metadata(&d.control).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let out = ctl_as_nobody(&d.control);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("NAME"));
}

#[test]
fn a_restarted_daemon_serves_again_what_was_added_at_run_time() {
    let dir = scratch("serve-restart");
    let image = common::sparse_image(&dir);
    let config = memory_export(&dir, "m1");
    let d = Daemon::start(&dir, Some(&config), &[]);
    let socket = dir.join("rt.sock");
    let added = d
        .call(
            "add",
            json!({"transport": "vhost-user", "socket": socket, "file": image}),
        )
        .unwrap();
    assert_eq!(added["runtime"], true);
    let mut c = Client::connect(&socket, 1).unwrap();
    pattern(&mut c.buf()[..65536], 99);
    assert_eq!(c.write(0, 4096, 65536), 0);
    assert_eq!(c.flush(0), 0);
    drop(c);
    // kill -9: the control socket and the export sockets are left behind, stale.
    d.kill();
    assert!(dir.join("control.sock").exists());
    let d = Daemon::start(&dir, Some(&config), &[]);
    assert_eq!(d.names(), ["m1", "rt"]);
    let rt = d.call("show", json!({"name": "rt"})).unwrap();
    assert_eq!(
        (rt["runtime"].clone(), rt["state"].clone()),
        (json!(true), json!("waiting"))
    );
    let mut c = Client::connect(&socket, 1).unwrap();
    assert_eq!(c.read(0, 4096, 65536), 0);
    let mut want = vec![0u8; 65536];
    pattern(&mut want, 99);
    assert!(
        c.buf()[1 << 20..(1 << 20) + 65536] == want[..],
        "data written before the kill"
    );
    drop(c);
    // Removed, it stays removed across a restart; the config's export is kept.
    d.call("remove", json!({"name": "rt"})).unwrap();
    drop(d);
    let d = Daemon::start(&dir, Some(&config), &[]);
    assert_eq!(d.names(), ["m1"]);
    drop(d);
    // A record that cannot be read is set aside for a person, not overwritten.
    let record = dir.join("state/serve-exports.json");
    std::fs::write(&record, "[{\"transport\": \"vhost-user\", tor").unwrap();
    let d = Daemon::start(&dir, Some(&config), &[]);
    assert_eq!(d.names(), ["m1"]);
    let aside = std::fs::read_to_string(dir.join("state/serve-exports.json.bad")).unwrap();
    assert!(aside.ends_with("tor"), "{aside}");
}

#[test]
fn a_config_with_an_error_creates_nothing_and_check_prints_the_plan() {
    let dir = scratch("serve-config");
    let path = dir.join("vudev.toml");
    let good = memory_export(&dir, "m1");
    std::fs::write(&path, format!("{good}\n[[export]]\ntransport = \"vhost-user\"\nsocket = \"{}/b.sock\"\nnull = \"1G\"\nnum-queue = 2\n", dir.display())).unwrap();
    let control = dir.join("control.sock");
    let out = Command::new(VUDEV)
        .args(["serve", "--config"])
        .arg(&path)
        .arg("--control")
        .arg(&control)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:11: unknown option 'num-queue'",
            path.display()
        )),
        "{err}"
    );
    assert!(err.contains("num-queues"), "the options are listed: {err}");
    assert!(
        !control.exists() && !dir.join("m1.sock").exists(),
        "something was created"
    );
    // --check: the equivalent commands, nothing created.
    std::fs::write(&path, &good).unwrap();
    let out = Command::new(VUDEV)
        .args(["serve", "--check", "--config"])
        .arg(&path)
        .arg("--control")
        .arg(&control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.starts_with(&format!(
            "vudev export vhost-user --memory {SIZE} --name m1 --socket {}",
            dir.join("m1.sock").display()
        )),
        "{plan}"
    );
    assert!(
        !control.exists() && !dir.join("m1.sock").exists(),
        "--check created something"
    );
}

#[test]
fn the_service_manager_hears_ready_the_watchdog_and_stopping() {
    let dir = scratch("serve-notify");
    let listen = dir.join("notify.sock");
    let manager = UnixDatagram::bind(&listen).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let control = dir.join("control.sock");
    let mut child = Command::new(VUDEV)
        .args(["serve", "--control"])
        .arg(&control)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("NOTIFY_SOCKET", &listen)
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut heard = Vec::new();
    let mut next = || {
        let mut buf = [0u8; 4096];
        let n = manager.recv(&mut buf).expect("the daemon fell silent");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    while !heard.iter().any(|m: &String| m.contains("READY=1")) {
        heard.push(next());
    }
    assert!(
        UnixStream::connect(&control).is_ok(),
        "READY=1 before the control socket"
    );
    assert!(next().contains("WATCHDOG=1"));
    let st = terminate(
        &mut child,
        Duration::from_secs(10),
        "vudev serve ignored SIGTERM",
    );
    assert!(st.success());
    let mut rest = Vec::new();
    manager
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(m) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut next)) {
        rest.push(m);
    }
    assert!(rest.iter().any(|m| m.contains("STOPPING=1")), "{rest:?}");
}

/// `expected` with `"…"` standing for any value.
fn matches_doc(got: &Value, expected: &Value) -> bool {
    match (got, expected) {
        (_, Value::String(s)) if s == "…" => true,
        (Value::Object(g), Value::Object(e)) => {
            g.len() == e.len()
                && e.iter()
                    .all(|(k, v)| g.get(k).is_some_and(|gv| matches_doc(gv, v)))
        }
        (Value::Array(g), Value::Array(e)) => {
            g.len() == e.len() && g.iter().zip(e).all(|(a, b)| matches_doc(a, b))
        }
        _ => got == expected,
    }
}

#[test]
fn the_api_document_runs_as_written() {
    let dir = scratch("serve-apidoc");
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/API.md"))
        .unwrap()
        .replace("/run/vudev/", &format!("{}/", dir.display()));
    // Fenced blocks, in order: (language, text).
    let mut blocks = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in doc.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(lang)) => open = Some((lang.to_string(), String::new())),
            (Some(_), Some("")) => blocks.push(open.take().unwrap()),
            (Some((_, text)), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => {}
        }
    }
    let config = &blocks
        .iter()
        .find(|(l, _)| l == "toml")
        .expect("a config block")
        .1;
    let d = Daemon::start(&dir, Some(config), &[]);
    let mut ran = 0;
    for pair in blocks.windows(2) {
        let [(l1, cmd), (l2, want)] = pair else {
            unreachable!()
        };
        if l1 != "sh" || l2 != "json" {
            continue;
        }
        assert!(
            cmd.starts_with("echo '") && cmd.contains("| socat - UNIX-CONNECT:"),
            "{cmd}"
        );
        let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{cmd}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        let want: Value = serde_json::from_str(want).unwrap_or_else(|e| panic!("{want}: {e}"));
        assert!(
            matches_doc(&got, &want),
            "{cmd}\n gave: {got}\nthe document says: {want}"
        );
        ran += 1;
    }
    assert!(ran >= 12, "only {ran} examples found");
    drop(d);
}

#[test]
fn a_resize_is_seen_by_the_next_frontend_and_refused_where_it_would_lose_data() {
    let dir = scratch("serve-resize");
    let config = file_export(&dir, "f1") + &memory_export(&dir, "m1");
    let d = Daemon::start(&dir, Some(&config), &[]);
    let socket = dir.join("f1.sock");
    // A connected frontend without a backend channel (blkio): it cannot be told, and the
    // resize still happens.
    let mut c = Client::connect(&socket, 1).unwrap();
    assert_ne!(c.read(0, SIZE, 4096), 0, "past the end before the resize");
    let grown = d
        .call("resize", json!({"name": "f1", "size": "128M"}))
        .unwrap();
    assert_eq!(grown["size"], 128u64 << 20);
    assert_eq!(
        std::fs::metadata(dir.join("f1.img")).unwrap().len(),
        128 << 20
    );
    // The bound moved under the running queue: the old end is readable now.
    assert_eq!(c.read(0, SIZE, 4096), 0, "past the old end after growing");
    pattern(&mut c.buf()[..4096], 5);
    assert_eq!(c.write(0, SIZE + 4096, 4096), 0);
    drop(c);
    let c = Client::connect(&socket, 1).unwrap();
    assert_eq!(
        c.capacity(),
        128 << 20,
        "the next frontend reads the new size"
    );
    drop(c);
    // Shrinking below the data just written is refused, and changes nothing...
    let e = d
        .call("resize", json!({"name": "f1", "size": SIZE}))
        .unwrap_err();
    assert_eq!(e.0, -32602, "{e:?}");
    assert!(e.1.contains("--force"), "{e:?}");
    assert_eq!(
        std::fs::metadata(dir.join("f1.img")).unwrap().len(),
        128 << 20
    );
    // ... unless forced.
    let shrunk = d
        .call("resize", json!({"name": "f1", "size": SIZE, "force": true}))
        .unwrap();
    assert_eq!(shrunk["size"], SIZE);
    // A file grown from outside: `resize` without a size takes the file's.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("f1.img"))
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    assert_eq!(
        d.call("resize", json!({"name": "f1"})).unwrap()["size"],
        96u64 << 20
    );
    assert_eq!(Client::connect(&socket, 1).unwrap().capacity(), 96 << 20);
    // ... and without being asked, within a few seconds.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("f1.img"))
        .unwrap()
        .set_len(112 << 20)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.call("show", json!({"name": "f1"})).unwrap()["size"] != 112u64 << 20 {
        assert!(Instant::now() < deadline, "a grown file was not followed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(Client::connect(&socket, 1).unwrap().capacity(), 112 << 20);
    // What cannot be resized says why.
    let e = d
        .call("resize", json!({"name": "m1", "size": "1G"}))
        .unwrap_err();
    assert!(e.0 == 3 && e.1.contains("cannot change size"), "{e:?}");
    let e = d.call("resize", json!({"name": "m1"})).unwrap_err();
    assert_eq!(e.0, -32602, "{e:?}");
    let e = d
        .call("resize", json!({"name": "f1", "size": "1000"}))
        .unwrap_err();
    assert!(e.0 == -32602 && e.1.contains("multiple"), "{e:?}");
    let e = d
        .call("resize", json!({"name": "nope", "size": "1G"}))
        .unwrap_err();
    assert_eq!(e.0, 1);
    // The CLI spelling.
    let out = Command::new(VUDEV)
        .args(["ctl", "--control"])
        .arg(&d.control)
        .args(["resize", "f1", "100M"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("resized f1: {} bytes", 100 << 20)
    );
}

/// One HTTP request over `stream`; the whole reply.
fn http(mut stream: impl Read + Write, request: &str) -> String {
    stream.write_all(request.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply
}

/// The value of the sample `name{labels}` in a Prometheus text exposition.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_count_what_the_queues_did_for_prometheus_and_the_api() {
    let dir = scratch("serve-metrics");
    let metrics = dir.join("metrics.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = file_export(&dir, "f1");
    let d = Daemon::start(
        &dir,
        Some(&config),
        &["--metrics", metrics.to_str().unwrap()],
    );
    let mut c = Client::connect(&dir.join("f1.sock"), 1).unwrap();
    for i in 0..10 {
        assert_eq!(c.write(0, i * 4096, 4096), 0);
    }
    for i in 0..5 {
        assert_eq!(c.read(0, i * 8192, 8192), 0);
    }
    assert_ne!(c.read(0, SIZE, 4096), 0);
    assert_eq!(c.flush(0), 0);
    // A scraper that connects and says nothing does not hold up the next one.
    let _silent = UnixStream::connect(&metrics).unwrap();
    let reply = http(
        UnixStream::connect(&metrics).unwrap(),
        "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(
        reply.contains("Content-Type: text/plain; version=0.0.4"),
        "{reply}"
    );
    let q = "export=\"f1\",queue=\"0\"";
    assert_eq!(
        sample(&reply, &format!("vudev_requests_total{{{q},op=\"write\"}}")),
        Some(10)
    );
    assert_eq!(
        sample(&reply, &format!("vudev_requests_total{{{q},op=\"read\"}}")),
        Some(6)
    );
    assert_eq!(
        sample(&reply, &format!("vudev_bytes_total{{{q},op=\"write\"}}")),
        Some(40960)
    );
    assert_eq!(
        sample(&reply, &format!("vudev_bytes_total{{{q},op=\"read\"}}")),
        Some(40960)
    );
    assert_eq!(
        sample(
            &reply,
            &format!("vudev_errors_total{{{q},status=\"ioerr\"}}")
        ),
        Some(1)
    );
    assert_eq!(
        sample(&reply, &format!("vudev_requests_total{{{q},op=\"flush\"}}")),
        Some(1)
    );
    assert_eq!(
        sample(
            &reply,
            &format!("vudev_request_duration_seconds_count{{{q},op=\"write\"}}")
        ),
        Some(10)
    );
    assert_eq!(
        sample(
            &reply,
            &format!("vudev_request_duration_seconds_bucket{{{q},op=\"write\",le=\"+Inf\"}}")
        ),
        Some(10)
    );
    assert_eq!(
        sample(&reply, "vudev_export_size_bytes{export=\"f1\"}"),
        Some(SIZE)
    );
    assert!(reply.contains("# TYPE vudev_request_duration_seconds histogram"));
    // The API gives the same counters.
    let stats = d.call("stats", json!({"name": "f1"})).unwrap();
    assert_eq!(stats[0]["queues"][0]["requests"]["write"], 10);
    assert_eq!(stats[0]["queues"][0]["latency"]["write"]["count"], 10);
    assert_eq!(d.call("stats", json!({"name": "nope"})).unwrap_err().0, 1);
    // Anything but GET is refused; so is a head that never ends.
    let reply = http(
        UnixStream::connect(&metrics).unwrap(),
        "DELETE /metrics HTTP/1.1\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
    let reply = http(
        UnixStream::connect(&metrics).unwrap(),
        "GET /other HTTP/1.1\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    let reply = http(UnixStream::connect(&metrics).unwrap(), &"X".repeat(20000));
    assert!(
        reply.starts_with("HTTP/1.1 405"),
        "an endless head is cut at its bound: {reply}"
    );
    drop(c);
    drop(d);
    // Over TCP, as a Prometheus server scrapes.
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(&dir, Some(&config), &["--metrics", &addr]);
    let reply = http(
        std::net::TcpStream::connect(&addr).unwrap(),
        "GET /metrics HTTP/1.0\r\n\r\n",
    );
    assert_eq!(
        sample(&reply, &format!("vudev_requests_total{{{q},op=\"write\"}}")),
        Some(0)
    );
    let out = Command::new(VUDEV)
        .args(["ctl", "--control"])
        .arg(&d.control)
        .arg("stats")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("EXPORT") && text.contains("f1"),
        "{text}"
    );
}

#[test]
fn a_guest_that_shrinks_its_memory_costs_only_its_own_session() {
    use common::frontend::*;
    let dir = scratch("serve-sigbus");
    let config = file_export(&dir, "a") + &file_export(&dir, "b");
    let d = Daemon::start(&dir, Some(&config), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let verifier = {
        let (socket, stop) = (dir.join("b.sock"), stop.clone());
        std::thread::spawn(move || verify_until(&socket, &stop))
    };
    // On export a: memory in a plain memfd (not sealed), a running ring, then the memory
    // taken away and a kick: the worker's next look at the ring faults.
    let m = memfd(1 << 20);
    let stream = session_with_memory(&dir.join("a.sock"), &m);
    let kick = start_ring_0(&stream, 0x7000_0000, 0x7000_2000, 0x7000_1000);
    assert_eq!(acks_of(SET_VRING_ENABLE, &read_all(&stream)), vec![0]);
    m.set_len(0).unwrap();
    // SAFETY: writing to our own eventfd.
    unsafe { libc::eventfd_write(kick, 1) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !closed(&stream) {
        assert!(
            Instant::now() < deadline,
            "the hostile session was not ended"
        );
    }
    // SAFETY: closing our own fd.
    unsafe { libc::close(kick) };
    assert!(log(&dir).contains("SIGBUS caught"), "{}", log(&dir));
    // The daemon, the other export and this one are all still there.
    assert_eq!(d.names(), ["a", "b"]);
    common::writable_suite(&dir.join("a.sock"), 1);
    stop.store(true, Ordering::Relaxed);
    let rounds = verifier.join().expect("the other export's I/O failed");
    assert!(rounds > 10, "only {rounds} rounds on the other export");
}

/// A field of /proc/PID/status.
fn proc_status(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn a_daemon_serving_as_a_user_keeps_root_in_its_helper_only() {
    common::require_root("this test changes users");
    let dir = scratch("serve-nobody");
    // The user's directory, for the vhost-user sockets it makes; the rest (the state
    // directory's parent) root's.
    let run = dir.join("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A file only root may open, named by the config: opened before the change of user.
    let image = common::sparse_image(&dir);
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = format!(
        "user = \"nobody\"\n\n[[export]]\ntransport = \"vhost-user\"\nname = \"cfg\"\n\
         socket = \"{}\"\nfile = \"{}\"\n",
        run.join("cfg.sock").display(),
        image.display()
    );
    // A state directory the user could swap (its parent is the user's) is refused.
    let swappable = run.join("state");
    let out = Command::new(VUDEV)
        .args(["serve", "--user", "nobody", "--control"])
        .arg(dir.join("refused.sock"))
        .arg("--state-dir")
        .arg(&swappable)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("must be root's"),
        "{err}"
    );
    let d = Daemon::start(&dir, Some(&config), &[]);
    let helper = d.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{helper}/task/{helper}/children")).unwrap();
    let serving: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(
        proc_status(helper, "Uid").split_whitespace().next(),
        Some("0")
    );
    assert!(proc_status(serving, "Uid")
        .split_whitespace()
        .all(|u| u == "65534"));
    for caps in ["CapPrm", "CapEff", "CapBnd"] {
        assert_eq!(proc_status(serving, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(proc_status(serving, "NoNewPrivs"), "1");
    assert_eq!(proc_status(serving, "Seccomp"), "2");
    common::writable_suite(&run.join("cfg.sock"), 1);

    // Added at run time, a file is opened by the user: root's is refused, and says so.
    let (code, msg) = d
        .call(
            "add",
            json!({"transport": "vhost-user", "socket": run.join("rt2.sock"), "file": image}),
        )
        .unwrap_err();
    assert!(msg.contains("permission denied"), "{code}: {msg}");
    // The record of run-time exports is written by the helper, in root's state directory.
    d.call(
        "add",
        json!({"transport": "vhost-user", "socket": run.join("rt.sock"), "memory": "64M"}),
    )
    .unwrap();
    // Kept apart from a root daemon's record, which never reads it.
    let record = dir.join("state/serve-exports-65534.json");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(dir.join("state")).unwrap().uid(), 0);
    assert_eq!(std::fs::metadata(&record).unwrap().uid(), 0);
    assert!(std::fs::read_to_string(&record)
        .unwrap()
        .contains("rt.sock"));
    common::writable_suite(&run.join("rt.sock"), 1);
    // A VDUSE export keeps its state where the helper gives state files, nowhere else.
    let (_, msg) = d
        .call(
            "add",
            json!({"transport": "vduse", "name": "v", "memory": "1M", "state-dir": "/tmp/elsewhere"}),
        )
        .unwrap_err();
    assert!(msg.contains("drop state-dir"), "{msg}");
    // SIGTERM reaches the serving process through the helper; both exit 0, and the helper
    // removes the control socket the user could not (checked on drop).
    drop(d);
    assert!(!Path::new(&format!("/proc/{serving}")).exists());
    let log = log(&dir);
    assert!(log.contains("serving as an unprivileged user"), "{log}");
}

#[test]
fn a_device_handed_over_through_the_api_must_be_that_device() {
    let dir = scratch("serve-handover");
    let d = Daemon::start(&dir, None, &[]);
    let control = d.control.to_str().unwrap().to_string();
    // `vudev ctl add … --device-fd N` sends N with the request (SCM_RIGHTS): here /dev/null.
    let ctl = |fd: &str, transport: &[&str]| {
        let out = Command::new(VUDEV)
            .args(["ctl", "--control", &control, "add"])
            .args(transport)
            .args(["--device-fd", fd])
            .stdin(std::fs::File::open("/dev/null").unwrap())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = ctl("0", &["vduse", "--name", "d0", "--null", "1M"]);
    assert!(
        err.contains("device-fd: /dev/null is not /dev/vduse/d0"),
        "{err}"
    );
    let err = ctl("9", &["vduse", "--name", "d0", "--null", "1M"]);
    assert!(
        err.contains("--device-fd 9: no such open file descriptor"),
        "{err}"
    );
    // Asked for, but none came; or not asked for the right way.
    let (code, msg) = d
        .call(
            "add",
            json!({"transport": "vduse", "name": "d0", "null": "1M", "device-fd": true}),
        )
        .unwrap_err();
    assert!(
        msg.contains("no file descriptor came with the request"),
        "{code}: {msg}"
    );
    let (_, msg) = d
        .call(
            "add",
            json!({"transport": "vduse", "name": "d0", "null": "1M", "device-fd": 3}),
        )
        .unwrap_err();
    assert!(msg.contains("device-fd must be true"), "{msg}");
    // A vhost-user export has no device to be handed.
    let line = json!({"jsonrpc": "2.0", "id": 1, "method": "add", "params":
        {"transport": "vhost-user", "socket": dir.join("h.sock"), "null": "1M", "device-fd": true}})
    .to_string()
        + "\n";
    let s = UnixStream::connect(&d.control).unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    use std::os::fd::AsRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    s.send_with_fds(&[line.as_bytes()], &[null.as_raw_fd()])
        .unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    assert!(
        reply.contains("only a VDUSE export serves a device"),
        "{reply}"
    );
    assert!(d.names().is_empty());
}

/// One notification and the pid of the process that sent it (SO_PASSCRED).
fn notification_with_sender(manager: &UnixDatagram) -> (String, i32) {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 4096];
    let mut cmsg = [0u8; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.len();
    // SAFETY: recvmsg fills the buffers msg points at, within their lengths.
    let n = unsafe { libc::recvmsg(manager.as_raw_fd(), &mut msg, 0) };
    assert!(
        n >= 0,
        "the daemon fell silent: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the control buffer holds what the kernel wrote: one SCM_CREDENTIALS message.
    let pid = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        assert!(!c.is_null() && (*c).cmsg_type == libc::SCM_CREDENTIALS);
        (*(libc::CMSG_DATA(c) as *const libc::ucred)).pid
    };
    (
        String::from_utf8_lossy(&buf[..n as usize]).into_owned(),
        pid,
    )
}

#[test]
fn a_daemon_serving_as_a_user_is_heard_from_its_main_process() {
    common::require_root("this test changes users");
    let dir = scratch("serve-notify-user");
    let listen = dir.join("notify.sock");
    let manager = UnixDatagram::bind(&listen).unwrap();
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads the int.
    let set = unsafe {
        libc::setsockopt(
            manager.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PASSCRED,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
    let mut child = Command::new(VUDEV)
        .args(["serve", "--user", "nobody", "--control"])
        .arg(dir.join("control.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("NOTIFY_SOCKET", &listen)
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let main = child.id() as i32;
    // systemd takes notifications from the main process only (NotifyAccess=main): the
    // helper it started passes the daemon's on.
    let mut heard = Vec::new();
    while !heard
        .iter()
        .any(|(m, _): &(String, i32)| m.contains("READY=1"))
    {
        heard.push(notification_with_sender(&manager));
    }
    let (watchdog, from) = notification_with_sender(&manager);
    assert!(watchdog.contains("WATCHDOG=1"), "{watchdog}");
    heard.push((watchdog, from));
    assert!(
        heard.iter().all(|(_, pid)| *pid == main),
        "{heard:?} not all from {main}"
    );
    let st = terminate(
        &mut child,
        Duration::from_secs(10),
        "vudev serve ignored SIGTERM",
    );
    assert!(st.success());
    assert!(!dir.join("control.sock").exists());
}

/// A TAP made for a test (persistent, up), removed on drop.
struct TestTap(String);

impl TestTap {
    fn new(tag: &str) -> TestTap {
        common::require_root("a net export needs a TAP");
        let name = format!("vst{}{tag}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("run ip");
            assert!(st.success(), "ip {args:?}: {st}");
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        ip(&["link", "set", &name, "up"]);
        TestTap(name)
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[test]
fn a_net_export_is_served_listed_counted_and_never_resized() {
    let dir = scratch("serve-net");
    let (tap1, tap2) = (TestTap::new("a"), TestTap::new("b"));
    let metrics = dir.join("metrics.sock");
    let config = format!(
        "[[export]]\ntransport = \"vhost-user\"\nname = \"n1\"\nsocket = \"{}\"\n\
         net-tap = \"{}\"\nmac = \"52:54:00:ab:cd:ef\"\nmtu = 9000\n",
        dir.join("n1.sock").display(),
        tap1.0
    );
    let d = Daemon::start(
        &dir,
        Some(&config),
        &["--metrics", metrics.to_str().unwrap()],
    );
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{}/mtu", tap1.0)).unwrap();
    assert_eq!(mtu.trim(), "9000", "the TAP took the export's MTU");
    common::frontend::transmit_one_frame(&dir.join("n1.sock"));
    let stats = d.call("stats", json!({"name": "n1"})).unwrap();
    assert_eq!(stats[0]["net"]["tx_packets"], 1, "{stats}");
    assert_eq!(stats[0]["net"]["tx_bytes"], 60, "{stats}");
    assert_eq!(stats[0]["queues"], json!([]), "{stats}");
    let reply = http(
        UnixStream::connect(&metrics).unwrap(),
        "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(
        sample(
            &reply,
            "vudev_net_total{export=\"n1\",counter=\"tx_packets\"}"
        ),
        Some(1),
        "{reply}"
    );
    assert_eq!(
        sample(&reply, "vudev_export_size_bytes{export=\"n1\"}"),
        None
    );
    let list = d.call("list", json!({})).unwrap();
    let n1 = &list[0];
    assert!(
        n1["backend"]
            .as_str()
            .unwrap()
            .contains(&format!("TAP {}", tap1.0)),
        "{n1}"
    );
    assert!(n1["size"].is_null(), "{n1}");
    let (code, message) = d
        .call("resize", json!({"name": "n1", "size": "1G"}))
        .unwrap_err();
    assert_eq!(code, -32602, "{message}");
    assert!(message.contains("only disks are resized"), "{message}");
    // Added and removed at run time, as a disk is; block options are refused.
    let add = |extra: Value| {
        let mut p = json!({"transport": "vhost-user", "name": "n2",
            "socket": dir.join("n2.sock"), "net-tap": tap2.0});
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        d.call("add", p)
    };
    let (_, message) = add(json!({"readonly": true})).unwrap_err();
    assert!(message.contains("--readonly applies to disks"), "{message}");
    add(json!({})).unwrap();
    common::frontend::transmit_one_frame(&dir.join("n2.sock"));
    let stats = d.call("stats", json!({"name": "n2"})).unwrap();
    assert_eq!(stats[0]["net"]["tx_packets"], 1, "{stats}");
    d.call("remove", json!({"name": "n2"})).unwrap();
    assert_eq!(d.names(), ["n1"]);
}
