//! NBD transmission-phase messages (NetworkBlockDevice `doc/proto.md`, and its
//! `extension-ext-header` branch for extended headers): request headers, reply headers, and
//! the server's error codes.

use std::io;

pub(super) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(super) const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub(super) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(super) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub(super) const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

pub(super) const TF_READ_ONLY: u16 = 0x2;
pub(super) const TF_SEND_FLUSH: u16 = 0x4;
pub(super) const TF_SEND_TRIM: u16 = 0x20;
pub(super) const TF_SEND_WRITE_ZEROES: u16 = 0x40;
pub(super) const TF_CAN_MULTI_CONN: u16 = 0x100;

pub(super) const CMD_READ: u16 = 0;
pub(super) const CMD_WRITE: u16 = 1;
pub(super) const CMD_DISC: u16 = 2;
pub(super) const CMD_FLUSH: u16 = 3;
pub(super) const CMD_TRIM: u16 = 4;
pub(super) const CMD_WRITE_ZEROES: u16 = 6;
pub(super) const CMD_FLAG_NO_HOLE: u16 = 0x2;
const CMD_FLAG_PAYLOAD_LEN: u16 = 0x20;

pub(super) const REPLY_FLAG_DONE: u16 = 0x1;
pub(super) const CHUNK_NONE: u16 = 0;
pub(super) const CHUNK_OFFSET_DATA: u16 = 1;
pub(super) const CHUNK_OFFSET_HOLE: u16 = 2;
pub(super) const CHUNK_ERROR: u16 = 0x8001;
pub(super) const CHUNK_ERROR_OFFSET: u16 = 0x8002;
/// Largest chunk other than read data we accept (an error message is at most 4 KiB).
pub(super) const MAX_CHUNK: u64 = 8 << 10;

/// Largest payload we send or accept in one request (the protocol's default maximum).
pub(super) const MAX_PAYLOAD: u32 = 32 << 20;

/// How replies look on a connection, as negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Replies {
    /// Simple replies only (an old server).
    Simple,
    /// Structured replies (`NBD_OPT_STRUCTURED_REPLY`).
    Structured,
    /// Extended headers (`NBD_OPT_EXTENDED_HEADERS`): 32-byte requests and replies.
    Extended,
}

/// A request header, ready to send: the bytes and how many of them are used.
pub(super) fn request_header(
    replies: Replies,
    cmd: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> ([u8; 32], usize) {
    let mut h = [0u8; 32];
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    if replies == Replies::Extended {
        let flags = if cmd == CMD_WRITE {
            flags | CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        h[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[24..32].copy_from_slice(&u64::from(len).to_be_bytes());
        (h, 32)
    } else {
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        (h, 28)
    }
}

/// The header of one reply message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReplyHeader {
    /// A simple reply: the error code (0: success). A successful read's data follows.
    Simple { cookie: u64, error: u32 },
    /// One chunk of a structured or extended reply; `len` bytes of payload follow.
    Chunk {
        cookie: u64,
        flags: u16,
        kind: u16,
        /// The request's offset, echoed by extended replies.
        offset: Option<u64>,
        len: u64,
    },
}

/// Parses one reply header from the start of `b`, refusing what the negotiated mode does not
/// allow: the header and its length, or `None` if `b` does not hold all of it yet.
pub(super) fn parse_reply_header(
    b: &[u8],
    replies: Replies,
) -> io::Result<Option<(ReplyHeader, usize)>> {
    if b.len() < 4 {
        return Ok(None);
    }
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let need = match (magic, replies) {
        (SIMPLE_REPLY_MAGIC, Replies::Simple | Replies::Structured) => 16,
        (STRUCTURED_REPLY_MAGIC, Replies::Structured) => 20,
        (EXTENDED_REPLY_MAGIC, Replies::Extended) => 32,
        _ => {
            return Err(proto(format!(
                "unexpected reply magic {magic:#x} ({replies:?} replies negotiated)"
            )))
        }
    };
    if b.len() < need {
        return Ok(None);
    }
    let be16 = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or_default());
    let h = match need {
        16 => ReplyHeader::Simple {
            error: be32(4),
            cookie: be64(8),
        },
        20 => ReplyHeader::Chunk {
            flags: be16(4),
            kind: be16(6),
            cookie: be64(8),
            offset: None,
            len: u64::from(be32(16)),
        },
        _ => ReplyHeader::Chunk {
            flags: be16(4),
            kind: be16(6),
            cookie: be64(8),
            offset: Some(be64(16)),
            len: be64(24),
        },
    };
    Ok(Some((h, need)))
}

/// The server broke the protocol.
pub(super) fn proto(what: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("NBD server: {}", what.into()),
    )
}

