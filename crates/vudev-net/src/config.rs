//! What a net device offers: its MAC address and MTU, the feature bits, and the config
//! space the driver reads (virtio 1.2, 5.1.4).

use std::fmt;
use std::str::FromStr;

use virtio_bindings::virtio_net::*;

use crate::tap::Offloads;

/// Ethernet header plus one VLAN tag: what a frame holds beyond its MTU.
pub const ETH_OVERHEAD: u32 = 14 + 4;
/// The largest frame a segmentation offload makes (64 KiB of IP, plus the Ethernet header).
pub const MAX_GSO_FRAME: u32 = 65535 + ETH_OVERHEAD;
/// The smallest MTU an IPv4 link may have.
pub const MIN_MTU: u32 = 68;
/// The largest MTU the config space can say (a 16-bit field).
pub const MAX_MTU: u32 = 65535;

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// A locally administered unicast address derived from `seed` (the TAP's name): the same
    /// after a restart, so that a restarted daemon offers what the driver has.
    pub fn derived(seed: &str) -> MacAddress {
        // FNV-1a: stable across builds and machines, which std's hasher does not promise.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        MacAddress([0x02, b[0], b[1], b[2], b[3], b[4]])
    }
}

impl FromStr for MacAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<MacAddress, String> {
        let bad = || format!("invalid MAC address '{s}': use six hex bytes, as 52:54:00:12:34:56");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if out[0] & 1 != 0 {
            return Err(format!(
                "invalid MAC address '{s}': it is a multicast address (the first byte is odd)"
            ));
        }
        if out == [0; 6] {
            return Err(format!("invalid MAC address '{s}': all zeros"));
        }
        Ok(MacAddress(out))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A net device's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The address the driver's interface takes.
    pub mac: MacAddress,
    /// The MTU offered (VIRTIO_NET_F_MTU), 68 to 65535.
    pub mtu: u32,
    /// The largest queue the device accepts.
    pub queue_size: u16,
    /// Receive/transmit queue pairs (MQ, over a multi-queue TAP), 1 to [`MAX_QUEUE_PAIRS`].
    pub queue_pairs: u16,
}

/// The most queue pairs a net export takes.
pub const MAX_QUEUE_PAIRS: u16 = 16;

impl NetConfig {
    /// Checks the MTU and the queue size.
    pub fn check(&self) -> Result<(), String> {
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(format!(
                "invalid MTU {}: use {MIN_MTU} to {MAX_MTU}",
                self.mtu
            ));
        }
        if !(1..=MAX_QUEUE_PAIRS).contains(&self.queue_pairs) {
            return Err(format!(
                "invalid number of queue pairs {}: use 1 to {MAX_QUEUE_PAIRS}",
                self.queue_pairs
            ));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 2 {
            return Err(format!(
                "invalid queue size {}: use a power of two from 2 to 32768",
                self.queue_size
            ));
        }
        Ok(())
    }

    /// The device feature bits: the address, link status, MTU, mergeable receive buffers,
    /// checksum and segmentation offload from the driver (the TAP takes those), and to the
    /// driver those of `tap` (what the TAP accepted to hand over).
    pub fn features(&self, tap: Offloads) -> u64 {
        let mut f = [
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
        ]
        .iter()
        .fold(0u64, |f, &b| f | 1 << b);
        // Several queue pairs: the frontend's control queue chooses how many are used.
        if self.queue_pairs > 1 {
            f |= 1 << VIRTIO_NET_F_MQ;
        }
        // The TAP takes UFO frames written to it where it also hands them over.
        if tap.ufo {
            f |= 1 << VIRTIO_NET_F_HOST_UFO;
        }
        if tap.csum {
            f |= 1 << VIRTIO_NET_F_GUEST_CSUM;
            for (on, bit) in [
                (tap.tso4, VIRTIO_NET_F_GUEST_TSO4),
                (tap.tso6, VIRTIO_NET_F_GUEST_TSO6),
                (tap.ecn && (tap.tso4 || tap.tso6), VIRTIO_NET_F_GUEST_ECN),
                (tap.ufo, VIRTIO_NET_F_GUEST_UFO),
            ] {
                if on {
                    f |= 1 << bit;
                }
            }
        }
        f
    }

    /// The config space: mac, status (link up), max_virtqueue_pairs, mtu.
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(12);
        c.extend_from_slice(&self.mac.0);
        c.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c.extend_from_slice(&self.queue_pairs.to_le_bytes());
        c.extend_from_slice(&(self.mtu as u16).to_le_bytes());
        c
    }
}

