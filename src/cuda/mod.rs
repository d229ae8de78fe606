//! The CUDA backend: the decoder's operations ([`crate::model::ops::Ops`]) on an NVIDIA
//! GPU. Built only with the `cuda` feature.
//!
//! - [`Gpu`]: one device, one stream that every thread of the process uses (a model is
//!   loaded on one thread and run on the engine's worker), our kernels
//!   (`kernels.cu`, compiled to PTX by build.rs) and cuBLAS.
//! - `weights.rs`: linear layers uploaded once at load, repacked for the GPU kernels.
//! - `ops.rs`: one forward pass's operations; the KV cache is [`crate::engine::kv::KvStorage`]
//!   with its layers in GPU memory.
//! - `graph.rs`: decode steps captured as CUDA graphs and replayed.
//!
//! Activations stay f32 on the GPU (more exact than the CPU's int8-rounded quantized
//! path); the CPU's f32 computation is the reference the GPU tests compare against.

pub mod graph;
mod ops;
mod weights;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute_enum as Attribute;
use candle_core::cuda_backend::cudarc::driver::{
    self, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDevice;
use candle_core::Device;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::model::Draw;

pub use ops::{Meta, Params, Pass};
pub use weights::{GpuEmbedding, GpuLinear, Scratch, GEMV_MAX_ROWS};

/// The kernels of `kernels.cu`, as PTX for every GPU from Ampere on, and for Hopper and later
/// (programmatic dependent launch, `PDL_WAIT` in kernels.cu).
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels_sm90.ptx"));

/// Words of one row's draw in kernels.cu `sample_rows` (its `DRAW_WORDS`).
const DRAW_WORDS: usize = 12;
/// Bytes of static shared memory `sample_rows` takes beside a row (4.6 KiB by ptxas, and room).
const SAMPLE_STATIC_SHARED: usize = 8 << 10;

/// Whether the GPU attention kernels take heads of `head_dim` (kernels.cu `attention`:
/// 16-byte loads of 8 dimensions, builds for up to 256).
pub fn attention_takes(head_dim: usize) -> bool {
    head_dim <= 256 && head_dim.is_multiple_of(8)
}

/// A GPU error (a driver call that failed, memory that ran out) as a Cortex error.
pub(crate) fn device_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Device(format!("{what}: {e}"))
}

/// What `get_device_info()` reports about a GPU.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_memory: usize,
    pub free_memory: usize,
    /// `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// The driver's CUDA version, e.g. `(13, 0)`.
    pub driver_version: (i32, i32),
}

/// How many CUDA GPUs this process can use: 0 without a driver or a GPU.
pub fn device_count() -> usize {
    driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// One GPU and the stream Cortex runs everything on.
pub struct Gpu {
    device: CudaDevice,
    stream: Arc<CudaStream>,
    ordinal: usize,
    /// Streaming multiprocessors: how many blocks it takes to keep the GPU busy.
    sms: usize,
    /// Compute capability 9.0 or later: kernels come from `PTX_SM90` and each may be
    /// scheduled while the one before it finishes (programmatic dependent launch).
    pdl: bool,
    /// The most shared memory a block may ask for (bytes, past the default 48 KiB).
    shared_optin: usize,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// Counts reallocations of the buffers a forward pass computes in (workspaces, scratch,
    /// KV caches): a captured graph holds their addresses, and is stale once this moves.
    epoch: AtomicU64,
    /// Kernels launched (through [`Gpu::launch`]): a kernel's output is still what the
    /// next one reads when none came between (`weights::Scratch::q8_written`).
    launches: AtomicU64,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu(cuda:{})", self.ordinal)
    }
}

