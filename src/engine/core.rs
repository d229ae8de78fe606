//! The engine (vLLM's `EngineCore`): requests come in through a channel, and a background
//! thread repeats `step()` = [`Scheduler::schedule`] → [`Runner::execute`] (one forward
//! pass over every scheduled sequence) → [`Scheduler::update_from_output`] (sample,
//! detokenize, stop checks, stream each request's event to its caller). The scheduler and
//! the runner meet only through the step's [`super::scheduler::SchedulerOutput`] and its
//! logits. A single streamed prompt is the engine with one request; [`super::client`]
//! collects and streams results for callers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

use super::kv::{BlockPool, CacheShape, Ring, HOLE};
use super::request::{Event, Request, RequestId, RequestState, Sink};
use super::runner::Runner;
use super::sampling::SamplingParams;
use super::scheduler::{Scheduler, Windows};
use super::stats::Stats;

/// Positions the rotating cache always keeps from the start of a sequence (mlx-lm's
/// `RotatingKVCache(keep=4)`: the first tokens act as attention sinks).
pub const ROTATING_KEEP: usize = 4;

/// Bytes of memory where the KV cache goes: the GPU's for a model on one, else the host's.
struct Memory {
    available: usize,
    total: usize,
}

fn memory(model: &Model) -> Result<Memory> {
    #[cfg(feature = "cuda")]
    if let Some(gpu) = model.decoder().gpu() {
        let info = gpu.info()?;
        return Ok(Memory {
            available: info.free_memory,
            total: info.total_memory,
        });
    }
    let _ = model;
    let read = |key| {
        meminfo(key)
            .ok_or_else(|| Error::param("memory_fraction", format!("no {key} in /proc/meminfo")))
    };
    Ok(Memory {
        available: read("MemAvailable")?,
        total: read("MemTotal")?,
    })
}

/// Most positions the cache gets when neither `kv_cache_tokens` nor `memory_fraction`
/// is given (a model's whole context when it is shorter).
pub const DEFAULT_KV_CACHE_TOKENS: usize = 32_768;

/// Default [`EngineConfig::max_batch_size`].
pub const DEFAULT_MAX_BATCH_SIZE: usize = 32;
/// Default [`EngineConfig::block_size`] (vLLM's too).
pub const DEFAULT_BLOCK_SIZE: usize = 16;
/// Default [`EngineConfig::max_num_batched_tokens`].
pub const DEFAULT_MAX_NUM_BATCHED_TOKENS: usize = 256;

/// Blocks for the window layers' pool beside `main` blocks of the others: no more than
/// those (window layers hold a subset of a sequence's positions), unless one sequence
/// needs more (beside a rotating cache smaller than the window), and enough that no
/// sequence waits for one while the main pool has room. A sequence holds at most the
/// blocks of its last `window - 1` positions, one more (see `Scheduler::schedule`) and
/// those of its step's own positions, with a partial block at each end; a step runs at
/// most `max_batch` sequences and `step_tokens` positions. Cached windows (prefix caching)
/// live in what the running sequences leave free, as cached blocks do in the main pool.
pub(crate) fn window_blocks(
    window: usize,
    block: usize,
    (max_batch, step_tokens): (usize, usize),
    main: usize,
) -> usize {
    let held = (window - 1).div_ceil(block) + 3;
    let step = step_tokens.div_ceil(block);
    (max_batch * held + step).min(main).max(held + step)
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Most sequences in one step.
    pub max_batch_size: usize,
    /// Cache size in positions (shared by all sequences)...
    pub kv_cache_tokens: Option<usize>,
    /// ...or as a fraction of the memory available now.
    pub memory_fraction: Option<f64>,
    /// Positions per cache block.
    pub block_size: usize,
    /// Token budget of one step (prompt chunks and decode tokens together).
    pub max_num_batched_tokens: usize,
    /// Most positions one sequence may cache (mlx-lm's `max_kv_size`); by default the
    /// context.
    pub kv_cache_size: Option<usize>,
    /// Past `kv_cache_size`, keep the first tokens and a sliding window instead of stopping.
    pub rotating: bool,
    /// Share the cached keys and values of common prefixes between requests (vLLM's
    /// automatic prefix caching; not with a rotating cache, whose blocks are rewritten).
    pub prefix_caching: bool,
    /// Sliding-window layers (Gemma 3's local ones) keep only their window in the cache,
    /// in blocks of their own, rather than every position masked.
    pub sliding_window_eviction: bool,
    /// Speculative decoding: how draft tokens are proposed, if at all.
    pub speculative: Option<Speculative>,
}

