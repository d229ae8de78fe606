//! A validating safetensors reader and a streaming writer.
//!
//! Format (huggingface/safetensors): an u64 little-endian header length `n`, `n` bytes of
//! JSON `{name: {"dtype", "shape", "data_offsets": [start, end]}, "__metadata__": {..}}`,
//! then the data section. The `safetensors` crate parses and validates the tensor entries
//! (`TensorInfo`, `Metadata::new`: offsets that tile the data from 0, shape × dtype = byte
//! count without overflow); this reader adds what it leaves out: the header read from a
//! file without mapping it, duplicate names (the crate keeps the last silently), a data
//! section that ends exactly where the tensors do, the dtypes Cortex computes with, and
//! messages naming the tensor and offsets at fault. Files are read with positioned reads,
//! never memory-mapped, so a file rewritten underneath us gives an error, not a SIGBUS; its
//! length is re-checked before every read.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Metadata, TensorInfo};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Largest header accepted (the `safetensors` crate's limit).
const MAX_HEADER: u64 = 100 << 20;

/// Element types Cortex reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    U32,
    I32,
    I64,
    U8,
    I8,
}

impl Dtype {
    const ALL: [(Dtype, &'static str); 8] = [
        (Dtype::F32, "F32"),
        (Dtype::F16, "F16"),
        (Dtype::BF16, "BF16"),
        (Dtype::U32, "U32"),
        (Dtype::I32, "I32"),
        (Dtype::I64, "I64"),
        (Dtype::U8, "U8"),
        (Dtype::I8, "I8"),
    ];

    pub fn name(self) -> &'static str {
        Dtype::ALL
            .iter()
            .find(|(d, _)| *d == self)
            .map_or("?", |(_, n)| n)
    }

    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.iter().find(|(_, n)| *n == name).map(|(d, _)| *d)
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::U8 | Dtype::I8 => 1,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 | Dtype::U32 | Dtype::I32 => 4,
            Dtype::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub start: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A safetensors file whose header has been validated; tensors are read on demand.
#[derive(Debug)]
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, TensorEntry>,
    pub metadata: BTreeMap<String, String>,
    data_start: u64,
    file_len: u64,
    file: File,
}

/// The header's top-level object, read key by key so duplicates are seen.
struct RawHeader(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RawHeader, A::Error> {
                let mut seen = HashSet::new();
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format!("duplicate tensor name '{k}'")));
                    }
                    entries.push((k, v));
                }
                Ok(RawHeader(entries))
            }
        }
        d.deserialize_map(V)
    }
}

impl Dtype {
    /// Ours for the crate's, `None` for the element types Cortex does not compute with.
    fn from_crate(d: safetensors::Dtype) -> Option<Dtype> {
        use safetensors::Dtype as D;
        Some(match d {
            D::F32 => Dtype::F32,
            D::F16 => Dtype::F16,
            D::BF16 => Dtype::BF16,
            D::U32 => Dtype::U32,
            D::I32 => Dtype::I32,
            D::I64 => Dtype::I64,
            D::U8 => Dtype::U8,
            D::I8 => Dtype::I8,
            _ => return None,
        })
    }
}

