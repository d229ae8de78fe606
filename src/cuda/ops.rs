//! One forward pass on the GPU: [`Ops`] over [`GpuBuf`]s. The batch's positions, block
//! tables and cache slots are uploaded once when the pass begins ([`Meta`]); each
//! operation is then one or a few kernel launches on the GPU's stream, and nothing waits
//! for the GPU until the logits come back ([`Ops::to_host`]).

use std::collections::HashMap;

use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use parking_lot::Mutex;

use super::weights::Scratch;
use super::{ptr, Arg, Gpu, GpuBuf};
use crate::engine::kv::{KvDType, KvLayout, KvStorage, Ring};
use crate::error::{Error, Result};
use crate::model::attention::SeqSpan;
use crate::model::config::Activation;
use crate::model::decoder::{Batch, Draw, Logits};
use crate::model::layers::{Embedding, Linear, MoeMlp, Norm, Rope};
use crate::model::ops::Ops;

/// Query heads one attention block serves, and most splits of a row's keys (kernels.cu
/// `ATT_GH`, `ATT_MAX_SPLITS`).
const ATT_GH: usize = 4;
const ATT_MAX_SPLITS: usize = 32;

/// Rows a block of the prompt attention serves (kernels.cu `PA_ROWS`), and fewest rows of a
/// sequence's span for it to take them: a warp's 16 rows of the mma (shorter spans, such as
/// decode steps, take the flash-decoding kernel).
const PA_ROWS: usize = 64;
const PA_MIN_ROWS: usize = 16;

/// Values one thread of the norm kernel keeps (kernels.cu `NORM_PER`).
const NORM_PER: usize = 4;

/// The decoder's small host parameters (norm weights and biases, RoPE frequencies) on the
/// GPU, uploaded on first use and keyed by their host address: the decoder owns them and
/// never changes them, so an address names one parameter for the decoder's life.
pub type Params = Mutex<HashMap<usize, CudaSlice<f32>>>;

/// A batch's layout on the GPU, what the attention, RoPE and cache kernels read.
pub struct Meta {
    /// `[rows]`: each row's position (RoPE).
    positions: CudaSlice<i32>,
    /// `[rows, 4]`: position, sequence start, sequence's first row, block-table offset
    /// (`RowMeta` in kernels.cu).
    rows: CudaSlice<i32>,
    /// The block tables and slots of the cache's layers, and of its window layers (when it
    /// has them: see `WindowLayers`), at the same offsets.
    main: Tables,
    window: Option<Tables>,
    /// The prompt attention's tiles, when a span of the pass has [`PA_MIN_ROWS`] rows or
    /// more.
    prompt: Option<PromptRows>,
    num_rows: usize,
    table_stride: usize,
}

/// Where a pass's prompts go through the prompt attention.
struct PromptRows {
    /// `[tiles, 2]`: each tile's first row and rows (up to [`PA_ROWS`] of one span).
    tiles: CudaSlice<i32>,
    /// The rows of the spans too short for it (`None` when there are none), which the
    /// flash-decoding kernel serves.
    short: Option<CudaSlice<i32>>,
}

/// One group of layers' block tables and slots for a batch.
struct Tables {
    /// Each sequence's block table at `table_stride` elements from the last.
    tables: CudaSlice<u32>,
    /// `[rows]`: the cache slot (block · block_size + index) each row's key goes to, or -1
    /// where a later row of the pass takes the same slot (a ring that wraps in one chunk).
    slots: CudaSlice<i64>,
}

/// [`Meta`]'s host side for `batch`, with tables `table_stride` apart.
struct HostMeta {
    positions: Vec<i32>,
    rows: Vec<i32>,
    main: HostTables,
    window: Option<HostTables>,
    /// Tiles and short rows (see [`PromptRows`]).
    prompt: Option<(Vec<i32>, Vec<i32>)>,
}

/// [`Tables`]' host side.
struct HostTables {
    tables: Vec<u32>,
    slots: Vec<i64>,
}

