//! The byte stream to an NBD server: a TCP or unix socket, with TLS on top when the URI asks
//! for it. The handshake runs on a blocking socket with one deadline ([`Timed`]); after it the
//! link is non-blocking, and whoever drives the connection sends and receives what the socket
//! allows at that moment.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
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
/// takes a byte at a time cannot stretch a handshake past it.
pub(super) struct Timed<'a> {
    sock: &'a mut Sock,
    deadline: Instant,
    total: Duration,
}

impl<'a> Timed<'a> {
    /// `sock`, with every operation ending within `total` from now.
    pub(super) fn new(sock: &'a mut Sock, total: Duration) -> Timed<'a> {
        Timed {
            sock,
            deadline: Instant::now() + total,
            total,
        }
    }

    /// Gives the socket the time left, or fails once there is none.
    fn arm(&mut self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
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

    /// Runs `op` until it is done, fails, or the deadline passes.
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

/// Socket reads one [`Link::receive`] makes at most over TLS.
const TLS_READS: usize = 4;

/// A link in the transmission phase: the socket, and the TLS session if there is one. Once
/// [`Link::go_live`] made it non-blocking, nothing on it waits: [`Link::send`] and
/// [`Link::receive`] take and give what the socket allows now.
pub(super) struct Link {
    pub(super) sock: Sock,
    pub(super) tls: Option<ClientConnection>,
    /// Encrypted bytes the socket has not taken yet (TLS only); the first `sealed_at` of them
    /// are gone already.
    sealed: Vec<u8>,
    sealed_at: usize,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the server closed the connection",
    )
}

impl Link {
    /// A link on `sock`, in TLS session `tls` if there is one.
    pub(super) fn new(sock: Sock, tls: Option<ClientConnection>) -> Link {
        Link {
            sock,
            tls,
            sealed: Vec::new(),
            sealed_at: 0,
        }
    }

    /// Makes the socket non-blocking, for the transmission phase.
    pub(super) fn go_live(self) -> io::Result<Link> {
        self.sock.set_nonblocking()?;
        Ok(self)
    }

    /// The socket, to poll.
    pub(super) fn raw_fd(&self) -> RawFd {
        self.sock.raw_fd()
    }

    /// Sends what the socket takes of `data` now; returns how many bytes of it are taken
    /// (with TLS: sealed into the session, whose bytes then go out as the socket allows).
    pub(super) fn send(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.tls.is_none() {
            return write_some(&self.sock, data);
        }
        self.flush_sealed()?;
        if self.sealed_at < self.sealed.len() {
            return Ok(0);
        }
        let Some(conn) = self.tls.as_mut() else {
            return Ok(0);
        };
        // The session takes at most its buffer limit at a time.
        let n = conn.writer().write(data)?;
        while conn.wants_write() {
            conn.write_tls(&mut self.sealed)?;
        }
        self.flush_sealed()?;
        Ok(n)
    }

    /// True if sealed bytes still wait for the socket.
    pub(super) fn backlogged(&self) -> bool {
        self.sealed_at < self.sealed.len() || self.tls.as_ref().is_some_and(|c| c.wants_write())
    }

    /// Writes what the socket takes of the sealed bytes (and of what the session itself
    /// wants to send: a key update's answer, an alert).
    pub(super) fn flush_sealed(&mut self) -> io::Result<()> {
        if let Some(conn) = self.tls.as_mut() {
            while conn.wants_write() {
                conn.write_tls(&mut self.sealed)?;
            }
        }
        while self.sealed_at < self.sealed.len() {
            match write_some(&self.sock, &self.sealed[self.sealed_at..])? {
                0 => return Ok(()),
                n => self.sealed_at += n,
            }
        }
        self.sealed.clear();
        self.sealed_at = 0;
        Ok(())
    }

    /// Reads what is there into `buf`: 0 if nothing is (never blocks); an error once the
    /// server has closed the connection. With TLS, at most [`TLS_READS`] socket reads of a
    /// few KiB each, whatever the server sends (records without data included): what is
    /// left waits in the socket, which stays readable.
    pub(super) fn receive(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Link { sock, tls, .. } = self;
        let Some(conn) = tls.as_mut() else {
            return read_some(sock, buf);
        };
        for round in 0..=TLS_READS {
            match conn.reader().read(buf) {
                Ok(0) if !buf.is_empty() => return Err(closed()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if round == TLS_READS {
                break;
            }
            // rustls reads straight from the socket, about 4 KiB a call, and only while
            // its plaintext buffer has room: decrypted data is taken before it reads more.
            match conn.read_tls(sock) {
                // A session that has seen close_notify takes nothing more.
                Ok(0) => return Err(closed()),
                Ok(_) => {
                    conn.process_new_packets().map_err(tls_error)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(0)
    }

    /// True if the TLS session holds decrypted data not read yet (the socket may not be
    /// readable for it).
    pub(super) fn buffered(&mut self) -> bool {
        self.tls.as_mut().is_some_and(|c| {
            c.process_new_packets()
                .is_ok_and(|s| s.plaintext_bytes_to_read() > 0)
        })
    }

    /// Reads what is there into `iov`, in order (no TLS: its records must be opened first):
    /// 0 if nothing is, an error once the server has closed the connection.
    ///
    /// Every iovec must be memory that may be written for the call; the caller says why
    /// where it makes them.
    pub(super) fn receive_vectored(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        debug_assert!(self.tls.is_none());
        loop {
            // SAFETY: `iov` is a valid array of iovecs over writable memory (see above), for
            // the duration of the call; the socket is ours.
            let r =
                unsafe { libc::readv(self.sock.raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
            if r > 0 {
                return Ok(r as usize);
            }
            if r == 0 {
                return Err(closed());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }

    /// Sends `msg` and, over TLS, closes the session properly (close_notify); best effort,
    /// never waiting.
    pub(super) fn goodbye(&mut self, msg: &[u8]) {
        let _ = self.send(msg);
        if let Some(conn) = self.tls.as_mut() {
            conn.send_close_notify();
            while conn.wants_write() {
                if conn.write_tls(&mut self.sealed).is_err() {
                    break;
                }
            }
            let _ = self.flush_sealed();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.sock.shutdown();
    }
}

/// Writes what the non-blocking `sock` takes of `data` now; 0 if it takes nothing.
fn write_some(sock: &Sock, data: &[u8]) -> io::Result<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    loop {
        let r = match sock {
            Sock::Tcp(s) => (&*s).write(data),
            Sock::Unix(s) => (&*s).write(data),
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

/// Reads what the non-blocking `sock` has into `buf`; 0 if nothing is there, an error if
/// the server closed the connection.
fn read_some(sock: &Sock, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let r = match sock {
            Sock::Tcp(s) => (&*s).read(buf),
            Sock::Unix(s) => (&*s).read(buf),
        };
        match r {
            Ok(0) if !buf.is_empty() => return Err(closed()),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
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
