//! SIGINT/SIGTERM: blocked in every thread and taken synchronously by the main thread.

use std::io;

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

/// Waits for SIGINT or SIGTERM (which must be blocked) and returns its number.
pub fn wait_termination() -> io::Result<i32> {
    let set = term_set();
    let mut sig = 0;
    // SAFETY: `set` is initialised and `sig` is a valid out pointer.
    let r = unsafe { libc::sigwait(&set, &mut sig) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(sig)
}
