//! Parsing and validating one virtio-blk request from a descriptor chain.
//!
//! Layout (virtio 1.2, 5.2.6): a 16-byte header in driver-readable buffers, then data
//! (readable for writes, writable for reads), then a 1-byte status at the very end of the
//! last writable buffer. Everything here is checked; nothing the driver wrote is trusted.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;

use vudev_core::memory::read_bytes;
use vudev_core::Memory;

/// Request types this device knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// VIRTIO_BLK_T_IN
    Read,
    /// VIRTIO_BLK_T_OUT
    Write,
    /// VIRTIO_BLK_T_FLUSH
    Flush,
    /// VIRTIO_BLK_T_GET_ID
    GetId,
    /// VIRTIO_BLK_T_DISCARD
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES
    WriteZeroes,
    /// Anything else: answered UNSUPP.
    Other(u32),
}

impl Kind {
    fn from_raw(t: u32) -> Kind {
        match t {
            VIRTIO_BLK_T_IN => Kind::Read,
            VIRTIO_BLK_T_OUT => Kind::Write,
            VIRTIO_BLK_T_FLUSH => Kind::Flush,
            VIRTIO_BLK_T_GET_ID => Kind::GetId,
            VIRTIO_BLK_T_DISCARD => Kind::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Kind::WriteZeroes,
            t => Kind::Other(t),
        }
    }
}

/// A request whose shape is valid. Data segments are `(address, length)` pairs.
#[derive(Debug, Default)]
pub struct Request {
    /// Request type (None until parsed).
    pub kind: Option<Kind>,
    /// Starting sector (512-byte units).
    pub sector: u64,
    /// Where the status byte goes.
    pub status: u64,
    /// Data segments in order: readable ones for writes/discards, writable ones for reads.
    pub data: Vec<(u64, u32)>,
    /// Total data length.
    pub data_len: u64,
}

/// Why a chain is not a valid request.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// No writable status byte: the request cannot even be failed properly.
    NoStatus,
    /// Malformed; the status byte at `status` should get IOERR.
    Malformed {
        /// Status byte address.
        status: u64,
        /// What was wrong.
        why: &'static str,
    },
}

const HEADER_LEN: u64 = 16;

impl Request {
    /// Parses `descs` into `self` (reusing its buffers).
    pub fn parse(&mut self, mem: &Memory, descs: &[Descriptor]) -> Result<(), ParseError> {
        self.kind = None;
        self.data.clear();
        self.data_len = 0;
        let last = descs.last().ok_or(ParseError::NoStatus)?;
        if !last.is_write_only() || last.len() == 0 {
            return Err(ParseError::NoStatus);
        }
        // The status byte is the last byte of the last buffer; an address that wraps has none.
        self.status = last
            .addr()
            .0
            .checked_add(u64::from(last.len()) - 1)
            .ok_or(ParseError::NoStatus)?;
        let status = self.status;
        let bad = |why| ParseError::Malformed { status, why };

        let first_writable = descs
            .iter()
            .position(|d| d.is_write_only())
            .unwrap_or(descs.len());
        if descs[first_writable..].iter().any(|d| !d.is_write_only()) {
            return Err(bad("a readable buffer follows a writable one"));
        }
        let (readable, writable) = descs.split_at(first_writable);

        // Header: the first 16 readable bytes, possibly spread over several buffers; the
        // readable bytes after it go to `self.data` (reused, no allocation once warm).
        let mut header = [0u8; HEADER_LEN as usize];
        let mut got = 0usize;
        for d in readable {
            let (addr, len) = (d.addr().0, u64::from(d.len()));
            let take = (HEADER_LEN as usize - got).min(len as usize);
            if take > 0 {
                if !read_bytes(mem, addr, &mut header[got..got + take]) {
                    return Err(bad("request header is outside driver memory"));
                }
                got += take;
            }
            if (take as u64) < len {
                // `addr + take` was just read, so it does not wrap.
                self.data
                    .push((addr + take as u64, (len - take as u64) as u32));
            }
        }
        if got < HEADER_LEN as usize {
            return Err(bad("request header shorter than 16 bytes"));
        }
        let kind = Kind::from_raw(u32::from_le_bytes(header[0..4].try_into().unwrap()));
        self.sector = u64::from_le_bytes(header[8..16].try_into().unwrap());

        // Writable data is every writable byte but the final status byte.
        let writable_bytes: u64 = writable.iter().map(|d| u64::from(d.len())).sum();
        match kind {
            Kind::Read | Kind::GetId => {
                if !self.data.is_empty() {
                    return Err(bad("data buffers point the wrong way for the request type"));
                }
                for (i, d) in writable.iter().enumerate() {
                    let len = d.len() - u32::from(i + 1 == writable.len());
                    if len > 0 {
                        self.data.push((d.addr().0, len));
                    }
                }
            }
            Kind::Write | Kind::Discard | Kind::WriteZeroes => {
                if writable_bytes != 1 {
                    return Err(bad("data buffers point the wrong way for the request type"));
                }
            }
            Kind::Flush | Kind::Other(_) => self.data.clear(),
        }
        self.data_len = self.data.iter().map(|&(_, l)| u64::from(l)).sum();
        self.kind = Some(kind);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, write: bool) -> Descriptor {
        Descriptor::new(
            addr,
            len,
            if write { VRING_DESC_F_WRITE as u16 } else { 0 },
            0,
        )
    }