/// The offloads the driver takes, from the negotiated `features`: what the TAP may hand over.
pub fn guest_offloads(features: u64) -> Offloads {
    let has = |b: u32| features & (1 << b) != 0;
    let csum = has(VIRTIO_NET_F_GUEST_CSUM);
    Offloads {
        csum,
        tso4: csum && has(VIRTIO_NET_F_GUEST_TSO4),
        tso6: csum && has(VIRTIO_NET_F_GUEST_TSO6),
        ecn: csum && has(VIRTIO_NET_F_GUEST_ECN),
        ufo: csum && has(VIRTIO_NET_F_GUEST_UFO),
    }
}

/// The virtio-net features among `features`, by their spec names, for the log.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    [
        (VIRTIO_NET_F_CSUM, "CSUM"),
        (VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
        (VIRTIO_NET_F_MTU, "MTU"),
        (VIRTIO_NET_F_MAC, "MAC"),
        (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
        (VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
        (VIRTIO_NET_F_GUEST_ECN, "GUEST_ECN"),
        (VIRTIO_NET_F_GUEST_UFO, "GUEST_UFO"),
        (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
        (VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
        (VIRTIO_NET_F_HOST_ECN, "HOST_ECN"),
        (VIRTIO_NET_F_HOST_UFO, "HOST_UFO"),
        (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
        (VIRTIO_NET_F_STATUS, "STATUS"),
        (VIRTIO_NET_F_MQ, "MQ"),
    ]
    .into_iter()
    .filter(|&(bit, _)| features & (1 << bit) != 0)
    .map(|(_, name)| name)
    .collect()
}

/// The largest frame (without the virtio-net header) either side may send with `features`
/// negotiated and `mtu` offered.
pub fn max_frame(features: u64, mtu: u32, from_driver: bool) -> u32 {
    let has = |b: u32| features & (1 << b) != 0;
    let gso = if from_driver {
        [
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
        ]
    } else {
        [
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
        ]
    };
    if gso.iter().any(|&b| has(b)) {
        MAX_GSO_FRAME.max(mtu + ETH_OVERHEAD)
    } else {
        mtu + ETH_OVERHEAD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_names_follow_the_bits() {
        let f = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_MRG_RXBUF) | (1u64 << 32);
        assert_eq!(feature_names(f), ["MAC", "MRG_RXBUF"]);
        assert!(feature_names(0).is_empty());
    }

    #[test]
    fn mac_addresses_parse_and_print() {
        let m: MacAddress = "52:54:00:12:34:5f".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0x12, 0x34, 0x5f]);
        assert_eq!(m.to_string(), "52:54:00:12:34:5f");
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
        let d = MacAddress::derived("vnet0");
        assert_eq!(d, MacAddress::derived("vnet0"));
        assert_ne!(d, MacAddress::derived("vnet1"));
        assert_eq!(d.0[0], 0x02, "locally administered, unicast");
    }

    #[test]
    fn config_space_and_features() {
        let c = NetConfig {
            mac: MacAddress([2, 1, 2, 3, 4, 5]),
            mtu: 9000,
            queue_size: 256,
            queue_pairs: 1,
        };
        assert_eq!(c.config_space(), [2, 1, 2, 3, 4, 5, 1, 0, 1, 0, 0x28, 0x23]);
        let mq = NetConfig {
            queue_pairs: 4,
            ..c.clone()
        };
        assert_eq!(mq.config_space()[8..10], [4, 0]);
        assert_ne!(mq.features(Offloads::default()) & (1 << VIRTIO_NET_F_MQ), 0);
        assert_eq!(
            c.features(Offloads::default()) & (1 << VIRTIO_NET_F_MQ),
            0,
            "one pair: no MQ"
        );
        for bad in [0, MAX_QUEUE_PAIRS + 1] {
            assert!(NetConfig {
                queue_pairs: bad,
                ..c.clone()
            }
            .check()
            .is_err());
        }
        let none = c.features(Offloads::default());
        assert_eq!(none & (1 << VIRTIO_NET_F_GUEST_CSUM), 0);
        assert_eq!(
            none & (1 << VIRTIO_NET_F_CTRL_VQ),
            0,
            "VDUSE refuses a control queue"
        );
        let all = Offloads {
            csum: true,
            tso4: true,
            tso6: true,
            ecn: true,
            ufo: true,
        };
        let f = c.features(all);
        assert_eq!(guest_offloads(f), all);
        assert_eq!(max_frame(f, 1500, false), MAX_GSO_FRAME);
        assert_eq!(max_frame(none, 9000, false), 9018);
        assert_eq!(max_frame(none, 9000, true), MAX_GSO_FRAME);
        assert!(NetConfig {
            mtu: 67,
            ..c.clone()
        }
        .check()
        .is_err());
        assert!(NetConfig {
            queue_size: 100,
            ..c
        }
        .check()
        .is_err());
    }
}