impl Gpu {
    /// GPU `ordinal`, shared by every model on it (one context, one stream).
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        static OPEN: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let mut open = OPEN.get_or_init(Mutex::default).lock();
        if let Some(gpu) = open.get(&ordinal) {
            return Ok(gpu.clone());
        }
        let count = device_count();
        if ordinal >= count {
            return Err(Error::param(
                "device",
                format!("cuda:{ordinal} does not exist: this machine has {count} CUDA GPU(s)"),
            ));
        }
        let device = CudaDevice::new_with_stream(ordinal)?;
        // SAFETY: everything runs on this one stream, in order, so no buffer is used on
        // another stream and cudarc's per-buffer events would only cost time.
        #[allow(unsafe_code)]
        unsafe {
            device.disable_event_tracking();
        }
        let attribute = |a| {
            device
                .cuda_stream()
                .context()
                .attribute(a)
                .map_err(|e| device_error("querying the GPU", e))
        };
        let sms = attribute(Attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let major = attribute(Attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let shared_optin =
            attribute(Attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let gpu = Arc::new(Gpu {
            stream: device.cuda_stream(),
            device,
            ordinal,
            sms: sms.max(1) as usize,
            pdl: major >= 9,
            shared_optin: shared_optin.max(0) as usize,
            functions: Mutex::default(),
            epoch: AtomicU64::new(0),
            launches: AtomicU64::new(0),
        });
        open.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn sms(&self) -> usize {
        self.sms
    }

    /// The candle device on this GPU (for candle's quantized kernels).
    pub fn candle_device(&self) -> Device {
        Device::Cuda(self.device.clone())
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn cublas(&self) -> Arc<candle_core::cuda_backend::cudarc::cublas::CudaBlas> {
        self.device.cublas_handle()
    }

    /// Makes this GPU's context current on the calling thread (each thread that launches
    /// work must).
    pub fn bind(&self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| device_error("binding the CUDA context", e))
    }

    pub fn info(&self) -> Result<GpuInfo> {
        self.bind()?;
        let ctx = self.stream.context();
        let err = |e| device_error("querying the GPU", e);
        let (free_memory, total_memory) = ctx.mem_get_info().map_err(err)?;
        let mut version = 0;
        // SAFETY: cuDriverGetVersion writes one int.
        #[allow(unsafe_code)]
        unsafe {
            driver::sys::cuDriverGetVersion(&raw mut version)
                .result()
                .map_err(err)?;
        }
        Ok(GpuInfo {
            ordinal: self.ordinal,
            name: ctx.name().map_err(err)?,
            total_memory,
            free_memory,
            compute_capability: ctx.compute_capability().map_err(err)?,
            driver_version: (version / 1000, version % 1000 / 10),
        })
    }

    /// Moves when a buffer a pass computes in moves (see the field).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// How many kernels have been launched so far.
    pub(crate) fn launches(&self) -> u64 {
        self.launches.load(Ordering::Acquire)
    }

    /// Records that a buffer a pass computes in has moved (captured graphs are stale).
    pub(crate) fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// `len` zeroed elements on the GPU.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| oom(len * std::mem::size_of::<T>(), e))
    }

    /// A copy of `values` on the GPU.
    pub fn upload<T: DeviceRepr>(&self, values: &[T]) -> Result<CudaSlice<T>> {
        if values.is_empty() {
            return self.zeros_raw(1);
        }
        self.stream
            .clone_htod(values)
            .map_err(|e| oom(std::mem::size_of_val(values), e))
    }

    fn zeros_raw<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: a placeholder of one element that no kernel reads.
        #[allow(unsafe_code)]
        unsafe {
            self.stream
                .alloc::<T>(len)
                .map_err(|e| oom(len * std::mem::size_of::<T>(), e))
        }
    }

    /// `dst[..src.len()]` ← `src`, host to GPU.
    pub fn copy_to<T: DeviceRepr>(&self, src: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice_mut(..src.len());
        self.stream
            .memcpy_htod(src, &mut view)
            .map_err(|e| device_error("copying to the GPU", e))
    }

    /// The first `len` elements of `src`, GPU to host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
        len: usize,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        if len > 0 {
            self.stream
                .memcpy_dtoh(&src.slice(..len), &mut out)
                .map_err(|e| device_error("copying from the GPU", e))?;
        }
        Ok(out)
    }

