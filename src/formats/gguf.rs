//! A validating GGUF reader.
//!
//! Follows the GGUF specification (ggml `docs/gguf.md`) and the checks of llama.cpp's
//! `gguf.cpp`. candle's own reader trusts several fields it should not (it panics on a zero
//! alignment, accepts overflowing dims and duplicate names, and amplifies huge metadata
//! arrays into gigabytes), so Cortex parses the header itself and hands candle only
//! validated [`TensorInfo`]s. Every count and length is checked against the bytes left in
//! the file *before* anything proportional to it is allocated, so a hostile header costs
//! time and memory bounded by the file's real size.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{TensorInfo, Value, ValueType};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use crate::error::{Error, Result};
use crate::quant::ggml::Iq4;

/// Longest string value accepted (a chat template or a token is far below this).
const MAX_STRING_BYTES: u64 = 16 << 20;
/// Most elements in one metadata array: the largest vocabularies have ~262k tokens.
/// Bounds memory, since each element becomes a `Value` of 32 bytes or more.
const MAX_ARRAY_LEN: u64 = 4 << 20;
/// Deepest nesting of arrays inside arrays (real files use 1).
const MAX_DEPTH: usize = 4;
/// Most memory the metadata of one file may take once parsed (a 262k-token vocabulary with
/// scores, types and merges takes ~60 MiB).
const MAX_METADATA_BYTES: u64 = 256 << 20;
/// What one parsed value costs beyond its string bytes: candle's `Value` enum.
const VALUE_BYTES: u64 = std::mem::size_of::<Value>() as u64;
/// Largest `general.alignment` accepted.
const MAX_ALIGNMENT: u32 = 1 << 20;
/// ggml's GGML_MAX_NAME includes the terminating NUL.
const MAX_TENSOR_NAME: usize = 63;
const DEFAULT_ALIGNMENT: u64 = 32;

/// A GGUF file whose header has been read and validated; tensors are read on demand.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, Value>,
    /// Tensor names in file order.
    pub tensor_names: Vec<String>,
    /// Each tensor's shape, offset and the candle type [`GgufFile::tensor`] reads it as
    /// (for the IQ4 types, which candle does not know, the type that holds their values
    /// exactly: see [`Iq4`]).
    pub tensors: HashMap<String, TensorInfo>,
    /// The tensors stored as an IQ4 type.
    pub iq4: HashMap<String, Iq4>,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    file: File,
}

/// Bounds-checked little-endian reader that knows how many bytes remain.
struct Cursor<'a> {
    inner: BufReader<&'a File>,
    path: &'a Path,
    pos: u64,
    len: u64,
    /// Memory the metadata parsed so far takes, charged against [`MAX_METADATA_BYTES`].
    cost: u64,
}

/// Whether the array under `key`, of elements of type `elem_ty`, is kept in memory. Only
/// the tokenizer's arrays are read (the vocabulary, scores, token types, merges; and the
/// GGUF writer copies `tokenizer.*`), and of those only arrays whose elements take at least
/// 4 bytes on disk, so a kept array costs at most 8x its bytes. Any other array is checked
/// and skipped: it is kept as an empty array, so its key still says an array was there.
fn keeps_array(key: &str, elem_ty: u32) -> bool {
    key.starts_with("tokenizer.") && min_value_size(elem_ty).is_some_and(|n| n >= 4)
}