    fn header(m: &Memory, at: u64, t: u32, sector: u64) {
        m.write_obj(t, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    #[test]
    fn parses_a_read() {
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_IN, 8);
        let mut r = Request::default();
        r.parse(
            &m,
            &[
                desc(0x100, 16, false),
                desc(0x1000, 4096, true),
                desc(0x200, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, Some(Kind::Read));
        assert_eq!(r.sector, 8);
        assert_eq!(r.status, 0x200);
        assert_eq!(r.data, vec![(0x1000, 4096)]);
    }

    #[test]
    fn header_may_be_split_and_status_may_share_a_buffer() {
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_OUT, 3);
        let mut r = Request::default();
        // Header split 10 + (6 + data 512) and status as the last byte of a 4097-byte buffer
        // would be a read; for a write the writable part must be only the status.
        r.parse(
            &m,
            &[
                desc(0x100, 10, false),
                desc(0x10a, 6 + 512, false),
                desc(0x300, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, Some(Kind::Write));
        assert_eq!(r.sector, 3);
        assert_eq!(r.data, vec![(0x110, 512)]);
        header(&m, 0x100, VIRTIO_BLK_T_IN, 0);
        r.parse(&m, &[desc(0x100, 16, false), desc(0x1000, 513, true)])
            .unwrap();
        assert_eq!(r.data, vec![(0x1000, 512)]);
        assert_eq!(r.status, 0x1200);
    }

    #[test]
    fn rejects_malformed_chains() {
        let m = mem();
        header(&m, 0x100, VIRTIO_BLK_T_IN, 0);
        let mut r = Request::default();
        assert_eq!(r.parse(&m, &[]), Err(ParseError::NoStatus));
        assert_eq!(
            r.parse(&m, &[desc(0x100, 16, false)]),
            Err(ParseError::NoStatus)
        );
        assert_eq!(
            r.parse(&m, &[desc(0x100, 16, false), desc(0x200, 0, true)]),
            Err(ParseError::NoStatus)
        );
        assert!(matches!(
            r.parse(&m, &[desc(0x100, 8, false), desc(0x200, 1, true)]),
            Err(ParseError::Malformed { status: 0x200, .. })
        ));
        assert!(matches!(
            r.parse(
                &m,
                &[
                    desc(0x100, 16, false),
                    desc(0x200, 1, true),
                    desc(0x300, 4, false),
                    desc(0x400, 1, true)
                ]
            ),
            Err(ParseError::Malformed { .. })
        ));
        // Header outside memory.
        assert!(matches!(
            r.parse(&m, &[desc(0xfff8, 16, false), desc(0x200, 1, true)]),
            Err(ParseError::Malformed { .. })
        ));
        // A status byte whose address wraps the address space.
        assert_eq!(
            r.parse(&m, &[desc(0x100, 16, false), desc(u64::MAX, 2, true)]),
            Err(ParseError::NoStatus)
        );
        // A read with readable data.
        assert!(matches!(
            r.parse(&m, &[desc(0x100, 32, false), desc(0x200, 1, true)]),
            Err(ParseError::Malformed { .. })
        ));
    }
}