    /// The token each row of `x: [draws.len(), width]` draws (kernels.cu `sample_rows`,
    /// which repeats the host sampler bit for bit), on the host: one id a row instead of
    /// `width` logits; `u32::MAX` marks a row with a NaN. The rows' penalties are applied
    /// to `x` in place.
    pub(crate) fn sample_rows(
        &self,
        x: &CudaSlice<f32>,
        width: usize,
        draws: &[Draw],
    ) -> Result<Vec<u32>> {
        let rows = draws.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        let row_bytes = width * std::mem::size_of::<f32>();
        let width = i32::try_from(width)
            .map_err(|_| Error::Internal(format!("a row of {width} logits")))?;
        // A batch that only takes argmaxes (greedy decoding, the hot path) uploads nothing:
        // the kernel reads null words as every row's argmax.
        let uploaded = if draws.iter().all(|d| *d == Draw::argmax()) {
            None
        } else {
            Some(self.upload_draws(draws)?)
        };
        let (words_arg, penalized_arg) = match &uploaded {
            Some((words, penalized)) => (ptr(words, &self.stream), ptr(penalized, &self.stream)),
            None => (Arg::Ptr(0), Arg::Ptr(0)),
        };
        // A row that samples makes a dozen passes over its logits: in shared memory when
        // they fit beside the kernel's own (49,152 logits do on Hopper, 128,256 do not),
        // else in place. Greedy rows read theirs once.
        let in_shared = draws.iter().any(|d| d.temperature > 0.0)
            && row_bytes + SAMPLE_STATIC_SHARED <= self.shared_optin;
        let out: CudaSlice<u32> = self.zeros(rows)?;
        self.launch_with_shared(
            "sample_rows",
            (rows as u32, 1),
            1024,
            if in_shared { row_bytes } else { 0 },
            &[
                ptr(x, &self.stream),
                Arg::I32(width),
                words_arg,
                penalized_arg,
                Arg::I32(i32::from(in_shared)),
                ptr(&out, &self.stream),
            ],
        )?;
        self.download(&out, rows)
    }

    /// The draws as `sample_rows` reads them, on the GPU: `DRAW_WORDS` words a row, and the
    /// penalized `(token, count)` pairs the rows' words point into.
    fn upload_draws(&self, draws: &[Draw]) -> Result<(CudaSlice<u32>, CudaSlice<u32>)> {
        let mut words = Vec::with_capacity(draws.len() * DRAW_WORDS);
        let mut penalized = Vec::new();
        for d in draws {
            let from = u32::try_from(penalized.len() / 2)
                .map_err(|_| Error::Internal("too many penalized tokens".into()))?;
            penalized.extend(d.penalized.iter().flat_map(|&(t, n)| [t, n]));
            words.extend([
                d.temperature.to_bits(),
                d.top_p.to_bits(),
                d.repetition_penalty.to_bits(),
                d.presence_penalty.to_bits(),
                d.frequency_penalty.to_bits(),
                d.top_k,
                from,
                d.penalized.len() as u32,
                d.min_p_floor as u32,
                (d.min_p_floor >> 32) as u32,
                d.draw as u32,
                (d.draw >> 32) as u32,
            ]);
        }
        Ok((self.upload(&words)?, self.upload(&penalized)?))
    }

    /// Waits until every launched kernel has finished (and reports a fault one raised).
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| device_error("running on the GPU", e))
    }

    /// Launches kernel `name` of `kernels.cu` over `grid` blocks of `block` threads.
    pub(crate) fn launch(
        &self,
        name: &str,
        grid: impl Into<Grid>,
        block: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.launch_with_shared(name, grid, block, 0, args)
    }

    /// [`Gpu::launch`], each block given `shared` bytes of dynamic shared memory (at most
    /// the device's opt-in limit).
    pub(crate) fn launch_with_shared(
        &self,
        name: &str,
        grid: impl Into<Grid>,
        block: u32,
        shared: usize,
        args: &[Arg],
    ) -> Result<()> {
        let Grid(x, y, z) = grid.into();
        self.launches.fetch_add(1, Ordering::AcqRel);
        let func = {
            let mut functions = self.functions.lock();
            if let Some(f) = functions.get(name) {
                f.clone()
            } else {
                let (module, ptx) = if self.pdl {
                    ("cortex_sm90", PTX_SM90)
                } else {
                    ("cortex", PTX)
                };
                let f = self
                    .device
                    .get_or_load_custom_func(name, module, ptx)?
                    .into_cuda_function();
                functions.insert(name.to_owned(), f.clone());
                f
            }
        };
        // Each argument's bytes in a slot of its own (the driver reads as many as the
        // kernel's parameter takes, from the slot's start).
        let mut slots: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(i) => u64::from(i.cast_unsigned()),
                Arg::I64(i) => i.cast_unsigned(),
                Arg::F32(f) => u64::from(f.to_bits()),
            })
            .collect();
        let mut params: Vec<*mut std::ffi::c_void> = slots
            .iter_mut()
            .map(|s| std::ptr::from_mut(s).cast())
            .collect();
        // SAFETY: a zeroed attribute is valid (id IGNORE); the value written is the one the
        // id names.
        #[allow(unsafe_code)]
        let mut attr: driver::sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id =
            driver::sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = driver::sys::CUlaunchConfig {
            gridDimX: x.max(1),
            gridDimY: y.max(1),
            gridDimZ: z.max(1),
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared as u32,
            hStream: self.stream.cu_stream(),
            attrs: &raw mut attr,
            numAttrs: u32::from(self.pdl),
        };
        if shared > 48 << 10 {
            // SAFETY: a valid function and attribute; the driver checks the value.
            #[allow(unsafe_code)]
            unsafe {
                driver::sys::cuFuncSetAttribute(
                    func.cu_function(),
                    driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )
                .result()
                .map_err(|e| device_error(&format!("giving {name} {shared} bytes of shared memory"), e))?;
            }
        }
        // SAFETY: each kernel's arguments are built by its one caller in ops.rs to match
        // its signature in kernels.cu, with buffers sized for the launch; `params` points at
        // `slots`, alive until the call returns (the driver copies them).
        #[allow(unsafe_code)]
        unsafe {
            driver::sys::cuLaunchKernelEx(
                &raw const config,
                func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
            .map_err(|e| device_error(&format!("launching {name}"), e))?;
        }
        Ok(())
    }

    /// Grid size for a grid-stride loop over `n` elements with 256 threads per block.
    pub(crate) fn grid_for(n: usize) -> (u32, u32) {
        (n.div_ceil(256).clamp(1, 65_535) as u32, 1)
    }
}

