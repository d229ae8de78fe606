//! Where a model's weights come from, addressed by Hugging Face module paths
//! (`model.layers.0.self_attn.q_proj`) whatever the file format:
//!
//! * [`GgufWeights`]: a GGUF file; names map onto llama.cpp's (`blk.0.attn_q`) through the
//!   family's table (`model::arch`), GGML blocks stay as they are.
//! * [`FolderWeights`]: a folder of safetensors (one file, or shards with
//!   `model.safetensors.index.json`) in HF layout — dense f32/f16/bf16 — or in MLX layout,
//!   where a quantized module `P` stores `P.weight` (packed uint32), `P.scales` and
//!   `P.biases`, with bits and group size from `config.json`'s `quantization` (per-module
//!   overrides keyed by module path). A family whose checkpoints name modules their own way
//!   (GPT-2) says where each module is stored.
//!
//! Every tensor's shape is checked against what the configuration expects before its data
//! is read.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::formats::safetensors::{Dtype, SafetensorsFile};
use crate::model::arch::{Family, StoredLayout};
use crate::model::layers::{dense, Weight};
use crate::quant::affine::{transpose, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES};
use crate::quant::ggml;
use crate::quant::{AffineMatrix, ScaleDType};

/// Splits a parameter name into its module path and `weight` / `bias`.
pub fn split_param(name: &str) -> Option<(&str, &str)> {
    name.strip_suffix(".weight")
        .map(|m| (m, "weight"))
        .or_else(|| name.strip_suffix(".bias").map(|m| (m, "bias")))
}

/// llama.cpp's name for an HF parameter of `family` (`model.layers.0.self_attn.q_proj.bias`
/// → `blk.0.attn_q.bias`).
pub fn gguf_param(name: &str, family: Family) -> Option<String> {
    let (module, suffix) = split_param(name)?;
    Some(format!("{}.{suffix}", family.traits().gguf_name(module)?))
}

/// The HF name of a GGUF parameter (the inverse of [`gguf_param`]).
pub fn hf_param(gguf_tensor: &str, family: Family, num_layers: usize) -> Option<String> {
    let (base, suffix) = split_param(gguf_tensor)?;
    Some(format!(
        "{}.{suffix}",
        family.traits().hf_module(base, num_layers)?
    ))
}

/// A source of weights addressed by HF module paths.
pub trait WeightSource {
    fn path(&self) -> &Path;
    /// Whether `module.weight` exists.
    fn has(&self, module: &str) -> bool;
    /// The matrix `module.weight`, `[out, in]`.
    fn matrix(&self, module: &str, out: usize, inp: usize) -> Result<Weight>;
    /// The vector `module.weight`, `[dim]`, as f32 (norm weights, already in the form the
    /// decoder multiplies by).
    fn vector(&self, module: &str, dim: usize) -> Result<Tensor>;
    /// The bias `module.bias`, `[dim]`, as f32.
    fn bias(&self, module: &str, dim: usize) -> Result<Tensor>;
    /// Stacked expert matrices `module.weight`, `[experts, out, in]` (mlx-lm's
    /// `switch_mlp`), as one `[experts * out, in]` weight whose row blocks are the experts.
    fn stacked(&self, module: &str, experts: usize, out: usize, inp: usize) -> Result<Weight>;
    /// Parameters in all the source's tensors (packed weights counted by the values they
    /// hold).
    fn num_parameters(&self) -> usize;
}

fn shape_error(path: &Path, name: &str, got: &[usize], want: &[usize]) -> Error {
    Error::format(
        path,
        None,
        format!("tensor '{name}' has shape {got:?}, expected {want:?}"),
    )
}

pub struct GgufWeights<'a> {
    pub gguf: &'a GgufFile,
    pub family: Family,
    pub device: &'a Device,
}