/// Longest part of a server's message we repeat in our own errors and logs.
const MAX_MESSAGE: usize = 200;

/// A server's text made safe to log: invalid UTF-8 replaced, control characters escaped, and
/// cut after about [`MAX_MESSAGE`] bytes of output.
pub(super) fn printable(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for c in text.chars() {
        if out.len() >= MAX_MESSAGE {
            out.push_str(&format!("… ({} bytes in all)", bytes.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A server error as an I/O error the device reports (IOERR), named for the log, with the
/// server's own message (made printable) if it sent one.
pub(super) fn server_error(code: u32, message: &[u8]) -> io::Error {
    let message = printable(message);
    let what = match code {
        1 => "operation not permitted (EPERM)",
        5 => "input/output error (EIO)",
        12 => "out of memory (ENOMEM)",
        22 => "invalid request (EINVAL)",
        28 => "no space left (ENOSPC)",
        75 => "value too large (EOVERFLOW)",
        95 => "not supported (ENOTSUP)",
        108 => "server shutting down (ESHUTDOWN)",
        _ => "unknown error",
    };
    let sep = if message.is_empty() { "" } else { ": " };
    let e = io::Error::other(format!("NBD server: {what}, code {code}{sep}{message}"));
    tracing::warn!("{e}");
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_encode_and_decode() {
        let (h, n) = request_header(Replies::Structured, CMD_WRITE, 0, 7, 4096, 512);
        assert_eq!(n, 28);
        assert_eq!(&h[0..4], &REQUEST_MAGIC.to_be_bytes());
        assert_eq!(&h[24..28], &512u32.to_be_bytes());
        let (h, n) = request_header(Replies::Extended, CMD_WRITE, 0, 7, 4096, 512);
        assert_eq!(n, 32);
        assert_eq!(
            &h[4..6],
            &0x20u16.to_be_bytes(),
            "a write carries PAYLOAD_LEN"
        );
        assert_eq!(&h[24..32], &512u64.to_be_bytes());

        let mut m = EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&CHUNK_OFFSET_DATA.to_be_bytes());
        m.extend_from_slice(&9u64.to_be_bytes());
        m.extend_from_slice(&4096u64.to_be_bytes());
        m.extend_from_slice(&520u64.to_be_bytes());
        let (h, n) = parse_reply_header(&m, Replies::Extended).unwrap().unwrap();
        assert_eq!(n, 32);
        assert!(parse_reply_header(&m[..31], Replies::Extended)
            .unwrap()
            .is_none());
        assert_eq!(
            h,
            ReplyHeader::Chunk {
                cookie: 9,
                flags: 1,
                kind: CHUNK_OFFSET_DATA,
                offset: Some(4096),
                len: 520
            }
        );
        // Each mode refuses the others' replies.
        assert!(parse_reply_header(&m, Replies::Structured).is_err());
        let mut s = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        s.extend_from_slice(&[0; 12]);
        assert!(parse_reply_header(&s, Replies::Extended).is_err());
        assert!(parse_reply_header(&s, Replies::Simple).unwrap().is_some());
    }

    #[test]
    fn server_text_is_escaped_and_cut() {
        assert_eq!(printable(b"no such export"), "no such export");
        let p = printable(b"bad\x1b[2J\r\nline\0");
        assert!(!p.chars().any(char::is_control), "{p:?}");
        assert!(p.contains("\\u{1b}") && p.contains("\\r\\n"), "{p:?}");
        let long = vec![b'a'; 60_000];
        let p = printable(&long);
        assert!(
            p.len() < 300 && p.ends_with("(60000 bytes in all)"),
            "{}",
            p.len()
        );
        assert!(printable(&[0xff, 0xfe]).contains('\u{fffd}'));
        let e = server_error(5, b"disk \x07 gone").to_string();
        assert!(e.contains("EIO") && !e.chars().any(char::is_control), "{e}");
    }
}
