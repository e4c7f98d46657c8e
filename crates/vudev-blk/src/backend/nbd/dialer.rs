//! Connecting (again) off the data path: a handshake blocks for up to its deadline, so it runs
//! on a thread of its own, which waits for a request, pauses as long as asked (the backoff),
//! connects, and leaves the result for the connection's driver with an eventfd to poll.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::handshake::{connect, Negotiated};
use super::uri::NbdUri;
use crate::backend::kit::eventfd;

#[derive(Default)]
struct Asked {
    /// A connection is wanted after this pause.
    after: Option<Duration>,
    result: Option<io::Result<Negotiated>>,
    stop: bool,
}

struct Line {
    uri: NbdUri,
    /// The deadline of one handshake.
    wait: Duration,
    asked: Mutex<Asked>,
    changed: Condvar,
    /// Readable when a result waits.
    ready: File,
}

fn lock(m: &Mutex<Asked>) -> MutexGuard<'_, Asked> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes connections to one export when asked, on its own thread.
pub(super) struct Dialer {
    line: Arc<Line>,
}

impl Dialer {
    /// A dialer for `uri`'s export whose handshakes end within `wait`.
    pub(super) fn start(uri: &NbdUri, wait: Duration) -> io::Result<Dialer> {
        let line = Arc::new(Line {
            uri: uri.clone(),
            wait,
            asked: Mutex::new(Asked::default()),
            changed: Condvar::new(),
            ready: eventfd()?,
        });
        let l = line.clone();
        std::thread::Builder::new()
            .name("vudev-nbd-dial".into())
            .spawn(move || l.run())?;
        Ok(Dialer { line })
    }

    /// Asks for a connection, made after `pause`.
    pub(super) fn ask(&self, pause: Duration) {
        lock(&self.line.asked).after = Some(pause);
        self.line.changed.notify_all();
    }

    /// The connection asked for, or why it failed, once there is one.
    pub(super) fn take(&self) -> Option<io::Result<Negotiated>> {
        let r = lock(&self.line.asked).result.take();
        if r.is_some() {
            let mut counter = [0u8; 8];
            let _ = (&self.line.ready).read(&mut counter);
        }
        r
    }

    /// Readable when [`Dialer::take`] has something.
    pub(super) fn fd(&self) -> RawFd {
        self.line.ready.as_raw_fd()
    }
}

impl Drop for Dialer {
    fn drop(&mut self) {
        lock(&self.line.asked).stop = true;
        self.line.changed.notify_all();
    }
}

impl Line {
    fn run(&self) {
        loop {
            let mut a = lock(&self.asked);
            while a.after.is_none() && !a.stop {
                a = self.changed.wait(a).unwrap_or_else(|e| e.into_inner());
            }
            let Some(pause) = a.after.take() else { return };
            // The pause, cut short by a stop.
            let until = Instant::now() + pause;
            while !a.stop && Instant::now() < until {
                let left = until - Instant::now();
                a = self
                    .changed
                    .wait_timeout(a, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if a.stop {
                return;
            }
            drop(a);
            let r = connect(&self.uri, self.wait);
            let mut a = lock(&self.asked);
            if a.stop {
                return;
            }
            a.result = Some(r);
            let _ = (&self.ready).write(&1u64.to_ne_bytes());
        }
    }
}