impl GgufWeights<'_> {
    fn name(&self, module: &str) -> Result<String> {
        self.family
            .traits()
            .gguf_name(module)
            .map(|n| format!("{n}.weight"))
            .ok_or_else(|| Error::Internal(format!("no GGUF name for module '{module}'")))
    }

    /// Checks that tensor `name` is there with the `expected` shape.
    fn checked(&self, name: &str, expected: &[usize]) -> Result<()> {
        let dims = self.gguf.info(name)?.shape.dims();
        if dims != expected {
            return Err(shape_error(&self.gguf.path, name, dims, expected));
        }
        Ok(())
    }

    fn get(
        &self,
        module: &str,
        expected: &[usize],
    ) -> Result<Arc<candle_core::quantized::QTensor>> {
        let name = self.name(module)?;
        self.checked(&name, expected)?;
        Ok(Arc::new(self.gguf.tensor(&name, self.device)?))
    }

    /// `module`'s weight (`expected` its stored shape) as a `[rows, cols]` matrix. IQ4
    /// types go straight from their blocks to our kernels' layout, at 4 bits a code.
    fn weight(&self, module: &str, expected: &[usize], rows: usize, cols: usize) -> Result<Weight> {
        let name = self.name(module)?;
        self.checked(&name, expected)?;
        if let Some(&iq) = self.gguf.iq4.get(&name) {
            let blocks = self.gguf.stored_blocks(&name)?;
            return Ok(Weight::Packed(Arc::new(ggml::iq4_to_packed(
                iq, &blocks, rows, cols,
            )?)));
        }
        let q = self.gguf.tensor(&name, self.device)?;
        if q.shape().dims() == [rows, cols] {
            return Weight::from_ggml(Arc::new(q));
        }
        let flat = candle_core::quantized::ggml_file::qtensor_from_ggml(
            q.dtype(),
            &q.data()?,
            vec![rows, cols],
            self.device,
        )?;
        Weight::from_ggml(Arc::new(flat))
    }
}

impl WeightSource for GgufWeights<'_> {
    fn path(&self) -> &Path {
        &self.gguf.path
    }

    fn has(&self, module: &str) -> bool {
        self.name(module).is_ok_and(|n| self.gguf.has_tensor(&n))
    }

    fn matrix(&self, module: &str, out: usize, inp: usize) -> Result<Weight> {
        self.weight(module, &[out, inp], out, inp)
    }

    fn vector(&self, module: &str, dim: usize) -> Result<Tensor> {
        // llama.cpp's converter already folds Gemma's `1 + w` into its norm weights.
        dense(self.get(module, &[dim])?.as_ref(), self.device)
    }

    fn bias(&self, module: &str, dim: usize) -> Result<Tensor> {
        let name = self.name(module)?.replace(".weight", ".bias");
        self.checked(&name, &[dim])?;
        dense(&self.gguf.tensor(&name, self.device)?, self.device)
    }

    fn stacked(&self, module: &str, experts: usize, out: usize, inp: usize) -> Result<Weight> {
        // `[experts, out, in]` as one matrix of `experts * out` rows (expert-major), whose
        // row blocks are the experts' matrices.
        self.weight(module, &[experts, out, inp], experts * out, inp)
    }

    fn num_parameters(&self) -> usize {
        self.gguf
            .tensors
            .values()
            .map(|t| t.shape.elem_count())
            .sum()
    }
}

/// Bits and group size of quantized modules (`config.json`'s `quantization`).
#[derive(Debug, Clone, Default)]
pub struct QuantConfig {
    pub default: Option<(u32, usize)>,
    /// Per-module overrides (mixed precision).
    pub overrides: HashMap<String, (u32, usize)>,
}

