//! Saved prefixes: the cached keys and values of a prompt's full blocks in a file, so that
//! a long system prompt survives a restart ([`Client::save_prefix`],
//! [`Client::load_prefix`]; `cortex.Engine.save_prefix` / `load_prefix`).
//!
//! A file is the magic `CXPREFIX`, the format version and the header's length (u32
//! little-endian each), the header (JSON: the model's identity, the cache's shape, the
//! number of tokens), the tokens (u32 little-endian), then the blocks as
//! [`super::kv::KvStorage::read_blocks`] lays them out. It is written to a temporary file
//! renamed into place, so a file that exists is whole.
//!
//! Nothing of a file reaches the cache before all of it is checked: its length against
//! the header (before the rest is read), its contents against the header's SHA-256, every
//! token against the vocabulary, the model's identity and the cache's shape against this
//! engine's, and (two models of one shape can differ in their weights alone) the keys and
//! values of its first block against this engine's own computation of that block.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

use super::client::Client;
use super::core::Engine;
use super::kv::{dead_blocks, CacheShape, KvDType};
use super::sampling::SamplingParams;

const MAGIC: &[u8; 8] = b"CXPREFIX";
const VERSION: u32 = 1;
/// Bytes before the header: magic, version, header length.
const PREAMBLE: usize = 16;
/// Longest header read (a real one is a few hundred bytes).
const MAX_HEADER: usize = 64 << 10;
/// Largest relative RMS difference between a file's first block and this engine's own
/// computation of it. The same model gives rounding differences (bf16 on a GPU: well
/// under 1 %); other weights of the same shape give differences of the order of the
/// values themselves.
const PROBE_TOLERANCE: f64 = 0.02;
/// Times a prefix is computed again when other requests evict it before it is read.
const ATTEMPTS: usize = 3;

/// What identifies the model whose keys and values a file holds: the same on every device
/// (a GPU's repacked weights take other bytes than the CPU's); two models that differ in
/// their weights alone are told apart by the probe of the first block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    family: String,
    num_parameters: usize,
    vocab_size: usize,
    /// The first 64 bits of the SHA-256 of the whole configuration as this version of
    /// Cortex reads it, in hex.
    config: String,
}

