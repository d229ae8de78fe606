//! CUDA graphs for decode steps. A decode step of a few sequences launches some 15 kernels
//! per layer, each too short to hide the CPU's cost of launching the next one; captured
//! once into a graph, the whole step is one launch. The second time a step of a given
//! shape comes (the first one ran eagerly, growing the workspace and uploading the
//! parameters, so that nothing allocates during the capture), it is captured and replayed
//! from then on: each replay rewrites the step's positions, block tables and cache slots
//! into the graph's own buffers ([`Meta::update`]), embeds the tokens eagerly, launches the
//! graph and reads the logits back.
//!
//! A graph holds the addresses of every buffer it touches, so it belongs to one shape (rows
//! and block-table capacity), one KV cache, and one generation of the workspace
//! ([`Gpu::epoch`]); when the workspace grows, it is captured again.

use std::collections::{HashMap, HashSet};

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use parking_lot::Mutex;

use super::{device_error, Gpu, GpuBuf, Meta};
use crate::engine::kv::KvStorage;
use crate::error::Result;
use crate::model::decoder::Batch;

/// Most graphs a decoder keeps (each shape of step takes one; a single sequence's cache
/// that grows makes new ones); past it, all are dropped and captured again as needed.
const MAX_GRAPHS: usize = 16;

/// Most rows a captured step takes (the engine's default batch): each graph keeps its own
/// logits, `rows × vocab` f32.
const MAX_GRAPH_ROWS: usize = 32;

/// What a graph is specific to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// Rows (one token of each sequence).
    pub rows: usize,
    /// Block-table capacity per sequence (a power of two).
    pub table_stride: usize,
    /// The KV cache (the address of its first layer's keys).
    pub kv: u64,
    /// The cache has window layers (a second set of block tables).
    pub window_layers: bool,
}

impl Key {
    /// The key of `batch` when it is a decode step of at most `max_rows` sequences (one
    /// token each, logits for every row).
    pub fn of(gpu: &Gpu, batch: &Batch<'_>, kv: &mut KvStorage, max_rows: usize) -> Option<Key> {
        let rows = batch.tokens.len();
        let decode = rows <= max_rows
            && batch.seqs.len() == rows
            && batch
                .seqs
                .iter()
                .enumerate()
                .all(|(i, s)| s.len == 1 && s.row == i)
            && batch.logits_rows.len() == rows
            && batch
                .logits_rows
                .iter()
                .enumerate()
                .all(|(i, &r)| r as usize == i);
        if !decode {
            return None;
        }
        let table_stride = Meta::longest_table(batch).next_power_of_two().max(16);
        let window_layers = kv.has_window_layers();
        let super::Arg::Ptr(kv) = super::ptr(kv.cuda_layer(0)?.0, gpu.stream()) else {
            return None;
        };
        Some(Key {
            rows,
            table_stride,
            kv,
            window_layers,
        })
    }
}

/// A captured step: the graph and the buffers it reads its input from and writes its
/// logits to.
pub struct Captured {
    graph: Option<Graph>,
    epoch: u64,
    pub meta: Meta,
    pub logits: GpuBuf,
}

/// A graph, launched only by the decoder that holds it, under its workspace's lock.
struct Graph(CudaGraph);

// SAFETY: a CUDA graph's executable may be launched from any thread on which its context is
// current (`Gpu::bind` runs before each pass); the decoder's workspace lock keeps launches
// of one graph from overlapping.
#[allow(unsafe_code)]
unsafe impl Send for Graph {}
#[allow(unsafe_code)]
unsafe impl Sync for Graph {}

impl Captured {
    /// Buffers for steps of `key`'s shape, with `vocab` logits per row; no graph yet.
    pub fn new(gpu: &Gpu, key: Key, vocab: usize) -> Result<Captured> {
        Ok(Captured {
            graph: None,
            epoch: 0,
            meta: Meta::with_capacity(gpu, key.rows, key.table_stride, key.window_layers)?,
            logits: GpuBuf::with_len(gpu, key.rows * vocab)?,
        })
    }

    pub fn is_captured(&self) -> bool {
        self.graph.is_some()
    }

    /// Records what `step` launches on the GPU's stream into this step's graph; `step` runs
    /// nothing while capturing. Fails (and keeps no graph) if the step allocated a pass
    /// buffer meanwhile.
    pub fn capture(&mut self, gpu: &Gpu, step: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        let epoch = gpu.epoch();
        let stream = gpu.stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| device_error("starting a CUDA graph capture", e))?;
        let ran = step(self);
        // The capture always ends, or the stream would stay in capture mode.
        let graph = stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e| device_error("capturing a CUDA graph", e));
        ran?;
        if gpu.epoch() != epoch {
            return Err(crate::Error::Internal(
                "a pass buffer moved while a decode step was captured".into(),
            ));
        }
        self.graph = graph?.map(Graph);
        self.epoch = epoch;
        Ok(())
    }

    /// Replays the captured step (its inputs already updated).
    pub fn launch(&self) -> Result<()> {
        let graph = self
            .graph
            .as_ref()
            .ok_or_else(|| crate::Error::Internal("a decode graph launched uncaptured".into()))?;
        graph
            .0
            .launch()
            .map_err(|e| device_error("launching a CUDA graph", e))
    }
}

/// A decoder's graphs, by step shape.
pub struct Graphs {
    /// Most rows of a captured step.
    max_rows: usize,
    inner: Mutex<Inner>,
    /// Set when a capture failed: this decoder's steps then all run op by op.
    failed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Inner {
    seen: HashSet<Key>,
    captured: HashMap<Key, Captured>,
}

impl std::fmt::Debug for Graphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Graphs({})", self.inner.lock().captured.len())
    }
}

impl Graphs {
    /// Graphs for decode steps of up to `max_rows` rows (at most [`MAX_GRAPH_ROWS`]).
    pub fn new(max_rows: usize) -> Graphs {
        Graphs {
            max_rows: max_rows.min(MAX_GRAPH_ROWS),
            inner: Mutex::default(),
            failed: std::sync::atomic::AtomicBool::default(),
        }
    }

    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Whether a step of `key`'s shape ran before (and so may be captured now); records
    /// that it has.
    pub fn seen_before(&self, key: Key) -> bool {
        if self.failed.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let mut inner = self.inner.lock();
        if inner.seen.len() >= 4 * MAX_GRAPHS {
            inner.seen.clear();
        }
        !inner.seen.insert(key)
    }

    /// The step for `key` (fresh when there is none, or when the workspace moved since it
    /// was captured), taken out while it runs.
    pub fn take(&self, gpu: &Gpu, key: Key, vocab: usize) -> Result<Captured> {
        let taken = self.inner.lock().captured.remove(&key);
        match taken {
            Some(c) if !c.is_captured() || c.epoch == gpu.epoch() => Ok(c),
            _ => Captured::new(gpu, key, vocab),
        }
    }

    /// Gives up on graphs for this decoder (a capture failed: `why`), saying so once.
    pub fn fail(&self, why: &crate::Error) {
        if !self.failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("cortex: decode steps run without CUDA graphs ({why})");
        }
        self.inner.lock().captured.clear();
    }

    /// Puts a step back after it ran.
    pub fn put(&self, key: Key, step: Captured) {
        let mut inner = self.inner.lock();
        if inner.captured.len() >= MAX_GRAPHS {
            inner.captured.clear();
        }
        inner.captured.insert(key, step);
    }
}
