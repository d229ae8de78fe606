//! The compute thread pool: rayon's global pool, which candle's CPU kernels run on.
//! Built once, before the first model loads, so that its size follows
//! `CORTEX_NUM_THREADS` (default: one thread per core) and its threads carry a name of
//! their own (otherwise they would inherit the name of whichever thread first used them).

use std::sync::Once;

/// Builds the global pool if nobody has yet; later calls do nothing.
pub fn init_thread_pool() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let threads = std::env::var("CORTEX_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0); // rayon: 0 = one per core
                           // Fails only if the pool was already built (by an embedding program): keep that one.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cortex-compute-{i}"))
            .build_global();
    });
}