impl HostMeta {
    fn new(batch: &Batch<'_>, kv: &KvStorage, table_stride: usize) -> Result<HostMeta> {
        let mut m = HostMeta {
            positions: Vec::new(),
            rows: Vec::new(),
            main: HostTables::new(batch, kv.layout(), table_stride, |s| s.blocks)?,
            window: None,
            prompt: None,
        };
        if kv.has_window_layers() {
            let layout = KvLayout {
                ring: None,
                ..kv.layout()
            };
            let window = HostTables::new(batch, layout, table_stride, |s| s.window_blocks)?;
            m.window = Some(window);
        }
        for (i, s) in batch.seqs.iter().enumerate() {
            for j in 0..s.len {
                let p = s.start + j;
                m.positions.push(p as i32);
                let offset = i * table_stride;
                m.rows
                    .extend([p as i32, s.start as i32, s.row as i32, offset as i32]);
            }
        }
        if batch.seqs.iter().any(|s| s.len >= PA_MIN_ROWS) {
            let (mut tiles, mut short) = (Vec::new(), Vec::new());
            for s in &batch.seqs {
                if s.len < PA_MIN_ROWS {
                    short.extend((s.row..s.row + s.len).map(|r| r as i32));
                    continue;
                }
                for t in (0..s.len).step_by(PA_ROWS) {
                    tiles.extend([(s.row + t) as i32, PA_ROWS.min(s.len - t) as i32]);
                }
            }
            m.prompt = Some((tiles, short));
        }
        Ok(m)
    }
}

impl HostTables {
    /// The tables `table_of` picks from `batch`'s spans, laid out as `layout` says.
    fn new(
        batch: &Batch<'_>,
        layout: KvLayout,
        table_stride: usize,
        table_of: impl for<'s> Fn(&SeqSpan<'s>) -> &'s [u32],
    ) -> Result<HostTables> {
        let mut t = HostTables {
            tables: vec![0; batch.seqs.len() * table_stride],
            slots: Vec::new(),
        };
        for (i, s) in batch.seqs.iter().enumerate() {
            let blocks = table_of(s);
            let offset = i * table_stride;
            t.tables[offset..offset + blocks.len()].copy_from_slice(blocks);
            for p in s.start..s.start + s.len {
                let slot = Ring::slot(layout.ring, p);
                let block = blocks.get(slot / layout.block_size).ok_or_else(|| {
                    Error::Internal(format!("position {p} is past its sequence's block table"))
                })?;
                t.slots.push(
                    i64::from(*block) * layout.block_size as i64
                        + (slot % layout.block_size) as i64,
                );
            }
        }
        // A slot written twice in one pass keeps the later row's key, as the CPU's
        // in-order store does.
        let mut last = HashMap::new();
        for (row, &slot) in t.slots.iter().enumerate() {
            last.insert(slot, row);
        }
        for (row, slot) in t.slots.iter_mut().enumerate() {
            if last[slot] != row {
                *slot = -1;
            }
        }
        Ok(t)
    }
}

impl Tables {
    fn upload(gpu: &Gpu, h: &HostTables) -> Result<Tables> {
        Ok(Tables {
            tables: gpu.upload(&h.tables)?,
            slots: gpu.upload(&h.slots)?,
        })
    }

    fn with_capacity(gpu: &Gpu, rows: usize, table_stride: usize) -> Result<Tables> {
        Ok(Tables {
            tables: gpu.zeros(rows * table_stride)?,
            slots: gpu.zeros(rows)?,
        })
    }

    fn update(&mut self, gpu: &Gpu, h: &HostTables) -> Result<()> {
        gpu.copy_to(&h.tables, &mut self.tables)?;
        gpu.copy_to(&h.slots, &mut self.slots)
    }
}

impl PromptRows {
    fn upload(gpu: &Gpu, tiles: &[i32], short: &[i32]) -> Result<PromptRows> {
        Ok(PromptRows {
            tiles: gpu.upload(tiles)?,
            short: (!short.is_empty()).then(|| gpu.upload(short)).transpose()?,
        })
    }
}

impl Meta {
    /// The longest block table of `batch` (window layers' included).
    pub fn longest_table(batch: &Batch<'_>) -> usize {
        let len = |s: &SeqSpan<'_>| s.blocks.len().max(s.window_blocks.len());
        batch.seqs.iter().map(len).max().unwrap_or(0)
    }

