//! virtio-blk features and configuration space.

use virtio_bindings::virtio_blk::*;

/// Largest discard / write-zeroes request, in 512-byte sectors (2 GiB).
pub(crate) const MAX_DISCARD_SECTORS: u32 = 1 << 22;

/// What the device offers; derived from the backend and the export options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Capacity in bytes at start (a multiple of `logical_block_size`); see
    /// [`BlockDevice::resize`](crate::BlockDevice::resize).
    pub size: u64,
    /// Logical block size: 512 or 4096.
    pub logical_block_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Queue size offered.
    pub queue_size: u16,
    /// Refuse writes.
    pub read_only: bool,
    /// Serial returned by GET_ID (at most 20 bytes).
    pub serial: String,
    /// Offer DISCARD.
    pub discard: bool,
    /// Offer WRITE_ZEROES.
    pub write_zeroes: bool,
    /// The backend's unit of allocation in bytes (an RBD object), offered as the optimal
    /// I/O size and the discard alignment; 0: none beyond the logical block.
    pub granularity: u64,
}

impl BlockConfig {
    /// A disk of `size` bytes with the export defaults: 512-byte blocks, one queue of 256,
    /// writable, no serial, DISCARD and WRITE_ZEROES offered.
    pub fn new(size: u64) -> Self {
        BlockConfig {
            size,
            logical_block_size: 512,
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            serial: String::new(),
            discard: true,
            write_zeroes: true,
            granularity: 0,
        }
    }

    /// Largest number of data segments per request.
    pub(crate) fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// virtio-blk feature bits offered.
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            if self.discard {
                f |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            if self.write_zeroes {
                f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        f
    }

    /// The configuration space (`struct virtio_blk_config`, little endian, 60 bytes), for a
    /// capacity of `size` bytes (which an online resize changes).
    pub(crate) fn config_space(&self, size: u64) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let put = |c: &mut Vec<u8>, off: usize, bytes: &[u8]| {
            c[off..off + bytes.len()].copy_from_slice(bytes)
        };
        let block = u64::from(self.logical_block_size);
        // A granularity that is a whole number of blocks (and fits the fields) is offered.
        let unit = Some(self.granularity)
            .filter(|&g| g > block && g.is_multiple_of(block) && g / 512 <= u64::from(u32::MAX))
            .unwrap_or(block);
        let align_sectors = (unit / 512) as u32;
        let opt_io_blocks = if unit > block {
            (unit / block) as u32
        } else {
            0
        };
        put(&mut c, 0, &(size / 512).to_le_bytes()); // capacity
        put(&mut c, 12, &self.seg_max().to_le_bytes()); // seg_max
        put(&mut c, 20, &self.logical_block_size.to_le_bytes()); // blk_size
        c[24] = 0; // physical_block_exp
        c[25] = 0; // alignment_offset
        put(&mut c, 26, &1u16.to_le_bytes()); // min_io_size (logical blocks)
        put(&mut c, 28, &opt_io_blocks.to_le_bytes()); // opt_io_size (logical blocks)
        put(&mut c, 34, &self.num_queues.to_le_bytes()); // num_queues
        put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(&mut c, 40, &1u32.to_le_bytes()); // max_discard_seg
        put(&mut c, 44, &align_sectors.to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(&mut c, 52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// The serial as GET_ID returns it: 20 bytes, NUL padded.
    pub(crate) fn id_bytes(&self) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let s = self.serial.as_bytes();
        let n = s.len().min(id.len());
        id[..n].copy_from_slice(&s[..n]);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BlockConfig {
        BlockConfig {
            logical_block_size: 4096,
            num_queues: 2,
            serial: "vudev-serial-number-too-long".into(),
            ..BlockConfig::new(1 << 30)
        }
    }

    #[test]
    fn config_space_layout() {
        let c = cfg().config_space(1 << 30);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2 << 20);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
        assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 0);
    }

    #[test]
    fn a_granularity_of_whole_blocks_sets_the_optimal_io_size_and_discard_alignment() {
        let rbd = BlockConfig {
            granularity: 4 << 20,
            ..cfg()
        };
        let c = rbd.config_space(1 << 30);
        assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 1024);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8192);
        // Not a whole number of 4096-byte blocks: ignored.
        let odd = BlockConfig {
            granularity: 6144,
            ..cfg()
        };
        let c = odd.config_space(1 << 30);
        assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 0);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
    }

    #[test]
    fn features_follow_options() {
        let f = cfg().features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            f & (1 << VIRTIO_BLK_F_CONFIG_WCE),
            0,
            "VDUSE refuses CONFIG_WCE"
        );
        let ro = BlockConfig {
            read_only: true,
            ..cfg()
        };
        assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(&cfg().id_bytes(), b"vudev-serial-number-");
    }
}
