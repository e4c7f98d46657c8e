//! NBD URIs (NetworkBlockDevice `doc/uri.md`): `nbd://host[:port]/export`,
//! `nbd+unix:///export?socket=PATH`, and with TLS `nbds://…?tls-certificates=DIR`.

use std::path::PathBuf;

use super::error::NbdError;

/// Where an NBD export is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddress {
    /// TCP host (name or address) and port.
    Tcp(String, u16),
    /// A unix socket path.
    Unix(PathBuf),
}

/// TLS settings of an `nbds` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdTls {
    /// Directory with `ca-cert.pem` (the server's CA) and, for a server that checks its
    /// clients, `client-cert.pem` and `client-key.pem` (the layout QEMU uses).
    pub certificates: PathBuf,
    /// The name the server's certificate must carry.
    pub hostname: String,
}

/// A parsed NBD URI (NetworkBlockDevice `doc/uri.md`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// The server.
    pub address: NbdAddress,
    /// The export name (empty: the server's default export).
    pub export: String,
    /// TLS, required by the `nbds` schemes.
    pub tls: Option<NbdTls>,
}

fn bad_uri(uri: &str, why: &str) -> NbdError {
    NbdError::Uri {
        uri: uri.into(),
        reason: why.into(),
    }
}

/// The query keys a URI may have.
const KEYS: [&str; 3] = ["socket", "tls-certificates", "tls-hostname"];

impl NbdUri {
    /// Parses `nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH`.
    pub fn parse(uri: &str) -> Result<NbdUri, NbdError> {
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| bad_uri(uri, "no scheme"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path))
            .ok_or_else(|| bad_uri(uri, "bad %-escape in the export name"))?;
        // A key we do not know is a typo or an option we do not have: never ignored.
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let key = kv.split_once('=').map_or(kv, |(k, _)| k);
            if !KEYS.contains(&key) {
                return Err(bad_uri(
                    uri,
                    &format!("unknown query key '{key}' (known: {})", KEYS.join(", ")),
                ));
            }
        }
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        };
        let (base, tls) = match scheme.split_once('+') {
            Some((b, rest)) => (b, Some(rest)),
            None => (scheme, None),
        };
        let unix = match tls {
            None => false,
            Some("unix") => true,
            Some(_) => return Err(bad_uri(uri, "unknown scheme")),
        };
        let secure = match base {
            "nbd" => false,
            "nbds" => true,
            _ => return Err(bad_uri(uri, "unknown scheme")),
        };
        let address = match unix {
            false => {
                // [v6-address]:port, host:port, or either without a port.
                let (host, port) = match authority.strip_prefix('[') {
                    Some(r) => {
                        let (h, after) = r
                            .split_once(']')
                            .ok_or_else(|| bad_uri(uri, "unclosed '['"))?;
                        (h, after.strip_prefix(':'))
                    }
                    None => match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    },
                };
                let port = match port {
                    Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p
                        .parse::<u16>()
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| bad_uri(uri, "the port is out of range (1 to 65535)"))?,
                    Some(_) => return Err(bad_uri(uri, "the port is not a number")),
                    None => 10809,
                };
                if host.is_empty() {
                    return Err(bad_uri(uri, "no host"));
                }
                NbdAddress::Tcp(host.to_string(), port)
            }
            true => {
                let socket = param("socket")
                    .and_then(percent_decode)
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| bad_uri(uri, "nbd+unix needs ?socket=PATH"))?;
                NbdAddress::Unix(PathBuf::from(socket))
            }
        };
        let tls = if secure {
            let certificates = param("tls-certificates")
                .and_then(percent_decode)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    bad_uri(uri, "nbds needs ?tls-certificates=DIR (with ca-cert.pem)")
                })?;
            let hostname = match (param("tls-hostname").and_then(percent_decode), &address) {
                (Some(h), _) if !h.is_empty() => h,
                (_, NbdAddress::Tcp(h, _)) => h.clone(),
                (_, NbdAddress::Unix(_)) => "localhost".into(),
            };
            Some(NbdTls {
                certificates: PathBuf::from(certificates),
                hostname,
            })
        } else {
            None
        };
        Ok(NbdUri {
            address,
            export,
            tls,
        })
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        let u = NbdUri::parse("nbd://storage.example:10810/volume1").unwrap();
        assert_eq!(u.address, NbdAddress::Tcp("storage.example".into(), 10810));
        assert_eq!(u.export, "volume1");
        let u = NbdUri::parse("nbd://127.0.0.1").unwrap();
        assert_eq!(u.address, NbdAddress::Tcp("127.0.0.1".into(), 10809));
        assert_eq!(u.export, "");
        let u = NbdUri::parse("nbd://[::1]/x").unwrap();
        assert_eq!(u.address, NbdAddress::Tcp("::1".into(), 10809));
        let u = NbdUri::parse("nbd://[::1]:99/a%20b").unwrap();
        assert_eq!(u.address, NbdAddress::Tcp("::1".into(), 99));
        assert_eq!(u.export, "a b");
        let u = NbdUri::parse("nbd+unix:///volume1?socket=/run/nbd.sock").unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/run/nbd.sock".into()));
        assert_eq!(u.export, "volume1");
        for bad in [
            "volume1",
            "http://x/y",
            "nbd+unix:///v",
            "nbd://:10809/v",
            "nbd://h:port/v",
            "nbd://h/%zz",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(NbdUri::parse("nbds://h/v")
            .unwrap_err()
            .to_string()
            .contains("tls-certificates"));
        let e = |u: &str| NbdUri::parse(u).unwrap_err().to_string();
        assert!(
            e("nbd://h:99999/x").contains("out of range"),
            "{}",
            e("nbd://h:99999/x")
        );
        assert!(e("nbd://h:0/x").contains("out of range"));
        assert!(e("nbd://h:12ab/x").contains("not a number"));
        assert!(e("nbd+unix:///x?socket=/s&sokcet=/t").contains("unknown query key 'sokcet'"));
        assert!(e("nbd://h/x?timeout=5").contains("unknown query key 'timeout'"));
        let u = NbdUri::parse("nbds://h.example/v?tls-certificates=/etc/pki").unwrap();
        let tls = u.tls.unwrap();
        assert_eq!(tls.certificates, PathBuf::from("/etc/pki"));
        assert_eq!(tls.hostname, "h.example");
        let u =
            NbdUri::parse("nbds+unix:///v?socket=/s&tls-certificates=/p&tls-hostname=srv").unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/s".into()));
        assert_eq!(u.tls.unwrap().hostname, "srv");
        assert!(NbdUri::parse("nbd+tcp://h/v").is_err());
    }
}