    /// `batch`'s layout, uploaded into fresh buffers.
    pub fn new(gpu: &Gpu, batch: &Batch<'_>, kv: &KvStorage) -> Result<Meta> {
        let stride = Meta::longest_table(batch);
        let h = HostMeta::new(batch, kv, stride)?;
        Ok(Meta {
            positions: gpu.upload(&h.positions)?,
            rows: gpu.upload(&h.rows)?,
            main: Tables::upload(gpu, &h.main)?,
            window: h
                .window
                .as_ref()
                .map(|w| Tables::upload(gpu, w))
                .transpose()?,
            prompt: (h.prompt.as_ref())
                .map(|(tiles, short)| PromptRows::upload(gpu, tiles, short))
                .transpose()?,
            num_rows: h.positions.len(),
            table_stride: stride,
        })
    }

    /// Buffers for batches of `rows` rows, one sequence each, with tables up to
    /// `table_stride` blocks (a decode step's, for a captured graph) for a cache with
    /// window layers or without.
    pub fn with_capacity(
        gpu: &Gpu,
        rows: usize,
        table_stride: usize,
        window_layers: bool,
    ) -> Result<Meta> {
        let window = window_layers
            .then(|| Tables::with_capacity(gpu, rows, table_stride))
            .transpose()?;
        Ok(Meta {
            positions: gpu.zeros(rows)?,
            rows: gpu.zeros(rows * 4)?,
            main: Tables::with_capacity(gpu, rows, table_stride)?,
            window,
            prompt: None,
            num_rows: rows,
            table_stride,
        })
    }

    /// Overwrites the buffers with `batch`'s layout (its rows and tables must fit).
    pub fn update(&mut self, gpu: &Gpu, batch: &Batch<'_>, kv: &KvStorage) -> Result<()> {
        let h = HostMeta::new(batch, kv, self.table_stride)?;
        if h.positions.len() != self.num_rows
            || Meta::longest_table(batch) > self.table_stride
            || h.window.is_some() != self.window.is_some()
        {
            return Err(Error::Internal(
                "a batch that does not fit its graph".into(),
            ));
        }
        gpu.copy_to(&h.positions, &mut self.positions)?;
        gpu.copy_to(&h.rows, &mut self.rows)?;
        self.main.update(gpu, &h.main)?;
        match (&mut self.window, &h.window) {
            (Some(t), Some(h)) => t.update(gpu, h),
            _ => Ok(()),
        }
    }

    /// The tables layer `layer` of `kv` reads and writes.
    fn tables(&self, kv: &KvStorage, layer: usize) -> Result<&Tables> {
        if !kv.is_window_layer(layer) {
            return Ok(&self.main);
        }
        (self.window.as_ref())
            .ok_or_else(|| Error::Internal("a window layer without its block tables".into()))
    }
}

/// One forward pass's view of the GPU: the batch's layout, the decoder's parameters.
pub struct Pass<'a> {
    gpu: &'a Gpu,
    params: &'a Params,
    meta: &'a Meta,
    num_rows: usize,
}

impl<'a> Pass<'a> {
    pub fn new(gpu: &'a Gpu, params: &'a Params, meta: &'a Meta) -> Self {
        Pass {
            gpu,
            params,
            meta,
            num_rows: meta.num_rows,
        }
    }

