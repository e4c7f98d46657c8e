//! Shared pieces of the vhost-user tests: a server process (vudev or qemu-storage-daemon)
//! and a blkio client.
#![allow(dead_code)]

pub mod frontend;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

pub const SIZE: u64 = 64 << 20;

/// A scratch directory, removed on drop.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sparse image of `SIZE` bytes, `dir/disk.img`.
pub fn sparse_image(dir: &Path) -> PathBuf {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    image
}

pub fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("vudev-vu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// A server process serving a socket; SIGTERM on drop must end it with status 0.
pub struct Server {
    child: Option<Child>,
    pub socket: PathBuf,
    expect_clean_exit: bool,
    /// Where the server's stderr goes, shown when a test fails.
    log: Option<PathBuf>,
}

impl Server {
    fn start(mut cmd: Command, socket: PathBuf, expect_clean_exit: bool) -> Server {
        let child = cmd.stdin(Stdio::null()).spawn().expect("start the server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if !expect_clean_exit {
            // qemu-storage-daemon binds before it listens: give it a moment. (vudev renames a
            // listening socket into place, so its socket is ready once it exists.)
            std::thread::sleep(Duration::from_millis(200));
        }
        Server {
            child: Some(child),
            socket,
            expect_clean_exit,
            log: None,
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn vudev(dir: &Path, args: &[&str]) -> Server {
        Server::vudev_with(dir, args, Command::new(env!("CARGO_BIN_EXE_vudev")))
    }

    /// vudev run through `cmd` (e.g. setpriv dropping to another user, ending in the binary).
    pub fn vudev_with(dir: &Path, args: &[&str], mut cmd: Command) -> Server {
        let socket = dir.join("vudev.sock");
        cmd.args(["export", "vhost-user", "--socket"])
            .arg(&socket)
            .args(args)
            .stderr(std::fs::File::create(dir.join("vudev.log")).unwrap());
        let mut server = Server::start(cmd, socket, true);
        server.log = Some(dir.join("vudev.log"));
        server
    }

    pub fn qsd(dir: &Path, image: &Path, writable: bool, queues: u16) -> Option<Server> {
        let socket = dir.join("qsd.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=d0,discard=unmap",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable={},num-queues={queues}",
                socket.display(),
                if writable { "on" } else { "off" }
            ))
            .stderr(Stdio::null());
        Some(Server::start(cmd, socket, false))
    }

    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: sending SIGTERM to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the server did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(st) = self.stop() {
            if self.expect_clean_exit && !std::thread::panicking() {
                assert!(st.success(), "server exited with {st}");
                assert!(!self.socket.exists(), "socket file left behind");
            }
        }
        if std::thread::panicking() {
            // The server's side of a failed test, before its scratch directory goes.
            if let Some(log) = self
                .log
                .as_ref()
                .and_then(|p| std::fs::read_to_string(p).ok())
            {
                eprintln!("--- server log ---\n{log}--- end of server log ---");
            }
        }
    }
}

/// A connected blkio client with one 2 MiB buffer region.
pub struct Client {
    blkio: Blkio,
    pub queues: Vec<Blkioq>,
    region: MemoryRegion,
}

impl Client {
    pub fn connect(socket: &Path, queues: i32) -> Result<Client, String> {
        Client::open(socket, queues, false)
    }

    pub fn open(socket: &Path, queues: i32, read_only: bool) -> Result<Client, String> {
        let e = |what: &'static str| move |err: blkio::Error| format!("{what}: {}", err.message());
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(e("new"))?;
        blkio
            .set_str("path", socket.to_str().unwrap())
            .map_err(e("path"))?;
        blkio
            .set_bool("read-only", read_only)
            .map_err(e("read-only"))?;
        blkio.connect().map_err(e("connect"))?;
        blkio
            .set_i32("num-queues", queues)
            .map_err(e("num-queues"))?;
        let started = blkio.start().map_err(e("start"))?;
        let region = blkio.alloc_mem_region(2 << 20).map_err(e("alloc"))?;
        blkio.map_mem_region(&region).map_err(e("map"))?;
        Ok(Client {
            blkio,
            queues: started.queues,
            region,
        })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    pub fn read_only(&self) -> bool {
        self.blkio.get_bool("read-only").unwrap()
    }

    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is 2 MiB of our own mapping, alive as long as `self`.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, 2 << 20) }
    }

    pub fn wait(&mut self, q: usize) -> i32 {
        self.wait_within(q, Duration::from_secs(10))
    }

    /// The result of the next request to complete on queue `q`, which must come `within`.
    pub fn wait_within(&mut self, q: usize, within: Duration) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let n = self.queues[q]
            .do_io(&mut c, 1, Some(&mut within.clone()), None)
            .expect("do_io");
        assert_eq!(n, 1, "no completion within {within:?}");
        // SAFETY: do_io initialised one completion.
        unsafe { c[0].assume_init_read() }.ret
    }

    /// Starts a write of `buf()[at..at + len]` to `off`; `wait_all` collects it.
    pub fn start_write(&mut self, q: usize, at: usize, off: u64, len: usize) {
        assert!(at + len <= 2 << 20);
        let p = (self.region.addr + at) as *const u8;
        self.queues[q].write(off, p, len, 0, ReqFlags::empty());
    }

    /// Starts a read of `len` bytes at `off` into `buf()[at..]`; `wait_all` collects it.
    pub fn start_read(&mut self, q: usize, at: usize, off: u64, len: usize) {
        assert!(at + len <= 2 << 20);
        let p = (self.region.addr + at) as *mut u8;
        self.queues[q].read(off, p, len, 0, ReqFlags::empty());
    }

    /// Waits (at most 30 s) for `n` started requests; their return codes.
    pub fn wait_all(&mut self, q: usize, n: usize) -> Vec<i32> {
        let mut c: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
        let got = self.queues[q]
            .do_io(&mut c, n, Some(&mut Duration::from_secs(30)), None)
            .expect("do_io");
        assert_eq!(got, n, "{got} of {n} completions within 30 s");
        // SAFETY: do_io initialised `n` completions.
        c.iter()
            .map(|x| unsafe { x.assume_init_read() }.ret)
            .collect()
    }

    pub fn write(&mut self, q: usize, off: u64, len: usize) -> i32 {
        let p = self.region.addr as *const u8;
        self.queues[q].write(off, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn read(&mut self, q: usize, off: u64, len: usize) -> i32 {
        let p = (self.region.addr + (1 << 20)) as *mut u8;
        self.queues[q].read(off, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        self.wait(q)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
    }
}

pub fn pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// The checks every writable vhost-user-blk export must pass.
pub fn writable_suite(socket: &Path, queues: i32) {
    let mut c = Client::connect(socket, queues).unwrap();
    assert_eq!(c.capacity(), SIZE);
    assert!(!c.read_only());
    for (i, &(off, len)) in [
        (0u64, 4096usize),
        (8192 + 512, 512),
        (5 << 20, 1 << 20),
        (SIZE - 65536, 65536),
    ]
    .iter()
    .enumerate()
    {
        let q = i % c.queues.len();
        pattern(&mut c.buf()[..len], off ^ i as u64);
        assert_eq!(c.write(q, off, len), 0, "write {len} at {off}");
        assert_eq!(c.read(q, off, len), 0, "read {len} at {off}");
        let b = c.buf();
        assert!(
            b[..len] == b[1 << 20..(1 << 20) + len],
            "read-back of {len} at {off} differs"
        );
    }
    assert_eq!(c.flush(0), 0);
    // Past the end fails; so does a length that is not a multiple of 512.
    assert_ne!(c.read(0, SIZE, 4096), 0);
    // Discard is accepted; write-zeroes reads back as zeros.
    pattern(&mut c.buf()[..65536], 7);
    assert_eq!(c.write(0, 1 << 20, 65536), 0);
    c.queues[0].discard(1 << 20, 32768, 0, ReqFlags::empty());
    assert_eq!(c.wait(0), 0);
    c.queues[0].write_zeroes(1 << 20, 65536, 0, ReqFlags::empty());
    assert_eq!(c.wait(0), 0);
    assert_eq!(c.read(0, 1 << 20, 65536), 0);
    assert!(c.buf()[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0));
}

/// Fails the test unless it runs as root; `why` says what it needs root for ("this test
/// changes users").
pub fn require_root(why: &str) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "{why}: run it as root");
}

/// Sends SIGTERM to `child` and waits (at most `within`) for it to exit; kills it and panics
/// with `what` if it does not.
pub fn terminate(child: &mut Child, within: Duration, what: &str) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > within {
            let _ = child.kill();
            panic!("{what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