impl Cursor<'_> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::format(self.path, Some(self.pos), message)
    }

    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{what} needs {n} bytes but only {} remain: the file is truncated or corrupt",
                self.remaining()
            )));
        }
        // n <= remaining <= file size, so this allocation is bounded by the file.
        let mut buf = vec![0u8; n as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let v = self.bytes(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&v);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Charges `n` bytes of parsed metadata; past [`MAX_METADATA_BYTES`] the file is refused.
    fn charge(&mut self, n: u64, key: &str) -> Result<()> {
        self.check_room(n, key)?;
        self.cost += n;
        Ok(())
    }

    fn check_room(&self, n: u64, key: &str) -> Result<()> {
        if self.cost.saturating_add(n) > MAX_METADATA_BYTES {
            return Err(self.err(format!(
                "{key}: the metadata would take more than {} MiB of memory",
                MAX_METADATA_BYTES >> 20
            )));
        }
        Ok(())
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{what} needs {n} bytes but only {} remain: the file is truncated or corrupt",
                self.remaining()
            )));
        }
        // n <= remaining <= file size, which fits an i64.
        self.inner
            .seek_relative(n as i64)
            .map_err(|e| Error::io(self.path, e))?;
        self.pos += n;
        Ok(())
    }

    fn string_len(&mut self, what: &str) -> Result<u64> {
        let n = self.u64(what)?;
        if n > MAX_STRING_BYTES {
            return Err(self.err(format!(
                "{what}: string length {n} exceeds the limit of {MAX_STRING_BYTES} bytes"
            )));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.string_len(what)?;
        self.charge(n, what)?;
        let bytes = self.bytes(n, what)?;
        String::from_utf8(bytes).map_err(|_| self.err(format!("{what}: string is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        let what = key;
        self.charge(VALUE_BYTES, key)?;
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.err(format!("{key}: bool value {b} is neither 0 nor 1"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                let (elem_ty, count) = self.array_header(key, depth)?;
                if !keeps_array(key, elem_ty) {
                    self.skip_array(elem_ty, count, key, depth + 1)?;
                    return Ok(Value::Array(Vec::new()));
                }
                // Checked before the allocation; each element then charges its own share.
                self.check_room(count.saturating_mul(VALUE_BYTES), key)?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(self.err(format!("{key}: unknown metadata value type {other}"))),
        })
    }

    /// Reads the element type and count of an array nested `depth` deep, checked against
    /// the nesting and length limits and the bytes left before anything proportional to
    /// the count happens (kept and skipped arrays alike).
    fn array_header(&mut self, key: &str, depth: usize) -> Result<(u32, u64)> {
        if depth >= MAX_DEPTH {
            return Err(self.err(format!(
                "{key}: arrays nested deeper than {MAX_DEPTH} (nesting depth)"
            )));
        }
        let elem_ty = self.u32(key)?;
        let count = self.u64(key)?;
        let min = min_value_size(elem_ty)
            .ok_or_else(|| self.err(format!("{key}: unknown array element type {elem_ty}")))?;
        if count > MAX_ARRAY_LEN {
            return Err(self.err(format!(
                "{key}: array of {count} elements exceeds the limit of {MAX_ARRAY_LEN}"
            )));
        }
        if count.saturating_mul(min) > self.remaining() {
            return Err(self.err(format!(
                "{key}: array of {count} elements cannot fit in the {} bytes left",
                self.remaining()
            )));
        }
        Ok((elem_ty, count))
    }

    /// Steps over `count` elements of type `elem_ty` without keeping them, checking what
    /// must hold for the file to be well formed (string lengths, nested array headers).
    fn skip_array(&mut self, elem_ty: u32, count: u64, key: &str, depth: usize) -> Result<()> {
        match elem_ty {
            8 => {
                for _ in 0..count {
                    let n = self.string_len(key)?;
                    self.skip(n, key)?;
                }
            }
            9 => {
                for _ in 0..count {
                    let (inner_ty, inner_count) = self.array_header(key, depth)?;
                    self.skip_array(inner_ty, inner_count, key, depth + 1)?;
                }
            }
            // Fixed-size elements; the caller checked the type and that they fit.
            _ => {
                let size = min_value_size(elem_ty).unwrap_or(1);
                self.skip(count.saturating_mul(size), key)?;
            }
        }
        Ok(())
    }
}

/// Smallest encoded size of a value of GGUF type `ty`, or None for an unknown type.
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8..=12 => 8,
        _ => return None,
    })
}

/// ggml's type ids (ggml.h `enum ggml_type`) for the block types candle can run.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The names of ggml's types that no kernel here runs (ggml.h `enum ggml_type`): a file
/// of them is refused by name, not as an unknown number.
fn unsupported_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        21 => "IQ3_S",
        22 => "IQ2_S",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

