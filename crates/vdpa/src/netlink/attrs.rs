//! Netlink attributes: typed, length-checked.
use std::mem;

use super::bytes::*;
use super::consts::*;
use crate::error::*;

/// One netlink attribute (type with the NESTED and NET_BYTEORDER flags masked off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Attr<'a> {
    pub(crate) kind: u16,
    pub(crate) value: &'a [u8],
}

impl Attr<'_> {
    pub(crate) fn wrong_size(&self, want: &str) -> Error {
        malformed(format!(
            "attribute {} has {} bytes, want {want}",
            self.kind,
            self.value.len()
        ))
    }

    pub(crate) fn u16(&self) -> Result<u16, Error> {
        let b: [u8; 2] = self.value.try_into().map_err(|_| self.wrong_size("2"))?;
        Ok(u16::from_ne_bytes(b))
    }

    pub(crate) fn u32(&self) -> Result<u32, Error> {
        let b: [u8; 4] = self.value.try_into().map_err(|_| self.wrong_size("4"))?;
        Ok(u32::from_ne_bytes(b))
    }

    pub(crate) fn u64(&self) -> Result<u64, Error> {
        let b: [u8; 8] = self.value.try_into().map_err(|_| self.wrong_size("8"))?;
        Ok(u64::from_ne_bytes(b))
    }

    /// A string attribute: up to the first NUL (the kernel always sends one); invalid UTF-8
    /// is replaced rather than refused, so one odd name does not hide the others.
    pub(crate) fn string(&self) -> Result<String, Error> {
        let end = self
            .value
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.value.len());
        Ok(String::from_utf8_lossy(&self.value[..end]).into_owned())
    }
}

/// The attributes of a payload, every length checked. After an error it ends. Fewer than 4
/// trailing bytes are ignored, as the kernel and libmnl do.
pub(crate) struct Attrs<'a> {
    pub(crate) data: &'a [u8],
}

impl<'a> Attrs<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Attrs { data }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let data = mem::take(&mut self.data);
        if data.len() < NLA_HDRLEN {
            return None;
        }
        let len = read_u16(data)? as usize;
        let kind = read_u16(&data[2..])? & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > data.len() {
            return Some(Err(malformed(format!(
                "attribute {kind} length {len} outside 4..={}",
                data.len()
            ))));
        }
        self.data = data.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(Attr {
            kind,
            value: &data[NLA_HDRLEN..len],
        }))
    }
}