impl QuantConfig {
    pub fn from_config_json(config: &serde_json::Value) -> Result<Self> {
        let Some(q) = config
            .get("quantization")
            .or_else(|| config.get("quantization_config"))
        else {
            return Ok(QuantConfig::default());
        };
        let q = q
            .as_object()
            .ok_or_else(|| Error::config("quantization", "expected an object"))?;
        let pair =
            |field: &str, v: &serde_json::Map<String, serde_json::Value>| -> Result<(u32, usize)> {
                let bits = v.get("bits").and_then(serde_json::Value::as_u64);
                let group = v.get("group_size").and_then(serde_json::Value::as_u64);
                let (Some(b), Some(g)) = (
                    bits.and_then(|b| u32::try_from(b).ok()),
                    group.and_then(|g| usize::try_from(g).ok()),
                ) else {
                    return Err(Error::config(
                        field,
                        "needs integer 'bits' and 'group_size'",
                    ));
                };
                // Checked here, not only where a matrix is read: both divide sizes (packed
                // widths, parameter counts, the converter's plan) before any matrix is.
                if !SUPPORTED_BITS.contains(&b) {
                    return Err(Error::config(
                        format!("{field}.bits"),
                        format!("{b} is not supported (supported: {SUPPORTED_BITS:?})"),
                    ));
                }
                if !SUPPORTED_GROUP_SIZES.contains(&g) {
                    return Err(Error::config(
                        format!("{field}.group_size"),
                        format!("{g} is not supported (supported: {SUPPORTED_GROUP_SIZES:?})"),
                    ));
                }
                Ok((b, g))
            };
        if let Some(mode) = q.get("mode").and_then(|m| m.as_str()) {
            if mode != "affine" {
                return Err(Error::config(
                    "quantization.mode",
                    format!("'{mode}' is not supported (supported: affine)"),
                ));
            }
        }
        let mut overrides = HashMap::new();
        for (k, v) in q {
            if let Some(obj) = v.as_object() {
                overrides.insert(k.clone(), pair(&format!("quantization.{k}"), obj)?);
            }
        }
        Ok(QuantConfig {
            default: Some(pair("quantization", q)?),
            overrides,
        })
    }

    pub fn for_module(&self, module: &str) -> Option<(u32, usize)> {
        self.overrides.get(module).copied().or(self.default)
    }
}

/// Safetensors files of a model folder, with each tensor's file.
pub struct FolderWeights {
    pub dir: PathBuf,
    pub files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
    pub quant: QuantConfig,
    /// Added to every norm weight: HF Gemma stores `w` and multiplies by `1 + w`.
    pub norm_offset: f32,
    /// The checkpoint's own module names, when its family names modules otherwise than
    /// the decoder (GPT-2).
    pub layout: Option<StoredLayout>,
    pub device: Device,
}

/// Checks that a shard name from an index stays inside the model folder (RELIABILITY A19).
pub(crate) fn shard_path(dir: &Path, index_path: &Path, name: &str) -> Result<PathBuf> {
    let rel = Path::new(name);
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !plain || name.contains('\\') || name.contains("://") {
        return Err(Error::format(
            index_path,
            None,
            format!("shard path '{name}' escapes model directory"),
        ));
    }
    let path = dir.join(rel);
    if let (Ok(real), Ok(real_dir)) = (path.canonicalize(), dir.canonicalize()) {
        // A Hugging Face cache snapshot (`models--org--name/snapshots/<commit>/`) links
        // its files to the repo's `blobs/`: that is inside the model too.
        let blobs = real_dir
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))
            .and_then(Path::parent)
            .map(|repo| repo.join("blobs"));
        let in_blobs = blobs.is_some_and(|b| real.parent() == Some(b.as_path()));
        if !real.starts_with(&real_dir) && !in_blobs {
            return Err(Error::format(
                index_path,
                None,
                format!("shard path '{name}' escapes model directory (symlink)"),
            ));
        }
    }
    Ok(path)
}