/// A launch's grid of blocks: `(x, y)`, or `(x, y, z)`.
pub(crate) struct Grid(u32, u32, u32);

impl From<(u32, u32)> for Grid {
    fn from((x, y): (u32, u32)) -> Grid {
        Grid(x, y, 1)
    }
}

impl From<(u32, u32, u32)> for Grid {
    fn from((x, y, z): (u32, u32, u32)) -> Grid {
        Grid(x, y, z)
    }
}

/// A failed allocation of `bytes`.
fn oom(bytes: usize, e: impl std::fmt::Display) -> Error {
    Error::Device(format!(
        "allocating {:.1} MB on the GPU failed ({e}); lower kv_cache_tokens or memory_fraction, \
         or use a smaller model",
        bytes as f64 / 1e6
    ))
}

/// A kernel argument.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// A device address (0 for a null pointer).
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// The device address of `s` (event tracking is off, so the guard does nothing).
pub(crate) fn ptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> Arg {
    Arg::Ptr(s.device_ptr(stream).0)
}

/// f32 activations on the GPU: `[rows, width]`, `len` elements in use, grown (never
/// shrunk) as a batch needs, so decoding allocates nothing per token.
#[derive(Default)]
pub struct GpuBuf {
    data: Option<CudaSlice<f32>>,
    len: usize,
}

impl std::fmt::Debug for GpuBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf({})", self.len)
    }
}

impl GpuBuf {
    /// Makes room for `len` elements (the contents are undefined after growing).
    pub fn resize(&mut self, gpu: &Gpu, len: usize) -> Result<()> {
        if self.data.as_ref().is_none_or(|d| d.len() < len) {
            self.data = None; // free the old one first
            gpu.bump_epoch();
            self.data = Some(gpu.zeros(len.next_power_of_two().max(256))?);
        }
        self.len = len;
        Ok(())
    }

    /// A buffer of `len` elements of its own (a captured graph's output: growing it would
    /// make no other graph stale).
    pub fn with_len(gpu: &Gpu, len: usize) -> Result<GpuBuf> {
        Ok(GpuBuf {
            data: Some(gpu.zeros(len.max(1))?),
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn slice(&self) -> Result<&CudaSlice<f32>> {
        self.data
            .as_ref()
            .ok_or_else(|| Error::Internal("a GPU buffer read before it was written".into()))
    }

    pub(crate) fn slice_mut(&mut self) -> Result<&mut CudaSlice<f32>> {
        self.data
            .as_mut()
            .ok_or_else(|| Error::Internal("a GPU buffer written before it was sized".into()))
    }

    pub(crate) fn arg(&self, gpu: &Gpu) -> Result<Arg> {
        Ok(ptr(self.slice()?, gpu.stream()))
    }
}