impl GgufFile {
    /// Opens `path` and validates its whole header: magic, version, counts, every metadata
    /// value, every tensor's name, type, dims and byte range.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut c = Cursor {
            inner: BufReader::with_capacity(1 << 16, &file),
            path,
            pos: 0,
            len,
            cost: 0,
        };
        if len < 24 {
            return Err(Error::format(
                path,
                None,
                format!("not a GGUF file: only {len} bytes, smaller than a GGUF header"),
            ));
        }
        let magic = c.array::<4>("magic")?;
        if &magic != b"GGUF" {
            return Err(Error::format(
                path,
                Some(0),
                format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32("version")?;
        if version > 3 && (1..=3).contains(&version.swap_bytes()) {
            return Err(Error::format(
                path,
                Some(4),
                "big-endian GGUF files are not supported",
            ));
        }
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                path,
                Some(4),
                format!("unsupported GGUF version {version} (supported: 2, 3)"),
            ));
        }
        let tensor_count = c.u64("tensor_count")?;
        let kv_count = c.u64("kv_count")?;
        // Smallest possible entries: a key-value is an 8-byte length, a 1-byte key, a 4-byte
        // type and a 1-byte value; a tensor info is an 8-byte length, a 1-byte name, a 4-byte
        // n_dims, one 8-byte dim, a 4-byte type and an 8-byte offset.
        let needed = u128::from(kv_count) * 14 + u128::from(tensor_count) * 33;
        if needed > u128::from(c.remaining()) {
            return Err(c.err(format!(
                "header declares {tensor_count} tensors and {kv_count} metadata entries, more than the file's {len} bytes can hold"
            )));
        }

        let mut metadata = HashMap::with_capacity(kv_count as usize);
        for _ in 0..kv_count {
            let key = c.string("metadata key")?;
            if key.is_empty() {
                return Err(c.err("empty metadata key"));
            }
            let ty = c.u32(&key)?;
            let value = c.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(c.err(format!("duplicate metadata key '{key}'")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if a.is_power_of_two() && *a <= MAX_ALIGNMENT => u64::from(*a),
            Some(v) => {
                return Err(Error::format(
                    path,
                    None,
                    format!(
                    "general.alignment must be a UINT32 power of two <= {MAX_ALIGNMENT}, got {v:?}"
                ),
                ))
            }
        };

        // (name, info, byte size) in file order.
        let mut infos: Vec<(String, TensorInfo, u64)> = Vec::with_capacity(tensor_count as usize);
        let mut seen = HashSet::with_capacity(tensor_count as usize);
        let mut iq4s = HashMap::new();
        for _ in 0..tensor_count {
            let name = c.string("tensor name")?;
            if name.is_empty() || name.len() > MAX_TENSOR_NAME {
                return Err(c.err(format!(
                    "tensor name '{name}' must be 1 to {MAX_TENSOR_NAME} bytes long"
                )));
            }
            let n_dims = c.u32(&name)?;
            if !(1..=4).contains(&n_dims) {
                return Err(c.err(format!(
                    "tensor '{name}' has {n_dims} dims (expected 1 to 4)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let type_id = c.u32(&name)?;
            let offset = c.u64(&name)?;
            let iq4 = Iq4::from_type_id(type_id);
            let dtype = ggml_dtype(type_id)
                .or(iq4.map(Iq4::exact_ggml))
                .ok_or_else(|| {
                    c.err(match unsupported_type_name(type_id) {
                        Some(t) => format!(
                            "tensor '{name}' is of ggml type {t} ({type_id}), which Cortex does \
                             not run yet (it runs F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, \
                             Q8_1, Q2_K to Q8_K, IQ4_NL and IQ4_XS): use another quantization of \
                             the model, such as Q4_K_M"
                        ),
                        None => format!("tensor '{name}' has unknown ggml type {type_id}"),
                    })
                })?;
            let elems = dims
                .iter()
                .try_fold(1u64, |acc, &d| {
                    if d == 0 || d > i64::MAX as u64 {
                        None
                    } else {
                        acc.checked_mul(d).filter(|&n| i64::try_from(n).is_ok())
                    }
                })
                .ok_or_else(|| {
                    c.err(format!(
                        "tensor '{name}' has invalid dims {dims:?} (zero, negative or overflowing)"
                    ))
                })?;
            // The stored type's blocks, which for an IQ4 type are not `dtype`'s.
            let (type_name, block, block_bytes) = match iq4 {
                Some(iq) => (iq.name().to_string(), iq.block_size(), iq.type_size()),
                None => (format!("{dtype:?}"), dtype.block_size(), dtype.type_size()),
            };
            let block = block as u64;
            if dims[0] % block != 0 {
                return Err(c.err(format!(
                    "tensor '{name}': row length {} is not a multiple of the {type_name} block size {block}",
                    dims[0]
                )));
            }
            let nbytes = (elems / block)
                .checked_mul(block_bytes as u64)
                .ok_or_else(|| c.err(format!("tensor '{name}': byte size overflows")))?;
            if offset % alignment != 0 {
                return Err(c.err(format!("tensor '{name}': offset {offset} is not a multiple of the alignment {alignment}")));
            }
            // candle's shapes list the slowest dimension first, GGUF lists the fastest first.
            let shape: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
            let info = TensorInfo {
                ggml_dtype: dtype,
                shape: shape.into(),
                offset,
            };
            if !seen.insert(name.clone()) {
                return Err(c.err(format!("duplicate tensor name '{name}'")));
            }
            if let Some(iq) = iq4 {
                iq4s.insert(name.clone(), iq);
            }
            infos.push((name, info, nbytes));
        }

        // llama.cpp's rule (gguf.cpp): in file order, each tensor starts exactly where the
        // previous one ends, padded to the alignment. Any gap or overlap means a tensor's
        // type or dims do not describe its bytes (a 4-byte edit of Q4_1 to Q4_0 would
        // otherwise load and produce nonsense), and so does data beyond the last tensor's
        // padded end.
        let data_offset = c.pos.div_ceil(alignment) * alignment;
        let mut expected = 0u64;
        for (name, info, nbytes) in &infos {
            if info.offset != expected {
                let how = if info.offset < expected {
                    "overlaps the tensor before it"
                } else {
                    "leaves a gap after the tensor before it"
                };
                return Err(Error::format(
                    path,
                    Some(data_offset.saturating_add(info.offset)),
                    format!(
                        "tensor '{name}' starts at data offset {}, where the tensors before it end at {expected}: it {how} (a type or dims that do not match the data)",
                        info.offset
                    ),
                ));
            }
            let end = expected
                .checked_add(*nbytes)
                .filter(|&e| e.saturating_add(data_offset) <= len)
                .ok_or_else(|| {
                    Error::format(
                        path,
                        Some(data_offset.saturating_add(expected)),
                        format!("tensor '{name}' ({nbytes} bytes at data offset {expected}) lies past the end of the file ({len} bytes)"),
                    )
                })?;
            expected = end.div_ceil(alignment) * alignment;
        }
        if len > data_offset.saturating_add(expected) {
            return Err(Error::format(
                path,
                Some(data_offset.saturating_add(expected)),
                format!(
                    "{} bytes follow the last tensor's data: a tensor's type or dims do not match its data",
                    len - data_offset - expected
                ),
            ));
        }

        let tensor_names = infos.iter().map(|(n, _, _)| n.clone()).collect();
        let tensors = infos.into_iter().map(|(n, info, _)| (n, info)).collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensor_names,
            tensors,
            iq4: iq4s,
            data_offset,
            file,
        })
    }

    /// Tensor `name`'s info, or an error saying it is missing.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::format(&self.path, None, format!("tensor '{name}' is missing")))
    }

    /// Reads tensor `name` into a quantized tensor on `device`, blocks kept as they are (an
    /// IQ4 type's as the candle type that holds the same values, [`Iq4::exact_ggml`]).
    pub fn tensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let info = self.info(name)?;
        if let Some(iq) = self.iq4.get(name) {
            let blocks = iq.to_exact_ggml(&self.stored_blocks(name)?);
            return Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
                info.ggml_dtype,
                &blocks,
                info.shape.dims().to_vec(),
                device,
            )?);
        }
        let mut file = &self.file;
        // The header was validated against the file's length at open; if the file shrank
        // since (rewritten underneath us), candle's read reports the short read.
        info.read(&mut file, self.data_offset, device)
            .map_err(|e| Error::format(&self.path, None, format!("reading tensor '{name}': {e}")))
    }

    /// The bytes of IQ4 tensor `name` as the file stores them.
    pub fn stored_blocks(&self, name: &str) -> Result<Vec<u8>> {
        use std::io::{Seek, SeekFrom};
        let info = self.info(name)?;
        let Some(iq) = self.iq4.get(name) else {
            return Err(Error::Internal(format!(
                "tensor '{name}' is not of an IQ4 type"
            )));
        };
        let len = info.shape.elem_count() / iq.block_size() * iq.type_size();
        let mut data = vec![0u8; len];
        let mut file = &self.file;
        file.seek(SeekFrom::Start(self.data_offset + info.offset))
            .and_then(|_| file.read_exact(&mut data))
            .map_err(|e| {
                Error::format(&self.path, None, format!("reading tensor '{name}': {e}"))
            })?;
        Ok(data)
    }

    /// The type tensor `name` is stored as: candle's name for its types (`Q4K`, `Q8_0`),
    /// else `IQ4_NL` or `IQ4_XS`.
    pub fn stored_type(&self, name: &str) -> Result<String> {
        Ok(match self.iq4.get(name) {
            Some(iq) => iq.name().to_string(),
            None => format!("{:?}", self.info(name)?.ggml_dtype),
        })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }
}