impl FolderWeights {
    /// Opens every weight file of `dir` (validating each header), holding a model of
    /// `family`, and the quantization settings of `config`; `norm_offset` is added to
    /// every norm weight read.
    pub fn open(
        dir: &Path,
        config: &serde_json::Value,
        family: Family,
        norm_offset: f32,
    ) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let mut files = Vec::new();
        let mut index = HashMap::new();
        if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index_path, None, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index_path, None, "no 'weight_map' object"))?;
            let mut shard_ids: BTreeMap<String, usize> = BTreeMap::new();
            let mut wanted: Vec<(String, String)> = Vec::new();
            for (tensor, shard) in map {
                let shard = shard.as_str().ok_or_else(|| {
                    Error::format(
                        &index_path,
                        None,
                        format!("weight_map['{tensor}'] is not a string"),
                    )
                })?;
                shard_path(dir, &index_path, shard)?;
                let next = shard_ids.len();
                shard_ids.entry(shard.to_string()).or_insert(next);
                wanted.push((tensor.clone(), shard.to_string()));
            }
            let mut by_id: Vec<(&String, &usize)> = shard_ids.iter().collect();
            by_id.sort_by_key(|(_, &i)| i);
            for (shard, _) in by_id {
                let path = shard_path(dir, &index_path, shard)?;
                if !path.is_file() {
                    return Err(Error::format(
                        &index_path,
                        None,
                        format!("shard '{shard}' listed in the index does not exist"),
                    ));
                }
                files.push(SafetensorsFile::open(&path)?);
            }
            for (tensor, shard) in wanted {
                let id = shard_ids[&shard];
                if !files[id].tensors.contains_key(&tensor) {
                    return Err(Error::format(
                        &index_path,
                        None,
                        format!("tensor '{tensor}' is not in shard '{shard}' as the index says"),
                    ));
                }
                index.insert(tensor, id);
            }
        } else {
            let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            paths.sort();
            if paths.is_empty() {
                return Err(Error::ModelNotFound {
                    path: dir.to_path_buf(),
                    message: "no model weights (.safetensors or .gguf) in directory".into(),
                });
            }
            for (id, path) in paths.iter().enumerate() {
                let f = SafetensorsFile::open(path)?;
                for name in f.tensors.keys() {
                    if index.insert(name.clone(), id).is_some() {
                        return Err(Error::format(
                            path,
                            None,
                            format!("tensor '{name}' appears in two weight files"),
                        ));
                    }
                }
                files.push(f);
            }
        }
        let layout = family.adapter().stored_layout(&|n| index.contains_key(n));
        Ok(FolderWeights {
            dir: dir.to_path_buf(),
            files,
            layout,
            quant: QuantConfig::from_config_json(config)?,
            index,
            norm_offset,
            device: Device::Cpu,
        })
    }

    /// The stored module behind a decoder module name, and whether its weight is stored
    /// transposed (GPT-2's Conv1D); other families store modules under the decoder's names.
    fn stored(&self, module: &str) -> (String, bool) {
        self.layout
            .as_ref()
            .and_then(|g| g.stored(module))
            .unwrap_or_else(|| (module.to_string(), false))
    }

    /// The file holding `name`, and its entry.
    pub fn file_of(&self, name: &str) -> Result<&SafetensorsFile> {
        self.index
            .get(name)
            .map(|&i| &self.files[i])
            .ok_or_else(|| Error::format(&self.dir, None, format!("tensor '{name}' is missing")))
    }

    /// Names of every tensor, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    fn checked(&self, name: &str, want: &[usize]) -> Result<&SafetensorsFile> {
        let f = self.file_of(name)?;
        let got = &f.get(name)?.shape;
        if got != want {
            return Err(shape_error(&f.path, name, got, want));
        }
        Ok(f)
    }

    /// Whether `module` is stored MLX-quantized (has `module.scales`).
    pub fn is_quantized(&self, module: &str) -> bool {
        self.index.contains_key(&format!("{module}.scales"))
    }

    /// The affine matrix `module`: `[lead.., in]` before packing (`lead` is `[out]`, or
    /// `[experts, out]` for stacked experts), as `[product(lead), in]`.
    pub fn affine(&self, module: &str, lead: &[usize], inp: usize) -> Result<AffineMatrix> {
        let (bits, group) = self.quant.for_module(module).ok_or_else(|| {
            Error::config(
                "quantization",
                format!("'{module}' is quantized but config.json has no 'quantization' settings"),
            )
        })?;
        crate::quant::affine::check_params(bits, group, inp)
            .map_err(|e| Error::config(format!("quantization.{module}"), e.to_string()))?;
        let (w, s, b) = (
            format!("{module}.weight"),
            format!("{module}.scales"),
            format!("{module}.biases"),
        );
        let shape = |last: usize| [lead, &[last]].concat();
        let out: usize = lead.iter().product();
        let packed = self
            .checked(&w, &shape(inp * bits as usize / 32))?
            .u32s(&w)?;
        let sf = self.checked(&s, &shape(inp / group))?;
        let scale_dtype = match sf.get(&s)?.dtype {
            Dtype::F32 => ScaleDType::F32,
            Dtype::F16 => ScaleDType::F16,
            Dtype::BF16 => ScaleDType::BF16,
            other => {
                return Err(Error::format(
                    &sf.path,
                    None,
                    format!("tensor '{s}' has dtype {other}, expected a float type"),
                ))
            }
        };
        let scales = sf.f32s(&s)?;
        let biases = self.checked(&b, &shape(inp / group))?.f32s(&b)?;
        AffineMatrix::from_parts(out, inp, bits, group, packed, scales, biases, scale_dtype)
    }

    /// A dense float tensor as f32 values after checking its shape.
    pub fn dense_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.checked(name, shape)?.f32s(name)
    }
}

