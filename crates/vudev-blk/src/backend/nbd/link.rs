//! The byte stream to an NBD server: a TCP or unix socket, with TLS on top when the URI asks
//! for it. After the handshake a link is split into a writing half (used by the queue threads
//! that send requests) and a reading half (used by the connection's reply thread), so that
//! requests go out while replies come in.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::ClientConnection;

use super::uri::{NbdAddress, NbdTls};

/// A connected socket.
pub(super) enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    /// Connects to `address`, giving up after `timeout`.
    pub(super) fn connect(address: &NbdAddress, timeout: Duration) -> io::Result<Sock> {
        let sock = match address {
            NbdAddress::Tcp(host, port) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for the host");
                let mut found = None;
                for addr in (host.as_str(), *port).to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(last)?;
                s.set_nodelay(true)?;
                Sock::Tcp(s)
            }
            NbdAddress::Unix(path) => Sock::Unix(UnixStream::connect(path)?),
        };
        sock.set_timeouts(timeout, timeout)?;
        Ok(sock)
    }

    /// Sets how long one read or one write may block.
    pub(super) fn set_timeouts(&self, read: Duration, write: Duration) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
            Sock::Unix(s) => {
                s.set_read_timeout(Some(read))?;
                s.set_write_timeout(Some(write))
            }
        }
    }

    /// Makes every handle on the socket non-blocking.
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_nonblocking(true),
            Sock::Unix(s) => s.set_nonblocking(true),
        }
    }

    /// The socket's file descriptor, to poll.
    pub(super) fn raw_fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }

    /// A second handle on the same socket.
    pub(super) fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }

    /// Ends the connection both ways; a thread blocked reading it wakes up.
    pub(super) fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A blocking socket whose reads and writes all end by one deadline: a server that sends or
/// takes a byte at a time cannot stretch a handshake past it. With a tick, every wait is cut
/// into ticks and `on_tick` runs between them (to fail requests whose time is up meanwhile).
pub(super) struct Timed<'a> {
    sock: &'a mut Sock,
    deadline: Instant,
    total: Duration,
    tick: Option<(Duration, &'a dyn Fn())>,
}

impl<'a> Timed<'a> {
    /// `sock`, with every operation ending within `total` from now.
    pub(super) fn new(sock: &'a mut Sock, total: Duration) -> Timed<'a> {
        Timed {
            sock,
            deadline: Instant::now() + total,
            total,
            tick: None,
        }
    }

    /// Calls `on_tick` at least every `tick` while waiting.
    pub(super) fn with_tick(mut self, tick: Duration, on_tick: &'a dyn Fn()) -> Timed<'a> {
        self.tick = Some((tick, on_tick));
        self
    }

    /// Gives the socket the time left (at most a tick), or fails once there is none.
    fn arm(&mut self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        let left = match self.tick {
            Some((tick, _)) => left.min(tick),
            None => left,
        };
        // A zero timeout would mean "block forever" to the kernel.
        let left = left.max(Duration::from_millis(1));
        self.sock.set_timeouts(left, left)
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "timed out: the NBD server did not complete the handshake within {:?}",
                self.total
            ),
        )
    }