/// Most draft tokens a request may carry in one step.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;
/// Default `num_speculative_tokens`.
pub const DEFAULT_SPECULATIVE_TOKENS: usize = 4;

/// How speculative decoding proposes draft tokens, which one forward pass of the model
/// then verifies together: greedy output is what plain decoding gives, sampled output
/// follows the same distribution (see `Request::sample_span`).
#[derive(Debug, Clone)]
pub enum Speculative {
    /// Prompt lookup: up to `num_tokens` tokens that followed the latest earlier
    /// occurrence of the sequence's last few tokens, in its prompt or output (no second
    /// model; pays off where the output repeats its input: rewriting, extraction, code
    /// edits).
    PromptLookup { num_tokens: usize },
    /// A smaller model with the same vocabulary proposes `num_tokens` tokens, one pass of
    /// it each, into a KV cache of its own that shares the target's block tables.
    DraftModel {
        model: Arc<Model>,
        num_tokens: usize,
    },
}

impl PartialEq for Speculative {
    /// Draft models compare by identity (the same loaded model).
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::PromptLookup { num_tokens: a }, Self::PromptLookup { num_tokens: b }) => a == b,
            (
                Self::DraftModel {
                    model: m,
                    num_tokens: a,
                },
                Self::DraftModel {
                    model: n,
                    num_tokens: b,
                },
            ) => Arc::ptr_eq(m, n) && a == b,
            _ => false,
        }
    }
}

impl Speculative {
    /// The method named `name` (`prompt_lookup`, or vLLM's `ngram`) with `num_tokens`
    /// draft tokens a step.
    pub fn parse(name: &str, num_tokens: usize) -> Result<Self> {
        check_num_tokens(num_tokens)?;
        match name {
            "prompt_lookup" | "ngram" => Ok(Speculative::PromptLookup { num_tokens }),
            other => Err(Error::param(
                "speculative",
                format!(
                    "{other:?} is not a speculative decoding method (prompt_lookup, or a \
                     draft model)"
                ),
            )),
        }
    }

    /// Drafting by `model`, `num_tokens` draft tokens a step.
    pub fn draft_model(model: Arc<Model>, num_tokens: usize) -> Result<Self> {
        check_num_tokens(num_tokens)?;
        Ok(Speculative::DraftModel { model, num_tokens })
    }

    pub fn num_tokens(&self) -> usize {
        match *self {
            Speculative::PromptLookup { num_tokens }
            | Speculative::DraftModel { num_tokens, .. } => num_tokens,
        }
    }

    /// The draft model, when drafts come from one.
    pub fn model(&self) -> Option<&Arc<Model>> {
        match self {
            Speculative::DraftModel { model, .. } => Some(model),
            Speculative::PromptLookup { .. } => None,
        }
    }
}

fn check_num_tokens(num_tokens: usize) -> Result<()> {
    if !(1..=MAX_SPECULATIVE_TOKENS).contains(&num_tokens) {
        return Err(Error::param(
            "num_speculative_tokens",
            format!("{num_tokens} is not in [1, {MAX_SPECULATIVE_TOKENS}]"),
        ));
    }
    Ok(())
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            kv_cache_tokens: None,
            memory_fraction: None,
            block_size: DEFAULT_BLOCK_SIZE,
            max_num_batched_tokens: DEFAULT_MAX_NUM_BATCHED_TOKENS,
            kv_cache_size: None,
            rotating: false,
            prefix_caching: true,
            sliding_window_eviction: true,
            speculative: None,
        }
    }
}

