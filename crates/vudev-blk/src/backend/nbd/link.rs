//! The byte stream to an NBD server: a TCP or unix socket, with TLS on top when the URI asks
//! for it. After the handshake a link is split into a writing half (used by the queue threads
//! that send requests) and a reading half (used by the connection's reply thread), so that
//! requests go out while replies come in.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// A link in the transmission phase: the socket, and the TLS session if there is one.
pub(super) struct Link {
    pub(super) sock: Sock,
    pub(super) tls: Option<ClientConnection>,
}

impl Link {
    /// Splits the link. Reads on the reading half block for at most `tick`, so that its
    /// thread can look at the clock; writes block for at most `write_timeout`.
    pub(super) fn split(
        self,
        tick: Duration,
        write_timeout: Duration,
    ) -> io::Result<(LinkWriter, LinkReader, Sock)> {
        self.sock.set_timeouts(tick, write_timeout)?;
        let read_sock = self.sock.try_clone()?;
        let kill = self.sock.try_clone()?;
        let tls = self.tls.map(|c| Arc::new(Mutex::new(c)));
        let writer = LinkWriter {
            sock: self.sock,
            tls: tls.clone(),
            sealed: Vec::new(),
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

/// The writing half of a link.
pub(super) struct LinkWriter {
    sock: Sock,
    tls: Option<Arc<Mutex<ClientConnection>>>,
    /// Encrypted bytes on their way out (reused).
    sealed: Vec<u8>,
}

impl LinkWriter {
    /// Sends `msg` whole.
    pub(super) fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        let Some(tls) = &self.tls else {
            return self.sock.write_all(msg);
        };
        // Encrypt under the session lock, write to the socket without it: the reading half
        // needs the session to decrypt replies, and must never wait for a blocked write. The
        // session takes at most its buffer limit (64 KiB) at a time.
        let mut rest = msg;
        while !rest.is_empty() {
            self.sealed.clear();
            let taken = {
                let mut conn = tls.lock().unwrap_or_else(|e| e.into_inner());
                let n = conn.writer().write(rest)?;
                while conn.wants_write() {
                    conn.write_tls(&mut self.sealed)?;
                }
                n
            };
            self.sock.write_all(&self.sealed)?;
            if taken == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the TLS session takes no more data",
                ));
            }
            rest = &rest[taken..];
        }
        Ok(())
    }
}

impl LinkWriter {
    /// Sends `msg` and, over TLS, closes the session properly (close_notify).
    pub(super) fn goodbye(&mut self, msg: &[u8]) -> io::Result<()> {
        self.send(msg)?;
        let Some(tls) = &self.tls else { return Ok(()) };
        self.sealed.clear();
        {
            let mut conn = tls.lock().unwrap_or_else(|e| e.into_inner());
            conn.send_close_notify();
            while conn.wants_write() {
                conn.write_tls(&mut self.sealed)?;
            }
        }
        self.sock.write_all(&self.sealed)
    }
}

/// The reading half of a link. A read that finds nothing within the tick fails with
/// `WouldBlock` or `TimedOut` and can be retried.
pub(super) struct LinkReader {
    sock: Sock,
    tls: Option<Arc<Mutex<ClientConnection>>>,
    /// Encrypted bytes read from the socket (reused).
    raw: Vec<u8>,
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
