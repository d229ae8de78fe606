//! Where a forward pass's time goes, per operation (norms, linear layers, attention, ...),
//! on the CPU and the GPU alike, while profiling is on: `CORTEX_PROFILE=1` from the start,
//! or [`set_profiling`] (Python: `cortex._core.profile(enable=True)`). Off, each operation
//! costs one atomic load more.
//!
//! On the GPU each operation then waits for the device before and after it, and decode steps
//! run op by op rather than as CUDA graphs: slower passes, but every kernel is charged to
//! the operation that launched it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use parking_lot::Mutex;

use crate::error::Result;

/// `(operation, calls, seconds)`, in the order operations first ran.
static PROFILE: Mutex<Vec<(&'static str, u64, f64)>> = Mutex::new(Vec::new());

fn switch() -> &'static AtomicBool {
    static ON: OnceLock<AtomicBool> = OnceLock::new();
    ON.get_or_init(|| AtomicBool::new(std::env::var("CORTEX_PROFILE").is_ok_and(|v| v == "1")))
}

/// Whether operations are being timed.
pub fn profiling() -> bool {
    switch().load(Ordering::Relaxed)
}

/// Turns profiling on or off for the operations that start from now on.
pub fn set_profiling(on: bool) {
    switch().store(on, Ordering::Relaxed);
}

/// The profile so far, and optionally a fresh start.
pub fn profile(reset: bool) -> Vec<(&'static str, u64, f64)> {
    let mut p = PROFILE.lock();
    let out = p.clone();
    if reset {
        p.clear();
    }
    out
}

/// Charges one call of `seconds` to `op`.
pub fn record(op: &'static str, seconds: f64) {
    let mut p = PROFILE.lock();
    match p.iter_mut().find(|e| e.0 == op) {
        Some(e) => {
            e.1 += 1;
            e.2 += seconds;
        }
        None => p.push((op, 1, seconds)),
    }
}

/// Runs `f`, charged to `op` when profiling (work that ends when `f` returns: the CPU's).
pub fn timed<T>(op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !profiling() {
        return f();
    }
    let start = Instant::now();
    let out = f()?;
    record(op, start.elapsed().as_secs_f64());
    Ok(out)
}
