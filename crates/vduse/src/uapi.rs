//! The VDUSE user API of `include/uapi/linux/vduse.h`, as `#[repr(C)]` Rust types.
//!
//! Every layout is checked at compile time against the size the kernel's C header gives, so a
//! mistake here fails the build instead of corrupting an ioctl. Covers the header up to Linux 7.3:
//! API versions 0 and 1 (virtqueue groups and address spaces), the control-device features
//! (`VDUSE_F_QUEUE_READY`, `VDUSE_F_SUSPEND`) and their messages.

#![allow(missing_docs)]

use std::mem::size_of;

/// The ioctl "magic" type of every VDUSE ioctl.
pub const VDUSE_BASE: u32 = 0x81;

/// The first VDUSE API version (Linux 5.15 and later).
pub const VDUSE_API_VERSION: u64 = 0;
/// API version 1: virtqueue groups and address spaces (ASIDs).
pub const VDUSE_API_VERSION_1: u64 = 1;

/// Control-device feature bit: the kernel sends `VDUSE_SET_VQ_READY` messages.
pub const VDUSE_F_QUEUE_READY: u32 = 0;
/// Control-device feature bit: the kernel sends `VDUSE_SUSPEND` messages.
pub const VDUSE_F_SUSPEND: u32 = 1;

/// Length of the device name buffer, NUL included.
pub const VDUSE_NAME_MAX: usize = 256;

/// IOTLB access permissions.
pub const VDUSE_ACCESS_RO: u8 = 0x1;
pub const VDUSE_ACCESS_WO: u8 = 0x2;
pub const VDUSE_ACCESS_RW: u8 = 0x3;

/// `VDUSE_IOTLB_GET_INFO` capability: user memory may be registered for this region.
pub const VDUSE_IOVA_CAP_UMEM: u64 = 1 << 0;

/// Deassign a kick eventfd.
pub const VDUSE_EVENTFD_DEASSIGN: i32 = -1;

/// Message types read from the device fd (`enum vduse_req_type`).
pub const VDUSE_GET_VQ_STATE: u32 = 0;
pub const VDUSE_SET_STATUS: u32 = 1;
pub const VDUSE_UPDATE_IOTLB: u32 = 2;
pub const VDUSE_SET_VQ_GROUP_ASID: u32 = 3;
pub const VDUSE_SET_VQ_READY: u32 = 4;
pub const VDUSE_SUSPEND: u32 = 5;

/// Response results.
pub const VDUSE_REQ_RESULT_OK: u32 = 0x00;
pub const VDUSE_REQ_RESULT_FAILED: u32 = 0x01;

