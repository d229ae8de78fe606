//! Threads for compute.
//!
//! * Rayon's global pool runs the coarse work (loading, repacking, conversion, some of
//!   candle's kernels; its k-quant products run on candle's barrier pool, sized the same). It is built once, before the first model loads, so that its size follows
//!   `CORTEX_NUM_THREADS` (default: one thread per core) and its threads carry a name of
//!   their own.
//! * [`parallel_for`] runs the forward pass's fine-grained work (each quantized matmul,
//!   each layer's attention): a decode step has a few hundred such operations of tens of
//!   microseconds each, so waking a sleeping thread for each (rayon's way) would cost as
//!   much as the work. Its helper threads are persistent and spin for a while between
//!   operations, then sleep; the calling thread takes tasks too, so `CORTEX_NUM_THREADS`
//!   threads compute in all.
//! * `fork()` copies only the thread that calls it: in a child forked after these threads
//!   started, work handed to them would wait forever. [`register_fork_handler`] marks such
//!   a child (huggingface/tokenizers does the same for rayon, `utils/parallelism.rs`), and
//!   [`check_not_forked`] turns the hang into an error at every entry point.

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Once, OnceLock};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// Set once any thread of ours (rayon's pool, the compute helpers, an engine) has started.
static THREADS_STARTED: AtomicBool = AtomicBool::new(false);
/// Set in a child forked after [`THREADS_STARTED`]: none of those threads exist there.
static FORKED_AFTER_THREADS: AtomicBool = AtomicBool::new(false);

/// Records that this process now runs threads of ours, which a forked child will lack.
pub fn note_threads_started() {
    THREADS_STARTED.store(true, Ordering::SeqCst);
}

/// Runs in the child of every `fork()` (also Python's `os.fork` and multiprocessing's
/// "fork" start method); only atomics here, as async-signal safety requires.
extern "C" fn in_forked_child() {
    if THREADS_STARTED.load(Ordering::SeqCst) {
        FORKED_AFTER_THREADS.store(true, Ordering::SeqCst);
    }
}

/// Registers [`in_forked_child`] with `pthread_atfork`, once per process.
pub fn register_fork_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        extern "C" {
            fn pthread_atfork(
                prepare: Option<extern "C" fn()>,
                parent: Option<extern "C" fn()>,
                child: Option<extern "C" fn()>,
            ) -> std::ffi::c_int;
        }
        // SAFETY: the C signature of pthread_atfork (POSIX), given a handler that lives as
        // long as the process and touches only atomics. It fails only for lack of memory,
        // in which case a forked child keeps today's behaviour.
        #[allow(unsafe_code)]
        unsafe {
            pthread_atfork(None, None, Some(in_forked_child));
        }
    });
}

/// Fails in a child forked after this process's compute threads started: they do not
/// exist there, so any work would wait for them forever.
pub fn check_not_forked() -> Result<()> {
    if FORKED_AFTER_THREADS.load(Ordering::SeqCst) {
        return Err(Error::Engine(
            "this process was forked (os.fork, or multiprocessing's default 'fork' start \
             method on Linux) after Cortex had started its compute threads, which a fork does \
             not copy; use the 'spawn' start method (multiprocessing.set_start_method('spawn') \
             or get_context('spawn')), or load models only in the child processes"
                .into(),
        ));
    }
    Ok(())
}

/// `CORTEX_NUM_THREADS`, or the number of cores (read once: finding the cores reads
/// cgroup files).
pub fn num_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("CORTEX_NUM_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
            })
    })
}

/// Builds rayon's global pool if nobody has yet, and sizes candle's barrier pool (its
/// k-quant kernels, e.g. GGUF Q6_K, run there); later calls do nothing.
pub fn init_thread_pool() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // Candle's barrier pool (its k-quant kernels) reads these when its first kernel
        // runs, which is after this. Unset, it takes every core whatever
        // `CORTEX_NUM_THREADS` says, and each worker spins 25,000 rounds (about a
        // millisecond) after every kernel: between our operations that takes a core from
        // our own threads (Gemma 3 270M Q4_K_M decoded 25 % faster on 2 cores with 2,000).
        // A user's own setting wins. Only while no thread of ours runs (another thread
        // reading the environment while it changes is undefined in C); a child process
        // inherits them, as it would the user's.
        if !THREADS_STARTED.load(Ordering::SeqCst) {
            for (name, value) in [
                ("CANDLE_NUM_THREADS", num_threads().to_string()),
                ("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000".to_string()),
            ] {
                if std::env::var_os(name).is_none() {
                    std::env::set_var(name, value);
                }
            }
        }
        note_threads_started();
        // Fails only if the pool was already built (by an embedding program): keep that one.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads())
            .thread_name(|i| format!("cortex-compute-{i}"))
            .build_global();
    });
}

/// Elements of simple arithmetic (a norm, an activation, a rounding) below which a piece of
/// work costs less than handing it to another thread.
const MIN_PER_TASK: usize = 8192;

