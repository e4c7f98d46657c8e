//! SIGINT/SIGTERM: blocked in every thread and taken synchronously by the main thread.

use std::io;
use std::sync::mpsc;
use std::time::Duration;

fn term_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread and every thread it starts afterwards.
pub fn block_termination() -> io::Result<()> {
    let set = term_set();
    // SAFETY: `set` is initialised; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Waits up to `timeout` for SIGINT or SIGTERM (which must be blocked): its number, or
/// `None` if none came.
pub fn wait_termination_for(timeout: Duration) -> io::Result<Option<i32>> {
    let set = term_set();
    let tick = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos().into(),
    };
    // SAFETY: `set` and `tick` are initialised; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &tick) };
    if sig > 0 {
        return Ok(Some(sig));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(e),
    }
}

/// Runs `work` on a thread of its own while waiting for SIGINT/SIGTERM (which must be
/// blocked): its result, or `Err(signal)` if a signal came first. Startup steps that wait on
/// a peer (connecting to an NBD server) run this way, so a signal stops vudev at any moment;
/// the abandoned thread ends with the process.
pub fn unless_terminated<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> io::Result<Result<T, i32>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("vudev-start".into())
        .spawn(move || {
            let _ = tx.send(work());
        })?;
    loop {
        match rx.try_recv() {
            Ok(done) => return Ok(Ok(done)),
            Err(mpsc::TryRecvError::Disconnected) => {
                return Err(io::Error::other("the startup thread panicked"))
            }
            Err(mpsc::TryRecvError::Empty) => {}
        }
        if let Some(sig) = wait_termination_for(Duration::from_millis(20))? {
            return Ok(Err(sig));
        }
        if let Ok(done) = rx.recv_timeout(Duration::from_millis(1)) {
            return Ok(Ok(done));
        }
    }
}
