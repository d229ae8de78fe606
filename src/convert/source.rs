//! Conversion sources, all presented the same way: a Hugging Face `config.json`, and
//! tensors under HF names (`model.layers.0.mlp.up_proj.weight`) read one at a time as
//! f32 values or, where the stored form is already MLX affine (MLX folders, GGUF
//! Q4_0/Q4_1/Q5_0/Q5_1/Q8_0), as an exact [`AffineMatrix`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::json;

use crate::error::{bail, Context, Error, Result};
use crate::formats::gguf::GgufFile;
use crate::formats::safetensors::Dtype;
use crate::model::arch;
use crate::model::config::ModelConfig;
use crate::model::loader::read_config_json;
use crate::model::resolve_model_path;
use crate::model::weights::{gguf_param, hf_param, split_param, FolderWeights};
use crate::quant::affine::transpose;
use crate::quant::{ggml, AffineMatrix};
use crate::tokenizer::Tokenizer;

/// A tensor of the source, as the converter sees it.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    /// HF name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Logical shape (before any packing).
    pub shape: Vec<usize>,
    /// How the source stores it: `F32`, `BF16`, `Q4_1`, `affine4g64`...
    pub stored: String,
    /// For a tensor the converter assembles (mlx-lm's stacked experts): the source tensors
    /// whose rows it stacks, in order. Empty for a stored tensor.
    pub parts: Vec<String>,
}

/// Tensor values read from a source.
pub enum TensorData {
    Float(Vec<f32>),
    Affine(AffineMatrix),
}

impl TensorData {
    /// Row blocks stacked in order: affine matrices of one kind stay affine (rows are
    /// independent), anything else is stacked as f32.
    pub fn stack_rows(parts: Vec<TensorData>) -> TensorData {
        let same_affine = match parts.first() {
            Some(TensorData::Affine(first)) => parts.iter().all(|p| {
                matches!(p, TensorData::Affine(a) if (a.bits, a.group_size, a.cols, a.scale_dtype)
                    == (first.bits, first.group_size, first.cols, first.scale_dtype))
            }),
            _ => false,
        };
        if !same_affine {
            return TensorData::Float(parts.iter().flat_map(TensorData::to_f32).collect());
        }
        let mut it = parts.into_iter().map(|p| match p {
            TensorData::Affine(a) => a,
            TensorData::Float(_) => unreachable!("checked above"),
        });
        let mut acc = it.next().expect("checked non-empty");
        for a in it {
            acc.rows += a.rows;
            acc.packed.extend(a.packed);
            acc.scales.extend(a.scales);
            acc.biases.extend(a.biases);
        }
        TensorData::Affine(acc)
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            TensorData::Float(v) => v.clone(),
            TensorData::Affine(a) => a.dequantize(),
        }
    }
}

enum Kind {
    Gguf(GgufFile),
    Folder(FolderWeights),
    Pytorch(
        Vec<candle_core::pickle::PthTensors>,
        BTreeMap<String, usize>,
    ),
}

pub struct Source {
    pub path: PathBuf,
    /// `gguf`, `safetensors`, `mlx` or `pytorch`.
    pub format: &'static str,
    /// The HF `config.json` (generated from metadata for GGUF).
    pub config: serde_json::Value,
    pub model: ModelConfig,
    /// Tensors sorted by name.
    pub tensors: Vec<SourceTensor>,
    /// The float dtype of the source weights (`torch_dtype`), for outputs kept float.
    pub float_dtype: Dtype,
    /// Stored tensors that only feed assembled ones (see [`SourceTensor::parts`]).
    tensors_by_parts: HashMap<String, SourceTensor>,
    /// Tensors presented under another name: the stored tensor, and whether it is read
    /// transposed (GPT-2's Conv1D weights).
    renamed: HashMap<String, (SourceTensor, bool)>,
    /// A GGUF source's tensor names, by the name presented.
    gguf_names: HashMap<String, String>,
    kind: Kind,
}

