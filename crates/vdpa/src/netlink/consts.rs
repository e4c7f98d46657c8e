//! Numbers of the generic netlink and netlink protocols (`include/uapi/linux/netlink.h`,
//! `genetlink.h`), and this crate's own limits.

// include/uapi/linux/genetlink.h
pub(crate) const GENL_ID_CTRL: u16 = 0x10; // NLMSG_MIN_TYPE
pub(crate) const CTRL_VERSION: u8 = 1;
pub(crate) const CTRL_CMD_GETFAMILY: u8 = 3;
pub(crate) const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub(crate) const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// include/uapi/linux/netlink.h
pub(crate) const NLM_F_REQUEST: u16 = 0x01;
#[cfg(test)]
pub(crate) const NLM_F_MULTI: u16 = 0x02;
pub(crate) const NLM_F_ACK: u16 = 0x04;
pub(crate) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(crate) const NLM_F_DUMP: u16 = 0x100 | 0x200; // NLM_F_ROOT | NLM_F_MATCH
pub(crate) const NLM_F_CAPPED: u16 = 0x100;
pub(crate) const NLM_F_ACK_TLVS: u16 = 0x200;
pub(crate) const NLMSG_NOOP: u16 = 0x1;
pub(crate) const NLMSG_ERROR: u16 = 0x2;
pub(crate) const NLMSG_DONE: u16 = 0x3;
pub(crate) const NLMSG_OVERRUN: u16 = 0x4;
pub(crate) const NLMSGERR_ATTR_MSG: u16 = 1;
pub(crate) const NETLINK_CAP_ACK: libc::c_int = 10;
pub(crate) const NETLINK_EXT_ACK: libc::c_int = 11;
pub(crate) const NLA_TYPE_MASK: u16 = !((1 << 15) | (1 << 14)); // ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

/// `sizeof(struct nlmsghdr)`.
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct genlmsghdr)`.
pub(crate) const GENL_HDRLEN: usize = 4;
/// `sizeof(struct nlattr)`.
pub(crate) const NLA_HDRLEN: usize = 4;

/// Receive buffer size. The kernel sizes dump datagrams to at most 32 KiB.
pub(crate) const RECV_BUF_LEN: usize = 32 * 1024;
/// Most entries a dump may return before it is treated as runaway.
pub(crate) const MAX_DUMP_ENTRIES: usize = 4096;
/// Longest device name accepted in a request (VDUSE allows up to 255 bytes).
pub(crate) const MAX_NAME_LEN: usize = 255;
/// How often a dump the kernel marks inconsistent (`NLM_F_DUMP_INTR`) is retried.
pub(crate) const DUMP_ATTEMPTS: usize = 3;