/// The variable candle-based runners read for how many prompts they generate at once;
/// here, when set, the default `max_batch_size` of every engine (`cortex.Engine`'s and the
/// one each model starts for `cortex.generate`), see [`EngineConfig::from_env`].
pub const NUM_PARALLEL_VAR: &str = "CANDLE_NUM_PARALLEL";

/// `CANDLE_NUM_PARALLEL` as a count of requests, `None` when unset or empty; anything but
/// a whole number from 1 up is a configuration error naming the variable.
pub fn num_parallel() -> Result<Option<usize>> {
    let raw = match std::env::var(NUM_PARALLEL_VAR) {
        Ok(raw) => raw,
        Err(std::env::VarError::NotPresent) => return Ok(None),
        Err(std::env::VarError::NotUnicode(raw)) => raw.to_string_lossy().into_owned(),
    };
    if raw.trim().is_empty() {
        return Ok(None);
    }
    match raw.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => Err(Error::config(
            NUM_PARALLEL_VAR,
            format!("{raw:?} must be a whole number of requests, at least 1"),
        )),
    }
}

impl EngineConfig {
    /// The defaults, with `max_batch_size` from `CANDLE_NUM_PARALLEL` where it is set.
    pub fn from_env() -> Result<Self> {
        let default = EngineConfig::default();
        Ok(EngineConfig {
            max_batch_size: num_parallel()?.unwrap_or(default.max_batch_size),
            ..default
        })
    }
}

/// A draft model must share the target's vocabulary (its token ids are the target's),
/// reach every position a sequence may (`positions`; `None`: unbounded, a rotating
/// cache), and run where the target runs.
fn check_draft_model(target: &Model, draft: &Model, positions: Option<usize>) -> Result<()> {
    let bad = |message: String| Err(Error::param("speculative", message));
    let d = &draft.config;
    if target.config.vocab_size != d.vocab_size {
        return bad(format!(
            "the draft model's vocabulary has {} tokens, the model's {}: they must share \
             one tokenizer",
            d.vocab_size, target.config.vocab_size
        ));
    }
    match positions {
        Some(n) if d.max_position_embeddings < n => {
            return bad(format!(
                "the draft model's context ({}) is shorter than a sequence may grow ({n})",
                d.max_position_embeddings
            ))
        }
        None if d.learned_positions => {
            return bad(
                "a draft model with learned positions (gpt2) cannot go past its context, as \
                 a rotating cache does"
                    .into(),
            )
        }
        _ => {}
    }
    #[cfg(feature = "cuda")]
    let same_device = match (target.decoder().gpu(), draft.decoder().gpu()) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (a, b) => a.is_none() && b.is_none(),
    };
    #[cfg(not(feature = "cuda"))]
    let same_device = true;
    if !same_device {
        return bad("the draft model and the model must be on the same device".into());
    }
    Ok(())
}

/// A `/proc/meminfo` figure in bytes (`MemAvailable`, `MemTotal`), where Linux gives one.
fn meminfo(key: &str) -> Option<usize> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map(|kb| kb * 1024)
}

enum Command {
    Submit(Box<Request>),
    Abort(RequestId),
    /// The keys and values of every full block of `tokens`, if all are cached.
    ReadPrefix {
        tokens: Vec<u32>,
        reply: Sender<Result<Option<Vec<u8>>>>,
    },
    /// Puts the full blocks of `tokens`, with keys and values `data`, in the cache.
    WritePrefix {
        tokens: Vec<u32>,
        data: Vec<u8>,
        reply: Sender<Result<usize>>,
    },
    Shutdown,
}

/// What every submitted request is checked against.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Longest prompt accepted (the context, or `kv_cache_size`); none with rotation.
    max_prompt: Option<usize>,
    /// Positions the pool holds.
    capacity: usize,
    ring: Option<Ring>,
}

