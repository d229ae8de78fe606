//! How far a long step (loading a model, converting one) has got, readable from another
//! thread (the Python side draws a progress bar from it), and a request to stop it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::{Error, Result};

#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicUsize,
    pub total: AtomicUsize,
    cancelled: AtomicBool,
}

impl Progress {
    /// A new step of `total` units, none done.
    pub fn start(&self, total: usize) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// One more unit done, or `Error::Cancelled` if the step was asked to stop.
    pub fn advance(&self) -> Result<()> {
        self.check_cancelled()?;
        self.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `Error::Cancelled` once the step was asked to stop (checked before a unit's work).
    pub fn check_cancelled(&self) -> Result<()> {
        if self.is_cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    /// `(done, total)`.
    pub fn get(&self) -> (usize, usize) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// True once the step was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Asks the step to stop at its next unit.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}