impl WeightSource for FolderWeights {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn has(&self, module: &str) -> bool {
        self.index
            .contains_key(&format!("{}.weight", self.stored(module).0))
    }

    fn matrix(&self, module: &str, out: usize, inp: usize) -> Result<Weight> {
        let (module, conv1d) = self.stored(module);
        if self.is_quantized(&module) {
            return Ok(Weight::from_affine(&self.affine(&module, &[out], inp)?));
        }
        let name = format!("{module}.weight");
        let values = if conv1d {
            transpose(&self.dense_f32(&name, &[inp, out])?, inp, out)
        } else {
            self.dense_f32(&name, &[out, inp])?
        };
        Ok(Weight::Dense(Tensor::from_vec(
            values,
            (out, inp),
            &self.device,
        )?))
    }

    fn vector(&self, module: &str, dim: usize) -> Result<Tensor> {
        let name = format!("{}.weight", self.stored(module).0);
        let mut values = self.dense_f32(&name, &[dim])?;
        if self.norm_offset != 0.0 {
            values.iter_mut().for_each(|v| *v += self.norm_offset);
        }
        Ok(Tensor::from_vec(values, dim, &self.device)?)
    }

    fn bias(&self, module: &str, dim: usize) -> Result<Tensor> {
        let values = self.dense_f32(&format!("{}.bias", self.stored(module).0), &[dim])?;
        Ok(Tensor::from_vec(values, dim, &self.device)?)
    }

    fn stacked(&self, module: &str, experts: usize, out: usize, inp: usize) -> Result<Weight> {
        if self.is_quantized(module) {
            return Ok(Weight::from_affine(&self.affine(
                module,
                &[experts, out],
                inp,
            )?));
        }
        let values = self.dense_f32(&format!("{module}.weight"), &[experts, out, inp])?;
        Ok(Weight::Dense(Tensor::from_vec(
            values,
            (experts * out, inp),
            &self.device,
        )?))
    }

