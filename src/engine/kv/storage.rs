//! The KV cache's memory: every layer's keys and values, in fixed-size blocks (vLLM's
//! PagedAttention layout, Kwon et al. 2023). Which sequence owns which block is
//! [`super::BlockPool`]'s business; this side only says where a slot lives
//! ([`KvLayout::place`]) and lends each layer's arrays to the attention kernels, which read
//! and write them through [`KvStorage::layer`] and [`KvStorage::layer_mut`] alone on the
//! CPU, [`KvStorage::cuda_layer`] on a GPU (the `cuda` feature: f16 or bf16, keys laid out
//! like values so that one key is contiguous).
//!
//! Memory: `2 · layers · num_blocks · block_size · kv_heads · head_dim` elements, reserved
//! up front: on the CPU as zeroed allocations that the OS maps lazily, so only written
//! blocks are resident; on a GPU all at once.

use half::f16;

use super::pool::HOLE;
use crate::error::{Error, Result};

/// Elements after each layer's keys, so that a kernel reading 16 keys at a time past the
/// end of a run (and dropping the extra lanes) never reads out of bounds.
pub const KEY_PAD: usize = 16;

/// The rotating cache's shape (mlx-lm's `RotatingKVCache`): the first `keep` positions
/// stay, and the rest share `window` slots in a ring, so a sequence holds at most
/// `keep + window` positions and sees its first tokens and the most recent ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    pub keep: usize,
    pub window: usize,
}

impl Ring {
    /// Cache slots a sequence of `len` positions occupies.
    pub fn slots(ring: Option<Ring>, len: usize) -> usize {
        ring.map_or(len, |r| len.min(r.keep + r.window))
    }

    /// The slot of position `p` within its sequence.
    pub fn slot(ring: Option<Ring>, p: usize) -> usize {
        match ring {
            Some(r) if p >= r.keep => r.keep + (p - r.keep) % r.window,
            _ => p,
        }
    }
}

/// How the cache stores keys and values: f16 halves the memory a position takes and the
/// bytes each decoded token reads (llama.cpp's default too); f32 keeps a float model's
/// reference computation exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDType {
    F32,
    F16,
    /// GPU caches of bf16 models.
    BF16,
}

impl KvDType {
    /// Bytes of one element.
    pub fn size(self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 | KvDType::BF16 => 2,
        }
    }
}

/// The shape of the cache, shared by every layer: what a kernel needs to find a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Positions per block.
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Past `keep + window` positions a sequence's slots wrap around (rotating cache).
    pub ring: Option<Ring>,
}

impl KvLayout {
    /// Where the keys of `kv_head` in slot `slot` of a sequence with block table `blocks`
    /// start: `(block's first key element, index within the block)`. Keys are `[num_blocks,
    /// kv_heads, head_dim, block_size]` (transposed within a block: one dimension of a
    /// block's keys is contiguous, so a query scores a whole run of keys with vector
    /// multiply-adds and no horizontal sums): dimension `d` of the key is at
    /// `first + d * block_size + index`. Values are `[num_blocks, kv_heads, block_size,
    /// head_dim]` (a key's value is contiguous): at `first + index * head_dim..`.
    pub fn place(&self, blocks: &[u32], slot: usize, kv_head: usize) -> (usize, usize) {
        let block = blocks[slot / self.block_size] as usize;
        let base = (block * self.kv_heads + kv_head) * self.block_size * self.head_dim;
        (base, slot % self.block_size)
    }

    /// Elements of keys (or of values) per block and layer.
    fn block_len(&self) -> usize {
        self.block_size * self.kv_heads * self.head_dim
    }
}

/// One layer's `(keys, values)` as [`KvLayout::place`] lays them out; keys carry
/// [`KEY_PAD`] elements more.
#[derive(Debug, Clone, Copy)]
pub enum LayerKv<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [f16], &'a [f16]),
}

/// [`LayerKv`], writable.
#[derive(Debug)]
pub enum LayerKvMut<'a> {
    F32(&'a mut [f32], &'a mut [f32]),
    F16(&'a mut [f16], &'a mut [f16]),
}