/// A running engine. Dropping it stops the thread after its current step; requests still
/// in flight then end with an `EngineError`.
pub struct Engine {
    commands: Mutex<Sender<Command>>,
    stats: Arc<Mutex<Stats>>,
    model: Arc<Model>,
    limits: Limits,
    next_id: AtomicU64,
    config: EngineConfig,
    cache: CacheShape,
}

impl Engine {
    pub fn new(model: Arc<Model>, config: EngineConfig) -> Result<Self> {
        let c = &config;
        if c.max_batch_size == 0 {
            return Err(Error::param("max_batch_size", "must be at least 1"));
        }
        if !(1..=1024).contains(&c.block_size) {
            return Err(Error::param(
                "block_size",
                format!("{} is not in [1, 1024]", c.block_size),
            ));
        }
        if c.max_num_batched_tokens == 0 {
            return Err(Error::param("max_num_batched_tokens", "must be at least 1"));
        }
        let cfg = &model.config;
        let context = cfg.max_position_embeddings;
        let draft = c.speculative.as_ref().and_then(Speculative::model);
        let decoder = model.decoder();
        // Sliding-window layers that keep only their window: which, and the window.
        let windows = c
            .sliding_window_eviction
            .then(|| decoder.window_layers())
            .flatten();
        // Bytes a position takes in the main blocks, and in window layers' blocks. A draft
        // model's cache holds the same positions as the target's, in the main blocks.
        let all = decoder.kv_bytes_per_token();
        let window_per_token = windows.as_ref().map_or(0, |(layers, _)| {
            all / layers.len() * layers.iter().filter(|&&w| w).count()
        });
        let per_token =
            all - window_per_token + draft.map_or(0, |d| d.decoder().kv_bytes_per_token());
        // Prefix caching needs blocks that are never rewritten: not with a rotating cache.
        let caching = c.prefix_caching && !c.rotating;
        // Window layers' blocks, for a cache of `blocks` main ones: at most as many, and
        // enough for every sequence's window and the positions one step adds (see
        // `window_blocks`).
        let window_cap = |blocks: usize| {
            windows.as_ref().map(|(_, window)| {
                let step = (c.max_batch_size, c.max_num_batched_tokens);
                window_blocks(*window, c.block_size, step, blocks)
            })
        };
        let tokens = match (c.kv_cache_tokens, c.memory_fraction) {
            (Some(_), Some(_)) => {
                return Err(Error::param(
                    "memory_fraction",
                    "give kv_cache_tokens or memory_fraction, not both",
                ))
            }
            (Some(t), None) => t,
            (None, Some(f)) => {
                if !(f > 0.0 && f <= 1.0) {
                    return Err(Error::param(
                        "memory_fraction",
                        format!("{f} is not in (0, 1]"),
                    ));
                }
                let budget = (memory(&model)?.available as f64 * f) as usize;
                // As many positions as fit beside the window layers' blocks, which stop
                // growing at their cap.
                let even = budget / (per_token + window_per_token);
                match window_cap(usize::MAX) {
                    Some(cap) if cap.saturating_mul(c.block_size) < even => {
                        budget.saturating_sub(cap * c.block_size * window_per_token) / per_token
                    }
                    _ => even,
                }
            }
            (None, None) => context.min(DEFAULT_KV_CACHE_TOKENS),
        };
        // The cache is reserved up front (on the CPU only touched as used), but a
        // reservation past the device's memory could still fail, and a failed host
        // allocation aborts the process: refuse it here instead (RELIABILITY G10).
        let num_window_blocks = window_cap(tokens / c.block_size);
        let bytes = tokens
            .saturating_mul(per_token)
            .saturating_add(num_window_blocks.unwrap_or(0) * c.block_size * window_per_token);
        if let Some(total) = memory(&model).ok().map(|m| m.total).filter(|&t| bytes > t) {
            return Err(Error::param(
                "kv_cache_tokens",
                format!(
                    "{tokens} positions need {:.1} GB of KV cache; this {} has {:.1} GB",
                    bytes as f64 / 1e9,
                    if model.decoder().on_gpu() {
                        "GPU"
                    } else {
                        "machine"
                    },
                    total as f64 / 1e9
                ),
            ));
        }
        let num_blocks = tokens / c.block_size;
        if num_blocks == 0 {
            return Err(Error::param(
                "kv_cache_tokens",
                format!("{tokens} positions make no block of {}", c.block_size),
            ));
        }
        let per_seq = c.kv_cache_size.unwrap_or(context);
        if per_seq == 0 {
            return Err(Error::param("kv_cache_size", "must be at least 1"));
        }
        let ring = if c.rotating {
            if cfg.learned_positions {
                return Err(Error::param(
                    "rotating_kv_cache",
                    "a model with learned positions (gpt2) cannot go past its context",
                ));
            }
            if c.kv_cache_size.is_none() || per_seq <= ROTATING_KEEP {
                return Err(Error::param(
                    "kv_cache_size",
                    format!("a rotating cache needs kv_cache_size above {ROTATING_KEEP}"),
                ));
            }
            if per_seq > num_blocks * c.block_size {
                return Err(Error::param(
                    "kv_cache_size",
                    format!(
                        "{per_seq} positions per sequence exceed the cache's {}",
                        num_blocks * c.block_size
                    ),
                ));
            }
            Some(Ring {
                keep: ROTATING_KEEP,
                window: per_seq - ROTATING_KEEP,
            })
        } else {
            None
        };
        let limits = Limits {
            max_prompt: ring.is_none().then(|| per_seq.min(context)),
            capacity: num_blocks * c.block_size,
            ring,
        };
        if let Some(d) = draft {
            let positions = (limits.max_prompt).map(|m| m.min(limits.capacity));
            check_draft_model(&model, d, positions)?;
        }
        let storage = decoder.new_storage(num_blocks, c.block_size, ring, num_window_blocks)?;
        let draft = match draft {
            Some(d) => {
                let storage = d
                    .decoder()
                    .new_storage(num_blocks, c.block_size, ring, None)?;
                Some((d.clone(), storage))
            }
            None => None,
        };
        let pool = BlockPool::new(num_blocks, c.block_size, caching);
        let windows = windows
            .zip(num_window_blocks)
            .map(|((_, window), n)| Windows {
                pool: BlockPool::new(n, c.block_size, caching),
                window,
            });
        let stats = Arc::new(Mutex::new(Stats {
            kv_blocks_total: num_blocks,
            kv_blocks_free: num_blocks,
            kv_window_blocks_total: num_window_blocks.unwrap_or(0),
            kv_window_blocks_free: num_window_blocks.unwrap_or(0),
            kv_block_size: c.block_size,
            prefix_caching: pool.caching(),
            ..Stats::default()
        }));
        let speculative_tokens = c.speculative.as_ref().map_or(0, Speculative::num_tokens);
        let scheduler = Scheduler::new(
            pool,
            windows,
            ring,
            c.max_batch_size,
            c.max_num_batched_tokens,
            speculative_tokens,
            draft.is_some(),
        );
        let cache = storage.shape();
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            runner: Runner::new(model.clone(), storage, draft),
            scheduler,
            stats: stats.clone(),
        };
        crate::threads::note_threads_started();
        std::thread::Builder::new()
            .name("cortex-engine".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::Engine(format!("could not start the engine thread: {e}")))?;
        Ok(Engine {
            commands: Mutex::new(tx),
            stats,
            model,
            limits,
            next_id: AtomicU64::new(0),
            config,
            cache,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Queues a request; its events go to `sink`. Everything that can be known before
    /// running is checked here, so a bad request fails alone and at once.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        tokenizer: Arc<Tokenizer>,
        sink: Sink,
    ) -> Result<RequestId> {
        // In a forked child the engine thread is gone: the request would never run.
        crate::threads::check_not_forked()?;
        params.validate()?;
        if prompt.is_empty() {
            return Err(Error::param("prompt", "the prompt is empty"));
        }
        let vocab = self.model.config.vocab_size;
        if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::param(
                "prompt",
                format!("token id {bad} is out of vocabulary (size {vocab})"),
            ));
        }
        let Limits {
            max_prompt,
            capacity,
            ring,
        } = self.limits;
        if let Some(max) = max_prompt {
            if prompt.len() >= max {
                return Err(Error::ContextLength {
                    prompt_tokens: prompt.len(),
                    context_length: max,
                });
            }
        }
        if Ring::slots(ring, prompt.len()) > capacity {
            return Err(Error::CacheFull {
                needed: prompt.len(),
                capacity,
            });
        }
        let max_len = max_prompt.map_or(usize::MAX, |m| m.min(capacity));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // The grammar compiles here, in the caller's thread: a bad one fails at once.
        let grammar = match &params.constraint {
            Some(c) => Some(tokenizer.grammars()?.compile(c)?),
            None => None,
        };
        let mut request = Request::new(id, prompt, params, max_len, tokenizer, sink);
        if let Some(g) = grammar {
            request = request.with_grammar(g);
        }
        self.send(Command::Submit(Box::new(request)))?;
        Ok(id)
    }

    /// Ends request `id` now and frees its cache blocks; it receives `Event::Aborted`.
    /// Unknown or finished ids are ignored.
    pub fn abort(&self, id: RequestId) {
        // A stopped engine has nothing left to abort.
        let _ = self.send(Command::Abort(id));
    }

    /// What one block of this engine's cache holds.
    pub fn cache_shape(&self) -> CacheShape {
        self.cache.clone()
    }

    /// Positions the whole cache holds.
    pub fn cache_capacity(&self) -> usize {
        self.limits.capacity
    }

    /// Whether prefix caching is on (it is off with a rotating cache).
    pub fn prefix_caching(&self) -> bool {
        self.config.prefix_caching && self.limits.ring.is_none()
    }

    /// The keys and values of every full block of `tokens` (in
    /// [`super::kv::KvStorage::read_blocks`]' form), when all of them are cached; read
    /// between steps.
    pub fn read_prefix(&self, tokens: Vec<u32>) -> Result<Option<Vec<u8>>> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::ReadPrefix { tokens, reply })?;
        answer.recv().map_err(|_| stopped())?
    }

    /// Puts the full blocks of `tokens`, whose keys and values are `data` (as
    /// [`Engine::read_prefix`] gives them), in the prefix cache; returns how many blocks
    /// were not cached already.
    pub fn write_prefix(&self, tokens: Vec<u32>, data: Vec<u8>) -> Result<usize> {
        let (reply, answer) = mpsc::channel();
        self.send(Command::WritePrefix {
            tokens,
            data,
            reply,
        })?;
        answer.recv().map_err(|_| stopped())?
    }

    pub fn stats(&self) -> Stats {
        self.stats.lock().clone()
    }

    fn send(&self, command: Command) -> Result<()> {
        self.commands.lock().send(command).map_err(|_| stopped())
    }
}