impl Identity {
    fn of(engine: &Engine) -> Self {
        let model = engine.model();
        let digest = Sha256::digest(format!("{:?}", model.config).as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Identity {
            family: format!("{:?}", model.config.model_type),
            num_parameters: model.num_parameters,
            vocab_size: model.config.vocab_size,
            config: format!("{:016x}", u64::from_be_bytes(first)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Header {
    model: Identity,
    /// `f32`, `f16` or `bf16`.
    dtype: String,
    block_size: usize,
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
    tokens: usize,
    /// SHA-256 of everything after the header (the tokens and the blocks), in hex.
    sha256: String,
    /// The sliding-window layers' keys and values cover only the blocks this many
    /// positions before the end reads (the file was saved by an engine that keeps only
    /// their window; zeros before); absent when they cover every position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window: Option<usize>,
}

fn dtype_name(d: KvDType) -> &'static str {
    match d {
        KvDType::F32 => "f32",
        KvDType::F16 => "f16",
        KvDType::BF16 => "bf16",
    }
}

impl Header {
    /// This engine's header for a file of `tokens` tokens whose contents hash to `sha256`.
    fn of(engine: &Engine, tokens: usize, sha256: String) -> Self {
        let CacheShape {
            dtype,
            layout,
            num_layers,
            windows,
        } = engine.cache_shape();
        let window = windows
            .filter(|w| dead_blocks(w.window, layout.block_size, tokens) > 0)
            .map(|w| w.window);
        Header {
            model: Identity::of(engine),
            dtype: dtype_name(dtype).into(),
            block_size: layout.block_size,
            num_layers,
            kv_heads: layout.kv_heads,
            head_dim: layout.head_dim,
            tokens,
            sha256,
            window,
        }
    }
}

/// The parts of one block's data (as `KvStorage::read_blocks` lays it out) that belong
/// to the layers that keep every position.
fn full_layers(block: &[u8], shape: &CacheShape) -> Vec<u8> {
    let per_layer = block.len() / shape.num_layers;
    block
        .chunks_exact(per_layer)
        .enumerate()
        .filter(|(l, _)| !shape.windows.as_ref().is_some_and(|w| w.layers[*l]))
        .flat_map(|(_, part)| part.iter().copied())
        .collect()
}

/// The values of `data`, little-endian elements of `dtype`, as f64.
fn values(data: &[u8], dtype: KvDType) -> Vec<f64> {
    match dtype {
        KvDType::F32 => data
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        KvDType::F16 => data
            .chunks_exact(2)
            .map(|c| f64::from(f16::from_bits(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        KvDType::BF16 => data
            .chunks_exact(2)
            .map(|c| f64::from(bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
    }
}

/// `‖a − b‖ / ‖b‖` (non-finite values count as a total mismatch).
fn relative_rms(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    let r = (diff / norm.max(f64::MIN_POSITIVE)).sqrt();
    if r.is_finite() {
        r
    } else {
        f64::INFINITY
    }
}

fn bad(path: &Path, message: impl Into<String>) -> Error {
    Error::SavedPrefix {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl Client {
    /// The keys and values of `tokens`' full blocks, computed by the engine when they are
    /// not cached (one greedy token on the prefix, which names its blocks in the cache).
    fn cached_prefix_data(&self, tokens: &[u32]) -> Result<Vec<u8>> {
        let engine = self.engine();
        for _ in 0..ATTEMPTS {
            if let Some(data) = engine.read_prefix(tokens.to_vec())? {
                return Ok(data);
            }
            let params = SamplingParams {
                max_tokens: 1,
                temperature: 0.0,
                ..SamplingParams::default()
            };
            for c in self.generate(vec![tokens.to_vec()], &[params])? {
                c.finish?;
            }
        }
        Err(Error::Engine(format!(
            "other requests evicted the prefix {ATTEMPTS} times before it could be read; \
             save it when the engine is less busy or give it a larger cache"
        )))
    }

    fn check_caching(&self) -> Result<usize> {
        let engine = self.engine();
        if !engine.prefix_caching() {
            return Err(Error::param(
                "prefix_caching",
                "saved prefixes need an engine with prefix caching (and no rotating cache)",
            ));
        }
        Ok(engine.cache_shape().layout.block_size)
    }

    /// Writes the keys and values of `tokens`' full blocks to `path` (computing them
    /// first unless they are cached). Returns how many tokens the file holds: the tokens
    /// of the full blocks (a last partial block is not saved).
    pub fn save_prefix(&self, tokens: &[u32], path: &Path) -> Result<usize> {
        let block_size = self.check_caching()?;
        let whole = tokens.len() / block_size * block_size;
        if whole == 0 {
            return Err(Error::param(
                "prompt",
                format!(
                    "a prefix of {} tokens fills no cache block of {block_size}",
                    tokens.len()
                ),
            ));
        }
        let tokens = &tokens[..whole];
        let data = self.cached_prefix_data(tokens)?;
        let mut body: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        body.extend_from_slice(&data);
        drop(data);
        let sha256 = hex(&Sha256::digest(&body));
        let header = serde_json::to_vec(&Header::of(self.engine(), whole, sha256))
            .map_err(|e| Error::Internal(format!("a prefix header: {e}")))?;
        let mut head = Vec::with_capacity(PREAMBLE + header.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(header.len() as u32).to_le_bytes());
        head.extend_from_slice(&header);
        write_whole(path, &[&head, &body])?;
        Ok(whole)
    }

    /// Puts the prefix saved in `path` into the engine's cache (as cached blocks, evicted
    /// like any others when space is needed); returns how many tokens it holds. A file
    /// that is malformed, or holds another model's keys and values or another cache
    /// layout, is refused whole with [`Error::SavedPrefix`].
    pub fn load_prefix(&self, path: &Path) -> Result<usize> {
        self.check_caching()?;
        let engine = self.engine();
        let (tokens, data) = read_checked(path, engine)?;
        let shape = engine.cache_shape();
        let size = shape.layout.block_size;
        let block_bytes = shape.block_bytes();
        // The first block, computed here, must match the file's: in the layers that keep
        // every position when window layers may hold zeros there.
        let ours = self.cached_prefix_data(&tokens[..size])?;
        let theirs = &data[..block_bytes];
        let zeroed =
            (shape.windows.as_ref()).is_some_and(|w| dead_blocks(w.window, size, tokens.len()) > 0);
        let (ours, theirs) = if zeroed {
            (full_layers(&ours, &shape), full_layers(theirs, &shape))
        } else {
            (ours, theirs.to_vec())
        };
        let difference = relative_rms(&values(&ours, shape.dtype), &values(&theirs, shape.dtype));
        if difference > PROBE_TOLERANCE {
            return Err(bad(
                path,
                format!(
                    "its keys and values differ from this model's by {:.1} % (relative RMS over \
                     the first block; at most {:.0} % is rounding): it was saved from another \
                     model of the same shape",
                    difference * 100.0,
                    PROBE_TOLERANCE * 100.0
                ),
            ));
        }
        let n = tokens.len();
        engine.write_prefix(tokens, data)?;
        Ok(n)
    }
}

/// Writes `parts` one after the other to a temporary file beside `path`, then renames it
/// into place.
fn write_whole(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| bad(path, "the path names no file"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let written = File::create(&tmp).and_then(|mut f| {
        for part in parts {
            f.write_all(part)?;
        }
        f.sync_all()
    });
    let result = written.and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(bad(path, format!("could not be written: {e}")));
    }
    Ok(())
}

/// Reads `path` and checks everything but the probe: `(tokens, blocks)`.
fn read_checked(path: &Path, engine: &Engine) -> Result<(Vec<u32>, Vec<u8>)> {
    let unreadable = |e: std::io::Error| bad(path, format!("could not be read: {e}"));
    let mut file = File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    // A device or a pipe could be endless, or never end.
    if !meta.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    let file_len = meta.len();
    // The preamble and the header, however long the file says the header is.
    let mut bytes = Vec::new();
    (&mut file)
        .take((PREAMBLE + MAX_HEADER) as u64)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    let u32_at = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if bytes.get(..8) != Some(&MAGIC[..]) {
        return Err(bad(path, "not a saved prefix (no CXPREFIX magic)"));
    }
    let (Some(version), Some(header_len)) = (u32_at(&bytes, 8), u32_at(&bytes, 12)) else {
        return Err(bad(path, "truncated in its preamble"));
    };
    if version != VERSION as usize {
        return Err(bad(
            path,
            format!("format version {version}; this Cortex reads version {VERSION}"),
        ));
    }
    if header_len > MAX_HEADER {
        return Err(bad(path, format!("a header of {header_len} bytes")));
    }
    let Some(raw) = bytes.get(PREAMBLE..PREAMBLE + header_len) else {
        return Err(bad(path, "truncated in its header"));
    };
    let header: Header =
        serde_json::from_slice(raw).map_err(|e| bad(path, format!("a malformed header: {e}")))?;
    let mut ours = Header::of(engine, header.tokens, header.sha256.clone());
    if header.model != ours.model {
        return Err(bad(
            path,
            format!(
                "it was saved from another model ({} with {} parameters, config {}); this is {} \
                 with {} parameters, config {}",
                header.model.family,
                header.model.num_parameters,
                header.model.config,
                ours.model.family,
                ours.model.num_parameters,
                ours.model.config
            ),
        ));
    }
    if let Some(w) = header.window.filter(|&w| ours.window != Some(w)) {
        return Err(bad(
            path,
            format!(
                "its sliding-window layers hold only the last {w} positions, and this engine \
                 keeps them all: load it into one with sliding_window_eviction on"
            ),
        ));
    }
    // A file whose window layers hold every position is read as this engine needs.
    ours.window = header.window;
    if header != ours {
        return Err(bad(
            path,
            format!(
                "it holds a {} cache of blocks of {} ({} layers, {} KV heads of {}); this \
                 engine's is {} with blocks of {} ({} layers, {} KV heads of {})",
                header.dtype,
                header.block_size,
                header.num_layers,
                header.kv_heads,
                header.head_dim,
                ours.dtype,
                ours.block_size,
                ours.num_layers,
                ours.kv_heads,
                ours.head_dim
            ),
        ));
    }
    let shape = engine.cache_shape();
    let size = shape.layout.block_size;
    let context = engine.model().config.max_position_embeddings;
    if header.tokens == 0 || !header.tokens.is_multiple_of(size) || header.tokens >= context {
        return Err(bad(
            path,
            format!(
                "{} tokens: not a whole number of blocks of {size} below the context of {context}",
                header.tokens
            ),
        ));
    }
    let blocks = header.tokens / size;
    let capacity = engine.cache_capacity() / size;
    if blocks > capacity {
        return Err(bad(
            path,
            format!("its {blocks} blocks are more than this engine's whole cache of {capacity}"),
        ));
    }
    let at = PREAMBLE + header_len;
    let expected = at + 4 * header.tokens + blocks * shape.block_bytes();
    if file_len != expected as u64 {
        return Err(bad(
            path,
            format!("{file_len} bytes where its header calls for {expected}: truncated or padded"),
        ));
    }
    // Tokens and blocks: the length is checked, and bounded by the context.
    let mut rest = vec![0u8; expected - at];
    file.seek(SeekFrom::Start(at as u64))
        .and_then(|_| file.read_exact(&mut rest))
        .map_err(unreadable)?;
    let digest = hex(&Sha256::digest(&rest));
    if digest != header.sha256 {
        return Err(bad(
            path,
            "its tokens or keys and values do not match its checksum: the file is damaged",
        ));
    }
    let vocab = engine.model().config.vocab_size;
    let mut tokens = Vec::with_capacity(header.tokens);
    for i in 0..header.tokens {
        match u32_at(&rest, 4 * i) {
            Some(t) if t < vocab => tokens.push(t as u32),
            _ => {
                return Err(bad(
                    path,
                    format!("token {i} is out of the vocabulary of {vocab}"),
                ))
            }
        }
    }
    let data = rest.split_off(4 * header.tokens);
    Ok((tokens, data))
}

/// `bytes` in lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_rms_is_zero_for_equal_values_and_huge_for_nan_or_zero() {
        assert_eq!(relative_rms(&[1.0, -2.0], &[1.0, -2.0]), 0.0);
        assert!((relative_rms(&[1.1, 0.0], &[1.0, 0.0]) - 0.1).abs() < 1e-12);
        assert_eq!(relative_rms(&[f64::NAN], &[1.0]), f64::INFINITY);
        assert!(relative_rms(&[1.0], &[0.0]) > 1e100);
    }
}