/// Each layer's keys and values, in one element type.
#[derive(Debug)]
enum Layers {
    F32(Vec<(Vec<f32>, Vec<f32>)>),
    F16(Vec<(Vec<f16>, Vec<f16>)>),
    /// In GPU memory, f16 or bf16 bits, keys and values both `[num_blocks, kv_heads,
    /// block_size, head_dim]` (one key contiguous, for coalesced reads).
    #[cfg(feature = "cuda")]
    Cuda(GpuLayers),
}

#[cfg(feature = "cuda")]
struct GpuLayers {
    gpu: std::sync::Arc<crate::cuda::Gpu>,
    layers: Vec<(GpuSlice, GpuSlice)>,
}

#[cfg(feature = "cuda")]
type GpuSlice = candle_core::cuda_backend::cudarc::driver::CudaSlice<u16>;

#[cfg(feature = "cuda")]
impl std::fmt::Debug for GpuLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuLayers({:?}, {} layers)", self.gpu, self.layers.len())
    }
}

/// Sliding-window layers whose cache keeps only their window (Gemma 3's local layers):
/// their slots come from a second block table, [`super::BlockPool::release_before`]
/// frees the blocks that fall out of the window, and their memory is a pool of its own,
/// `num_blocks` blocks (a few windows per sequence, not whole contexts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowLayers {
    /// Per layer: whether it is one of them.
    pub layers: Vec<bool>,
    /// Positions each query attends to (its own included).
    pub window: usize,
    pub num_blocks: usize,
}

/// What a block of a cache holds, for files that carry blocks from one cache to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheShape {
    pub dtype: KvDType,
    pub layout: KvLayout,
    pub num_layers: usize,
    /// Window layers, which hold a block only while it is in their window.
    pub windows: Option<WindowLayers>,
}

impl CacheShape {
    /// Bytes of one block in [`KvStorage::read_blocks`]' form: every layer's keys and
    /// values.
    pub fn block_bytes(&self) -> usize {
        2 * self.num_layers * self.layout.block_len() * self.dtype.size()
    }
}

/// An element of a host cache that allocates its zeros untouched (`calloc`: the OS maps
/// pages as they are written), so that a cache is resident only where blocks are used.
/// (`vec![f16::ZERO; n]` would write every element: `f16` is not one of the types the
/// standard library allocates zeroed.)
trait Zeroed: Sized {
    fn zeroed(n: usize) -> Vec<Self>;
}

impl Zeroed for f32 {
    fn zeroed(n: usize) -> Vec<Self> {
        vec![0.0; n]
    }
}

impl Zeroed for f16 {
    fn zeroed(n: usize) -> Vec<Self> {
        use half::vec::HalfBitsVecExt;
        vec![0u16; n].reinterpret_into()
    }
}

/// An element of a host cache, as saved prefixes store it: little-endian bytes.
trait LeBytes: Copy {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    /// From the first `SIZE` bytes of `b`.
    fn get(b: &[u8]) -> Self;
}

