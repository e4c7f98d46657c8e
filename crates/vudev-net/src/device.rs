//! The virtio-net device: queue pairs (receive queue 2N, transmit queue 2N+1) over the
//! queues of a TAP, one TAP queue per pair.

use std::io;
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vudev_core::{Device, QueueHandler};

use crate::config::{feature_names, guest_offloads, max_frame, NetConfig};
use crate::rx::RxQueue;
use crate::stats::NetStats;
use crate::tap::{Offloads, Tap};
use crate::tx::TxQueue;

/// virtio device id of a network device.
pub const VIRTIO_ID_NET: u32 = 1;

/// A virtio-net device over a TAP.
pub struct NetDevice {
    cfg: NetConfig,
    /// One TAP queue per queue pair.
    taps: Vec<Tap>,
    /// What the TAP accepted to hand over, hence what the driver is offered.
    offloads: Offloads,
    stats: Arc<NetStats>,
}

impl NetDevice {
    /// A device over `taps`, the queues of one TAP (one per queue pair): its MTU is set to
    /// the config's, and the offloads it accepts are what the driver is offered.
    pub fn new(cfg: NetConfig, taps: Vec<Tap>) -> io::Result<NetDevice> {
        cfg.check()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if taps.len() != usize::from(cfg.queue_pairs) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} TAP queues for {} queue pairs",
                    taps.len(),
                    cfg.queue_pairs
                ),
            ));
        }
        // Queues 1 and up are attached while their pair's receive queue runs (see
        // `queue_handler`): a driver using fewer pairs than offered must not lose the flows
        // the TAP would hash to the others.
        for t in taps.iter().skip(1) {
            t.set_attached(false)?;
        }
        let tap = &taps[0];
        if tap.mtu()? != cfg.mtu {
            tap.set_mtu(cfg.mtu)?;
        }
        let offloads = tap.probe_offloads(Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
            ufo: true,
        });
        tracing::info!(
            tap = tap.name(),
            mac = %cfg.mac,
            mtu = cfg.mtu,
            "net device over TAP {}; offloads it hands over: {offloads:?}",
            tap.name()
        );
        Ok(NetDevice {
            cfg,
            taps,
            offloads,
            stats: Arc::new(NetStats::default()),
        })
    }

    /// The device's settings.
    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// Its counters.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// The device in one line, for logs and `vudev ctl list`.
    pub fn describe(&self) -> String {
        format!(
            "TAP {}, MAC {}, MTU {}",
            self.taps[0].name(),
            self.cfg.mac,
            self.cfg.mtu
        ) + &match self.cfg.queue_pairs {
            1 => String::new(),
            n => format!(", {n} queue pairs"),
        }
    }
}

impl Device for NetDevice {
    fn device_id(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn features(&self) -> u64 {
        self.cfg.features(self.offloads)
    }
    fn config(&self) -> Vec<u8> {
        self.cfg.config_space()
    }
    fn num_queues(&self) -> u16 {
        2 * self.cfg.queue_pairs
    }
    fn max_queue_size(&self) -> u16 {
        self.cfg.queue_size
    }
    fn queue_handler(&self, index: u16, features: u64) -> io::Result<Box<dyn QueueHandler>> {
        let Some(tap) = self.taps.get(usize::from(index / 2)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "this net device has queues 0 to {} (receive even, transmit odd), not {index}",
                    self.num_queues() - 1
                ),
            ));
        };
        // The TAP's header is the 12-byte one of VERSION_1; a legacy driver's is 10 bytes.
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a net device needs VIRTIO_F_VERSION_1 (a legacy driver's header is not the \
                 TAP's)",
            ));
        }
        let tap = tap.try_clone()?;
        let stats = self.stats.clone();
        if index == 0 {
            let offered = self.features();
            let refused = feature_names(offered & !features);
            tracing::info!(
                "the driver took {}; it left {}",
                feature_names(features & offered).join(" "),
                if refused.is_empty() {
                    "nothing".to_string()
                } else {
                    refused.join(" ")
                }
            );
        }
        if index.is_multiple_of(2) {
            // What the driver takes decides what the TAP may hand over.
            let offloads = guest_offloads(features);
            let mergeable = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
            let frame = max_frame(features, self.cfg.mtu, false);
            let detach = index > 0;
            if detach {
                tap.set_attached(true)?;
            }
            let rx = RxQueue::new(tap, offloads, mergeable, frame, stats);
            Ok(Box::new(rx.map(|rx| rx.detached_on_drop(detach))?))
        } else {
            let frame = max_frame(features, self.cfg.mtu, true);
            Ok(Box::new(TxQueue::new(tap, frame, stats)))
        }
    }
}