    /// The GPU copy of host parameter `values`.
    fn param(&self, values: &[f32]) -> Result<Arg> {
        let mut params = self.params.lock();
        let slice = match params.entry(values.as_ptr() as usize) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.gpu.upload(values)?),
        };
        Ok(ptr(slice, self.gpu.stream()))
    }

    /// Runs `f`, charged to `op` in the profile when profiling (`crate::model::profile`):
    /// the GPU is waited for before and after, so the time is the work's own.
    fn timed<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if !crate::model::profile::profiling() {
            return f();
        }
        self.gpu.synchronize()?;
        let start = std::time::Instant::now();
        let out = f()?;
        self.gpu.synchronize()?;
        crate::model::profile::record(op, start.elapsed().as_secs_f64());
        Ok(out)
    }

    fn elementwise(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        self.gpu.launch(name, Gpu::grid_for(n), 256, args)
    }

    /// `out ← norm(x)` row by row, after `x += a (+ b)` when `add` is given (kernels.cu
    /// `norm_f32`; `out` may be `x`); `x` holds `len` values.
    fn norm_kernel(
        &self,
        norm: &Norm,
        (x, len): (Arg, usize),
        add: Option<(Arg, Arg)>,
        out: Arg,
        scratch: Option<&mut Scratch>,
    ) -> Result<()> {
        let (weight, bias, eps) = norm.parts();
        let d = weight.len();
        let rows = (len / d) as u32;
        // float4s: a thread keeps at most NORM_PER of them (kernels.cu), in blocks of at
        // most 1024 threads.
        if d % 4 != 0 || d > NORM_PER * 4 * 1024 {
            return Err(Error::config(
                "hidden_size",
                format!(
                    "a norm over {d} values on the GPU, which takes multiples of 4 up to {}",
                    NORM_PER * 4 * 1024
                ),
            ));
        }
        let threads = (d / 4)
            .div_ceil(NORM_PER)
            .next_multiple_of(32)
            .clamp(32, 1024);
        let (a, b) = add.unwrap_or((Arg::Ptr(0), Arg::Ptr(0)));
        let bias = bias.map_or(Ok(Arg::Ptr(0)), |b| self.param(b))?;
        let args = [
            x,
            a,
            b,
            out,
            self.param(weight)?,
            bias,
            Arg::F32(eps),
            Arg::I32(d as i32),
        ];
        // The output rounded to q8 too, for the projections that read it.
        let q8 = scratch.and_then(|s| Some((s.q8_target(self.gpu, len)?, s)));
        let [xq, ds] = q8.as_ref().map_or([Arg::Ptr(0); 2], |(t, _)| *t);
        self.gpu.launch(
            "norm_f32",
            (rows, 1),
            threads as u32,
            &[&args[..], &[xq, ds]].concat(),
        )?;
        if let Some((_, s)) = q8 {
            s.q8_written(self.gpu, out, len);
        }
        Ok(())
    }
}

fn on_gpu(l: &Linear) -> Result<&super::GpuLinear> {
    l.gpu()
        .ok_or_else(|| Error::Internal("a CPU layer in a GPU forward pass".into()))
}