/// `struct vduse_dev_config`: the fixed header of `VDUSE_CREATE_DEV`; `config_size` bytes of
/// device configuration space follow it in the same buffer.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_config {
    pub name: [u8; VDUSE_NAME_MAX],
    pub vendor_id: u32,
    pub device_id: u32,
    pub features: u64,
    pub vq_num: u32,
    pub vq_align: u32,
    /// Number of virtqueue groups (API version 1 only; zero otherwise).
    pub ngroups: u32,
    /// Number of address spaces (API version 1 only; zero otherwise).
    pub nas: u32,
    pub reserved: [u32; 11],
    pub config_size: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iotlb_entry {
    pub offset: u64,
    pub start: u64,
    pub last: u64,
    pub perm: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iotlb_entry_v2 {
    pub v1: vduse_iotlb_entry,
    pub asid: u32,
    pub reserved: [u32; 12],
}

/// `struct vduse_config_data`: header of `VDUSE_DEV_SET_CONFIG`; `length` bytes follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_config_data {
    pub offset: u32,
    pub length: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_config {
    pub index: u32,
    pub max_size: u16,
    pub reserved1: u16,
    /// Virtqueue group (API version 1 only).
    pub group: u32,
    pub reserved2: [u16; 10],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_state_split {
    pub avail_index: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_state_packed {
    pub last_avail_counter: u16,
    pub last_avail_idx: u16,
    pub last_used_counter: u16,
    pub last_used_idx: u16,
}

/// The union of split and packed virtqueue state. The split view is the first two bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub union vduse_vq_state_union {
    pub split: vduse_vq_state_split,
    pub packed: vduse_vq_state_packed,
}

impl Default for vduse_vq_state_union {
    fn default() -> Self {
        vduse_vq_state_union {
            packed: vduse_vq_state_packed::default(),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct vduse_vq_info {
    pub index: u32,
    pub num: u32,
    pub desc_addr: u64,
    pub driver_addr: u64,
    pub device_addr: u64,
    pub state: vduse_vq_state_union,
    pub ready: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_eventfd {
    pub index: u32,
    pub fd: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iova_umem {
    pub uaddr: u64,
    pub iova: u64,
    pub size: u64,
    pub asid: u32,
    pub reserved: [u32; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iova_info {
    pub start: u64,
    pub last: u64,
    pub capability: u64,
    pub asid: u32,
    pub reserved: [u32; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct vduse_vq_state {
    pub index: u32,
    pub state: vduse_vq_state_union,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_dev_status {
    pub status: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iova_range {
    pub start: u64,
    pub last: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_iova_range_v2 {
    pub start: u64,
    pub last: u64,
    pub asid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_group_asid {
    pub group: u32,
    pub asid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct vduse_vq_ready {
    pub num: u32,
    pub ready: u32,
}

/// The payload of a request; which member is valid depends on the request type.
#[repr(C)]
#[derive(Clone, Copy)]
pub union vduse_dev_request_payload {
    pub vq_state: vduse_vq_state,
    pub s: vduse_dev_status,
    pub iova: vduse_iova_range,
    pub iova_v2: vduse_iova_range_v2,
    pub vq_group_asid: vduse_vq_group_asid,
    pub vq_ready: vduse_vq_ready,
    pub padding: [u32; 32],
}

/// A message read from the device fd.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_request {
    pub type_: u32,
    pub request_id: u32,
    pub reserved: [u32; 4],
    pub payload: vduse_dev_request_payload,
}

/// The payload of a response.
#[repr(C)]
#[derive(Clone, Copy)]
pub union vduse_dev_response_payload {
    pub vq_state: vduse_vq_state,
    pub padding: [u32; 32],
}

/// A reply written to the device fd.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vduse_dev_response {
    pub request_id: u32,
    pub result: u32,
    pub reserved: [u32; 4],
    pub payload: vduse_dev_response_payload,
}

impl vduse_dev_response {
    /// A response with every reserved byte zero, as the kernel requires.
    pub fn new(request_id: u32, result: u32) -> Self {
        vduse_dev_response {
            request_id,
            result,
            reserved: [0; 4],
            payload: vduse_dev_response_payload { padding: [0; 32] },
        }
    }
}

// Compile-time layout checks against the C header (x86_64 and every 64-bit Linux ABI).
const _: () = assert!(size_of::<vduse_dev_config>() == 336);
const _: () = assert!(size_of::<vduse_iotlb_entry>() == 32);
const _: () = assert!(size_of::<vduse_iotlb_entry_v2>() == 88);
const _: () = assert!(size_of::<vduse_config_data>() == 8);
const _: () = assert!(size_of::<vduse_vq_config>() == 32);
const _: () = assert!(size_of::<vduse_vq_state_union>() == 8);
const _: () = assert!(size_of::<vduse_vq_info>() == 48);
const _: () = assert!(std::mem::offset_of!(vduse_vq_info, ready) == 40);
const _: () = assert!(size_of::<vduse_vq_eventfd>() == 8);
const _: () = assert!(size_of::<vduse_iova_umem>() == 48);
const _: () = assert!(size_of::<vduse_iova_info>() == 48);
const _: () = assert!(size_of::<vduse_vq_state>() == 12);
const _: () = assert!(size_of::<vduse_iova_range_v2>() == 24);
const _: () = assert!(size_of::<vduse_dev_request>() == 152);
const _: () = assert!(std::mem::offset_of!(vduse_dev_request, payload) == 24);
const _: () = assert!(size_of::<vduse_dev_response>() == 152);

// ioctl request numbers, built as the kernel's _IOC macros build them.
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, nr: u32, size: usize) -> u64 {
    ((dir << 30) | ((size as u32) << 16) | (VDUSE_BASE << 8) | nr) as u64
}

pub const VDUSE_GET_API_VERSION: u64 = ioc(IOC_READ, 0x00, size_of::<u64>());
pub const VDUSE_SET_API_VERSION: u64 = ioc(IOC_WRITE, 0x01, size_of::<u64>());
pub const VDUSE_CREATE_DEV: u64 = ioc(IOC_WRITE, 0x02, size_of::<vduse_dev_config>());
pub const VDUSE_DESTROY_DEV: u64 = ioc(IOC_WRITE, 0x03, VDUSE_NAME_MAX);
pub const VDUSE_GET_FEATURES: u64 = ioc(IOC_READ, 0x04, size_of::<u64>());
pub const VDUSE_SET_FEATURES: u64 = ioc(IOC_WRITE, 0x05, size_of::<u64>());

pub const VDUSE_IOTLB_GET_FD: u64 = ioc(IOC_READ | IOC_WRITE, 0x10, size_of::<vduse_iotlb_entry>());
pub const VDUSE_DEV_GET_FEATURES: u64 = ioc(IOC_READ, 0x11, size_of::<u64>());
pub const VDUSE_DEV_SET_CONFIG: u64 = ioc(IOC_WRITE, 0x12, size_of::<vduse_config_data>());
pub const VDUSE_DEV_INJECT_CONFIG_IRQ: u64 = ioc(IOC_NONE, 0x13, 0);
pub const VDUSE_VQ_SETUP: u64 = ioc(IOC_WRITE, 0x14, size_of::<vduse_vq_config>());
pub const VDUSE_VQ_GET_INFO: u64 = ioc(IOC_READ | IOC_WRITE, 0x15, size_of::<vduse_vq_info>());
pub const VDUSE_VQ_SETUP_KICKFD: u64 = ioc(IOC_WRITE, 0x16, size_of::<vduse_vq_eventfd>());
pub const VDUSE_VQ_INJECT_IRQ: u64 = ioc(IOC_WRITE, 0x17, size_of::<u32>());
pub const VDUSE_IOTLB_REG_UMEM: u64 = ioc(IOC_WRITE, 0x18, size_of::<vduse_iova_umem>());
pub const VDUSE_IOTLB_DEREG_UMEM: u64 = ioc(IOC_WRITE, 0x19, size_of::<vduse_iova_umem>());
pub const VDUSE_IOTLB_GET_INFO: u64 = ioc(IOC_READ | IOC_WRITE, 0x1a, size_of::<vduse_iova_info>());
pub const VDUSE_IOTLB_GET_FD2: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x1b,
    size_of::<vduse_iotlb_entry_v2>(),
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // Values computed by hand from the _IOC macros of <asm-generic/ioctl.h>.
        assert_eq!(VDUSE_GET_API_VERSION, 0x8008_8100);
        assert_eq!(VDUSE_SET_API_VERSION, 0x4008_8101);
        assert_eq!(VDUSE_CREATE_DEV, 0x4150_8102);
        assert_eq!(VDUSE_DESTROY_DEV, 0x4100_8103);
        assert_eq!(VDUSE_IOTLB_GET_FD, 0xc020_8110);
        assert_eq!(VDUSE_VQ_GET_INFO, 0xc030_8115);
        assert_eq!(VDUSE_VQ_INJECT_IRQ, 0x4004_8117);
        assert_eq!(VDUSE_DEV_INJECT_CONFIG_IRQ, 0x0000_8113);
    }
}