/// GGML type ids as GGUF stores them (ggml.h `enum ggml_type`).
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// One tensor of a GGUF file about to be written; `dims` slowest first (row-major), as
/// everywhere in Cortex (the file stores them fastest first).
#[derive(Debug, Clone)]
pub struct GgufTensorSpec {
    pub name: String,
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl GgufTensorSpec {
    pub fn nbytes(&self) -> u64 {
        let n: usize = self.dims.iter().product();
        (n / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

fn write_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => {
            w.write_all(&(s.len() as u64).to_le_bytes())?;
            w.write_all(s.as_bytes())
        }
        Value::Array(items) => {
            let ty = items.first().map_or(ValueType::U8, Value::value_type);
            w.write_all(&value_type_id(ty).to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| write_value(w, item))
        }
    }
}

fn value_type_id(t: ValueType) -> u32 {
    match t {
        ValueType::U8 => 0,
        ValueType::I8 => 1,
        ValueType::U16 => 2,
        ValueType::I16 => 3,
        ValueType::U32 => 4,
        ValueType::I32 => 5,
        ValueType::F32 => 6,
        ValueType::Bool => 7,
        ValueType::String => 8,
        ValueType::Array => 9,
        ValueType::U64 => 10,
        ValueType::I64 => 11,
        ValueType::F64 => 12,
    }
}

/// Writes a GGUF v3 file: `metadata` in the order given, then the tensors, whose bytes
/// `data(i)` produces one at a time (so the model is never held in memory whole). Arrays
/// must be homogeneous.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    specs: &[GgufTensorSpec],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(path, e);
    let string = |w: &mut BufWriter<File>, s: &str| -> std::io::Result<()> {
        w.write_all(&(s.len() as u64).to_le_bytes())?;
        w.write_all(s.as_bytes())
    };
    w.write_all(b"GGUF").map_err(io)?;
    w.write_all(&3u32.to_le_bytes()).map_err(io)?;
    w.write_all(&(specs.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&(metadata.len() as u64).to_le_bytes())
        .map_err(io)?;
    for (key, value) in metadata {
        string(&mut w, key).map_err(io)?;
        w.write_all(&value_type_id(value.value_type()).to_le_bytes())
            .map_err(io)?;
        write_value(&mut w, value).map_err(io)?;
    }
    let mut offset = 0u64;
    // The data section starts at the first aligned offset after the header.
    let mut pos = 24u64; // magic, version, tensor count, metadata count
    for (key, value) in metadata {
        pos += 8 + key.len() as u64 + 4;
        let mut counter = CountingWriter(0);
        write_value(&mut counter, value).map_err(io)?;
        pos += counter.0;
    }
    for s in specs {
        string(&mut w, &s.name).map_err(io)?;
        w.write_all(&(s.dims.len() as u32).to_le_bytes())
            .map_err(io)?;
        for &d in s.dims.iter().rev() {
            w.write_all(&(d as u64).to_le_bytes()).map_err(io)?;
        }
        w.write_all(&ggml_type_id(s.dtype).to_le_bytes())
            .map_err(io)?;
        w.write_all(&offset.to_le_bytes()).map_err(io)?;
        pos += 8 + s.name.len() as u64 + 4 + 8 * s.dims.len() as u64 + 4 + 8;
        offset = (offset + s.nbytes()).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    }
    let pad = |w: &mut BufWriter<File>, at: u64| -> std::io::Result<u64> {
        let to = at.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        w.write_all(&vec![0u8; (to - at) as usize])?;
        Ok(to)
    };
    pad(&mut w, pos).map_err(io)?;
    for (i, s) in specs.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() as u64 != s.nbytes() {
            return Err(Error::Internal(format!(
                "writing '{}': produced {} bytes, {} expected",
                s.name,
                bytes.len(),
                s.nbytes()
            )));
        }
        w.write_all(&bytes).map_err(io)?;
        if i + 1 < specs.len() {
            pad(&mut w, bytes.len() as u64).map_err(io)?;
        }
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)
}

/// Counts bytes instead of writing them (for the header length).
struct CountingWriter(u64);

impl Write for CountingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch file path for one test.
    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("cortex-gguf-{name}-{}.gguf", std::process::id()))
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Two F32 tensors (`a: [2, 3]`, `b: [5]`, so `b` starts after padding) and metadata of
    /// every kind the reader treats differently.
    fn write_sample(path: &Path, names: [&str; 2]) -> Result<()> {
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("llama.block_count".to_string(), Value::U32(2)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
            // Not a tokenizer array: checked, skipped, kept empty.
            (
                "general.tags".to_string(),
                Value::Array(vec![Value::String("x".into()); 3]),
            ),
            // A tokenizer array of 1-byte elements: skipped too.
            (
                "tokenizer.ggml.flags".to_string(),
                Value::Array(vec![Value::U8(1); 4]),
            ),
        ];
        let specs = [
            GgufTensorSpec {
                name: names[0].into(),
                dims: vec![2, 3],
                dtype: GgmlDType::F32,
            },
            GgufTensorSpec {
                name: names[1].into(),
                dims: vec![5],
                dtype: GgmlDType::F32,
            },
        ];
        write_gguf(path, &metadata, &specs, |i| {
            Ok(f32_bytes(
                &(0..specs[i].dims.iter().product::<usize>())
                    .map(|v| (10 * i + v) as f32)
                    .collect::<Vec<_>>(),
            ))
        })
    }

    fn format_error(result: Result<GgufFile>) -> String {
        match result {
            Err(Error::ModelFormat { message, .. }) => message,
            other => panic!("expected a ModelFormat error, got {other:?}"),
        }
    }

    #[test]
    fn written_files_read_back() -> Result<()> {
        let path = scratch("roundtrip");
        write_sample(&path, ["a", "b"])?;
        let g = GgufFile::open(&path)?;
        assert_eq!(g.version, 3);
        assert_eq!(g.tensor_names, ["a", "b"]);
        assert!(matches!(g.get("llama.block_count"), Some(Value::U32(2))));
        match g.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => assert_eq!(tokens.len(), 2),
            other => panic!("tokens: {other:?}"),
        }
        for skipped in ["general.tags", "tokenizer.ggml.flags"] {
            assert!(
                matches!(g.get(skipped), Some(Value::Array(v)) if v.is_empty()),
                "{skipped} should be kept as an empty array"
            );
        }
        let b = g.tensor("b", &Device::Cpu)?.dequantize(&Device::Cpu)?;
        assert_eq!(b.to_vec1::<f32>()?, [10.0, 11.0, 12.0, 13.0, 14.0]);
        let a = g.tensor("a", &Device::Cpu)?.dequantize(&Device::Cpu)?;
        assert_eq!(a.dims(), [2, 3]);
        assert!(matches!(
            g.tensor("c", &Device::Cpu),
            Err(Error::ModelFormat { .. })
        ));
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))
    }

    #[test]
    fn bytes_after_the_last_tensor_are_refused() -> Result<()> {
        let path = scratch("trailing");
        write_sample(&path, ["a", "b"])?;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        f.write_all(&[0; 64]).map_err(|e| Error::io(&path, e))?;
        let message = format_error(GgufFile::open(&path));
        assert!(message.contains("follow the last tensor"), "{message}");
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))
    }

    #[test]
    fn a_truncated_tensor_is_refused() -> Result<()> {
        let path = scratch("truncated");
        write_sample(&path, ["a", "b"])?;
        let len = std::fs::metadata(&path)
            .map_err(|e| Error::io(&path, e))?
            .len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        f.set_len(len - 4).map_err(|e| Error::io(&path, e))?;
        let message = format_error(GgufFile::open(&path));
        assert!(
            message.contains("'b'") && message.contains("past the end"),
            "{message}"
        );
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))
    }

    #[test]
    fn duplicate_names_and_bad_magic_are_refused() -> Result<()> {
        let path = scratch("duplicate");
        write_sample(&path, ["a", "a"])?;
        let message = format_error(GgufFile::open(&path));
        assert!(message.contains("duplicate tensor name 'a'"), "{message}");

        let mut bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        bytes[..4].copy_from_slice(b"GGUX");
        std::fs::write(&path, &bytes).map_err(|e| Error::io(&path, e))?;
        assert!(matches!(
            GgufFile::open(&path),
            Err(Error::ModelFormat {
                offset: Some(0),
                ..
            })
        ));
        std::fs::write(&path, b"GGUF").map_err(|e| Error::io(&path, e))?;
        format_error(GgufFile::open(&path));
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))
    }
}
