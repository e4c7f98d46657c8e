//! Netlink message handling against hand-made kernel replies, and the live socket.
#![allow(unused_imports)]
use std::fmt;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::*;
use crate::management::*;
use crate::names::VDUSE_MGMTDEV;
use crate::netlink::attrs::*;
use crate::netlink::bytes::*;
use crate::netlink::consts::*;
use crate::netlink::message::*;
use crate::netlink::socket::*;

use super::*;

const FAMILY: u16 = 0x1c;

/// A kernel-style reply: a request built with the same builder, given a type and flags.
fn reply(flags: u16, seq: u32, build: impl FnOnce(&mut Request)) -> Vec<u8> {
    let mut r = Request::new(FAMILY, flags, VDPA_CMD_DEV_NEW, VDPA_GENL_VERSION);
    build(&mut r);
    r.finish(seq).to_vec()
}

fn control(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(payload);
    m.resize(align4(m.len()), 0);
    m
}

fn device_attrs(r: &mut Request) {
    r.put_strz(VDPA_ATTR_MGMTDEV_DEV_NAME, "vduse", "x")
        .unwrap();
    r.put_strz(VDPA_ATTR_DEV_NAME, "vdisk0", "x").unwrap();
    r.put(VDPA_ATTR_DEV_ID, &2u32.to_ne_bytes()).unwrap();
    r.put(VDPA_ATTR_DEV_VENDOR_ID, &0x1af4u32.to_ne_bytes())
        .unwrap();
    r.put(VDPA_ATTR_DEV_MAX_VQS, &4u32.to_ne_bytes()).unwrap();
    r.put(VDPA_ATTR_DEV_MAX_VQ_SIZE, &256u16.to_ne_bytes())
        .unwrap();
    r.put(9, &1u16.to_ne_bytes()).unwrap(); // VDPA_ATTR_DEV_MIN_VQ_SIZE: ignored
}

fn run(ex: &mut Exchange, dgram: &[u8]) -> (Result<bool, Error>, Vec<Vec<u8>>) {
    let mut got = Vec::new();
    let r = ex.process(dgram, &mut |a: &[u8]| {
        got.push(a.to_vec());
        Ok(())
    });
    (r, got)
}

fn exchange(seq: u32, dump: bool) -> Exchange {
    Exchange {
        seq,
        family: FAMILY,
        dump,
        interrupted: false,
    }
}

#[test]
fn builds_a_request() {
    let mut m = Request::new(FAMILY, NLM_F_REQUEST | NLM_F_ACK, VDPA_CMD_DEV_NEW, 1);
    m.put_strz(VDPA_ATTR_MGMTDEV_DEV_NAME, "vduse", "x")
        .unwrap();
    m.put_strz(VDPA_ATTR_DEV_NAME, "vdisk0", "x").unwrap();
    let b = m.finish(7).to_vec();
    // "vduse\0" is 6 bytes, padded to 8; "vdisk0\0" is 7, padded to 8.
    assert_eq!(b.len(), 16 + 4 + (4 + 8) + (4 + 8));
    assert_eq!(read_u32(&b).unwrap() as usize, b.len());
    assert_eq!(read_u16(&b[4..]).unwrap(), FAMILY);
    assert_eq!(read_u16(&b[6..]).unwrap(), NLM_F_REQUEST | NLM_F_ACK);
    assert_eq!(read_u32(&b[8..]).unwrap(), 7);
    assert_eq!(read_u32(&b[12..]).unwrap(), 0);
    assert_eq!(&b[16..20], &[VDPA_CMD_DEV_NEW, 1, 0, 0]);
    // The attribute length excludes the padding.
    assert_eq!(read_u16(&b[20..]).unwrap(), 10);
    assert_eq!(&b[30..32], &[0, 0]);
    let attrs: Vec<_> = Attrs::new(&b[20..]).map(Result::unwrap).collect();
    assert_eq!(
        attrs,
        vec![
            Attr {
                kind: VDPA_ATTR_MGMTDEV_DEV_NAME,
                value: b"vduse\0"
            },
            Attr {
                kind: VDPA_ATTR_DEV_NAME,
                value: b"vdisk0\0"
            },
        ]
    );
    let msgs: Vec<_> = Messages::new(&b).map(Result::unwrap).collect();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].seq, 7);
    assert_eq!(msgs[0].payload.len(), b.len() - 16);
}

