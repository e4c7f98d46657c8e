//! vudev-bench: vudev's vhost-user export and qemu-storage-daemon's, side by side, on the same
//! machine in the same run, driven by the same client (the `blkio` crate). Prints a table with
//! ratios and writes BENCHMARKS.md. A benchmark, not a test: it never fails on a figure.
//!
//! Usage: vudev-bench [--seconds N] [--output PATH] [--vudev PATH] [--vduse-log PATH]
//!                    [--only TEXT] [--poll-us N]
//!
//! `--only` runs the workloads whose name contains TEXT; `--poll-us N` gives vudev a fixed
//! busy-poll budget (by default it runs with its own defaults: adaptive polling, as
//! qemu-storage-daemon's iothread polls adaptively up to 32 µs).
//!
//! `--vduse-log` is the console log of `tests/vm/scenarios/bench-vduse.sh` (fio on the VDUSE
//! block devices of both daemons inside a guest; `scripts/bench` runs it): its figures become
//! the VDUSE table.

use std::fmt::Write as _;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

mod nbd;
mod profile;
mod rbd;

const DISK: u64 = 1 << 30;
const BS: usize = 4096;

/// What a server exports.
#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Null,
    TmpfsFile,
    /// The tmpfs file served by qemu-nbd on a unix socket; the exporters are NBD clients.
    Nbd,
    /// The same over TCP on the loopback address.
    NbdTcp,
    /// An RBD image on a one-OSD Ceph cluster started for the run.
    Rbd,
}

/// The loopback port of the qemu-nbd that serves the TCP rows (picked by `main`).
static NBD_TCP_PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();

fn nbd_tcp_port() -> u16 {
    *NBD_TCP_PORT.get().unwrap_or(&10809)
}

/// The config of the cluster that serves the RBD rows (started by `main`).
static RBD_CONF: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn rbd_conf() -> &'static str {
    RBD_CONF.get().map_or("/nonexistent", String::as_str)
}

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    RandRead,
    RandWrite,
}

struct Workload {
    name: &'static str,
    backend: Backend,
    pattern: Pattern,
    /// Requests in flight per queue.
    depth: usize,
    /// Queues of the export and of the client (each driven by its own client thread).
    queues: usize,
    /// Extra vudev options for this row only.
    vudev_args: &'static str,
}

const WORKLOADS: [Workload; 18] = [
    Workload {
        name: "null, random read, QD32",
        backend: Backend::Null,
        pattern: Pattern::RandRead,
        depth: 32,
        queues: 1,
        vudev_args: "",
    },
    Workload {
        name: "null, random read, QD1",
        backend: Backend::Null,
        pattern: Pattern::RandRead,
        depth: 1,
        queues: 1,
        vudev_args: "",
    },
    Workload {
        name: "file on tmpfs, random read, QD32",
        backend: Backend::TmpfsFile,
        pattern: Pattern::RandRead,
        depth: 32,
        queues: 1,
        vudev_args: "",
    },
    Workload {
        name: "file on tmpfs, random write, QD32",
        backend: Backend::TmpfsFile,
        pattern: Pattern::RandWrite,
        depth: 32,
        queues: 1,
        vudev_args: "",
    },
    // vudev's default on tmpfs copies on the queue thread (`--aio auto`); these rows show
    // what io_uring, which this kernel can only run through its worker threads there, gives.
    Workload {
        name: "file on tmpfs, random read, QD32, vudev --aio io_uring",
        backend: Backend::TmpfsFile,
        pattern: Pattern::RandRead,
        depth: 32,
        queues: 1,
        vudev_args: "--aio io_uring",
    },
    Workload {
        name: "file on tmpfs, random write, QD32, vudev --aio io_uring",
        backend: Backend::TmpfsFile,
        pattern: Pattern::RandWrite,
        depth: 32,
        queues: 1,
        vudev_args: "--aio io_uring",
    },
    Workload {
        name: "NBD (qemu-nbd, unix), random read, QD32",
        backend: Backend::Nbd,
        pattern: Pattern::RandRead,
        depth: 32,
        queues: 1,
        vudev_args: "",
    },
    Workload {
        name: "NBD (qemu-nbd, unix), random write, QD32",
        backend: Backend::Nbd,
        pattern: Pattern::RandWrite,
        depth: 32,
        queues: 1,
        vudev_args: "",
    },
    Workload {
        name: "NBD (qemu-nbd, unix), random read, QD1",
        backend: Backend::Nbd,
        pattern: Pattern::RandRead,
        depth: 1,
        queues: 1,
        vudev_args: "",
    },
    Workload {
        name: "NBD (qemu-nbd, TCP), random read, QD32",
        backend: Backend::NbdTcp,
        pattern: Pattern::RandRead,
        depth: 32,
        queues: 1,
        vudev_args: "",
    },
    Workload {
        name: "NBD (qemu-nbd, TCP), random write, QD32",
        backend: Backend::NbdTcp,
        pattern: Pattern::RandWrite,
        depth: 32,
        queues: 1,
        vudev_args: "",
    },
    Workload {
        name: "NBD (qemu-nbd, TCP), random read, QD1",
        backend: Backend::NbdTcp,
        pattern: Pattern::RandRead,
        depth: 1,
        queues: 1,
        vudev_args: "",
    },
    Workload {
        name: "NBD (qemu-nbd, unix), random read, 2 queues x QD16",
        backend: Backend::Nbd,
        pattern: Pattern::RandRead,
        depth: 16,
        queues: 2,
        vudev_args: "",
    },
    Workload {
        name: "NBD (qemu-nbd, unix), random write, 2 queues x QD16",
        backend: Backend::Nbd,
        pattern: Pattern::RandWrite,
        depth: 16,
        queues: 2,
        vudev_args: "",
    },
    Workload {
        name: "NBD (qemu-nbd, TCP), random read, 2 queues x QD16",
        backend: Backend::NbdTcp,
        pattern: Pattern::RandRead,
        depth: 16,
        queues: 2,
        vudev_args: "",
    },
    Workload {
        name: "RBD (1 OSD), random read, QD32",
        backend: Backend::Rbd,
        pattern: Pattern::RandRead,
        depth: 32,
        queues: 1,
        vudev_args: "",
    },
    Workload {
        name: "RBD (1 OSD), random write, QD32",
        backend: Backend::Rbd,
        pattern: Pattern::RandWrite,
        depth: 32,
        queues: 1,
        vudev_args: "",
    },
    Workload {
        name: "RBD (1 OSD), random read, QD1",
        backend: Backend::Rbd,
        pattern: Pattern::RandRead,
        depth: 1,
        queues: 1,
        vudev_args: "",
    },
];