/// How many of `rows` rows of `width` elements of simple arithmetic each task takes: one
/// task per [`MIN_PER_TASK`] elements, at most one per thread, the rows shared evenly (a
/// last task with a remainder would keep the others waiting).
pub fn rows_per_task(rows: usize, width: usize) -> usize {
    let tasks = (rows * width / MIN_PER_TASK).clamp(1, num_threads());
    rows.div_ceil(tasks).max(1)
}

/// Runs `f(task)` for every task in `0..tasks` on the compute threads (the caller among
/// them) and returns when all are done. A panic in a task is re-raised here once every
/// task has finished. Called from inside a task, it runs the tasks in place.
pub fn parallel_for(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    let pool = Pool::global();
    if tasks <= 1 || tasks > MAX_TASKS || pool.helpers == 0 || IN_TASK.get() {
        (0..tasks).for_each(f);
        return;
    }
    // One operation at a time: a second caller (another engine) waits its turn.
    let _turn = pool.turn.lock();
    let shared = &pool.shared;
    // SAFETY (of the lifetime erasure): helpers call `f` only for tasks they claimed under
    // this operation's generation, and this function returns only after every claimed task
    // has finished (`pending` reaches 0), so `f` outlives every use.
    let job: Job = Job { f: unsafe_erase(f) };
    // Posting order matters: the claim word moves to the new generation before the job
    // pointer changes, so a helper still holding the previous generation that reads the
    // new pointer fails its claim instead of running a task of the wrong operation.
    let generation = shared.generation.load(Ordering::Relaxed) + 1;
    shared.pending.store(tasks, Ordering::Relaxed);
    shared
        .claim
        .store(Claim::pack(generation, tasks, 0), Ordering::Release);
    shared
        .job
        .store((&raw const job).cast_mut(), Ordering::Release);
    shared.generation.store(generation, Ordering::Release);
    if shared.sleepers.load(Ordering::Acquire) > 0 {
        let _lock = shared.sleep_lock.lock();
        shared.wake.notify_all();
    }
    IN_TASK.set(true);
    shared.run(generation, &raw const job);
    IN_TASK.set(false);
    while shared.pending.load(Ordering::Acquire) > 0 {
        std::hint::spin_loop();
    }
    if let Some(panic) = shared.panic.lock().take() {
        resume_unwind(panic);
    }
}

/// Runs `f(i, chunk)` for each `chunk`-sized piece of `data` (the last may be shorter), in
/// parallel as [`parallel_for`] does.
pub fn parallel_chunks_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    let (len, chunk) = (data.len(), chunk.max(1));
    let base = SendPtr(data.as_mut_ptr());
    parallel_for(len.div_ceil(chunk), &|i| {
        let start = i * chunk;
        let n = chunk.min(len - start);
        // SAFETY: tasks have distinct `i`, hence disjoint ranges inside `data`, which
        // stays mutably borrowed until every task has finished.
        #[allow(unsafe_code)]
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), n) };
        f(i, piece);
    });
}

/// A pointer that tasks share, each using its own part of what it points at.
pub struct SendPtr<T>(pub *mut T);

impl<T> SendPtr<T> {
    pub fn get(&self) -> *mut T {
        self.0
    }
}

// SAFETY: whoever shares one promises that tasks touch disjoint elements.
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for SendPtr<T> {}
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for SendPtr<T> {}

thread_local! {
    /// True on the pool's helpers, and on a caller while it runs tasks: an operation
    /// started there runs in place (waiting for the pool from inside it would deadlock).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// The task function with its lifetime erased (see `parallel_for`'s safety note).
type TaskFn = *const (dyn Fn(usize) + Sync + 'static);

// A pointer cast cannot change a trait object's lifetime bound; a transmute can.
#[allow(unsafe_code, clippy::transmute_ptr_to_ptr)]
fn unsafe_erase(f: &(dyn Fn(usize) + Sync)) -> TaskFn {
    // SAFETY: a fat-pointer cast that only widens the lifetime; see `parallel_for`.
    unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), TaskFn>(f) }
}

struct Job {
    f: TaskFn,
}

/// Tasks of one operation at most (20 bits of the claim word).
const MAX_TASKS: usize = (1 << 20) - 1;

/// The claim word: generation (low 24 bits of it), task count and next task, 20 bits each.
/// One word, so that what a helper reads about an operation always belongs together.
struct Claim;

impl Claim {
    fn pack(generation: u64, tasks: usize, next: usize) -> u64 {
        (generation & 0xFF_FFFF) << 40 | (tasks as u64) << 20 | next as u64
    }

    /// `(generation & 0xFFFFFF, tasks, next)`.
    fn unpack(word: u64) -> (u64, usize, usize) {
        (
            word >> 40,
            (word >> 20 & 0xF_FFFF) as usize,
            (word & 0xF_FFFF) as usize,
        )
    }
}