#[test]
fn refuses_unsendable_names() {
    let mut m = Request::new(FAMILY, NLM_F_REQUEST, VDPA_CMD_DEV_DEL, 1);
    assert!(m.put_strz(VDPA_ATTR_DEV_NAME, "", "device name").is_err());
    assert!(m
        .put_strz(VDPA_ATTR_DEV_NAME, "a\0b", "device name")
        .is_err());
    let long = "x".repeat(256);
    let e = m.put_strz(VDPA_ATTR_DEV_NAME, &long, "device name");
    assert!(matches!(e, Err(Error::InvalidName { .. })));
    assert!(m.put(1, &vec![0; 70_000]).is_err());
    assert_eq!(m.buf.len(), 20, "nothing appended on error");
    assert_eq!(split_mgmtdev("vduse").unwrap(), (None, "vduse"));
    assert_eq!(
        split_mgmtdev("pci/0000:03:00.0").unwrap(),
        (Some("pci"), "0000:03:00.0")
    );
    assert!(split_mgmtdev("a/b/c").is_err());
    assert!(split_mgmtdev("/b").is_err());
}

#[test]
fn parses_a_device_and_a_mgmtdev() {
    let b = reply(NLM_F_MULTI, 1, device_attrs);
    let d = parse_device(&b[20..]).unwrap();
    assert_eq!(
        d,
        VdpaDevice {
            name: "vdisk0".into(),
            mgmtdev: "vduse".into(),
            device_id: 2,
            vendor_id: 0x1af4,
            max_vqs: 4,
            max_vq_size: 256,
        }
    );

    let b = reply(NLM_F_MULTI, 1, |r| {
        r.put_strz(VDPA_ATTR_MGMTDEV_BUS_NAME, "pci", "x").unwrap();
        r.put_strz(VDPA_ATTR_MGMTDEV_DEV_NAME, "0000:03:00.0", "x")
            .unwrap();
        r.put(0, &[0; 0]).unwrap(); // VDPA_ATTR_PAD before a u64
        r.put(VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES, &6u64.to_ne_bytes())
            .unwrap();
        r.put(19, &0u64.to_ne_bytes()).unwrap(); // newer attributes: ignored
    });
    let m = parse_mgmtdev(&b[20..]).unwrap();
    assert_eq!(m.bus.as_deref(), Some("pci"));
    assert_eq!(m.name, "0000:03:00.0");
    assert_eq!(m.supported_classes, 6);

    // A device of a bus management device shows as bus/name.
    let b = reply(0, 1, |r| {
        device_attrs(r);
        r.put_strz(VDPA_ATTR_MGMTDEV_BUS_NAME, "pci", "x").unwrap();
    });
    assert_eq!(parse_device(&b[20..]).unwrap().mgmtdev, "pci/vduse");
}