fn stopped() -> Error {
    Error::Engine("the engine has stopped".into())
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.send(Command::Shutdown);
    }
}

/// The engine thread's state.
struct Worker {
    runner: Runner,
    scheduler: Scheduler,
    stats: Arc<Mutex<Stats>>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Command>) {
        loop {
            if self.scheduler.is_idle() {
                self.publish();
                let keep_going = rx.recv().is_ok_and(|command| self.handle(command));
                if !keep_going {
                    return self.shut_down();
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(command) => {
                        if !self.handle(command) {
                            return self.shut_down();
                        }
                    }
                    Err(TryRecvError::Disconnected) => return self.shut_down(),
                    Err(TryRecvError::Empty) => break,
                }
            }
            if self.scheduler.is_idle() {
                continue;
            }
            let start = Instant::now();
            match catch_unwind(AssertUnwindSafe(|| self.step())) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.fail_all(&e),
                Err(panic) => self.fail_all(&Error::from_panic(panic)),
            }
            let mut stats = self.stats.lock();
            stats.busy_seconds += start.elapsed().as_secs_f64();
            stats.steps += 1;
            drop(stats);
            self.publish();
        }
    }

    /// Applies a command; false to stop.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Submit(request) => self.scheduler.add(*request),
            Command::Abort(id) => {
                if self.scheduler.abort(id) {
                    self.stats.lock().aborted += 1;
                }
            }
            Command::ReadPrefix { tokens, reply } => {
                let data = match self.scheduler.cached_blocks(&tokens) {
                    Some((blocks, windows)) => self
                        .runner
                        .storage()
                        .read_blocks(&blocks, &windows)
                        .map(Some),
                    None => Ok(None),
                };
                let _ = reply.send(data);
            }
            Command::WritePrefix {
                tokens,
                data,
                reply,
            } => {
                let Worker {
                    runner, scheduler, ..
                } = self;
                let size = runner.storage().layout().block_size;
                let filled = scheduler.adopt(&tokens, |table, first, windows| {
                    // Blocks cached already stay as they are.
                    let mut blocks = table.to_vec();
                    blocks[..first].fill(HOLE);
                    runner.storage().write_blocks(&blocks, windows, &data)?;
                    // A saved prefix holds the target's keys and values only: a draft
                    // model computes its own.
                    runner.fill_draft(&tokens[..table.len() * size], first * size, table)
                });
                let _ = reply.send(filled);
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn shut_down(&mut self) {
        self.fail_all(&Error::Engine("the engine was shut down".into()));
    }

    /// Fails every request (a fault whose culprit is unknown, or shutdown); the cache is
    /// then empty and the engine ready for new work.
    fn fail_all(&mut self, error: &Error) {
        let all = self.scheduler.drain();
        self.stats.lock().failed += all.len() as u64;
        for mut request in all {
            request.state = RequestState::Failed;
            request.emit(Event::Failed(Error::Engine(error.to_string())));
        }
    }

    fn publish(&self) {
        let mut stats = self.stats.lock();
        stats.waiting = self.scheduler.num_waiting();
        stats.running = self.scheduler.num_running();
        stats.kv_blocks_free = self.scheduler.num_free_blocks();
        if let Some((free, _)) = self.scheduler.window_blocks() {
            stats.kv_window_blocks_free = free;
        }
        stats.preemptions = self.scheduler.preemptions();
        (
            stats.prefix_cache_queries,
            stats.prefix_cache_hits,
            stats.prefix_cache_blocks,
        ) = self.scheduler.prefix_cache();
    }

    /// One step: schedule → execute → update from output.
    fn step(&mut self) -> Result<()> {
        let mut output = self.scheduler.schedule(Instant::now());
        if output.is_empty() {
            if self.scheduler.fail_unschedulable() {
                self.stats.lock().failed += 1;
            }
            return Ok(());
        }
        let Worker {
            runner,
            scheduler,
            stats,
        } = self;
        if runner.has_draft() {
            scheduler.draft(&mut output, |spans| runner.execute_draft(spans))?;
        }
        // Grammar masks depend only on tokens already sampled: they are computed on the
        // thread pool while this thread runs the forward pass (tens of microseconds each
        // against milliseconds). On a GPU the CPU would idle; on the CPU they take cores
        // from the pass's own helpers, which costs about as much as they take. A panic in
        // a mask resurfaces at the scope's end, inside the step's `catch_unwind`.
        let mut constrained = scheduler.constrained(&output);
        let logits = if constrained.is_empty() {
            runner.execute(&output)?
        } else {
            let mut mask_seconds = 0.0;
            let logits = rayon::in_place_scope(|s| {
                s.spawn(|_| {
                    let start = Instant::now();
                    constrained.par_iter_mut().for_each(|r| r.prepare_mask());
                    mask_seconds = start.elapsed().as_secs_f64();
                });
                runner.execute(&output)
            });
            stats.lock().mask_seconds += mask_seconds;
            logits?
        };
        drop(constrained);
        scheduler.update_from_output(&output, &logits, stats)?;
        Ok(())
    }
}
