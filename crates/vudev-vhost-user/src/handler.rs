//! The protocol's messages, answered on a [`Session`] (rust-vmm `vhost` parses and
//! validates them; the session checks what only the device can).

use std::fs::File;
use std::os::fd::AsRawFd;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;

use vudev_core::fault_guard::sealed_against_shrinking;
use vudev_core::InflightArea;

use crate::session::{invalid, Session, MAX_CONFIG_SIZE, MAX_MEM_SLOTS};

impl VhostUserBackendReqHandlerMut for Session {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset_rings();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset_rings();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.offered)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.offered != 0 {
            return Err(invalid("frontend acked features that were not offered"));
        }
        self.acked = features;
        // The frontend turns LOG_ALL on (and off) around a migration, with the rings running.
        let log_all = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if log_all {
            tracing::info!("dirty-page logging on (live migration)");
        }
        self.log.set_active(log_all);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() {
            return Err(invalid("memory table and fds differ in number"));
        }
        // All or nothing: the region list and the memory map must never disagree.
        let old = std::mem::take(&mut self.regions);
        let added = ctx
            .iter()
            .zip(files)
            .try_for_each(|(r, f)| self.add_region(r, f))
            .and_then(|()| self.remap());
        if let Err(e) = added {
            self.regions = old;
            return Err(e);
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = self.max_queue_size;
        let v = self.vring(index)?;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(invalid("queue size out of range"));
        }
        v.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        tracing::debug!(index, descriptor, used, available, log, "SET_VRING_ADDR");
        // Used-ring writes are logged at the ring's guest address: without a vIOMMU (which
        // vhost-user here does not offer) that is the log address a frontend gives.
        if flags.contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            && self.uva_to_gpa(used, 1).is_some_and(|gpa| gpa != log)
        {
            return Err(invalid(
                "used ring log address is not the ring's guest address",
            ));
        }
        let v = self.vring(index)?;
        v.desc = descriptor;
        v.used = used;
        v.avail = available;
        v.addr_set = true;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let v = self.vring(index)?;
        v.base = u16::try_from(base).map_err(|_| invalid("ring base out of range"))?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let base = self.stop_ring(index as usize);
        let v = &mut self.vrings[index as usize];
        v.kick = None;
        v.enabled = false;
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = u32::from(index);
        let Some(fd) = fd else {
            return Err(invalid("polling rings (no kick fd) are not supported"));
        };
        let protocol_acked = self.acked & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let v = self.vring(i)?;
        v.kick = Some(fd);
        if !protocol_acked {
            v.enabled = true;
        }
        self.maybe_start(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let v = self.vring(u32::from(index))?;
        *v.call.0.write().unwrap_or_else(|e| e.into_inner()) = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::STATUS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.protocol = VhostUserProtocolFeatures::from_bits_truncate(features);
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.device.num_queues()))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.vring(index)?.enabled = enable;
        if enable {
            self.maybe_start(index as usize)
        } else {
            self.stop_ring(index as usize);
            Ok(())
        }
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        // Fields past the device's config (newer virtio-blk fields a frontend may ask for) read
        // as zero, up to the protocol's 256-byte limit.
        let end = offset
            .checked_add(size)
            .filter(|e| *e <= MAX_CONFIG_SIZE)
            .ok_or_else(|| invalid("config read out of range"))?;
        let mut config = self.device.config();
        config.resize(MAX_CONFIG_SIZE as usize, 0);
        Ok(config[offset as usize..end as usize].to_vec())
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        Err(invalid("the configuration space is read-only"))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation(
            "shared objects are not supported",
        ))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        let (queues, size) = (inflight.num_queues, inflight.queue_size);
        if queues > self.device.num_queues() || size > self.max_queue_size {
            return Err(invalid(
                "in-flight area for more queues or descriptors than offered",
            ));
        }
        let (file, mmap_size) = InflightArea::create(queues, size).map_err(|e| {
            tracing::warn!("frontend request refused: {e}");
            VuError::InvalidParam
        })?;
        tracing::debug!(queues, size, mmap_size, "GET_INFLIGHT_FD");
        let reply = VhostUserInflight {
            mmap_size,
            mmap_offset: 0,
            num_queues: queues,
            queue_size: size,
        };
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let (queues, size) = (inflight.num_queues, inflight.queue_size);
        if queues > self.device.num_queues() || size > self.max_queue_size {
            return Err(invalid(
                "in-flight area for more queues or descriptors than offered",
            ));
        }
        let (len, offset) = (inflight.mmap_size, inflight.mmap_offset);
        tracing::debug!(queues, size, len, offset, "SET_INFLIGHT_FD");
        // The area vudev hands out is sealed. One from before it did (a VM that has run since
        // an older vudev) is sealed now if it can be, and taken as it is otherwise: refusing
        // it would leave that VM's disk dead after every reconnect.
        // SAFETY: F_ADD_SEALS on a descriptor we own; it fails harmlessly on other files.
        let sealed = sealed_against_shrinking(file.as_raw_fd())
            || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) }
                == 0;
        if !sealed {
            tracing::warn!(
                "the frontend's in-flight area cannot be sealed against shrinking: a frontend \
                 that shrinks it can end vudev"
            );
        }
        let area = InflightArea::map(file, offset, len, queues, size).map_err(|e| {
            tracing::warn!("frontend in-flight area refused: {e}");
            VuError::InvalidParam
        })?;
        self.inflight = Some(area);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        self.add_region(region, fd)?;
        if let Err(e) = self.remap() {
            self.regions.pop();
            return Err(e);
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let Some(at) = self
            .regions
            .iter()
            .position(|r| r.gpa == region.guest_phys_addr && r.size == region.memory_size)
        else {
            return Err(invalid("no such memory region"));
        };
        let removed = self.regions.remove(at);
        if let Err(e) = self.remap() {
            self.regions.insert(at, removed);
            return Err(e);
        }
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "device state transfer is not supported",
        ))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        tracing::debug!(size, offset, "SET_LOG_BASE");
        self.log
            .set_bitmap(file, offset, size, Some(&self.fault))
            .map_err(|e| {
                // The frontend waits for a reply the protocol has no error form for: disconnect
                // it rather than leave it waiting.
                tracing::warn!("frontend dirty log refused: {e}; disconnecting it");
                VuError::InvalidMessage
            })
    }
}