#[test]
fn malformed_attributes_are_errors() {
    // Length past the end, below the header size, zero.
    assert!(Attrs::new(&[200, 0, 1, 0, 1, 2]).next().unwrap().is_err());
    assert!(Attrs::new(&[3, 0, 1, 0]).next().unwrap().is_err());
    assert!(Attrs::new(&[0, 0, 1, 0]).next().unwrap().is_err());
    // Fewer than 4 trailing bytes are ignored; the iterator ends after an error.
    assert!(Attrs::new(&[8, 0]).next().is_none());
    let mut it = Attrs::new(&[9, 0, 1, 0, 0, 0, 0, 0]);
    assert!(it.next().unwrap().is_err());
    assert!(it.next().is_none());
    // Unaligned last attribute without padding is accepted.
    let a: Vec<_> = Attrs::new(&[5, 0, 4, 0, b'x']).collect();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].as_ref().unwrap().string().unwrap(), "x");

    // Integers of the wrong size.
    let a = Attr {
        kind: 5,
        value: &[1, 2, 3],
    };
    assert!(a.u16().is_err() && a.u32().is_err() && a.u64().is_err());

    // A device entry with a short u32, or no name, or no mgmtdev, or no id.
    let b = reply(0, 1, |r| {
        r.put_strz(VDPA_ATTR_DEV_NAME, "d", "x").unwrap();
        r.put(VDPA_ATTR_DEV_ID, &[2, 0]).unwrap();
    });
    assert!(matches!(parse_device(&b[20..]), Err(Error::Malformed(_))));
    let b = reply(0, 1, |r| {
        r.put(VDPA_ATTR_DEV_ID, &2u32.to_ne_bytes()).unwrap();
    });
    assert!(parse_device(&b[20..]).is_err());
    let b = reply(0, 1, |r| {
        r.put_strz(VDPA_ATTR_DEV_NAME, "d", "x").unwrap();
        r.put(VDPA_ATTR_DEV_ID, &2u32.to_ne_bytes()).unwrap();
    });
    assert!(parse_device(&b[20..]).is_err());
    let b = reply(0, 1, |r| {
        r.put_strz(VDPA_ATTR_DEV_NAME, "d", "x").unwrap();
        r.put_strz(VDPA_ATTR_MGMTDEV_DEV_NAME, "vduse", "x")
            .unwrap();
    });
    assert!(parse_device(&b[20..]).is_err());
    assert!(parse_mgmtdev(&[]).is_err());
    // A truncated entry.
    let b = reply(0, 1, device_attrs);
    assert!(parse_device(&b[20..b.len() - 12]).is_err());
}

