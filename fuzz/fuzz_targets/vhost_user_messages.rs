//! The vhost-user session (rust-vmm `vhost` parsing plus our own checks and the status
//! messages we answer ourselves) fed the input as the byte stream of a frontend, over a real
//! socket pair. The session must end (the stream ends) without a panic or a hang.
#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;
use vudev_blk::{BlockConfig, BlockDevice, MemoryBackend};
use vudev_vhost_user::serve_frontend;

fuzz_target!(|data: &[u8]| {
    // A write to a socket the session has closed must fail, not kill the process.
    // SAFETY: setting a signal disposition to SIG_IGN has no memory effects.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let cfg = BlockConfig {
        num_queues: 2,
        serial: "fuzz".into(),
        ..BlockConfig::new(1 << 20)
    };
    let dev = Arc::new(BlockDevice::new(
        cfg,
        Arc::new(MemoryBackend::new(1 << 20, false).unwrap()),
    ));
    let (ours, theirs) = UnixStream::pair().unwrap();
    let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let input = data.to_vec();
    // The frontend: writes the input, closes its side for writing, reads every reply.
    let frontend = std::thread::spawn(move || {
        let mut w = &theirs;
        let _ = w.write_all(&input);
        let _ = theirs.shutdown(Shutdown::Write);
        let mut sink = Vec::new();
        let _ = (&theirs).read_to_end(&mut sink);
    });
    serve_frontend(dev, 256, &Default::default(), ours, &stop, None, &Default::default());
    frontend.join().unwrap();
});