    fn num_parameters(&self) -> usize {
        // Packed weights count as the values they hold; scales and biases are overhead.
        self.index
            .keys()
            .filter(|n| n.ends_with(".weight"))
            .map(|n| {
                let module = &n[..n.len() - ".weight".len()];
                let numel = self
                    .file_of(n)
                    .and_then(|f| {
                        f.get(n)
                            .map(super::super::formats::safetensors::TensorEntry::numel)
                    })
                    .unwrap_or(0);
                match (self.is_quantized(module), self.quant.for_module(module)) {
                    (true, Some((bits, _))) => numel * 32 / bits as usize,
                    _ => numel,
                }
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::formats::gguf::{write_gguf, GgufTensorSpec};
    use crate::formats::safetensors::{write, TensorSpec};
    use candle_core::quantized::GgmlDType;

    /// A scratch folder for one test.
    fn scratch(name: &str) -> Result<PathBuf> {
        let dir =
            std::env::temp_dir().join(format!("cortex-weights-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(dir)
    }

    /// f32 tensors `(name, shape)` holding `0, 1, 2...` in row-major order.
    fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>)]) -> Result<()> {
        let specs: Vec<TensorSpec> = tensors
            .iter()
            .map(|(name, shape)| TensorSpec {
                name: name.to_string(),
                dtype: Dtype::F32,
                shape: shape.clone(),
            })
            .collect();
        write(path, &specs, &BTreeMap::new(), |i| {
            let n: usize = tensors[i].1.iter().product();
            Ok((0..n).flat_map(|x| (x as f32).to_le_bytes()).collect())
        })
    }

    fn values(w: &Weight) -> Result<Vec<f32>> {
        match w {
            Weight::Dense(t) => Ok(t.flatten_all()?.to_vec1()?),
            other => Err(Error::Internal(format!("expected dense, got {other:?}"))),
        }
    }

    #[test]
    fn gguf_param_names_per_family() {
        let q_bias = "model.layers.0.self_attn.q_proj.bias";
        assert_eq!(
            gguf_param(q_bias, Family::Qwen2).as_deref(),
            Some("blk.0.attn_q.bias")
        );
        assert_eq!(
            hf_param("blk.0.attn_q.bias", Family::Qwen2, 1).as_deref(),
            Some(q_bias)
        );
        assert_eq!(
            hf_param("output.bias", Family::Phi, 2).as_deref(),
            Some("lm_head.bias")
        );
        assert_eq!(
            hf_param("blk.1.attn_qkv.weight", Family::Gpt2, 2).as_deref(),
            Some("model.layers.1.self_attn.qkv_proj.weight")
        );
        // Not a parameter, or past the last layer.
        assert_eq!(hf_param("rope_freqs", Family::Llama, 2), None);
        assert_eq!(hf_param("blk.2.attn_q.weight", Family::Llama, 2), None);
    }

    #[test]
    fn gguf_weights_by_hf_name() -> Result<()> {
        let dir = scratch("gguf")?;
        let path = dir.join("m.gguf");
        let specs = [GgufTensorSpec {
            name: "blk.0.post_attention_norm.weight".into(),
            dims: vec![4],
            dtype: GgmlDType::F32,
        }];
        write_gguf(&path, &[], &specs, |_| {
            Ok([1.0f32, 2.0, 3.0, 4.0]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect())
        })?;
        let gguf = GgufFile::open(&path)?;
        let device = Device::Cpu;
        let src = GgufWeights {
            gguf: &gguf,
            family: Family::Gemma3,
            device: &device,
        };
        let module = "model.layers.0.post_attention_layernorm";
        assert!(src.has(module));
        // llama.cpp already holds Gemma's `1 + w`: read as stored.
        assert_eq!(
            src.vector(module, 4)?.to_vec1::<f32>()?,
            [1.0, 2.0, 3.0, 4.0]
        );
        let wrong = src.vector(module, 5).err().map(|e| e.to_string());
        assert!(wrong.is_some_and(|m| m.contains("expected [5]")));
        // The llama family names that module `ffn_norm`, which this file lacks.
        let llama = GgufWeights {
            family: Family::Llama,
            ..src
        };
        assert!(!llama.has(module));
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))
    }

    #[test]
    fn gpt2_checkpoint_layouts() -> Result<()> {
        let (d, out) = (2, 6);
        for (prefix, transposed) in [("transformer.", true), ("model.", false)] {
            let dir = scratch(&format!("gpt2-{}", prefix.trim_end_matches('.')))?;
            let qkv = format!("{prefix}h.0.attn.c_attn.weight");
            let shape = if transposed {
                vec![d, out]
            } else {
                vec![out, d]
            };
            let wte = format!("{prefix}wte.weight");
            write_f32(
                &dir.join("model.safetensors"),
                &[(&wte, vec![3, d]), (&qkv, shape)],
            )?;
            let src = FolderWeights::open(&dir, &serde_json::json!({}), Family::Gpt2, 0.0)?;
            assert!(src.has("model.embed_tokens"));
            let w = src.matrix("model.layers.0.self_attn.qkv_proj", out, d)?;
            // Stored `[in, out]` (Conv1D), the value at [o, i] is `i * out + o`.
            let want: Vec<f32> = (0..out)
                .flat_map(|o| (0..d).map(move |i| if transposed { i * out + o } else { o * d + i }))
                .map(|x| x as f32)
                .collect();
            assert_eq!(values(&w)?, want, "{prefix}");
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        Ok(())
    }

    #[test]
    fn folder_norm_offset_and_missing_tensor() -> Result<()> {
        let dir = scratch("gemma")?;
        let norm = "model.layers.0.input_layernorm.weight";
        write_f32(&dir.join("model.safetensors"), &[(norm, vec![3])])?;
        let src = FolderWeights::open(&dir, &serde_json::json!({}), Family::Gemma3, 1.0)?;
        let v = src.vector("model.layers.0.input_layernorm", 3)?;
        assert_eq!(v.to_vec1::<f32>()?, [1.0, 2.0, 3.0]);
        let missing = src.vector("model.norm", 3).err().map(|e| e.to_string());
        assert!(missing.is_some_and(|m| m.contains("'model.norm.weight' is missing")));
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))
    }
}