#[test]
fn malformed_messages_are_errors() {
    let mut dg = reply(0, 1, device_attrs);
    // Length past the datagram, below the header size.
    dg[0..4].copy_from_slice(&4096u32.to_ne_bytes());
    assert!(Messages::new(&dg).next().unwrap().is_err());
    dg[0..4].copy_from_slice(&4u32.to_ne_bytes());
    assert!(Messages::new(&dg).next().unwrap().is_err());
    // Trailing bytes shorter than a header.
    let mut two = reply(0, 1, device_attrs);
    two.extend_from_slice(&[1, 2, 3]);
    let mut it = Messages::new(&two);
    assert!(it.next().unwrap().is_ok());
    assert!(it.next().unwrap().is_err());
    assert!(it.next().is_none());
    // A reply shorter than the genl header, and an unknown message type.
    let mut ex = exchange(1, true);
    assert!(run(&mut ex, &control(FAMILY, NLM_F_MULTI, 1, &[5, 1]))
        .0
        .is_err());
    assert!(run(&mut ex, &control(0x99, NLM_F_MULTI, 1, &[0; 4]))
        .0
        .is_err());
    // Error and done messages without their error code.
    let mut ex = exchange(1, false);
    assert!(run(&mut ex, &control(NLMSG_ERROR, 0, 1, &[])).0.is_err());
    assert!(matches!(
        run(
            &mut ex,
            &control(NLMSG_ERROR, 0, 1, &i32::MIN.to_ne_bytes())
        )
        .0,
        Err(Error::Kernel { .. })
    ));
    // NLMSG_ERROR with bogus extended-ack lengths: still the error, no message.
    let mut p = (-libc::EINVAL).to_ne_bytes().to_vec();
    p.extend_from_slice(&u32::MAX.to_ne_bytes());
    p.extend_from_slice(&[0; 12]);
    match run(&mut ex, &control(NLMSG_ERROR, NLM_F_ACK_TLVS, 1, &p)).0 {
        Err(Error::Kernel { source, ext, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
            assert_eq!(ext, None);
        }
        r => panic!("{r:?}"),
    }
}

#[test]
fn multi_part_dump_until_done() {
    let mut ex = exchange(5, true);
    // First datagram: two entries, plus a stale message of another sequence.
    let mut dg = reply(NLM_F_MULTI, 5, device_attrs);
    dg.extend(reply(NLM_F_MULTI, 4, device_attrs));
    dg.extend(reply(NLM_F_MULTI, 5, device_attrs));
    let (r, got) = run(&mut ex, &dg);
    assert!(!r.unwrap());
    assert_eq!(got.len(), 2);
    assert_eq!(parse_device(&got[1]).unwrap().name, "vdisk0");
    // Second datagram: one more entry, then NLMSG_DONE.
    let mut dg = reply(NLM_F_MULTI, 5, device_attrs);
    dg.extend(control(NLMSG_DONE, NLM_F_MULTI, 5, &0i32.to_ne_bytes()));
    let (r, got) = run(&mut ex, &dg);
    assert!(r.unwrap());
    assert_eq!(got.len(), 1);
    assert!(!ex.interrupted);
}

#[test]
fn dump_errors_and_interruptions() {
    // A dump that fails midway: NLMSG_DONE with -errno and an extended-ack message.
    let mut tlv = Request::new(0, 0, 0, 0);
    tlv.put_strz(NLMSGERR_ATTR_MSG, "vdpa: something broke", "x")
        .unwrap();
    let mut p = (-libc::EMSGSIZE).to_ne_bytes().to_vec();
    p.extend_from_slice(&tlv.buf[20..]);
    let mut ex = exchange(3, true);
    match run(
        &mut ex,
        &control(NLMSG_DONE, NLM_F_MULTI | NLM_F_ACK_TLVS, 3, &p),
    )
    .0
    {
        Err(Error::Kernel { source, ext, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EMSGSIZE));
            assert_eq!(ext.as_deref(), Some("vdpa: something broke"));
        }
        r => panic!("{r:?}"),
    }
    // An ack in the middle of a dump does not end it; DUMP_INTR is noted.
    let mut ex = exchange(3, true);
    let mut dg = control(NLMSG_ERROR, 0, 3, &[0; 20]);
    dg.extend(reply(NLM_F_MULTI | NLM_F_DUMP_INTR, 3, device_attrs));
    let (r, got) = run(&mut ex, &dg);
    assert!(!r.unwrap());
    assert_eq!(got.len(), 1);
    assert!(ex.interrupted);
    // A dump answered by NLMSG_OVERRUN.
    assert!(run(&mut ex, &control(NLMSG_OVERRUN, 0, 3, &[])).0.is_err());
}

#[test]
fn acks_and_extended_ack_messages() {
    let mut ex = exchange(9, false);
    // A reply then the ack.
    let mut dg = reply(0, 9, device_attrs);
    let mut ack = 0i32.to_ne_bytes().to_vec();
    ack.extend_from_slice(&dg[..16]);
    dg.extend(control(NLMSG_ERROR, NLM_F_CAPPED, 9, &ack));
    let (r, got) = run(&mut ex, &dg);
    assert!(r.unwrap());
    assert_eq!(got.len(), 1);

    // A capped error with a message: error code, echoed header, TLVs.
    let req = Request::new(FAMILY, NLM_F_REQUEST | NLM_F_ACK, VDPA_CMD_DEV_DEL, 1)
        .finish(9)
        .to_vec();
    let mut tlv = Request::new(0, 0, 0, 0);
    tlv.put_strz(NLMSGERR_ATTR_MSG, "vdpa: device not found", "x")
        .unwrap();
    let mut p = (-libc::ENODEV).to_ne_bytes().to_vec();
    p.extend_from_slice(&req[..16]);
    p.extend_from_slice(&tlv.buf[20..]);
    let flags = NLM_F_CAPPED | NLM_F_ACK_TLVS;
    let e = run(&mut exchange(9, false), &control(NLMSG_ERROR, flags, 9, &p))
        .0
        .unwrap_err();
    let e = refine(e, "vdpa dev del x");
    assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
    let text = e.to_string();
    assert!(text.starts_with("vdpa dev del x: "), "{text}");
    assert!(text.ends_with("(kernel: vdpa: device not found)"), "{text}");

    // The same, uncapped: the whole request is echoed before the TLVs.
    let mut p = (-libc::ENODEV).to_ne_bytes().to_vec();
    p.extend_from_slice(&req);
    p.extend_from_slice(&tlv.buf[20..]);
    let (r, _) = run(
        &mut exchange(9, false),
        &control(NLMSG_ERROR, NLM_F_ACK_TLVS, 9, &p),
    );
    match r {
        Err(Error::Kernel { ext, .. }) => {
            assert_eq!(ext.as_deref(), Some("vdpa: device not found"))
        }
        r => panic!("{r:?}"),
    }

    // EPERM becomes the CAP_NET_ADMIN hint.
    let p = (-libc::EPERM).to_ne_bytes();
    let e = run(&mut exchange(9, false), &control(NLMSG_ERROR, 0, 9, &p))
        .0
        .unwrap_err();
    let text = refine(e, "vdpa dev add name x mgmtdev vduse").to_string();
    assert!(
        text.contains("run as root (vdpa management needs CAP_NET_ADMIN)"),
        "{text}"
    );
}