/// The NBD server both exporters connect to (started by `main` for the NBD rows).
fn nbd_socket(dir: &Path) -> PathBuf {
    dir.join("nbd.sock")
}

/// One measurement.
#[derive(Clone, Copy, Default)]
struct Figures {
    /// Requests completed in the measured window.
    ios: u64,
    iops: f64,
    p50_us: f64,
    /// Server CPU seconds (user + system) per I/O, in microseconds.
    cpu_us_per_io: f64,
    /// Share of the window the server's threads were on a CPU (1.0 = one CPU all the time).
    server_busy: f64,
    /// Share of the window the client thread was on a CPU: near 1.0, the client is the limit.
    client_busy: f64,
}

/// The run with the median IOPS; the first error if any run failed.
fn median(mut runs: Vec<Result<Figures, String>>) -> Result<Figures, String> {
    if let Some(i) = runs.iter().position(Result::is_err) {
        return runs.swap_remove(i);
    }
    let mut ok: Vec<Figures> = runs.into_iter().flatten().collect();
    ok.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    let mid = ok.len() / 2;
    Ok(ok.swap_remove(mid))
}

/// CPU seconds (user + system) the calling thread has used.
fn thread_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, exclusively borrowed rusage.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(cmd: Command, socket: PathBuf) -> Server {
        Server::try_start(cmd, socket).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `cmd` and waits (at most 30 s) for its socket.
    fn try_start(mut cmd: Command, socket: PathBuf) -> Result<Server, String> {
        let _ = std::fs::remove_file(&socket);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
        let mut s = Server { child, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !s.socket.exists() {
            if Instant::now() >= deadline || s.child.try_wait().ok().flatten().is_some() {
                return Err(format!("{cmd:?}: {} never appeared", s.socket.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        Ok(s)
    }

    /// utime + stime of the server in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no preconditions.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn vudev(
    bin: &Path,
    dir: &Path,
    w: &Workload,
    image: &Path,
    poll_us: Option<u32>,
    extra: &str,
) -> (Server, String) {
    let extra = format!("{extra} --num-queues {}", w.queues);
    let (cmd, socket) = vudev_cmd(bin, dir, w.backend, image, poll_us, &extra);
    let line = format!("{cmd:?}");
    (Server::start(cmd, socket), line)
}

/// The command that runs vudev's vhost-user export of `backend`, and its socket.
fn vudev_cmd(
    bin: &Path,
    dir: &Path,
    backend: Backend,
    image: &Path,
    poll_us: Option<u32>,
    extra: &str,
) -> (Command, PathBuf) {
    let socket = dir.join("vudev.sock");
    let mut cmd = Command::new(bin);
    cmd.args(["export", "vhost-user", "--socket"]).arg(&socket);
    if let Some(us) = poll_us {
        cmd.arg("--poll-us").arg(us.to_string());
    }
    match backend {
        Backend::Null => cmd.args(["--null", "1G"]),
        Backend::TmpfsFile => cmd.arg("--file").arg(image),
        Backend::Nbd => cmd
            .arg("--nbd")
            .arg(format!("nbd+unix:///?socket={}", nbd_socket(dir).display())),
        Backend::NbdTcp => cmd
            .arg("--nbd")
            .arg(format!("nbd://127.0.0.1:{}/", nbd_tcp_port())),
        Backend::Rbd => cmd
            .args(["--rbd", rbd::IMAGE, "--rbd-conf"])
            .arg(rbd_conf()),
    };
    cmd.args(extra.split_whitespace());
    (cmd, socket)
}

fn qsd(dir: &Path, w: &Workload, image: &Path) -> (Server, String) {
    let (cmd, socket) = qsd_cmd(dir, w.backend, image, w.queues);
    let line = format!("{cmd:?}");
    (Server::start(cmd, socket), line)
}

/// The command that runs qemu-storage-daemon's vhost-user-blk export of `backend`, and its
/// socket.
fn qsd_cmd(dir: &Path, backend: Backend, image: &Path, queues: usize) -> (Command, PathBuf) {
    let socket = dir.join("qsd.sock");
    let mut cmd = Command::new("qemu-storage-daemon");
    let blockdev = match backend {
        Backend::Null => "driver=null-co,size=1073741824,node-name=d0".to_string(),
        Backend::TmpfsFile => format!(
            "driver=file,filename={},node-name=d0,aio=io_uring",
            image.display()
        ),
        Backend::Nbd => format!(
            "driver=nbd,server.type=unix,server.path={},node-name=d0",
            nbd_socket(dir).display()
        ),
        Backend::NbdTcp => format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},node-name=d0",
            nbd_tcp_port()
        ),
        Backend::Rbd => format!(
            "driver=rbd,pool=rbd,image=bench,conf={},user=admin,node-name=d0",
            rbd_conf()
        ),
    };
    cmd.arg("--blockdev").arg(blockdev).arg("--export").arg(format!(
        "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
        socket.display()
    ));
    (cmd, socket)
}

/// Drives a server's socket with one queue for `secs` seconds.
fn drive(server: &Server, w: &Workload, secs: f64) -> Result<Figures, String> {
    drive_with(
        "virtio-blk-vhost-user",
        &server.socket,
        Some(server),
        w,
        secs,
        &|_| {},
    )
}

/// Drives `path` through blkio `driver` with `w.queues` queues (a thread each) for `secs`
/// seconds; the CPU figure is the server's (NaN without one).
fn drive_with(
    driver: &str,
    path: &Path,
    server: Option<&Server>,
    w: &Workload,
    secs: f64,
    window: &dyn Fn(bool),
) -> Result<Figures, String> {
    let e = |what: &'static str| move |err: blkio::Error| format!("{what}: {}", err.message());
    let mut b = Blkio::new(driver).map_err(e("new"))?;
    b.set_str("path", path.to_str().unwrap())
        .map_err(e("path"))?;
    b.connect().map_err(e("connect"))?;
    b.set_i32("num-queues", w.queues as i32)
        .map_err(e("num-queues"))?;
    let mut started = b.start().map_err(e("start"))?;
    let region = b
        .alloc_mem_region(w.queues * w.depth * BS)
        .map_err(e("alloc"))?;
    b.map_mem_region(&region).map_err(e("map"))?;
    window(true);
    let cpu0 = server.map_or(f64::NAN, Server::cpu_seconds);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let runs: Vec<Result<QueueRun, String>> = std::thread::scope(|scope| {
        let threads: Vec<_> = started
            .queues
            .iter_mut()
            .enumerate()
            .map(|(i, q)| {
                let base = region.addr + i * w.depth * BS;
                scope.spawn(move || run_queue(q, base, i as u64, w, end))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("a client thread panicked".into()))
            })
            .collect()
    });
    window(false);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = server.map_or(f64::NAN, Server::cpu_seconds) - cpu0;
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    let mut done = 0;
    let mut client = 0.0;
    let mut lat = Vec::new();
    for r in runs {
        let r = r?;
        done += r.done;
        client += r.cpu;
        lat.extend(r.lat);
    }
    lat.sort_unstable();
    Ok(Figures {
        ios: done,
        iops: done as f64 / elapsed,
        p50_us: lat.get(lat.len() / 2).map_or(0.0, |&ns| ns as f64 / 1000.0),
        cpu_us_per_io: cpu / done.max(1) as f64 * 1e6,
        server_busy: cpu / elapsed,
        client_busy: client / elapsed,
    })
}

/// What one client queue did.
struct QueueRun {
    done: u64,
    /// Latencies in ns (QD1 only).
    lat: Vec<u64>,
    /// CPU seconds of its thread.
    cpu: f64,
}

/// Keeps `w.depth` requests in flight on `q` (buffers from `base`) until `end`.
fn run_queue(
    q: &mut blkio::Blkioq,
    base: usize,
    seed: u64,
    w: &Workload,
    end: Instant,
) -> Result<QueueRun, String> {
    let e = |what: &'static str| move |err: blkio::Error| format!("{what}: {}", err.message());
    let client0 = thread_cpu_seconds();
    let blocks = DISK / BS as u64;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ (seed << 32);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * BS as u64
    };
    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
        let buf = base + slot * BS;
        match w.pattern {
            Pattern::RandRead => q.read(off, buf as *mut u8, BS, slot, ReqFlags::empty()),
            Pattern::RandWrite => q.write(off, buf as *const u8, BS, slot, ReqFlags::empty()),
        }
    };
    let mut started_at = vec![Instant::now(); w.depth];
    for (slot, t) in started_at.iter_mut().enumerate() {
        *t = Instant::now();
        submit(q, slot, next());
    }
    let mut lat = Vec::with_capacity(1 << 20);
    let mut done = 0u64;
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..w.depth).map(|_| MaybeUninit::uninit()).collect();
    loop {
        let n = q
            .do_io(&mut comps, 1, Some(&mut Duration::from_secs(10)), None)
            .map_err(e("do_io"))?;
        if n == 0 {
            return Err("no completion within 10 s".into());
        }
        let now = Instant::now();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                return Err(format!("request failed with errno {}", -c.ret));
            }
            done += 1;
            if w.depth == 1 {
                lat.push(now.duration_since(started_at[c.user_data]).as_nanos() as u64);
            }
            if now < end {
                started_at[c.user_data] = Instant::now();
                submit(q, c.user_data, next());
            }
        }
        if now >= end {
            break;
        }
    }
    let cpu = thread_cpu_seconds() - client0;
    // Drain what is still in flight before disconnecting.
    let mut left = w.depth;
    while left > 0 {
        let n = q
            .do_io(&mut comps, 0, Some(&mut Duration::from_millis(200)), None)
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        left = left.saturating_sub(n);
    }
    Ok(QueueRun { done, lat, cpu })
}

