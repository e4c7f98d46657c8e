//! One export, serving: started and stopped the same way by `vudev export` (one, until a
//! signal) and by `vudev serve` (many, added and removed at run time).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;
use vudev_core::socket::Access;
use vudev_vduse::authority::Authority;
use vudev_vduse::lifecycle::Attached;
use vudev_vduse::{MessageLoop, VduseExport, VduseOptions};
use vudev_vhost_user::{VhostUserOptions, VhostUserServer};

use crate::cli::{VduseArgs, VhostUserArgs};
use crate::device::{worker_options, Built};

/// A VDUSE export: its device created (or adopted), its message loop answering the kernel,
/// and the device on the vdpa bus unless `--no-attach`.
pub struct VduseServing {
    export: VduseExport,
    messages: MessageLoop,
    attached: Option<Attached>,
    /// False for a device handed over (`--device-fd`): left on the bus as it is.
    owned: bool,
}

impl VduseServing {
    /// Creates (or adopts) the device and attaches it; `authority` does what needs
    /// privileges.
    pub fn start(
        args: &VduseArgs,
        built: &Built,
        authority: Arc<dyn Authority>,
    ) -> Result<Self, String> {
        let dev = &args.device;
        let owned = authority.owns_device();
        let export = VduseExport::create(
            built.virtio(),
            &VduseOptions {
                name: args.name.clone(),
                queue_size: dev.queue_size,
                state_dir: Some(args.state_dir.clone()),
                bounce_umem: args.bounce_umem,
                workers: worker_options(dev),
            },
            authority,
        )
        .map_err(|e| e.to_string())?;
        let messages = export.spawn_message_loop().map_err(|e| e.to_string())?;
        tracing::info!(
            name = %args.name,
            queues = dev.num_queues,
            queue_size = dev.queue_size,
            "serving {}",
            built.description
        );
        let mut serving = VduseServing {
            export,
            messages,
            attached: None,
            owned,
        };
        if !owned {
            tracing::info!(
                "the device was handed over: its creator attaches it (`vudev vdpa attach {} \
                 [--driver vhost-vdpa]`)",
                args.name
            );
            return Ok(serving);
        }
        if args.no_attach {
            tracing::info!(
                "not attached: run `vudev vdpa attach {} [--driver vhost-vdpa]` to use it",
                args.name
            );
            return Ok(serving);
        }
        let was = serving.export.is_attached();
        let on = match serving.export.attach() {
            Ok(on) => on,
            Err(e) => {
                let _ = serving.stop();
                return Err(e.to_string());
            }
        };
        match &on {
            Attached::NoNode => tracing::warn!(
                "attached {}, but no device node appeared: is virtio_blk (or virtio_net) loaded?",
                args.name
            ),
            // An adopted device stays where the previous daemon put it.
            on if was => tracing::info!("{} is already attached: {on}", args.name),
            on => tracing::info!("attached: {} is {on}", args.name),
        }
        serving.attached = Some(on);
        Ok(serving)
    }

    /// Where the device is: `/dev/vda`, or the vdpa driver it is bound to; `None` when it
    /// was not attached.
    pub fn attached(&self) -> Option<&Attached> {
        self.attached.as_ref()
    }

    /// Tells the driver that the config space changed (an online resize).
    pub fn config_changed(&self) -> Result<(), String> {
        self.export.config_changed().map_err(|e| e.to_string())
    }

    /// Takes the device off the bus (while the message loop still answers the kernel's
    /// reset), stops the loop and the queues, and destroys the device.
    pub fn stop(self) -> Result<(), String> {
        let name = self.export.name().to_string();
        let detached = match if self.owned {
            self.export.detach()
        } else {
            Ok(false)
        } {
            Ok(true) => {
                tracing::info!("detached {name}");
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(format!("cannot detach {name}: {e}")),
        };
        self.messages.stop();
        let destroyed = self.export.shutdown().map_err(|e| e.to_string());
        detached.and(destroyed)
    }
}

/// A vhost-user export: its socket listening, frontends served one after another on a
/// thread of its own.
pub struct VhostUserServing {
    server: Arc<VhostUserServer>,
    stop: EventFd,
    thread: JoinHandle<Result<(), String>>,
    failure: Arc<Mutex<Option<String>>>,
}

impl VhostUserServing {
    /// Listens on the socket and starts serving; `on_failure` runs on the serving thread if
    /// the server fails (the listening socket broke).
    pub fn start(
        args: &VhostUserArgs,
        built: &Built,
        on_failure: impl FnOnce() + Send + 'static,
    ) -> Result<Self, String> {
        let server = VhostUserServer::bind(
            built.virtio(),
            &VhostUserOptions {
                socket: args.socket.clone(),
                socket_access: Access {
                    mode: args.socket_mode,
                    uid: args.socket_user,
                    gid: args.socket_group,
                },
                queue_size: args.device.queue_size,
                workers: worker_options(&args.device),
            },
        )
        .map_err(|e| format!("cannot listen on {}: {e}", args.socket.display()))?;
        tracing::info!(
            socket = %args.socket.display(),
            queues = args.device.num_queues,
            "serving {}",
            built.description
        );
        let server = Arc::new(server);
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| format!("eventfd: {e}"))?;
        let failure = Arc::new(Mutex::new(None));
        let thread = {
            let (server, stop, failure) = (
                server.clone(),
                stop.try_clone().map_err(|e| format!("eventfd: {e}"))?,
                failure.clone(),
            );
            std::thread::Builder::new()
                .name("vudev-vhost-user".into())
                .spawn(move || {
                    let served = server
                        .serve(&stop)
                        .map_err(|e| format!("vhost-user server: {e}"));
                    if let Err(e) = &served {
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                        on_failure();
                    }
                    served
                })
                .map_err(|e| format!("cannot start the server thread: {e}"))?
        };
        Ok(VhostUserServing {
            server,
            stop,
            thread,
            failure,
        })
    }

    /// True while a frontend is connected.
    pub fn connected(&self) -> bool {
        self.server.frontend_connected()
    }

    /// Tells the frontend that the config space changed (an online resize): false if none is
    /// connected with a channel for that (the next one reads the new config).
    pub fn config_changed(&self) -> Result<bool, String> {
        self.server
            .config_changed()
            .map_err(|e| format!("cannot tell the frontend: {e}"))
    }

    /// Why the server stopped serving, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Disconnects the frontend (resetting the device) and removes the socket.
    pub fn stop(self) -> Result<(), String> {
        let _ = self.stop.write(1);
        self.thread
            .join()
            .unwrap_or_else(|_| Err("the server thread panicked".into()))
    }
}