    /// Runs `op` until it is done, fails, or the deadline passes; a socket timeout (EAGAIN)
    /// before the deadline is a tick.
    fn run(&mut self, mut op: impl FnMut(&mut Sock) -> io::Result<usize>) -> io::Result<usize> {
        loop {
            self.arm()?;
            match op(self.sock) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= self.deadline {
                        return Err(self.timed_out());
                    }
                    if let Some((_, on_tick)) = self.tick {
                        on_tick();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.run(|s| s.read(buf))
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.run(|s| s.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A link in the transmission phase: the socket, and the TLS session if there is one.
pub(super) struct Link {
    pub(super) sock: Sock,
    pub(super) tls: Option<ClientConnection>,
}

impl Link {
    /// Splits the link, making the socket non-blocking: the writing half, the reading half
    /// and a handle to end the connection with.
    pub(super) fn split(self) -> io::Result<(LinkWriter, LinkReader, Sock)> {
        self.sock.set_nonblocking()?;
        let read_sock = self.sock.try_clone()?;
        let kill = self.sock.try_clone()?;
        let tls = self.tls.map(|c| Arc::new(Mutex::new(c)));
        let writer = LinkWriter {
            sock: self.sock,
            tls: tls.clone(),
            backlog: Vec::new(),
            written: 0,
            since: Instant::now(),
        };
        let reader = LinkReader {
            sock: read_sock,
            tls,
            raw: Vec::new(),
        };
        Ok((writer, reader, kill))
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// The writing half of a link. Writes never block: what the socket does not take stays in the
/// backlog, in order, until [`LinkWriter::flush`] gets it out.
pub(super) struct LinkWriter {
    sock: Sock,
    tls: Option<Arc<Mutex<ClientConnection>>>,
    /// Bytes for the socket (encrypted, with TLS) that it has not taken yet; the first
    /// `written` of them are gone already.
    backlog: Vec<u8>,
    written: usize,
    /// When the socket last took bytes, or the backlog last became non-empty.
    since: Instant,
}

impl LinkWriter {
    /// Sends `parts`, in order, after whatever the backlog holds. True if everything is out;
    /// false if some of it waits in the backlog.
    pub(super) fn send(&mut self, parts: &[&[u8]]) -> io::Result<bool> {
        if self.tls.is_none() && self.is_flushed() {
            // The common case: straight from the caller's buffers to the socket.
            let mut skip = write_some(&self.sock, parts)?;
            for p in parts {
                let take = skip.min(p.len());
                skip -= take;
                self.backlog.extend_from_slice(&p[take..]);
            }
            if self.backlog.is_empty() {
                return Ok(true);
            }
            self.since = Instant::now();
            return Ok(false);
        }
        let was_empty = self.is_flushed();
        if let Some(tls) = &self.tls {
            let mut conn = tls.lock().unwrap_or_else(|e| e.into_inner());
            for p in parts {
                let mut rest = *p;
                // The session takes at most its buffer limit at a time; what it encrypts
                // goes to the backlog at once, which makes room again.
                while !rest.is_empty() {
                    let n = conn.writer().write(rest)?;
                    while conn.wants_write() {
                        conn.write_tls(&mut self.backlog)?;
                    }
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "the TLS session takes no more data",
                        ));
                    }
                    rest = &rest[n..];
                }
            }
        } else {
            for p in parts {
                self.backlog.extend_from_slice(p);
            }
        }
        if was_empty {
            self.since = Instant::now();
        }
        self.flush()
    }

    /// Writes as much of the backlog as the socket takes now; true if it is empty.
    pub(super) fn flush(&mut self) -> io::Result<bool> {
        while self.written < self.backlog.len() {
            match write_some(&self.sock, &[&self.backlog[self.written..]]) {
                Ok(0) => break,
                Ok(n) => {
                    self.written += n;
                    self.since = Instant::now();
                }
                Err(e) => return Err(e),
            }
        }
        if self.written == self.backlog.len() {
            self.backlog.clear();
            self.written = 0;
            // Give back the memory of a large backlog once it is out.
            if self.backlog.capacity() > 1 << 20 {
                self.backlog = Vec::new();
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// True if nothing waits to be written.
    pub(super) fn is_flushed(&self) -> bool {
        self.written == self.backlog.len()
    }

    /// How long the backlog has waited without the socket taking a byte (zero if empty).
    pub(super) fn stalled_for(&self) -> Duration {
        if self.is_flushed() {
            Duration::ZERO
        } else {
            self.since.elapsed()
        }
    }

    /// Sends `msg` and, over TLS, closes the session properly (close_notify); best effort.
    pub(super) fn goodbye(&mut self, msg: &[u8]) -> io::Result<()> {
        self.send(&[msg])?;
        if let Some(tls) = &self.tls {
            let mut conn = tls.lock().unwrap_or_else(|e| e.into_inner());
            conn.send_close_notify();
            while conn.wants_write() {
                conn.write_tls(&mut self.backlog)?;
            }
        }
        self.flush().map(|_| ())
    }
}

/// Writes what the non-blocking `sock` takes of `parts` now (one `writev`); 0 if it takes
/// nothing.
fn write_some(sock: &Sock, parts: &[&[u8]]) -> io::Result<usize> {
    let iov: Vec<io::IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| io::IoSlice::new(p))
        .collect();
    if iov.is_empty() {
        return Ok(0);
    }
    loop {
        let r = match sock {
            Sock::Tcp(s) => (&*s).write_vectored(&iov),
            Sock::Unix(s) => (&*s).write_vectored(&iov),
        };
        match r {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the server's socket takes no more data",
                ))
            }
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The reading half of a link. A read that finds nothing fails with `WouldBlock`; poll
/// [`LinkReader::raw_fd`] and retry.
pub(super) struct LinkReader {
    sock: Sock,
    tls: Option<Arc<Mutex<ClientConnection>>>,
    /// Encrypted bytes read from the socket (reused).
    raw: Vec<u8>,
}

impl LinkReader {
    /// The socket, to poll for readability.
    pub(super) fn raw_fd(&self) -> RawFd {
        self.sock.raw_fd()
    }
}

impl Read for LinkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.sock.read(buf);
        };
        loop {
            {
                let mut conn = tls.lock().unwrap_or_else(|e| e.into_inner());
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // Nothing decrypted is waiting: read the socket without holding the session.
            self.raw.resize(16 << 10, 0);
            let n = self.sock.read(&mut self.raw)?;
            if n == 0 {
                return Ok(0);
            }
            let mut conn = tls.lock().unwrap_or_else(|e| e.into_inner());
            let mut rest = &self.raw[..n];
            while !rest.is_empty() {
                conn.read_tls(&mut rest)?;
                conn.process_new_packets().map_err(tls_error)?;
            }
        }
    }
}

/// A TLS client session for `tls`: the server is checked against `ca-cert.pem` in the
/// certificate directory and, if `client-cert.pem` is there, it is presented with
/// `client-key.pem` (the layout QEMU uses).
pub(super) fn tls_session(tls: &NbdTls) -> io::Result<ClientConnection> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let dir = &tls.certificates;
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: {what}: {e}", dir.display()),
        )
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.join("ca-cert.pem"))
        .map_err(|e| bad("cannot read ca-cert.pem", &e))?
    {
        roots
            .add(cert.map_err(|e| bad("bad certificate in ca-cert.pem", &e))?)
            .map_err(|e| bad("unusable CA certificate", &e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_root_certificates(roots);
    let client_cert = dir.join("client-cert.pem");
    let config = if client_cert.exists() {
        let certs = CertificateDer::pem_file_iter(&client_cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad("cannot read client-cert.pem", &e))?;
        let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem"))
            .map_err(|e| bad("cannot read client-key.pem", &e))?;
        builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| bad("client certificate refused", &e))?
    } else {
        builder.with_no_client_auth()
    };
    let name = ServerName::try_from(tls.hostname.clone())
        .map_err(|e| bad(&format!("bad tls-hostname '{}'", tls.hostname), &e))?;
    ClientConnection::new(Arc::new(config), name).map_err(tls_error)
}