/// A value alone on its cache lines: the word helpers spin on, the claim word and the
/// count of pending tasks change at different times, and sharing a line would make every
/// claim invalidate what the spinning helpers read.
#[repr(align(128))]
struct Padded<T>(T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

struct Shared {
    /// The current operation (valid while its tasks are pending).
    job: AtomicPtr<Job>,
    /// Bumped for each operation; helpers watch it.
    generation: Padded<AtomicU64>,
    /// See [`Claim`]: a claim is valid only under its own generation, so a helper that
    /// wakes late can never take a task of a newer operation for an old one.
    claim: Padded<AtomicU64>,
    /// Claimed tasks not yet finished, plus unclaimed ones.
    pending: Padded<AtomicUsize>,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    sleepers: AtomicUsize,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    /// Claims and runs tasks of operation `generation`, whose job `job` is (if the
    /// operation is still running), until none is left.
    fn run(&self, generation: u64, job: *const Job) {
        loop {
            let claim = self.claim.load(Ordering::Acquire);
            let (g, tasks, task) = Claim::unpack(claim);
            if g != generation & 0xFF_FFFF || task >= tasks {
                return;
            }
            if self
                .claim
                .compare_exchange_weak(claim, claim + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // SAFETY: the task was claimed under this operation's generation, so the
            // operation is still waiting for it: `job` is its job and the function alive.
            #[allow(unsafe_code)]
            let f = unsafe { &*(*job).f };
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| f(task))) {
                self.panic.lock().get_or_insert(panic);
            }
            self.pending.fetch_sub(1, Ordering::Release);
        }
    }

    fn helper(&self) {
        // Rounds of waiting for the next operation: first spinning (the gaps between a
        // step's operations are microseconds), then yielding the core to any other thread
        // that wants it (the engine's caller, say), then sleeping.
        const SPINS: u32 = 1 << 10;
        const YIELDS: u32 = 1 << 12;
        IN_TASK.set(true);
        let mut seen = self.generation.load(Ordering::Acquire);
        loop {
            let mut spins = 0;
            let generation = loop {
                let g = self.generation.load(Ordering::Acquire);
                if g != seen {
                    break g;
                }
                if spins < SPINS {
                    spins += 1;
                    std::hint::spin_loop();
                } else if spins < SPINS + YIELDS {
                    spins += 1;
                    std::thread::yield_now();
                } else {
                    let mut lock = self.sleep_lock.lock();
                    self.sleepers.fetch_add(1, Ordering::AcqRel);
                    while self.generation.load(Ordering::Acquire) == seen {
                        self.wake.wait(&mut lock);
                    }
                    self.sleepers.fetch_sub(1, Ordering::AcqRel);
                }
            };
            seen = generation;
            // Read after the generation (Acquire); `run` dereferences it only for a task
            // claimed under that generation, while its operation is alive.
            self.run(generation, self.job.load(Ordering::Acquire));
        }
    }
}

struct Pool {
    helpers: usize,
    turn: Mutex<()>,
    shared: Arc<Shared>,
}

impl Pool {
    fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let shared = Arc::new(Shared {
                job: AtomicPtr::new(std::ptr::null_mut()),
                generation: Padded(AtomicU64::new(0)),
                claim: Padded(AtomicU64::new(0)),
                pending: Padded(AtomicUsize::new(0)),
                panic: Mutex::new(None),
                sleepers: AtomicUsize::new(0),
                sleep_lock: Mutex::new(()),
                wake: Condvar::new(),
            });
            let helpers = num_threads() - 1;
            note_threads_started();
            for i in 0..helpers {
                let helper = Arc::clone(&shared);
                let spawned = std::thread::Builder::new()
                    .name(format!("cortex-worker-{i}"))
                    .spawn(move || helper.helper());
                if spawned.is_err() {
                    // No thread: the caller does all the work (correct, slower).
                    return Pool {
                        helpers: i,
                        turn: Mutex::new(()),
                        shared,
                    };
                }
            }
            Pool {
                helpers,
                turn: Mutex::new(()),
                shared,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_once_from_any_number_of_callers() {
        let callers: Vec<_> = (0..4)
            .map(|c| {
                std::thread::spawn(move || {
                    for n in [0usize, 1, 2, 7, 100, 1000] {
                        let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                        parallel_for(n, &|t| {
                            hits[t].fetch_add(1, Ordering::Relaxed);
                            // A nested operation runs in place.
                            parallel_for(3, &|_| {});
                        });
                        assert!(
                            hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                            "caller {c}, {n} tasks"
                        );
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
        let mut data = vec![0usize; 1001];
        parallel_chunks_mut(&mut data, 10, &|i, chunk| {
            chunk.iter_mut().for_each(|x| *x += i);
        });
        assert!(data.iter().enumerate().all(|(j, &x)| x == j / 10));
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_after_the_others_finish() {
        let done = AtomicU32::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            parallel_for(64, &|t| {
                assert!(t != 5, "task five");
                done.fetch_add(1, Ordering::Relaxed);
            });
        }));
        assert!(result.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 63);
        // The pool keeps working.
        let count = AtomicU32::new(0);
        parallel_for(10, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 10);
    }
}