/// One exporter's figures from the VDUSE guest run (a `BENCH name key=value…` line).
struct GuestFigures {
    iops: f64,
    user_us_per_io: f64,
    sys_us_per_io: f64,
    /// The whole guest's busy CPU time (all vCPUs: fio, the daemon, the guest kernel) per I/O.
    guest_us_per_io: f64,
}

/// The `BENCH` lines of the VDUSE guest run, by exporter name.
fn vduse_figures(log: &str) -> Vec<(String, GuestFigures)> {
    let mut out = Vec::new();
    for line in log.lines() {
        let Some(rest) = line.trim().strip_prefix("BENCH ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(name) = words.next() else { continue };
        let kv: std::collections::HashMap<&str, f64> = words
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        let get = |k: &str| kv.get(k).copied().unwrap_or(0.0);
        let ios = get("ios");
        if ios <= 0.0 || get("hz") <= 0.0 {
            continue;
        }
        let per_io = |ticks: f64| ticks / get("hz") * 1e6 / ios;
        out.push((
            name.to_string(),
            GuestFigures {
                iops: get("iops"),
                user_us_per_io: per_io(get("utime")),
                sys_us_per_io: per_io(get("stime")),
                guest_us_per_io: per_io(get("guest")),
            },
        ));
    }
    out
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    format!("{cpus} CPUs ({cpu}), kernel {}", kernel.trim())
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| format!("{cmd}: not found"))
}

