//! How long a queue worker busy-polls before it sleeps.
//!
//! Sleeping costs a wake-up per request (a notification, a system call, a context switch);
//! polling costs a CPU that spins. [`Polling::Adaptive`], the default, spins only as long as
//! that pays: the budget grows (from 4 µs, doubling, up to [`MAX_ADAPTIVE`]) while work
//! arrives within that much time of the worker going idle, and halves when it does not, so an
//! idle queue sleeps and costs nothing. This is the rule QEMU's iothreads follow.

use std::time::Duration;

/// The largest budget [`Polling::Adaptive`] grows to.
pub const MAX_ADAPTIVE: Duration = Duration::from_micros(32);
/// The budget [`Polling::Adaptive`] starts from once polling would have paid.
const FIRST: Duration = Duration::from_micros(4);
/// Below this a budget is not worth spinning for.
const MIN: Duration = Duration::from_micros(1);

/// How a worker polls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Polling {
    /// Never: sleep as soon as there is nothing to do.
    Off,
    /// For this long after the last activity, always.
    Fixed(Duration),
    /// For as long as it pays, up to [`MAX_ADAPTIVE`] (see the module).
    #[default]
    Adaptive,
}

/// One worker's current budget.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budget {
    mode: Polling,
    current: Duration,
}

impl Budget {
    pub(crate) fn new(mode: Polling) -> Budget {
        Budget {
            mode,
            current: Duration::ZERO,
        }
    }

    /// How long to poll now before sleeping.
    pub(crate) fn now(&self) -> Duration {
        match self.mode {
            Polling::Off => Duration::ZERO,
            Polling::Fixed(d) => d,
            Polling::Adaptive => self.current,
        }
    }

    /// The worker went idle and waited `waited` (polling, then sleeping) for its next event.
    pub(crate) fn waited(&mut self, waited: Duration) {
        if self.mode != Polling::Adaptive {
            return;
        }
        if waited <= self.current {
            // Polling caught it: the budget is right.
        } else if waited > MAX_ADAPTIVE {
            // It would have taken too long a poll: poll less.
            self.current /= 2;
            if self.current < MIN {
                self.current = Duration::ZERO;
            }
        } else {
            // A little longer and polling would have caught it.
            self.current = (self.current * 2).max(FIRST).min(MAX_ADAPTIVE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn adaptive_grows_while_work_comes_soon_and_shrinks_to_nothing_when_idle() {
        let mut b = Budget::new(Polling::Adaptive);
        assert_eq!(b.now(), Duration::ZERO, "no polling before any activity");
        b.waited(10 * US);
        assert_eq!(b.now(), 4 * US);
        for _ in 0..10 {
            b.waited((b.now() + US).min(MAX_ADAPTIVE));
        }
        assert_eq!(b.now(), MAX_ADAPTIVE, "grows no further than the maximum");
        b.waited(20 * US);
        assert_eq!(b.now(), MAX_ADAPTIVE, "caught by the poll: unchanged");
        // Idle: each long sleep halves it, until it polls no more.
        for _ in 0..10 {
            b.waited(Duration::from_secs(1));
        }
        assert_eq!(b.now(), Duration::ZERO);
    }

    #[test]
    fn fixed_and_off_do_not_adapt() {
        let mut f = Budget::new(Polling::Fixed(50 * US));
        let mut o = Budget::new(Polling::Off);
        for w in [US, Duration::from_secs(1), 10 * US] {
            f.waited(w);
            o.waited(w);
        }
        assert_eq!(f.now(), 50 * US);
        assert_eq!(o.now(), Duration::ZERO);
    }
}