fn dtype_of_torch(name: &str) -> Option<Dtype> {
    match name {
        "float32" => Some(Dtype::F32),
        "float16" => Some(Dtype::F16),
        "bfloat16" => Some(Dtype::BF16),
        _ => None,
    }
}

pub fn torch_dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    }
}

impl Source {
    /// Opens `path`: a `.gguf` file (or a folder holding one), a folder with `config.json`
    /// and safetensors (HF or MLX layout), or with `pytorch_model.bin` (read by candle's
    /// pickle reader, which interprets only the tensor records and never runs code).
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self::open_stored(path)?.stack_experts().sanitize())
    }

    /// The output has mlx-lm's layout: where the family's adapter renames a checkpoint's
    /// tensors (GPT-2: every name under `model.`, Conv1D weights `[out, in]`, no
    /// causal-mask buffers, no copy of the tied head), the source is presented renamed,
    /// its tensors read (and transposed) on demand.
    fn sanitize(mut self) -> Self {
        let names: Vec<&str> = self.tensors.iter().map(|t| t.name.as_str()).collect();
        let adapter = self.model.model_type.adapter();
        let Some(renamed) = adapter.sanitize(&names, self.model.tie_word_embeddings) else {
            return self; // already mlx-lm's layout
        };
        let by_name: HashMap<String, SourceTensor> = std::mem::take(&mut self.tensors)
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let mut tensors = Vec::with_capacity(renamed.len());
        for r in renamed {
            let Some(t) = by_name.get(&r.stored) else {
                continue;
            };
            let transposed = r.transposed && t.shape.len() == 2;
            let shape = if transposed {
                vec![t.shape[1], t.shape[0]]
            } else {
                t.shape.clone()
            };
            tensors.push(SourceTensor {
                name: r.name.clone(),
                shape,
                stored: t.stored.clone(),
                parts: vec![],
            });
            self.renamed.insert(r.name, (t.clone(), transposed));
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        self.tensors = tensors;
        self
    }

    /// mlx-lm stores a mixture of experts with each projection of all experts stacked
    /// (`mlp.switch_mlp.gate_proj.weight`, `[experts, out, in]`); HF stores one tensor per
    /// expert. Presents the HF ones stacked, so the output has mlx-lm's layout.
    fn stack_experts(mut self) -> Self {
        let Some(moe) = self.model.moe.clone() else {
            return self;
        };
        // By name: a large MoE has tens of thousands of tensors.
        let mut by_name: HashMap<String, SourceTensor> = std::mem::take(&mut self.tensors)
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        for layer in 0..self.model.num_hidden_layers {
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                let names: Vec<String> = (0..moe.num_experts)
                    .map(|e| format!("model.layers.{layer}.mlp.experts.{e}.{proj}.weight"))
                    .collect();
                if !names.iter().all(|n| by_name.contains_key(n)) {
                    continue;
                }
                let first = by_name[&names[0]].clone();
                for n in &names {
                    if let Some(t) = by_name.remove(n) {
                        self.tensors_by_parts.insert(t.name.clone(), t);
                    }
                }
                let name = format!("model.layers.{layer}.mlp.switch_mlp.{proj}.weight");
                let mut shape = vec![moe.num_experts];
                shape.extend(&first.shape);
                by_name.insert(
                    name.clone(),
                    SourceTensor {
                        name,
                        shape,
                        stored: first.stored,
                        parts: names,
                    },
                );
            }
        }
        self.tensors = by_name.into_values().collect();
        self.tensors.sort_by(|a, b| a.name.cmp(&b.name));
        self
    }

    fn open_stored(path: &Path) -> Result<Self> {
        if path.is_dir() && !path.join("config.json").is_file() {
            if let Ok(gguf) = resolve_model_path(path) {
                return Self::gguf(&gguf);
            }
        }
        if path.is_dir() {
            let config = read_config_json(path)?;
            let model = ModelConfig::from_hf(&config)?;
            let st = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(std::result::Result::ok)
                .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
            if st || path.join("model.safetensors.index.json").is_file() {
                return Self::folder(path, config, model);
            }
            return Self::pytorch(path, config, model);
        }
        if path.is_file() {
            return Self::gguf(path);
        }
        Err(Error::ModelNotFound {
            path: path.to_path_buf(),
            message: "no such file or directory".into(),
        })
    }

    fn gguf(path: &Path) -> Result<Self> {
        let gguf = GgufFile::open(path)?;
        let model = ModelConfig::from_gguf(&gguf)?;
        let tok = Tokenizer::from_gguf(&gguf).ok();
        let family = model.model_type;
        // mlx-lm's names where they differ from the decoder's (GPT-2's `model.h.0...`).
        let mlx = family.adapter().mlx_layout();
        let mut tensors = Vec::new();
        let mut gguf_names = HashMap::new();
        for name in &gguf.tensor_names {
            let info = &gguf.tensors[name];
            let hf = hf_param(name, family, model.num_hidden_layers).ok_or_else(|| {
                Error::format(path, None, format!(
                    "tensor '{name}' has no Hugging Face counterpart for {family} (llama 3 rope_freqs and similar are not convertible yet)",
                ))
            })?;
            let out = match (mlx, split_param(&hf)) {
                (Some(layout), Some((module, suffix))) => layout
                    .stored(module)
                    .map_or(hf.clone(), |(m, _)| format!("{m}.{suffix}")),
                _ => hf,
            };
            gguf_names.insert(out.clone(), name.clone());
            tensors.push(SourceTensor {
                parts: vec![],
                name: out,
                shape: info.shape.dims().to_vec(),
                stored: gguf.stored_type(name)?,
            });
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let mut config = arch::hf_config(&model);
        if let (Some(t), Some(m)) = (&tok, config.as_object_mut()) {
            m.insert("bos_token_id".into(), json!(t.bos_token_id));
            m.insert("eos_token_id".into(), json!(t.eos_token_ids));
        }
        Ok(Source {
            path: path.to_path_buf(),
            format: "gguf",
            config,
            model,
            tensors,
            // GGML scales are f16: keeping f16 makes Q4/Q5/Q8 transfers exact.
            float_dtype: Dtype::F16,
            tensors_by_parts: HashMap::new(),
            renamed: HashMap::new(),
            gguf_names,
            kind: Kind::Gguf(gguf),
        })
    }

    fn folder(path: &Path, config: serde_json::Value, model: ModelConfig) -> Result<Self> {
        // Norm weights are copied as stored.
        let folder = FolderWeights::open(path, &config, model.model_type, 0.0)?;
        let mut tensors = Vec::new();
        let mut float_dtype = None;
        for name in folder.tensor_names() {
            if name.ends_with("rotary_emb.inv_freq") {
                continue; // recomputed from the config, as mlx-lm and transformers do
            }
            let module = name.strip_suffix(".weight");
            let quantized = module.is_some_and(|m| folder.is_quantized(m));
            if quantized {
                let m = module.unwrap_or_default();
                let (bits, group) = folder.quant.for_module(m).ok_or_else(|| {
                    Error::config(
                        "quantization",
                        format!("'{m}' is quantized but config.json has no 'quantization'"),
                    )
                })?;
                let entry = folder.file_of(&name)?.get(&name)?.clone();
                let scales = folder
                    .file_of(&format!("{m}.scales"))?
                    .get(&format!("{m}.scales"))?
                    .clone();
                float_dtype.get_or_insert(scales.dtype);
                let cols = entry.shape.last().copied().unwrap_or(0) * 32 / bits as usize;
                let mut shape = entry.shape.clone();
                if let Some(last) = shape.last_mut() {
                    *last = cols;
                }
                tensors.push(SourceTensor {
                    shape,
                    stored: format!("affine{bits}g{group}"),
                    name,
                    parts: vec![],
                });
                continue;
            }
            if name.ends_with(".scales") || name.ends_with(".biases") {
                let m = &name[..name.len() - 7];
                if folder.is_quantized(m) {
                    continue;
                }
            }
            let entry = folder.file_of(&name)?.get(&name)?.clone();
            if !entry.dtype.is_float() {
                return Err(Error::format(
                    &folder.file_of(&name)?.path,
                    None,
                    format!(
                        "tensor '{name}' has dtype {} and is not a quantized module's weight",
                        entry.dtype
                    ),
                ));
            }
            float_dtype.get_or_insert(entry.dtype);
            tensors.push(SourceTensor {
                parts: vec![],
                name,
                shape: entry.shape.clone(),
                stored: entry.dtype.to_string(),
            });
        }
        let torch = config
            .get("torch_dtype")
            .or_else(|| config.get("dtype"))
            .and_then(|d| d.as_str())
            .and_then(dtype_of_torch);
        let is_mlx = config.get("quantization").is_some();
        Ok(Source {
            path: path.to_path_buf(),
            format: if is_mlx { "mlx" } else { "safetensors" },
            float_dtype: torch.or(float_dtype).unwrap_or(Dtype::F32),
            config,
            model,
            tensors,
            tensors_by_parts: HashMap::new(),
            renamed: HashMap::new(),
            gguf_names: HashMap::new(),
            kind: Kind::Folder(folder),
        })
    }

    fn pytorch(path: &Path, config: serde_json::Value, model: ModelConfig) -> Result<Self> {
        let index_path = path.join("pytorch_model.bin.index.json");
        let files: Vec<PathBuf> = if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index_path, None, format!("invalid JSON: {e}")))?;
            let mut names: Vec<String> = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index_path, None, "no 'weight_map' object"))?
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names
                .iter()
                .map(|n| crate::model::weights::shard_path(path, &index_path, n))
                .collect::<Result<_>>()?
        } else if path.join("pytorch_model.bin").is_file() {
            vec![path.join("pytorch_model.bin")]
        } else {
            return Err(Error::ModelNotFound {
                path: path.to_path_buf(),
                message:
                    "no weights (model.safetensors, pytorch_model.bin or a .gguf) in directory"
                        .into(),
            });
        };
        let mut readers = Vec::new();
        let mut index = BTreeMap::new();
        let mut tensors = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let r = candle_core::pickle::PthTensors::new(f, None).map_err(|e| {
                Error::format(f, None, format!("not a readable PyTorch checkpoint: {e}"))
            })?;
            for (name, info) in r.tensor_infos() {
                if name.ends_with("rotary_emb.inv_freq") {
                    continue;
                }
                if index.insert(name.clone(), i).is_some() {
                    return Err(Error::format(
                        f,
                        None,
                        format!("tensor '{name}' appears in two checkpoint files"),
                    ));
                }
                tensors.push(SourceTensor {
                    parts: vec![],
                    name: name.clone(),
                    shape: info.layout.shape().dims().to_vec(),
                    stored: format!("{:?}", info.dtype),
                });
            }
            readers.push(r);
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let torch = config
            .get("torch_dtype")
            .and_then(|d| d.as_str())
            .and_then(dtype_of_torch);
        Ok(Source {
            path: path.to_path_buf(),
            format: "pytorch",
            float_dtype: torch.unwrap_or(Dtype::F32),
            config,
            model,
            tensors,
            tensors_by_parts: HashMap::new(),
            renamed: HashMap::new(),
            gguf_names: HashMap::new(),
            kind: Kind::Pytorch(readers, index),
        })
    }

    /// Reads tensor `name` (one of [`Source::tensors`]) in HF layout.
    pub fn read(&self, t: &SourceTensor) -> Result<TensorData> {
        if let Some((stored, transposed)) = self.renamed.get(&t.name) {
            let data = self.read(stored)?;
            return Ok(match (transposed, stored.shape.as_slice()) {
                (true, &[rows, cols]) => TensorData::Float(transpose(&data.to_f32(), rows, cols)),
                _ => data,
            });
        }
        if !t.parts.is_empty() {
            let parts = t
                .parts
                .iter()
                .map(|name| {
                    let part = self.tensors_by_parts.get(name).ok_or_else(|| {
                        Error::format(&self.path, None, format!("tensor '{name}' is missing"))
                    })?;
                    self.read(part)
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok(TensorData::stack_rows(parts));
        }
        match &self.kind {
            Kind::Folder(folder) => match t.name.strip_suffix(".weight") {
                Some(m) if folder.is_quantized(m) => Ok(TensorData::Affine(folder.affine(
                    m,
                    &t.shape[..t.shape.len() - 1],
                    t.shape[t.shape.len() - 1],
                )?)),
                _ => Ok(TensorData::Float(folder.dense_f32(&t.name, &t.shape)?)),
            },
            Kind::Pytorch(readers, index) => {
                let r = &readers[index[&t.name]];
                let tensor = r
                    .get(&t.name)
                    .map_err(|e| {
                        Error::format(&self.path, None, format!("reading '{}': {e}", t.name))
                    })?
                    .ok_or_else(|| {
                        Error::format(&self.path, None, format!("tensor '{}' is missing", t.name))
                    })?;
                Ok(TensorData::Float(
                    tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
                ))
            }
            Kind::Gguf(gguf) => self.read_gguf(gguf, t),
        }
    }

    fn read_gguf(&self, gguf: &GgufFile, t: &SourceTensor) -> Result<TensorData> {
        let module = split_param(&t.name).map_or(t.name.as_str(), |(m, _)| m);
        let gname = self.gguf_name(t).unwrap_or_default();
        let q = gguf.tensor(&gname, &Device::Cpu)?;
        let data = match (t.shape.as_slice(), ggml::affine_bits(q.dtype())) {
            ([rows, cols], Some(_)) => {
                let a = ggml::to_affine(q.dtype(), &q.data()?, *rows, *cols)
                    .with_context(|| format!("reading '{}'", t.name))?;
                let Some(a) = a else {
                    bail!(
                        Conversion,
                        "'{}' ({:?}) has no affine form",
                        t.name,
                        q.dtype()
                    );
                };
                TensorData::Affine(a)
            }
            _ => TensorData::Float(
                q.dequantize(&Device::Cpu)
                    .and_then(|d| d.flatten_all()?.to_vec1())
                    .with_context(|| format!("dequantizing '{}'", t.name))?,
            ),
        };
        Ok(llama_cpp_layout(data, module, &t.shape, &self.model, true))
    }

    /// The GGUF file of a GGUF source.
    pub fn gguf_file(&self) -> Option<&GgufFile> {
        match &self.kind {
            Kind::Gguf(g) => Some(g),
            _ => None,
        }
    }

    /// The stored blocks of `t` when the source is GGUF (llama.cpp layout, unconverted).
    pub fn gguf_tensor(&self, t: &SourceTensor) -> Result<Option<candle_core::quantized::QTensor>> {
        let Some(g) = self.gguf_file() else {
            return Ok(None);
        };
        match self.gguf_name(t) {
            Some(name) => Ok(Some(g.tensor(&name, &Device::Cpu)?)),
            None => Ok(None),
        }
    }

    /// llama.cpp's name for `t`: the stored name for a GGUF source, else the family's.
    pub fn gguf_name(&self, t: &SourceTensor) -> Option<String> {
        match self.gguf_names.get(&t.name) {
            Some(name) => Some(name.clone()),
            None => gguf_param(&t.name, self.model.model_type),
        }
    }

    /// HF tokenizer files for the output: copied from a folder source, or built from a
    /// GGUF's metadata (`tokenizer.json` that Hugging Face `tokenizers` loads, and a
    /// `tokenizer_config.json` carrying the chat template and special tokens).
    pub fn write_tokenizer_files(&self, out: &Path) -> Result<Vec<String>> {
        let mut written = Vec::new();
        match &self.kind {
            Kind::Gguf(gguf) => {
                let tok = Tokenizer::from_gguf(gguf)?;
                let files =
                    tok.hf_files(gguf.get("tokenizer.chat_template").and_then(|v| match v {
                        candle_core::quantized::gguf_file::Value::String(s) => Some(s.as_str()),
                        _ => None,
                    }))?;
                for (name, text) in files {
                    let p = out.join(&name);
                    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
                    written.push(name);
                }
            }
            Kind::Folder(_) | Kind::Pytorch(..) => {
                const FILES: &[&str] = &[
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                    "generation_config.json",
                    "tokenizer.model",
                    "vocab.json",
                    "merges.txt",
                    "added_tokens.json",
                    "chat_template.json",
                    "chat_template.jinja",
                ];
                for name in FILES {
                    let src = self.path.join(name);
                    if src.is_file() {
                        let dst = out.join(name);
                        std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
                        written.push(name.to_string());
                    }
                }
            }
        }
        Ok(written)
    }
}

/// Converts one tensor between llama.cpp's layout and HF's (`to_hf` picks the direction),
/// the only two places they differ, as the family's traits say:
/// * the llama family's q/k rows (and biases) are permuted so that RoPE rotates adjacent
///   pairs; HF rotates the two halves of each head. Row `h·d + j·d/2 + i` of the HF matrix
///   is row `h·d + 2i + j` of the GGUF one.
/// * Gemma's norm weights are stored as `1 + w`; HF stores `w`.
pub(crate) fn llama_cpp_layout(
    data: TensorData,
    module: &str,
    shape: &[usize],
    model: &ModelConfig,
    to_hf: bool,
) -> TensorData {
    let traits = model.model_type.traits();
    let mut data = data;
    if traits.gguf_permuted_qk
        && (module.ends_with("self_attn.q_proj") || module.ends_with("self_attn.k_proj"))
    {
        let hd = model.head_dim;
        let perm: Vec<usize> = (0..shape[0])
            .map(|r| {
                let (h, rest) = (r / hd, r % hd);
                if to_hf {
                    let (j, i) = (rest / (hd / 2), rest % (hd / 2));
                    h * hd + 2 * i + j
                } else {
                    let (i, j) = (rest / 2, rest % 2);
                    h * hd + j * (hd / 2) + i
                }
            })
            .collect();
        data = permute_rows(data, &perm, shape.get(1).copied().unwrap_or(1));
    }
    if traits.norm_offset != 0.0 && shape.len() == 1 && module.contains("norm") {
        if let TensorData::Float(v) = &mut data {
            let offset = if to_hf {
                -traits.norm_offset
            } else {
                traits.norm_offset
            };
            v.iter_mut().for_each(|x| *x += offset);
        }
    }
    data
}

/// Reorders the rows of a `[rows, cols]` tensor: row `r` of the result is row `perm[r]`.
fn permute_rows(data: TensorData, perm: &[usize], cols: usize) -> TensorData {
    let gather = |v: &[f32], width: usize| -> Vec<f32> {
        perm.iter()
            .flat_map(|&p| v[p * width..(p + 1) * width].iter().copied())
            .collect()
    };
    match data {
        TensorData::Float(v) => TensorData::Float(gather(&v, cols)),
        TensorData::Affine(mut a) => {
            let (w, g) = (a.words_per_row(), a.groups_per_row());
            a.packed = perm
                .iter()
                .flat_map(|&p| a.packed[p * w..(p + 1) * w].iter().copied())
                .collect();
            a.scales = gather(&a.scales, g);
            a.biases = gather(&a.biases, g);
            TensorData::Affine(a)
        }
    }
}