fn main() {
    let mut secs = 5.0;
    let mut output = PathBuf::from("BENCHMARKS.md");
    let mut bin = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("vudev")))
        .unwrap_or_else(|| PathBuf::from("vudev"));
    let mut vduse_log = None;
    let mut only: Option<String> = None;
    let mut poll_us: Option<u32> = None;
    let mut keep: Option<PathBuf> = None;
    let mut rounds: usize = 3;
    let mut extra = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--seconds", Some(v)) => secs = v.parse().expect("--seconds N"),
            ("--output", Some(v)) => output = PathBuf::from(v),
            ("--vudev", Some(v)) => bin = PathBuf::from(v),
            ("--vduse-log", Some(v)) => vduse_log = Some(PathBuf::from(v)),
            ("--only", Some(v)) => only = Some(v),
            ("--poll-us", Some(v)) => poll_us = Some(v.parse().expect("--poll-us N")),
            ("--keep-profiles", Some(v)) => keep = Some(PathBuf::from(v)),
            ("--vudev-args", Some(v)) => extra = v,
            ("--rounds", Some(v)) => {
                rounds = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .expect("--rounds N (N > 0)")
            }
            _ => {
                eprintln!("usage: vudev-bench [--seconds N] [--rounds N] [--output PATH] [--vudev PATH] [--vduse-log PATH] [--only TEXT] [--poll-us N] [--vudev-args \"ARGS\"] [--keep-profiles DIR]");
                std::process::exit(2);
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("vudev-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The tmpfs file: /dev/shm is tmpfs on Debian.
    let image = PathBuf::from(format!("/dev/shm/vudev-bench-{}.img", std::process::id()));
    {
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(DISK).unwrap();
        // Write it once so that reads hit real pages.
        let chunk = vec![0x5au8; 1 << 20];
        use std::io::Write;
        let mut w = std::io::BufWriter::new(&f);
        for _ in 0..(DISK >> 20) {
            w.write_all(&chunk).unwrap();
        }
    }
    // qemu-nbd serves the tmpfs file for the NBD rows (-t: it stays up between clients).
    let nbd_pid = dir.join("qemu-nbd.pid");
    let nbd_cmd = format!(
        "qemu-nbd -f raw -t --fork -k {} --pid-file {} {}",
        nbd_socket(&dir).display(),
        nbd_pid.display(),
        image.display()
    );
    let nbd_started = Command::new("sh")
        .arg("-c")
        .arg(&nbd_cmd)
        .status()
        .is_ok_and(|s| s.success());
    if !nbd_started {
        eprintln!("qemu-nbd did not start: the NBD rows will fail");
    }
    // A second qemu-nbd, on a free loopback port, for the TCP rows.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(10809, |a| a.port());
    let _ = NBD_TCP_PORT.set(port);
    let nbd_tcp_pid = dir.join("qemu-nbd-tcp.pid");
    let nbd_tcp_cmd = format!(
        "qemu-nbd -f raw -t --fork -b 127.0.0.1 -p {port} --pid-file {} {}",
        nbd_tcp_pid.display(),
        image.display()
    );
    if !Command::new("sh")
        .arg("-c")
        .arg(&nbd_tcp_cmd)
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("qemu-nbd on TCP did not start: the NBD TCP rows will fail");
    }
    let mut rows = Vec::new();
    let mut commands = vec![nbd_cmd.clone(), nbd_tcp_cmd.clone()];
    let chosen = |w: &&Workload| only.as_ref().is_none_or(|o| w.name.contains(o.as_str()));
    // The RBD rows' cluster, and librbd's own figures on it (no virtio hop) as the limit.
    let cluster = if WORKLOADS
        .iter()
        .filter(chosen)
        .any(|w| w.backend == Backend::Rbd)
    {
        match rbd::Cluster::start(&dir.join("ceph")) {
            Ok(c) => {
                let _ = RBD_CONF.set(c.conf.clone());
                Some(c)
            }
            Err(e) => {
                eprintln!("{e}: the RBD rows will fail");
                None
            }
        }
    } else {
        None
    };
    let rbd_limits: Vec<(String, Result<f64, String>)> = cluster
        .as_ref()
        .map(|c| {
            [
                ("random read, 32 in flight", false, 32, 40000),
                ("random write, 32 in flight", true, 32, 20000),
                ("random read, 1 in flight", false, 1, 5000),
            ]
            .into_iter()
            .map(|(name, write, threads, ops)| {
                let r = c.bench(write, threads, ops);
                match &r {
                    Ok(iops) => {
                        println!("{:<36} rbd bench {iops:>9.0} IOPS", format!("RBD {name}"))
                    }
                    Err(e) => println!("RBD {name}: rbd bench failed: {e}"),
                }
                (name.to_string(), r)
            })
            .collect()
        })
        .unwrap_or_default();
    let ceph_version = cluster.as_ref().map(rbd::Cluster::version);
    // The NBD rows' limit: fio's nbd engine on the same servers, one connection.
    let nbd_uris = [
        (
            Backend::Nbd,
            format!("nbd+unix:///?socket={}", nbd_socket(&dir).display()),
        ),
        (Backend::NbdTcp, format!("nbd://127.0.0.1:{port}/")),
    ];
    let mut nbd_limits = Vec::new();
    for w in WORKLOADS
        .iter()
        .filter(chosen)
        .filter(|w| matches!(w.backend, Backend::Nbd | Backend::NbdTcp) && w.queues == 1)
    {
        let Some((_, uri)) = nbd_uris.iter().find(|(b, _)| *b == w.backend) else {
            continue;
        };
        let r = nbd::fio_limit(uri, w.pattern == Pattern::RandWrite, w.depth, secs);
        match &r {
            Ok(iops) => println!("{:<36} fio nbd engine {iops:>9.0} IOPS", w.name),
            Err(e) => println!("{}: fio nbd engine failed: {e}", w.name),
        }
        nbd_limits.push((w.name, r));
    }
    for w in WORKLOADS.iter().filter(chosen) {
        // The peers take turns, `rounds` times each; the run with the median IOPS stands for
        // each, so one burst of noise on this shared machine does not decide a ratio.
        let (mut ours, mut theirs, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let args = format!("{extra} {}", w.vudev_args);
            let (s, cmd) = vudev(&bin, &dir, w, &image, poll_us, &args);
            ours.push(drive(&s, w, secs));
            drop(s);
            let (s, cmd2) = qsd(&dir, w, &image);
            theirs.push(drive(&s, w, secs));
            drop(s);
            if round == 0 {
                commands.push(cmd);
                commands.push(cmd2);
            }
            if w.backend == Backend::TmpfsFile {
                plain.push(drive_with("io_uring", &image, None, w, secs, &|_| {}));
            }
        }
        let (ours, theirs) = (median(ours), median(theirs));
        let plain = (!plain.is_empty()).then(|| median(plain).ok()).flatten();
        let line = match (&ours, &theirs) {
            (Ok(o), Ok(t)) => format!(
                "{:<36} vudev {:>9.0} IOPS  qsd {:>9.0} IOPS  ratio {:.2}  busy (server/client) vudev {:.2}/{:.2} qsd {:.2}/{:.2}",
                w.name,
                o.iops,
                t.iops,
                o.iops / t.iops,
                o.server_busy,
                o.client_busy,
                t.server_busy,
                t.client_busy
            ),
            _ => format!(
                "{:<36} failed: {:?} / {:?}",
                w.name,
                ours.as_ref().err(),
                theirs.as_ref().err()
            ),
        };
        println!("{line}");
        if let (Some(p), Ok(o)) = (&plain, &ours) {
            println!(
                "{:<36} plain io_uring {:>9.0} IOPS  vudev/plain {:.2}",
                "",
                p.iops,
                o.iops / p.iops
            );
        }
        rows.push((w, ours, theirs, plain));
    }
    // Instructions per request under callgrind, for the null rows (the daemons' own cost)
    // and for NBD and RBD random reads at QD32, one queue (the remote client's own cost).
    let mut profiles = Vec::new();
    let valgrind = Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    for w in WORKLOADS.iter().filter(|w| {
        valgrind
            && chosen(w)
            && (w.backend == Backend::Null
                || (matches!(w.backend, Backend::Nbd | Backend::NbdTcp | Backend::Rbd)
                    && w.depth == 32
                    && w.queues == 1
                    && w.pattern == Pattern::RandRead))
    }) {
        let peers = [
            // No polling here: spinning would count as cost per request.
            (
                "vudev",
                // valgrind cannot run vudev's seccomp filter (it has no seccomp syscall).
                vudev_cmd(
                    &bin,
                    &dir,
                    w.backend,
                    &image,
                    Some(0),
                    &format!("{extra} --sandbox off"),
                ),
            ),
            ("qemu-storage-daemon", qsd_cmd(&dir, w.backend, &image, 1)),
        ];
        for (name, (cmd, socket)) in peers {
            let slug: String = w
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let out = dir.join(format!("callgrind-{name}-{slug}.out"));
            let p = profile::profile(&cmd, &socket, &out, w, 3.0);
            if let Some(k) = &keep {
                // For a closer look: callgrind_annotate --inclusive=yes, or kcachegrind.
                let _ = std::fs::create_dir_all(k);
                let _ = std::fs::copy(&out, k.join(out.file_name().unwrap()));
            }
            match &p {
                Ok(p) => println!(
                    "{:<36} {name}: {:.0} instructions per I/O",
                    w.name, p.ir_per_io
                ),
                Err(e) => println!("{:<36} {name}: profile failed: {e}", w.name),
            }
            profiles.push((w, name, p));
        }
    }
    drop(cluster);
    for pid_file in [&nbd_pid, &nbd_tcp_pid] {
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: signalling a qemu-nbd this run started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_dir_all(&dir);

    let mut md = String::new();
    let now = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(md, "Written by `scripts/bench` (vudev-bench). Figures are from one run on one machine; compare only within a run.\n");
    let _ = writeln!(md, "- date: {}", now.trim());
    let _ = writeln!(md, "- machine: {}", machine());
    let _ = writeln!(
        md,
        "- vudev: {}",
        version(bin.to_str().unwrap_or("vudev"), "--version")
    );
    let _ = writeln!(
        md,
        "- peer: {}",
        version("qemu-storage-daemon", "--version")
    );
    let _ = writeln!(md, "- client: the blkio crate's virtio-blk-vhost-user driver, 1 queue (2, each driven by its own thread, where the row says so; the export has as many), 4 KiB, {secs} s per run, on the same machine; the peers take turns {rounds} times per workload and each figure is from the run with the median IOPS");
    let _ = writeln!(
        md,
        "- transport: vhost-user for both in the first tables; VDUSE in the last one\n"
    );
    let _ = writeln!(md, "| workload | vudev IOPS | qsd IOPS | IOPS ratio | vudev p50 µs | qsd p50 µs | vudev CPU µs/IO | qsd CPU µs/IO | CPU ratio |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    let mut busy = String::new();
    for (w, o, t, _) in &rows {
        match (o, t) {
            (Ok(o), Ok(t)) => {
                let p = |f: &Figures| {
                    if w.depth == 1 {
                        format!("{:.1}", f.p50_us)
                    } else {
                        "-".into()
                    }
                };
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {:.0} | {:.2} | {} | {} | {:.2} | {:.2} | {:.2} |",
                    w.name,
                    o.iops,
                    t.iops,
                    o.iops / t.iops,
                    p(o),
                    p(t),
                    o.cpu_us_per_io,
                    t.cpu_us_per_io,
                    o.cpu_us_per_io / t.cpu_us_per_io
                );
                let _ = writeln!(
                    busy,
                    "| {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    w.name, o.server_busy, o.client_busy, t.server_busy, t.client_busy
                );
            }
            _ => {
                let _ = writeln!(md, "| {} | failed | failed | | | | | | |", w.name);
            }
        }
    }
    let _ = writeln!(md, "\nHow busy each side was: CPU time over the measured window (1.00 = one CPU the whole time; the machine has {}). The client is one thread; when it is near 1.00 the client, not the daemon, sets the pace.\n", std::thread::available_parallelism().map_or(0, |n| n.get()));
    let _ = writeln!(md, "| workload | vudev busy | its client busy | qsd busy | its client busy |\n|---|---|---|---|---|\n{busy}");
    let _ = writeln!(
        md,
        "With no virtio in between: the same client's `io_uring` driver on the same tmpfs file.\n"
    );
    let _ = writeln!(
        md,
        "| workload | plain io_uring IOPS | vudev IOPS | vudev / plain |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    for (w, o, _, p) in &rows {
        if let (Ok(o), Some(p)) = (o, p) {
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {:.2} |",
                w.name,
                p.iops,
                o.iops,
                o.iops / p.iops
            );
        }
    }
    let polling = match poll_us {
        None => "vudev runs with its defaults: each queue polls adaptively after activity (up to 32 us while requests keep coming, not at all when idle), so under load its worker is busy all the time and CPU per I/O is simply its time per I/O".to_string(),
        Some(us) => format!("vudev runs with `--poll-us {us}` (each queue busy-polls for that long after its last activity; 0 = off)"),
    };
    let _ = writeln!(md, "\nqemu-storage-daemon's null-co runs with the options below (read-zeroes not set; its profile below still shows one large memset per request); vudev's null backend writes zeros into every read buffer. Timings on this shared 2-CPU machine drift by up to 2x between runs (the same plain io_uring row has ranged from 252k to 344k IOPS within minutes), hence the alternating rounds and medians. {polling}; qemu-storage-daemon's iothread polls by default (adaptively, up to 32 us). NBD rows: both keep many requests in flight on their connection to the same qemu-nbd. File rows: vudev's default `--aio auto` copies on the queue's own thread for a tmpfs file, because this kernel cannot read tmpfs without blocking (preadv2 with RWF_NOWAIT gives EOPNOTSUPP), so io_uring hands every request to a kernel worker thread; the `--aio io_uring` rows show what that costs. qemu-storage-daemon runs `aio=io_uring`, which the targets name; its `aio=threads` was not measured.");
    if !nbd_limits.is_empty() {
        let _ = writeln!(md, "\nThe NBD rows' limit: fio's own `nbd` engine (libnbd inside fio: no virtio hop, no daemon) on the same qemu-nbd, one connection, 4 KiB, the same depth, {secs} s, run once before the rows.\n");
        let _ = writeln!(
            md,
            "| workload | fio nbd engine IOPS | vudev IOPS | vudev / fio |\n|---|---|---|---|"
        );
        for (name, r) in &nbd_limits {
            let ours = rows
                .iter()
                .find(|(w, ..)| w.name == *name)
                .and_then(|(_, o, ..)| o.as_ref().ok());
            match (r, ours) {
                (Ok(l), Some(o)) => {
                    let _ = writeln!(
                        md,
                        "| {name} | {l:.0} | {:.0} | {:.2} |",
                        o.iops,
                        o.iops / l
                    );
                }
                (Ok(l), None) => {
                    let _ = writeln!(md, "| {name} | {l:.0} | failed | |");
                }
                (Err(e), _) => {
                    let _ = writeln!(
                        md,
                        "| {name} | failed: {} | | |",
                        e.lines().next().unwrap_or("")
                    );
                }
            }
        }
    }
    if let Some(version) = &ceph_version {
        let _ = writeln!(md, "\nRBD rows: one image of 1 GiB, written through once, on a one-OSD cluster (BlueStore on a sparse file, `tests/ceph/cluster.sh`) on this machine, {version}. vudev runs without librbd's cache (it sets `rbd_cache = false`: a cache in its memory would lose completed writes when it dies); qemu-storage-daemon runs its default, which here is librbd's writeback cache once the client flushes (this client does not). The limit, `rbd bench` on the same image with no virtio in between (librbd in the `rbd` tool, 4 KiB):\n");
        let _ = writeln!(md, "| rbd bench | IOPS |\n|---|---|");
        for (name, r) in &rbd_limits {
            match r {
                Ok(iops) => {
                    let _ = writeln!(md, "| {name} | {iops:.0} |");
                }
                Err(e) => {
                    let _ = writeln!(
                        md,
                        "| {name} | failed: {} |",
                        e.lines().next().unwrap_or("")
                    );
                }
            }
        }
    }
    let guest = vduse_log
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|l| vduse_figures(&l))
        .unwrap_or_default();
    let _ = writeln!(md, "\nVDUSE: fio 4 KiB random read, QD16, libaio, O_DIRECT, on the /dev/vdX of each exporter (and on rublk's /dev/ublkb0, when scripts/bench could build rublk) in the same Debian 6.12 guest (QEMU TCG, 2 vCPUs: every figure is emulated CPU time, far below the host's), file on guest tmpfs, io_uring in both daemons (`tests/vm/scenarios/bench-vduse.sh`). CPU is the daemon's own, per I/O; the whole guest's is all busy vCPU time per I/O (fio, the daemon, the guest kernel's block and VDUSE or ublk path): the vCPUs are what the exporters share, so it bounds the IOPS.\n");
    if guest.is_empty() {
        let _ = writeln!(
            md,
            "Not measured in this run (the VM run failed or was not given)."
        );
    } else {
        let _ = writeln!(
            md,
            "| exporter | IOPS | CPU µs/IO | of which user | of which system | whole guest CPU µs/IO |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for (name, g) in &guest {
            let _ = writeln!(
                md,
                "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                g.iops,
                g.user_us_per_io + g.sys_us_per_io,
                g.user_us_per_io,
                g.sys_us_per_io,
                g.guest_us_per_io
            );
        }
        let find = |n: &str| guest.iter().find(|(k, _)| k == n).map(|(_, g)| g);
        // vudev against each other exporter of the same guest run.
        for (peer, what) in [
            ("qsd", "VDUSE fio QD16"),
            (
                "rublk",
                "VDUSE against ublk (rublk's loop target on the same file, in the same guest), fio QD16",
            ),
        ] {
            if let (Some(v), Some(p)) = (find("vudev"), find(peer)) {
                let cpu = |g: &GuestFigures| g.user_us_per_io + g.sys_us_per_io;
                let line = format!(
                    "{what}: vudev/{peer} IOPS {:.2}, CPU per I/O {:.2}",
                    v.iops / p.iops,
                    cpu(v) / cpu(p)
                );
                println!("{line}");
                let _ = writeln!(md, "\n{line}.");
            }
        }
    }
    let _ = writeln!(md, "\n## Where the time goes\n\nInstructions per request, counted by callgrind (`valgrind --tool=callgrind --instr-atstart=no`, switched on with `callgrind_control` only while the client runs 3 s of steady I/O, so start-up and connection set-up are left out), 4 KiB random read, on the null backend (the daemons' own cost), on NBD (each daemon's own NBD client, against the same qemu-nbd) and on RBD (where librbd's and librados' cost is the same for both daemons: compare their share with the null rows'). Instruction counts are stable here where timings are not; they leave out time in the kernel and waiting.\n");
    if profiles.is_empty() {
        let why = if valgrind {
            "no profiled workload was chosen"
        } else {
            "valgrind missing"
        };
        let _ = writeln!(md, "Not measured in this run ({why}).");
    }
    for (w, name, p) in &profiles {
        match p {
            Ok(p) => {
                let _ = writeln!(md, "\n{name}, {}: **{:.0} instructions per I/O**; the most expensive functions (own cost, per I/O):\n", w.name, p.ir_per_io);
                let _ = writeln!(md, "| function | instructions per I/O |\n|---|---|");
                for (f, ir) in &p.top {
                    let _ = writeln!(md, "| `{}` | {:.0} |", f.replace('|', "\\|"), ir);
                }
            }
            Err(e) => {
                let _ = writeln!(md, "\n{name}, {}: profile failed: {e}", w.name);
            }
        }
    }
    let _ = writeln!(md, "\nCommands (servers):\n");
    for c in &commands {
        let _ = writeln!(md, "    {c}");
    }
    std::fs::write(&output, md).unwrap();
    println!("wrote {}", output.display());
}