impl Ops for Pass<'_> {
    type Buf = GpuBuf;
    type Scratch = Scratch;

    fn embed(&self, table: &Embedding, ids: &[u32], width: usize, out: &mut GpuBuf) -> Result<()> {
        self.timed("embedding", || {
            if let Some(table) = table.gpu() {
                return table.gather(self.gpu, ids, width, out);
            }
            // GGML blocks stay on the host: a step's rows are `ids.len() · d` values to upload.
            let mut rows = vec![0f32; ids.len() * width];
            table.forward_into(ids, &mut rows)?;
            out.resize(self.gpu, rows.len())?;
            self.gpu.copy_to(&rows, out.slice_mut()?)
        })
    }

    fn add(&self, x: &mut GpuBuf, a: &GpuBuf, b: Option<&GpuBuf>) -> Result<()> {
        self.timed("elementwise", || {
            let b = b.map_or(Ok(Arg::Ptr(0)), |b| b.arg(self.gpu))?;
            self.elementwise(
                "add_f32",
                x.len(),
                &[
                    x.arg(self.gpu)?,
                    a.arg(self.gpu)?,
                    b,
                    Arg::I64(x.len() as i64),
                ],
            )
        })
    }

    fn scale(&self, x: &mut GpuBuf, factor: f32) -> Result<()> {
        self.timed("elementwise", || {
            self.elementwise(
                "scale_f32",
                x.len(),
                &[x.arg(self.gpu)?, Arg::F32(factor), Arg::I64(x.len() as i64)],
            )
        })
    }

    fn norm(&self, norm: &Norm, x: &mut GpuBuf) -> Result<()> {
        self.timed("norm", || {
            let (len, x) = (x.len(), x.arg(self.gpu)?);
            self.norm_kernel(norm, (x, len), None, x, None)
        })
    }

    fn norm_into(
        &self,
        norm: &Norm,
        x: &GpuBuf,
        out: &mut GpuBuf,
        scratch: &mut Scratch,
    ) -> Result<()> {
        self.timed("norm", || {
            out.resize(self.gpu, x.len())?;
            let x = (x.arg(self.gpu)?, x.len());
            self.norm_kernel(norm, x, None, out.arg(self.gpu)?, Some(scratch))
        })
    }

    fn add_norm(
        &self,
        x: &mut GpuBuf,
        (a, b): (&GpuBuf, Option<&GpuBuf>),
        norm: &Norm,
        out: &mut GpuBuf,
        scratch: &mut Scratch,
    ) -> Result<()> {
        self.timed("norm", || {
            out.resize(self.gpu, x.len())?;
            let b = b.map_or(Ok(Arg::Ptr(0)), |b| b.arg(self.gpu))?;
            let add = Some((a.arg(self.gpu)?, b));
            let x = (x.arg(self.gpu)?, x.len());
            self.norm_kernel(norm, x, add, out.arg(self.gpu)?, Some(scratch))
        })
    }

    fn linear<const N: usize>(
        &self,
        layers: [&Linear; N],
        x: &GpuBuf,
        rows: usize,
        outs: [&mut GpuBuf; N],
        scratch: &mut Scratch,
    ) -> Result<()> {
        self.timed("linear", || {
            let layers = layers.into_iter().map(on_gpu).collect::<Result<Vec<_>>>()?;
            let mut outs = outs;
            super::GpuLinear::forward_all(self.gpu, &layers, x, rows, &mut outs, scratch)
        })
    }

    fn attention(
        &self,
        kv: &mut KvStorage,
        layer: usize,
        seqs: &[SeqSpan<'_>],
        (rope, _positions): (&Rope, &[usize]),
        (q, k, v): (&mut GpuBuf, &mut GpuBuf, &GpuBuf),
        heads: usize,
        scale: f32,
        window: Option<usize>,
        out: &mut GpuBuf,
        scratch: &mut Scratch,
    ) -> Result<()> {
        let layout = kv.layout_of(layer);
        // The keys and values go into the cache with RoPE, before the attention reads it,
        // unless a row would then read a slot a later row of its pass overwrote (a ring
        // that wraps within a prompt's chunk): there the cache is written after.
        let store_first = seqs.iter().all(|s| {
            s.len == 1
                || layout
                    .ring
                    .is_none_or(|r| s.start + s.len <= r.keep + r.window)
        });
        // Prompts: their rows in tiles on the tensor cores, where every key they see is in
        // the cache by then and they see all before them.
        let prompt = (self.meta.prompt.as_ref()).filter(|_| {
            store_first
                && window.is_none()
                && layout.ring.is_none()
                && matches!(layout.head_dim, 64 | 128)
        });
        let op = match prompt {
            Some(_) => "prompt attention",
            None => "attention",
        };
        self.timed(op, || {
            let tables = self.meta.tables(kv, layer)?;
            let (hd, kvh) = (layout.head_dim, layout.kv_heads);
            if !super::attention_takes(hd) {
                return Err(Error::Internal(format!(
                    "head_dim {hd} in the GPU attention (Decoder::to_gpu checks it)"
                )));
            }
            let bf16 = kv.dtype() == KvDType::BF16;
            let (ck, cv) = kv
                .cuda_layer(layer)
                .ok_or_else(|| Error::Internal("a CPU KV cache in a GPU forward pass".into()))?;
            let (ck, cv) = (ptr(ck, self.gpu.stream()), ptr(cv, self.gpu.stream()));
            out.resize(self.gpu, self.num_rows * heads * hd)?;
            let (ring_keep, ring_window) = layout.ring.map_or((0, 0), |r| (r.keep, r.window));
            let cache = if bf16 { "bf16" } else { "f16" };
            let slots = ptr(&tables.slots, self.gpu.stream());
            let (inv_freq, interleaved, rope_scale) = rope.parts();
            let half = inv_freq.len();
            let store = if store_first {
                [v.arg(self.gpu)?, ck, cv]
            } else {
                [Arg::Ptr(0); 3]
            };
            let rope_args = [
                q.arg(self.gpu)?,
                k.arg(self.gpu)?,
                ptr(&self.meta.positions, self.gpu.stream()),
                self.param(inv_freq)?,
                Arg::I32(half as i32),
                Arg::I32(heads as i32),
                Arg::I32(kvh as i32),
                Arg::I32(hd as i32),
                Arg::I32(i32::from(interleaved)),
                Arg::F32(rope_scale),
                Arg::I32(self.num_rows as i32),
            ];
            self.elementwise(
                &format!("rope_{cache}"),
                self.num_rows * (heads * half + kvh * hd / 2),
                &[
                    &rope_args[..],
                    &store,
                    &[slots, Arg::I32(layout.block_size as i32)],
                ]
                .concat(),
            )?;
            if let Some(p) = prompt {
                self.gpu.launch(
                    &format!("prompt_attention_{cache}_{hd}"),
                    ((p.tiles.len() / 2) as u32, heads as u32, 1),
                    128, // kernels.cu, PA_WARPS
                    &[
                        q.arg(self.gpu)?,
                        ck,
                        cv,
                        ptr(&tables.tables, self.gpu.stream()),
                        ptr(&self.meta.rows, self.gpu.stream()),
                        ptr(&p.tiles, self.gpu.stream()),
                        out.arg(self.gpu)?,
                        Arg::I32(heads as i32),
                        Arg::I32(kvh as i32),
                        Arg::I32(layout.block_size as i32),
                        Arg::F32(scale),
                    ],
                )?;
            }
            // The rows the flash-decoding kernel serves: all, or those the tiles leave.
            let (rows, row_ids) = match prompt.map(|p| &p.short) {
                None => (self.num_rows, Arg::Ptr(0)),
                Some(None) => return Ok(()), // the cache is written
                Some(Some(short)) => (short.len(), ptr(short, self.gpu.stream())),
            };
            // The kernel for the cache type and the head size it is built for.
            let width = match hd {
                ..=64 => 64,
                65..=128 => 128,
                _ => 256,
            };
            let name = format!("attention_{cache}_{width}");
            // Blocks: one per row and chunk of ATT_GH query heads sharing a KV head, each
            // row's keys split until there are two blocks per SM (a single decoded row
            // reaches the whole GPU; a prefill's rows already do). The split count depends
            // on the shape only, so a captured step's scratch never grows.
            let chunks = kvh * (heads / kvh).div_ceil(ATT_GH);
            let splits = (2 * self.gpu.sms())
                .div_ceil(rows * chunks)
                .min(ATT_MAX_SPLITS);
            // Partials and tickets are indexed by the row's number in the pass.
            let (parts, counts) = if splits > 1 {
                let (size, tickets) = (
                    self.num_rows * heads * splits * (hd + 2),
                    self.num_rows * chunks,
                );
                scratch.attention(self.gpu, size, tickets)?
            } else {
                (Arg::Ptr(0), Arg::Ptr(0))
            };
            self.gpu.launch(
                &name,
                (rows as u32, chunks as u32, splits as u32),
                128, // kernels.cu, ATT_WARPS
                &[
                    q.arg(self.gpu)?,
                    k.arg(self.gpu)?,
                    v.arg(self.gpu)?,
                    ck,
                    cv,
                    ptr(&tables.tables, self.gpu.stream()),
                    ptr(&self.meta.rows, self.gpu.stream()),
                    out.arg(self.gpu)?,
                    parts,
                    counts,
                    Arg::I32(heads as i32),
                    Arg::I32(kvh as i32),
                    Arg::I32(hd as i32),
                    Arg::I32(layout.block_size as i32),
                    Arg::F32(scale),
                    Arg::I32(window.unwrap_or(0) as i32),
                    Arg::I32(ring_keep as i32),
                    Arg::I32(ring_window as i32),
                    row_ids,
                ],
            )?;
            if store_first {
                return Ok(());
            }
            // The fresh keys and values into the cache after the attention (as on the CPU:
            // the chunk must not overwrite keys its own queries still read).
            self.elementwise(
                &format!("kv_store_{cache}"),
                self.num_rows * kvh * hd,
                &[
                    k.arg(self.gpu)?,
                    v.arg(self.gpu)?,
                    ck,
                    cv,
                    slots,
                    Arg::I32(self.num_rows as i32),
                    Arg::I32(kvh as i32),
                    Arg::I32(hd as i32),
                    Arg::I32(layout.block_size as i32),
                ],
            )
        })
    }

    fn gated(
        &self,
        act: Activation,
        gate: &mut GpuBuf,
        up: &GpuBuf,
        scratch: &mut Scratch,
    ) -> Result<()> {
        self.timed("activation", || {
            // The product rounded to q8 too, for the down projection.
            let (n, g) = (gate.len(), gate.arg(self.gpu)?);
            let q8 = scratch.q8_target(self.gpu, n);
            let [xq, ds] = q8.unwrap_or([Arg::Ptr(0); 2]);
            self.elementwise(
                "activation_f32",
                n.div_ceil(4),
                &[
                    g,
                    up.arg(self.gpu)?,
                    Arg::I32(act_kind(act)),
                    Arg::I64(n as i64),
                    xq,
                    ds,
                ],
            )?;
            if q8.is_some() {
                scratch.q8_written(self.gpu, g, n);
            }
            Ok(())
        })
    }

    fn activation(&self, act: Activation, x: &mut GpuBuf) -> Result<()> {
        self.timed("activation", || {
            self.elementwise(
                "activation_f32",
                x.len().div_ceil(4),
                &[
                    x.arg(self.gpu)?,
                    Arg::Ptr(0),
                    Arg::I32(act_kind(act)),
                    Arg::I64(x.len() as i64),
                    Arg::Ptr(0),
                    Arg::Ptr(0),
                ],
            )
        })
    }

    fn moe(&self, moe: &MoeMlp, x: &GpuBuf, rows: usize, out: &mut GpuBuf) -> Result<()> {
        self.timed("moe routing and experts", || {
            // The router's logits come to the host, where the routing is decided exactly as
            // on the CPU; each chosen expert then runs on the GPU over its tokens.
            let d = x.len() / rows.max(1);
            let mut logits = GpuBuf::default();
            let mut scratch = Scratch::default();
            on_gpu(&moe.gate)?.forward(self.gpu, x, rows, &mut logits, &mut scratch)?;
            let experts = moe.experts.len();
            let host = self.gpu.download(logits.slice()?, rows * experts)?;
            let routed = moe.route(&host, rows);
            out.resize(self.gpu, rows * d)?;
            self.gpu
                .stream()
                .memset_zeros(&mut out.slice_mut()?.slice_mut(..rows * d))
                .map_err(|e| super::device_error("clearing a GPU buffer", e))?;
            let (mut xs, mut gate, mut up, mut y) = (
                GpuBuf::default(),
                GpuBuf::default(),
                GpuBuf::default(),
                GpuBuf::default(),
            );
            for (expert, (tokens, weights)) in moe.experts.iter().zip(routed) {
                if tokens.is_empty() {
                    continue;
                }
                let n = tokens.len();
                let idx = self.gpu.upload(&tokens)?;
                let w = self.gpu.upload(&weights)?;
                xs.resize(self.gpu, n * d)?;
                self.elementwise(
                    "gather_rows_f32",
                    n * d,
                    &[
                        x.arg(self.gpu)?,
                        ptr(&idx, self.gpu.stream()),
                        Arg::I32(d as i32),
                        xs.arg(self.gpu)?,
                        Arg::I32(n as i32),
                    ],
                )?;
                self.linear(
                    [&expert.gate_proj, &expert.up_proj],
                    &xs,
                    n,
                    [&mut gate, &mut up],
                    &mut scratch,
                )?;
                self.gated(expert.act, &mut gate, &up, &mut scratch)?;
                self.linear([&expert.down_proj], &gate, n, [&mut y], &mut scratch)?;
                self.elementwise(
                    "scatter_add_rows_f32",
                    n * d,
                    &[
                        out.arg(self.gpu)?,
                        y.arg(self.gpu)?,
                        ptr(&idx, self.gpu.stream()),
                        ptr(&w, self.gpu.stream()),
                        Arg::I32(d as i32),
                        Arg::I32(n as i32),
                    ],
                )?;
            }
            Ok(())
        })
    }

    fn gather_rows(&self, x: &GpuBuf, rows: &[u32], width: usize, out: &mut GpuBuf) -> Result<()> {
        self.timed("elementwise", || {
            let idx = self.gpu.upload(rows)?;
            out.resize(self.gpu, rows.len() * width)?;
            self.elementwise(
                "gather_rows_f32",
                rows.len() * width,
                &[
                    x.arg(self.gpu)?,
                    ptr(&idx, self.gpu.stream()),
                    Arg::I32(width as i32),
                    out.arg(self.gpu)?,
                    Arg::I32(rows.len() as i32),
                ],
            )
        })
    }

    fn to_host(
        &self,
        x: GpuBuf,
        rows: usize,
        width: usize,
        draws: Option<&[Draw]>,
    ) -> Result<Logits> {
        self.timed("logits to host", || {
            if let Some(draws) = draws {
                let ids = self.gpu.sample_rows(x.slice()?, width, draws)?;
                return Ok(Logits::drawn_only(ids, width));
            }
            Logits::new(self.gpu.download(x.slice()?, rows * width)?, rows, width)
        })
    }
}

fn act_kind(act: Activation) -> i32 {
    match act {
        Activation::Silu => 0,
        Activation::GeluPytorchTanh => 1,
    }
}
