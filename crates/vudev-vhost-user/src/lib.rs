//! The vhost-user transport: serves the same [`Device`] on a unix socket to one frontend at a
//! time (QEMU, cloud-hypervisor, libblkio). Protocol parsing and message validation come from
//! rust-vmm's `vhost` crate; this module holds the session state: the memory table, the rings,
//! and the queue workers, which are the same [`Worker`]s the VDUSE transport runs.
//!
//! A frontend that disconnects ends its session: workers stop, memory is unmapped, and the
//! next frontend starts from a reset device. A second frontend connecting while one is served
//! is refused, unless the first one goes within a second (then it is served next).
//!
//! Files by role: [`server`] listens and serves frontends one after another; [`session`] holds
//! one frontend's state (memory table, rings, workers); [`handler`] answers the protocol's
//! messages on it; [`status`] answers the STATUS messages the `vhost` crate does not dispatch.
#![deny(missing_docs)]

mod backend_channel;
mod frontend_channel;
mod handler;
pub mod server;
mod session;
mod status;
#[cfg(test)]
mod tests;
mod vring_enable;
mod wire;

pub use frontend_channel::FrontendChannel;
pub use server::{serve_frontend, SessionEnd, VhostUserOptions, VhostUserServer};
pub use session::MAX_MEM_SLOTS;
