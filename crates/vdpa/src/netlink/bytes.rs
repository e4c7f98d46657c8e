//! Reading the integers of netlink headers and attributes (native byte order, bounds
//! checked), and netlink's 4-byte alignment.

pub(crate) fn read_i32(b: &[u8]) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

pub(crate) fn read_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

pub(crate) fn read_u16(b: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(..2)?.try_into().ok()?))
}

pub(crate) const fn align4(n: usize) -> usize {
    (n + 3) & !3
}
