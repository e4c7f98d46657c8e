//! `vudev vdpa list | attach | detach`.

use std::time::{Duration, Instant};

use vdpa::{sysfs, VdpaNetlink, VDUSE_MGMTDEV};

use crate::cli::VdpaCommand;

/// Runs a vdpa management command.
pub fn run(cmd: VdpaCommand) -> Result<(), String> {
    let mut nl = VdpaNetlink::open().map_err(|e| e.to_string())?;
    match cmd {
        VdpaCommand::List => {
            for m in nl.list_mgmtdevs().map_err(|e| e.to_string())? {
                let name = match &m.bus {
                    Some(bus) => format!("{bus}/{}", m.name),
                    None => m.name.clone(),
                };
                println!("mgmtdev {name} classes {:#x}", m.supported_classes);
            }
            for d in nl.list_devices().map_err(|e| e.to_string())? {
                let driver = sysfs::bound_driver(&d.name)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| "-".into());
                let node = sysfs::block_device_of(&d.name)
                    .map(|b| format!("/dev/{b}"))
                    .or_else(|| {
                        sysfs::wait_for_vhost_vdpa_dev(&d.name, Duration::ZERO)
                            .map(|p| p.display().to_string())
                    })
                    .unwrap_or_else(|| "-".into());
                println!(
                    "dev {} mgmtdev {} device_id {} max_vqs {} max_vq_size {} driver {driver} node {node}",
                    d.name, d.mgmtdev, d.device_id, d.max_vqs, d.max_vq_size
                );
            }
            Ok(())
        }
        VdpaCommand::Attach { name, driver } => {
            nl.add_device(&name, VDUSE_MGMTDEV)
                .map_err(|e| e.to_string())?;
            if let Some(want) = driver {
                // The kernel binds a driver right away; move it if it is not the wanted one.
                let deadline = Instant::now() + Duration::from_secs(5);
                while sysfs::bound_driver(&name).ok().flatten().is_none()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let cur = sysfs::bound_driver(&name).ok().flatten();
                if cur.as_deref() != Some(want.kernel_name()) {
                    sysfs::bind_driver(&name, want.kernel_name()).map_err(|e| e.to_string())?;
                }
            }
            let node = sysfs::block_device_of(&name)
                .map(|b| format!("/dev/{b}"))
                .or_else(|| {
                    sysfs::wait_for_vhost_vdpa_dev(&name, Duration::from_secs(5))
                        .map(|p| p.display().to_string())
                });
            match node {
                Some(n) => println!("{name}: {n}"),
                None => println!("{name}: attached"),
            }
            Ok(())
        }
        VdpaCommand::Detach { name } => {
            nl.del_device(&name).map_err(|e| e.to_string())?;
            println!("{name}: detached");
            Ok(())
        }
    }
}
