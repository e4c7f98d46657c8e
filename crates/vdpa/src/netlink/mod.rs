//! Generic netlink, as much as vdpa management needs: the socket and its request/reply
//! exchange ([`socket`]), message framing ([`message`]), the attribute codec ([`attrs`]) and
//! the protocol's numbers ([`consts`]). Every length in a reply is checked before use.

pub(crate) mod attrs;
pub(crate) mod bytes;
pub(crate) mod consts;
pub(crate) mod message;
pub(crate) mod socket;
