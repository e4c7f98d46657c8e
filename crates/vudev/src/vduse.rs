//! `vudev vduse create|destroy`: the privileged side of `vudev export vduse --device-fd`, for
//! a platform without an agent of its own. `create` makes the device an export's options
//! describe and leaves it unattached and unserved, as a crashed vudev would; the process that
//! then gets `/dev/vduse/NAME` as an open fd serves it without privileges.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use vdpa::VDPA_DEVICES;
use vudev_vduse::authority::{Authority, Local};
use vudev_vduse::{TransportError, VduseExport, VduseOptions};

use crate::cli::{VduseArgs, VduseCommand};
use crate::device::{self, worker_options};
use crate::sandbox::{give_rbd_records, give_state_file, Identity};

/// Runs `vudev vduse …`.
pub fn run(cmd: VduseCommand) -> Result<(), String> {
    match cmd {
        VduseCommand::Create { args, user, group } => {
            let owner = match user {
                Some((uid, primary)) => Some(Identity {
                    uid,
                    gid: group.or(primary).ok_or_else(|| {
                        format!("user {uid} has no entry in the user database: name its group with --group")
                    })?,
                }),
                None => None,
            };
            create(&args, owner)
        }
        VduseCommand::Destroy { name, state_dir } => destroy(&name, &state_dir),
    }
}

fn create(args: &VduseArgs, owner: Option<Identity>) -> Result<(), String> {
    let node = format!("/dev/vduse/{}", args.name);
    if Path::new(&node).exists() {
        return Err(format!(
            "{node} exists already: serve it (`vudev export vduse --device-fd`), or destroy it \
             first (`vudev vduse destroy {}`)",
            args.name
        ));
    }
    let built = device::build(&args.backend, &args.backend_options, &args.device, None)?;
    let local = Local::open().map_err(|e| e.to_string())?;
    let export = VduseExport::create(
        built.virtio(),
        &VduseOptions {
            name: args.name.clone(),
            queue_size: args.device.queue_size,
            state_dir: Some(args.state_dir.clone()),
            bounce_umem: args.bounce_umem,
            workers: worker_options(&args.device),
        },
        Arc::new(local),
    )
    .map_err(|e| e.to_string())?;
    if let Some(id) = owner {
        let given = give_state_file(&args.state_dir.join(format!("{}.state", args.name)), id)
            .and_then(|()| match args.backend.rbd {
                Some(_) => give_rbd_records(id),
                None => Ok(()),
            });
        if let Err(e) = given {
            // Dropped, the export destroys the device again.
            drop(export);
            return Err(e);
        }
    }
    export.leave();
    println!("{node}");
    tracing::info!(
        "created {node} ({}): hand it to `vudev export vduse --device-fd` with the same options, \
         then `vudev vdpa attach {}`",
        built.description,
        args.name
    );
    Ok(())
}

fn destroy(name: &str, state_dir: &Path) -> Result<(), String> {
    let local = Local::open().map_err(|e| e.to_string())?;
    // Served still? Then it stays where it is: taking it off the bus first would pull the disk
    // from under its users, and the destroy would be refused anyway.
    match local.open_device(name) {
        Ok(dev) => drop(dev),
        Err(TransportError::Vduse(vduse::VduseError::Io { source, .. }))
            if source.kind() == std::io::ErrorKind::ResourceBusy =>
        {
            return Err(format!(
                "cannot destroy {name}: a process still serves it (detach it with `vudev vdpa \
                 detach {name}` if it is attached, stop the vudev serving it, then destroy it)"
            ))
        }
        Err(TransportError::Vduse(vduse::VduseError::Io { source, .. }))
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Err(format!("no VDUSE device named '{name}'"))
        }
        Err(e) => return Err(e.to_string()),
    }
    if Path::new(VDPA_DEVICES).join(name).exists() {
        local.detach(name).map_err(|e| e.to_string())?;
    }
    // The kernel lets go of a device taken off the bus a moment later.
    let mut tries = 0;
    loop {
        match local.destroy_device(name) {
            Ok(_) => break,
            Err(TransportError::Vduse(e))
                if e.raw_os_error() == Some(libc::EBUSY) && tries < 20 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(TransportError::Vduse(e)) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(format!(
                    "cannot destroy {name}: a process still serves it (stop that vudev first)"
                ))
            }
            Err(TransportError::Vduse(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(format!("no VDUSE device named '{name}'"))
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    let _ = std::fs::remove_file(state_dir.join(format!("{name}.state")));
    tracing::info!("destroyed {name}");
    Ok(())
}
