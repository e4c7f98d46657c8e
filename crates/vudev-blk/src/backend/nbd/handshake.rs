//! The NBD handshake (fixed newstyle): optional STARTTLS, then extended headers or structured
//! replies if the server has them, then `NBD_OPT_GO` asking for the export's size, flags and
//! block-size limits.

use std::io::{self, Read, Write};
use std::time::Duration;

use super::link::{tls_session, Link, Sock, Timed};
use super::uri::NbdUri;
use super::wire::{printable, proto, Replies, MAX_PAYLOAD};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_EXTENDED_HEADERS: u32 = 11;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

/// The smallest maximum payload we accept: one sector.
const MIN_PAYLOAD: u32 = 512;
/// Largest option reply we read during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Most replies we take to one option before calling the server broken (a server streaming
/// replies forever must not hold a queue forever).
const MAX_OPTION_REPLIES: usize = 64;

/// What the server told us about the export.
#[derive(Clone, Copy, Debug)]
pub(super) struct ExportInfo {
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) min_block: u32,
    pub(super) max_payload: u32,
}

/// A connection ready for the transmission phase.
pub(super) struct Negotiated {
    pub(super) link: Link,
    pub(super) info: ExportInfo,
    pub(super) replies: Replies,
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

fn send_option(stream: &mut dyn Stream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    stream.write_all(&m)?;
    stream.flush()
}

/// Reads one reply to `option`: its type and data.
fn option_reply(stream: &mut dyn Stream, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    stream.read_exact(&mut h)?;
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
    if magic != OPT_REPLY_MAGIC || opt != option || len > MAX_OPTION_REPLY {
        return Err(proto("malformed option reply"));
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data)?;
    Ok((kind, data))
}

/// Asks for an option that takes no data: true if the server acknowledged it, false if it
/// answered with an error (it does not have it).
fn ask(stream: &mut dyn Stream, option: u32, name: &str) -> io::Result<bool> {
    send_option(stream, option, &[])?;
    match option_reply(stream, option)? {
        (REP_ACK, _) => Ok(true),
        (kind, _) if kind & 0x8000_0000 != 0 => Ok(false),
        _ => Err(proto(format!("unexpected reply to {name}"))),
    }
}

/// Connects to the server of `uri` and negotiates; the whole handshake ends within `timeout`.
pub(super) fn connect(uri: &NbdUri, timeout: Duration) -> io::Result<Negotiated> {
    let mut sock = Sock::connect(&uri.address, timeout)?;
    let mut stream = Timed::new(&mut sock, timeout);
    let tls = greet(&mut stream, uri)?;
    let (tls, replies, info) = match tls {
        Some(mut conn) => {
            let (replies, info) = negotiate(&mut rustls::Stream::new(&mut conn, &mut stream), uri)?;
            (Some(conn), replies, info)
        }
        None => {
            let (replies, info) = negotiate(&mut stream, uri)?;
            (None, replies, info)
        }
    };
    Ok(Negotiated {
        link: Link::new(sock, tls),
        info,
        replies,
    })
}

/// The greeting, and STARTTLS if the URI asks for TLS: the TLS session to go on in.
fn greet(sock: &mut Timed<'_>, uri: &NbdUri) -> io::Result<Option<rustls::ClientConnection>> {
    let mut hello = [0u8; 18];
    sock.read_exact(&mut hello)?;
    let magic = u64::from_be_bytes(hello[0..8].try_into().unwrap_or_default());
    let opt = u64::from_be_bytes(hello[8..16].try_into().unwrap_or_default());
    let hflags = u16::from_be_bytes([hello[16], hello[17]]);
    if magic != NBDMAGIC || opt != IHAVEOPT {
        return Err(proto("not an NBD newstyle server"));
    }
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto("the server does not speak fixed newstyle"));
    }
    let cflags = u32::from(hflags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    sock.write_all(&cflags.to_be_bytes())?;
    let Some(t) = &uri.tls else { return Ok(None) };
    // STARTTLS first: the server forgets whatever was negotiated before it.
    send_option(sock, OPT_STARTTLS, &[])?;
    match option_reply(sock, OPT_STARTTLS)? {
        (REP_ACK, _) => {}
        (kind, msg) => {
            return Err(io::Error::other(format!(
                "NBD server refused TLS (reply {kind:#x}): {}",
                printable(&msg)
            )))
        }
    }
    Ok(Some(tls_session(t)?))
}

/// The options after STARTTLS: the reply style, then the export.
fn negotiate(stream: &mut dyn Stream, uri: &NbdUri) -> io::Result<(Replies, ExportInfo)> {
    // Extended headers take precedence over structured replies (a server that has them may
    // refuse structured replies once they are on), so they are asked for first.
    let replies = if ask(stream, OPT_EXTENDED_HEADERS, "NBD_OPT_EXTENDED_HEADERS")? {
        Replies::Extended
    } else if ask(stream, OPT_STRUCTURED_REPLY, "NBD_OPT_STRUCTURED_REPLY")? {
        Replies::Structured
    } else {
        Replies::Simple
    };
    // NBD_OPT_GO: the export name, and the information we want back.
    let name = uri.export.as_bytes();
    let mut go = Vec::with_capacity(10 + name.len());
    go.extend_from_slice(&(name.len() as u32).to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&2u16.to_be_bytes());
    go.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(stream, OPT_GO, &go)?;
    let mut export = None;
    let mut max_payload = MAX_PAYLOAD;
    let mut min_block = 1;
    for replies in 1.. {
        if replies > MAX_OPTION_REPLIES {
            return Err(proto("too many replies to NBD_OPT_GO"));
        }
        let (kind, data) = option_reply(stream, OPT_GO)?;
        if kind & 0x8000_0000 != 0 {
            let msg = printable(&data);
            let hint = match kind {
                0x8000_0005 => " (the server requires TLS: use nbds:// or nbds+unix://)",
                0x8000_0006 => " (no such export: check the export name)",
                _ => "",
            };
            return Err(io::Error::other(format!(
                "NBD server refused export '{}' (error {kind:#x}){}{msg}{hint}",
                uri.export,
                if msg.is_empty() { "" } else { ": " }
            )));
        }
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => {
                let info = u16::from_be_bytes([data[0], data[1]]);
                match (info, data.len()) {
                    (INFO_EXPORT, 12) => {
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                        let flags = u16::from_be_bytes([data[10], data[11]]);
                        export = Some((size, flags));
                    }
                    (INFO_BLOCK_SIZE, 14) => {
                        min_block =
                            u32::from_be_bytes(data[2..6].try_into().unwrap_or_default()).max(1);
                        let max = u32::from_be_bytes(data[10..14].try_into().unwrap_or_default());
                        // Never above our own bound (0xffffffff: no limit of its own).
                        if max < MIN_PAYLOAD {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!(
                                    "NBD server: its maximum payload ({max} bytes) is below one \
                                     {MIN_PAYLOAD}-byte sector: it cannot serve a disk"
                                ),
                            ));
                        }
                        max_payload = max.min(MAX_PAYLOAD);
                    }
                    _ => {} // information we did not ask for or do not use
                }
            }
            _ => {} // unknown reply types before the ACK are ignored, as the spec allows
        }
    }
    let (size, flags) = export.ok_or_else(|| proto("no export size in the reply to NBD_OPT_GO"))?;
    let info = ExportInfo {
        size,
        flags,
        min_block,
        max_payload,
    };
    tracing::debug!(?replies, ?info, "NBD export negotiated");
    Ok((replies, info))
}