impl LeBytes for f32 {
    const SIZE: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend(self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

impl LeBytes for f16 {
    const SIZE: usize = 2;
    fn put(self, out: &mut Vec<u8>) {
        out.extend(self.to_bits().to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
    }
}

/// Where element `c` of a block's keys in [`KvStorage::read_blocks`]' order `[kv_heads,
/// block_size, head_dim]` lives in a host block, whose keys are `[kv_heads, head_dim,
/// block_size]`.
fn host_key(layout: KvLayout, c: usize) -> usize {
    let KvLayout {
        block_size,
        head_dim,
        ..
    } = layout;
    let (h, i, d) = (
        c / (block_size * head_dim),
        c / head_dim % block_size,
        c % head_dim,
    );
    (h * head_dim + d) * block_size + i
}

/// Appends one block of every host layer to `out`, keys then values: layer `l`'s block
/// starts at element `first[l]`, and a layer without one (`None`: a window layer whose
/// block has left its window) gets zeros.
fn read_host<T: LeBytes + Default>(
    layers: &[(Vec<T>, Vec<T>)],
    layout: KvLayout,
    first: &[Option<usize>],
    out: &mut Vec<u8>,
) {
    let n = layout.block_len();
    for ((k, v), first) in layers.iter().zip(first) {
        match *first {
            Some(first) => {
                (0..n).for_each(|c| k[first + host_key(layout, c)].put(out));
                v[first..first + n].iter().for_each(|x| x.put(out));
            }
            None => (0..2 * n).for_each(|_| T::default().put(out)),
        }
    }
}

/// Writes one block of every host layer from `parts` (each layer's keys, then its
/// values, as [`read_host`] appends them); `first` as there, `None` skipping the layer.
fn write_host<'a, T: LeBytes>(
    layers: &mut [(Vec<T>, Vec<T>)],
    layout: KvLayout,
    first: &[Option<usize>],
    parts: &mut impl Iterator<Item = &'a [u8]>,
) -> Result<()> {
    let n = layout.block_len();
    for ((k, v), first) in layers.iter_mut().zip(first) {
        let (Some(pk), Some(pv)) = (parts.next(), parts.next()) else {
            return Err(Error::Internal("a block's data ended early".into()));
        };
        let Some(first) = *first else {
            continue;
        };
        for c in 0..n {
            k[first + host_key(layout, c)] = T::get(&pk[c * T::SIZE..]);
            v[first + c] = T::get(&pv[c * T::SIZE..]);
        }
    }
    Ok(())
}

/// Elements of each layer's keys (or values): `num_blocks` blocks, or for a window layer
/// its pool's.
fn layer_lens(
    num_layers: usize,
    num_blocks: usize,
    layout: KvLayout,
    windows: Option<&WindowLayers>,
) -> Result<Vec<usize>> {
    (0..num_layers)
        .map(|l| {
            let blocks = match windows {
                Some(w) if w.layers[l] => w.num_blocks,
                _ => num_blocks,
            };
            blocks
                .checked_mul(layout.block_len())
                .ok_or_else(|| Error::param("kv_cache_tokens", "the KV cache size overflows"))
        })
        .collect()
}

/// Keys and values of every layer, `num_blocks` blocks each (window layers: their own
/// number).
#[derive(Debug)]
pub struct KvStorage {
    layers: Layers,
    layout: KvLayout,
    num_blocks: usize,
    dtype: KvDType,
    windows: Option<WindowLayers>,
}

impl KvStorage {
    pub fn new(
        dtype: KvDType,
        num_layers: usize,
        num_blocks: usize,
        layout: KvLayout,
    ) -> Result<Self> {
        Self::with_windows(dtype, num_layers, num_blocks, layout, None)
    }

    /// A host cache whose `windows` layers (if any) keep only their window, in blocks of
    /// their own.
    pub fn with_windows(
        dtype: KvDType,
        num_layers: usize,
        num_blocks: usize,
        layout: KvLayout,
        windows: Option<WindowLayers>,
    ) -> Result<Self> {
        fn zeros<T: Zeroed>(lens: &[usize]) -> Vec<(Vec<T>, Vec<T>)> {
            lens.iter()
                .map(|&len| (T::zeroed(len + KEY_PAD), T::zeroed(len)))
                .collect()
        }
        let lens = layer_lens(num_layers, num_blocks, layout, windows.as_ref())?;
        Ok(KvStorage {
            layers: match dtype {
                KvDType::F32 => Layers::F32(zeros(&lens)),
                KvDType::F16 => Layers::F16(zeros(&lens)),
                KvDType::BF16 => {
                    return Err(Error::Internal("a bf16 KV cache on the CPU".into()));
                }
            },
            layout,
            num_blocks,
            dtype,
            windows,
        })
    }

    /// A cache in `gpu`'s memory, `dtype` F16 or BF16, whose `windows` layers (if any) keep
    /// only their window, in blocks of their own.
    #[cfg(feature = "cuda")]
    pub fn on_gpu(
        gpu: std::sync::Arc<crate::cuda::Gpu>,
        dtype: KvDType,
        num_layers: usize,
        num_blocks: usize,
        layout: KvLayout,
        windows: Option<WindowLayers>,
    ) -> Result<Self> {
        if dtype == KvDType::F32 {
            return Err(Error::Internal("an f32 KV cache on the GPU".into()));
        }
        gpu.bind()?;
        // A new cache may reuse a dropped one's addresses: graphs captured over that one
        // must not replay over this one.
        gpu.bump_epoch();
        let layers = layer_lens(num_layers, num_blocks, layout, windows.as_ref())?
            .into_iter()
            .map(|len| Ok((gpu.zeros(len)?, gpu.zeros(len)?)))
            .collect::<Result<_>>()?;
        Ok(KvStorage {
            layers: Layers::Cuda(GpuLayers { gpu, layers }),
            layout,
            num_blocks,
            dtype,
            windows,
        })
    }

    pub fn dtype(&self) -> KvDType {
        self.dtype
    }

    /// Whether the layers live in GPU memory.
    pub fn is_on_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Layers::Cuda(_) = self.layers {
            return true;
        }
        false
    }

    /// Layer `layer`'s `(keys, values)` in GPU memory, when the cache is there.
    #[cfg(feature = "cuda")]
    pub fn cuda_layer(&mut self, layer: usize) -> Option<(&GpuSlice, &GpuSlice)> {
        match &self.layers {
            Layers::Cuda(g) => g.layers.get(layer).map(|(k, v)| (k, v)),
            _ => None,
        }
    }

    /// Bytes of K and V per cached token, over all layers.
    pub fn bytes_per_token(
        dtype: KvDType,
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        2 * num_layers * kv_heads * head_dim * dtype.size()
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Whether some layers keep only their window.
    pub fn has_window_layers(&self) -> bool {
        self.windows.is_some()
    }

    /// Whether layer `layer` keeps only its window, in blocks of the window table.
    pub fn is_window_layer(&self, layer: usize) -> bool {
        self.windows.as_ref().is_some_and(|w| w.layers[layer])
    }

    /// Layer `layer`'s layout: a window layer's slot is its position (a rotating cache
    /// turns only the other layers).
    pub fn layout_of(&self, layer: usize) -> KvLayout {
        if self.is_window_layer(layer) {
            KvLayout {
                ring: None,
                ..self.layout
            }
        } else {
            self.layout
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Adds `more` blocks (a single sequence's cache growing); their ids follow the
    /// existing ones. O(size) when the arrays move. Not for a cache with window layers.
    pub fn grow(&mut self, more: usize) -> Result<()> {
        fn resize<T: Copy + Default>(layers: &mut [(Vec<T>, Vec<T>)], len: usize) {
            for (k, v) in layers {
                k.resize(len + KEY_PAD, T::default());
                v.resize(len, T::default());
            }
        }
        if self.windows.is_some() {
            return Err(Error::Internal("growing a cache with window layers".into()));
        }
        self.num_blocks += more;
        let len = self.num_blocks * self.layout.block_len();
        match &mut self.layers {
            Layers::F32(l) => resize(l, len),
            Layers::F16(l) => resize(l, len),
            #[cfg(feature = "cuda")]
            Layers::Cuda(g) => {
                g.gpu.bump_epoch();
                for (k, v) in &mut g.layers {
                    for old in [k, v] {
                        let mut new = g.gpu.zeros::<u16>(len)?;
                        let mut to = new.slice_mut(..old.len());
                        g.gpu
                            .stream()
                            .memcpy_dtod(&*old, &mut to)
                            .map_err(|e| crate::cuda::device_error("growing the KV cache", e))?;
                        *old = new;
                    }
                }
            }
        }
        Ok(())
    }

    fn num_layers(&self) -> usize {
        match &self.layers {
            Layers::F32(l) => l.len(),
            Layers::F16(l) => l.len(),
            #[cfg(feature = "cuda")]
            Layers::Cuda(g) => g.layers.len(),
        }
    }

    pub fn shape(&self) -> CacheShape {
        CacheShape {
            dtype: self.dtype,
            layout: self.layout,
            num_layers: self.num_layers(),
            windows: self.windows.clone(),
        }
    }

    /// Where block `i` of a prefix starts in each layer: `blocks[i]`'s first element, or
    /// for a window layer `window_blocks[i]`'s (`None` where that is a [`HOLE`]: nothing to
    /// read or write there).
    fn firsts(&self, blocks: &[u32], window_blocks: &[u32], i: usize) -> Vec<Option<usize>> {
        let n = self.layout.block_len();
        (0..self.num_layers())
            .map(|l| {
                let b = if self.is_window_layer(l) {
                    window_blocks[i]
                } else {
                    blocks[i]
                };
                (b != HOLE).then_some(b as usize * n)
            })
            .collect()
    }

    /// Copies the blocks of a prefix out (a saved prefix): block by block, each layer's keys
    /// then its values, each `[kv_heads, block_size, head_dim]` (keys laid out as values
    /// are, whatever this cache's own layout) in little-endian bytes of the cache's element
    /// type, so that a CPU and a GPU cache of one element type read each other's blocks.
    /// Block `i` is `blocks[i]`, in window layers `window_blocks[i]` (zeros where that is
    /// a [`HOLE`]; ignored without window layers).
    pub fn read_blocks(&self, blocks: &[u32], window_blocks: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(blocks.len() * self.shape().block_bytes());
        for i in 0..blocks.len() {
            let firsts = self.firsts(blocks, window_blocks, i);
            match &self.layers {
                Layers::F32(l) => read_host(l, self.layout, &firsts, &mut out),
                Layers::F16(l) => read_host(l, self.layout, &firsts, &mut out),
                #[cfg(feature = "cuda")]
                Layers::Cuda(g) => {
                    let n = self.layout.block_len();
                    let mut bits = vec![0u16; n];
                    for ((k, v), first) in g.layers.iter().zip(firsts) {
                        for half in [k, v] {
                            match first {
                                Some(first) => (g.gpu.stream())
                                    .memcpy_dtoh(&half.slice(first..first + n), &mut bits)
                                    .map_err(|e| crate::cuda::device_error("saving a prefix", e))?,
                                None => bits.fill(0),
                            }
                            out.extend(bits.iter().flat_map(|x| x.to_le_bytes()));
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Writes `data` (as [`KvStorage::read_blocks`] gives it) into `blocks` (window layers:
    /// into `window_blocks`), skipping [`HOLE`]s.
    pub fn write_blocks(
        &mut self,
        blocks: &[u32],
        window_blocks: &[u32],
        data: &[u8],
    ) -> Result<()> {
        let block_bytes = self.shape().block_bytes();
        if data.len() != blocks.len() * block_bytes {
            return Err(Error::Internal(format!(
                "{} bytes for {} blocks of {block_bytes}",
                data.len(),
                blocks.len(),
            )));
        }
        let n = self.layout.block_len();
        // One layer's keys or values of one block at a time, `n` elements.
        let mut parts = data.chunks_exact(n * self.dtype.size());
        for i in 0..blocks.len() {
            let firsts = self.firsts(blocks, window_blocks, i);
            match &mut self.layers {
                Layers::F32(l) => write_host(l, self.layout, &firsts, &mut parts)?,
                Layers::F16(l) => write_host(l, self.layout, &firsts, &mut parts)?,
                #[cfg(feature = "cuda")]
                Layers::Cuda(g) => {
                    for ((k, v), first) in g.layers.iter_mut().zip(firsts) {
                        for half in [k, v] {
                            let Some(p) = parts.next() else {
                                return Err(Error::Internal("a block's data ended early".into()));
                            };
                            let Some(first) = first else {
                                continue;
                            };
                            let bits: Vec<u16> = p
                                .chunks_exact(2)
                                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                                .collect();
                            (g.gpu.stream())
                                .memcpy_htod(&bits, &mut half.slice_mut(first..first + n))
                                .map_err(|e| crate::cuda::device_error("loading a prefix", e))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Layer `layer`'s keys and values, to read.
    /// Host caches only: the CPU backend refuses a GPU cache before it reads one.
    pub fn layer(&self, layer: usize) -> LayerKv<'_> {
        match &self.layers {
            Layers::F32(l) => LayerKv::F32(&l[layer].0, &l[layer].1),
            Layers::F16(l) => LayerKv::F16(&l[layer].0, &l[layer].1),
            #[cfg(feature = "cuda")]
            Layers::Cuda(_) => unreachable!("a GPU KV cache read on the host"),
        }
    }

    /// Layer `layer`'s keys and values, to write.
    pub fn layer_mut(&mut self, layer: usize) -> LayerKvMut<'_> {
        match &mut self.layers {
            Layers::F32(l) => {
                let (k, v) = &mut l[layer];
                LayerKvMut::F32(k, v)
            }
            Layers::F16(l) => {
                let (k, v) = &mut l[layer];
                LayerKvMut::F16(k, v)
            }
            #[cfg(feature = "cuda")]
            Layers::Cuda(_) => unreachable!("a GPU KV cache written on the host"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots of one sequence map to distinct elements inside its own blocks, and the ring
    /// wraps past `keep + window`.
    #[test]
    fn places_are_distinct_and_inside_the_table() -> Result<()> {
        let layout = KvLayout {
            block_size: 4,
            kv_heads: 2,
            head_dim: 3,
            ring: None,
        };
        let storage = KvStorage::new(KvDType::F16, 2, 5, layout)?;
        let LayerKv::F16(keys, values) = storage.layer(1) else {
            return Err(Error::Internal("an f16 cache lent f32 arrays".into()));
        };
        assert_eq!(values.len(), 5 * 4 * 2 * 3);
        assert_eq!(keys.len(), values.len() + KEY_PAD);
        let blocks = [3u32, 0, 4];
        let mut seen = std::collections::HashSet::new();
        for slot in 0..12 {
            for h in 0..2 {
                let (base, index) = layout.place(&blocks, slot, h);
                let block = base / layout.block_len();
                assert_eq!(block as u32, blocks[slot / 4]);
                assert!(base + index * 3 + 3 <= values.len());
                assert!(
                    seen.insert((base, index)),
                    "slot {slot} head {h} placed twice"
                );
            }
        }
        let ring = Some(Ring { keep: 2, window: 5 });
        assert_eq!(Ring::slots(ring, 100), 7);
        assert_eq!(Ring::slot(ring, 1), 1);
        assert_eq!(Ring::slot(ring, 7), 2);
        assert_eq!(Ring::slot(ring, 8), 3);
        Ok(())
    }

    /// Window layers get their own number of blocks and no ring; a prefix's blocks read
    /// back as written, a window layer's hole as zeros.
    #[test]
    fn window_layers_have_their_own_blocks() -> Result<()> {
        let layout = KvLayout {
            block_size: 2,
            kv_heads: 1,
            head_dim: 2,
            ring: Some(Ring { keep: 1, window: 3 }),
        };
        let windows = WindowLayers {
            layers: vec![false, true],
            window: 3,
            num_blocks: 2,
        };
        let mut storage = KvStorage::with_windows(KvDType::F32, 2, 5, layout, Some(windows))?;
        let (LayerKv::F32(_, main), LayerKv::F32(_, window)) = (storage.layer(0), storage.layer(1))
        else {
            return Err(Error::Internal("an f32 cache lent f16 arrays".into()));
        };
        assert_eq!((main.len(), window.len()), (5 * 4, 2 * 4));
        assert!(!storage.is_window_layer(0) && storage.is_window_layer(1));
        assert_eq!(storage.layout_of(0).ring, layout.ring);
        assert_eq!(storage.layout_of(1).ring, None);
        // Two blocks: the first left the window (a hole), the second is block 1.
        let data: Vec<u8> = (0..2 * storage.shape().block_bytes())
            .map(|i| (i % 7) as u8 + 1)
            .collect();
        storage.write_blocks(&[3, 4], &[HOLE, 1], &data)?;
        let back = storage.read_blocks(&[3, 4], &[HOLE, 1])?;
        let half = storage.shape().block_bytes() / 2; // one layer's keys and values
        assert_eq!(back[..half], data[..half]);
        assert!(back[half..2 * half].iter().all(|&b| b == 0));
        assert_eq!(back[2 * half..], data[2 * half..]);
        Ok(())
    }

    #[test]
    fn grow_adds_blocks_after_the_existing_ones() -> Result<()> {
        let layout = KvLayout {
            block_size: 2,
            kv_heads: 1,
            head_dim: 2,
            ring: None,
        };
        let mut storage = KvStorage::new(KvDType::F32, 1, 0, layout)?;
        storage.grow(3)?;
        assert_eq!(storage.num_blocks(), 3);
        let LayerKvMut::F32(keys, values) = storage.layer_mut(0) else {
            return Err(Error::Internal("an f32 cache lent f16 arrays".into()));
        };
        assert_eq!((keys.len(), values.len()), (12 + KEY_PAD, 12));
        Ok(())
    }
}