/// Why the crate refused the entries (`Metadata::new`), said with the tensor and offsets at
/// fault: the crate's errors name at most the tensor. `entries` are sorted by offset, as
/// the crate checks them.
fn explain_invalid(
    entries: &[(&String, &TensorInfo)],
    data_start: u64,
) -> Option<(Option<u64>, String)> {
    let mut pos = 0usize;
    for (name, t) in entries {
        let (start, end) = t.data_offsets;
        if start != pos {
            return Some((
                Some(data_start + start as u64),
                format!(
                    "tensor '{name}' starts at {start} but the previous tensor ends at {pos} ({})",
                    if start < pos { "overlap" } else { "hole" }
                ),
            ));
        }
        let bytes = t
            .shape
            .iter()
            .try_fold(t.dtype.bitsize(), |acc, &d| acc.checked_mul(d))
            .filter(|bits| bits % 8 == 0)
            .map(|bits| bits / 8);
        if end < start || bytes != Some(end - start) {
            return Some((
                Some(8),
                format!(
                    "tensor '{name}': shape {:?} of {:?} does not match its byte range [{start}, {end})",
                    t.shape, t.dtype
                ),
            ));
        }
        pos = end;
    }
    None
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let err = |offset: Option<u64>, msg: String| Error::format(path, offset, msg);
        if file_len < 8 {
            return Err(err(
                None,
                format!("{file_len} bytes is too short for a safetensors file"),
            ));
        }
        let mut len_bytes = [0u8; 8];
        (&file)
            .read_exact(&mut len_bytes)
            .map_err(|e| Error::io(path, e))?;
        let n = u64::from_le_bytes(len_bytes);
        if n > MAX_HEADER || n > file_len - 8 {
            return Err(err(
                Some(0),
                format!("declared header length {n} exceeds the file ({file_len} bytes) or the {MAX_HEADER}-byte limit"),
            ));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| Error::io(path, e))?;
        let header = std::str::from_utf8(&header)
            .map_err(|e| err(Some(8), format!("header is not UTF-8: {e}")))?;
        let raw: RawHeader = serde_json::from_str(header.trim_end_matches(' '))
            .map_err(|e| err(Some(8), format!("invalid JSON in header: {e}")))?;
        let data_start = 8 + n;
        let data_len = file_len - data_start;
        let mut metadata = BTreeMap::new();
        let mut entries = Vec::with_capacity(raw.0.len());
        for (name, value) in raw.0 {
            if name == "__metadata__" {
                metadata = serde_json::from_value(value).map_err(|e| {
                    err(
                        Some(8),
                        format!("__metadata__ must map strings to strings: {e}"),
                    )
                })?;
                continue;
            }
            let unsupported = |dtype: &str| {
                err(
                    Some(8),
                    format!(
                        "tensor '{name}' has dtype {dtype:?}; supported: {}",
                        Dtype::ALL
                            .iter()
                            .map(|(_, n)| *n)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            };
            let dtype_name = value
                .get("dtype")
                .and_then(|d| d.as_str())
                .unwrap_or("")
                .to_owned();
            let info: TensorInfo = match serde_json::from_value(value) {
                Ok(info) => info,
                // A dtype the crate does not know either ("Q4") reads as one Cortex lacks.
                Err(_) if Dtype::from_name(&dtype_name).is_none() => {
                    return Err(unsupported(&dtype_name))
                }
                Err(e) => return Err(err(Some(8), format!("tensor '{name}': {e}"))),
            };
            let dtype = Dtype::from_crate(info.dtype).ok_or_else(|| unsupported(&dtype_name))?;
            entries.push((name, info, dtype));
        }
        // The crate's validation expects the entries in data order.
        entries.sort_by_key(|(_, t, _)| t.data_offsets);
        let infos: Vec<(String, TensorInfo)> = entries
            .iter()
            .map(|(name, t, _)| (name.clone(), t.clone()))
            .collect();
        let checked = Metadata::new(None, infos).map_err(|e| {
            let infos: Vec<_> = entries.iter().map(|(n, t, _)| (n, t)).collect();
            let (offset, message) = explain_invalid(&infos, data_start)
                .unwrap_or((Some(8), format!("invalid tensor entries: {e}")));
            err(offset, message)
        })?;
        // The crate checks that the ranges tile [0, data_len()); the file must end there.
        let covered = checked.data_len() as u64;
        if covered != data_len {
            return Err(err(None, format!(
                "tensors cover {covered} bytes but the data section holds {data_len} (truncated or trailing bytes)"
            )));
        }
        let tensors = entries
            .into_iter()
            .map(|(name, t, dtype)| {
                let entry = TensorEntry {
                    dtype,
                    shape: t.shape,
                    start: t.data_offsets.0 as u64,
                    end: t.data_offsets.1 as u64,
                };
                (name, entry)
            })
            .collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            tensors,
            metadata,
            data_start,
            file_len,
            file,
        })
    }

    pub fn get(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::format(&self.path, None, format!("tensor '{name}' is missing")))
    }

    /// The raw little-endian bytes of `name`.
    pub fn bytes(&self, name: &str) -> Result<Vec<u8>> {
        let t = self.get(name)?;
        let now = self
            .file
            .metadata()
            .map_err(|e| Error::io(&self.path, e))?
            .len();
        if now != self.file_len {
            return Err(Error::format(
                &self.path,
                None,
                format!(
                    "file changed size while open ({} → {now} bytes); it is being rewritten",
                    self.file_len
                ),
            ));
        }
        let mut buf = vec![0u8; (t.end - t.start) as usize];
        self.file
            .read_exact_at(&mut buf, self.data_start + t.start)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(buf)
    }

    /// `name` as f32 values (from F32, F16 or BF16).
    pub fn f32s(&self, name: &str) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let dtype = self.get(name)?.dtype;
        let b = self.bytes(name)?;
        // Widened on every core: an 8B checkpoint is 16 GB of bf16.
        Ok(match dtype {
            Dtype::F32 => b
                .par_chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => b
                .par_chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .par_chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::format(
                    &self.path,
                    None,
                    format!("tensor '{name}' has dtype {other}, expected a float type"),
                ))
            }
        })
    }

    /// `name` as u32 values (MLX's packed weights).
    pub fn u32s(&self, name: &str) -> Result<Vec<u32>> {
        let dtype = self.get(name)?.dtype;
        if dtype != Dtype::U32 {
            return Err(Error::format(
                &self.path,
                None,
                format!(
                    "tensor '{name}' has dtype {dtype}, expected U32 (packed quantized weights)"
                ),
            ));
        }
        Ok(self
            .bytes(name)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// One tensor of a file about to be written.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn nbytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// Writes a safetensors file whose tensors are known up front (`specs`, in data order) and
/// whose bytes are produced one tensor at a time by `data(i)`, so a shard is never held in
/// memory whole. Each produced buffer must have exactly the spec's byte count.
pub fn write(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).map_err(json_err)?,
        );
    }
    let mut offset = 0u64;
    for s in specs {
        let end = offset + s.nbytes();
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.dtype.name(), "shape": s.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&header).map_err(json_err)?;
    // Pad with spaces so the data section starts 8-byte aligned (as the reference writer).
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for (i, s) in specs.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() as u64 != s.nbytes() {
            return Err(Error::Internal(format!(
                "writing '{}': produced {} bytes for shape {:?} of {} ({} expected)",
                s.name,
                bytes.len(),
                s.shape,
                s.dtype,
                s.nbytes()
            )));
        }
        w.write_all(&bytes).map_err(io)?;
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(())
}

fn json_err(e: serde_json::Error) -> Error {
    Error::Internal(format!("serialising a safetensors header: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_back() {
        let dir = std::env::temp_dir().join(format!("cortex-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let specs = vec![
            TensorSpec {
                name: "b".into(),
                dtype: Dtype::F32,
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "a".into(),
                dtype: Dtype::U32,
                shape: vec![1],
            },
        ];
        let meta = BTreeMap::from([("format".to_string(), "mlx".to_string())]);
        write(&path, &specs, &meta, |i| {
            Ok(match i {
                0 => (0..6).flat_map(|x| (x as f32).to_le_bytes()).collect(),
                _ => 7u32.to_le_bytes().to_vec(),
            })
        })
        .unwrap();
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.metadata, meta);
        assert_eq!(f.f32s("b").unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(f.u32s("a").unwrap(), vec![7]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