#[test]
fn error_messages_name_the_fix() {
    assert!(Error::FamilyNotFound.to_string().contains("modprobe vdpa"));
    let e = Error::DeviceExists { name: "vd0".into() };
    assert!(e
        .to_string()
        .starts_with("a vdpa device named 'vd0' already exists"));
    let e = Error::Kernel {
        op: "vdpa dev add name vd0 mgmtdev vduse".into(),
        source: io::Error::from_raw_os_error(libc::EINVAL),
        ext: None,
        hint: Some("is there a VDUSE device?".into()),
    };
    assert!(e.to_string().ends_with(": is there a VDUSE device?"));
}

/// A generic netlink socket: every Linux host has one, so a failure here fails the test.
fn live() -> VdpaNetlink {
    VdpaNetlink::connect().unwrap_or_else(|e| panic!("no generic netlink socket: {e}"))
}

#[test]
fn live_resolves_the_controller_family() {
    let mut nl = live();
    assert_eq!(nl.resolve_family("nlctrl").unwrap(), GENL_ID_CTRL);
    let e = nl.resolve_family("no-such-family").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    // Right after an error the socket still works.
    assert_eq!(nl.resolve_family("nlctrl").unwrap(), GENL_ID_CTRL);
}

#[test]
fn live_dumps_the_families() {
    let mut nl = live();
    // Dump the controller's family list with the same machinery as the vdpa dumps.
    nl.family = GENL_ID_CTRL;
    let names = nl
        .dump(CTRL_CMD_GETFAMILY, "list families", |attrs| {
            let mut name = None;
            for a in Attrs::new(attrs) {
                let a = a?;
                if a.kind == CTRL_ATTR_FAMILY_NAME {
                    name = Some(a.string()?);
                }
            }
            name.ok_or_else(|| malformed("no name"))
        })
        .unwrap();
    assert!(names.iter().any(|n| n == "nlctrl"), "{names:?}");

    // A dump abandoned midway (here: a parse error on its first entry) does not block
    // the next one.
    let e = nl
        .dump(CTRL_CMD_GETFAMILY, "list families", |_| {
            Err::<(), _>(malformed("refused"))
        })
        .unwrap_err();
    assert!(matches!(e, Error::Malformed(_)), "{e}");
    let again = nl
        .dump(CTRL_CMD_GETFAMILY, "list families", |_| Ok(()))
        .unwrap();
    assert_eq!(again.len(), names.len());
}

#[test]
fn live_open_reports_a_missing_family_or_works() {
    match VdpaNetlink::open() {
        Ok(mut nl) => {
            // vdpa is loaded on this host: listing needs no privilege.
            nl.list_mgmtdevs().unwrap();
            nl.list_devices().unwrap();
        }
        // A host without vdpa (CONFIG_VDPA unset): the error that says so.
        Err(Error::FamilyNotFound) => {}
        Err(e) => panic!("{e}"),
    }
}
