//! Loading a model (and its tokenizer) from a reference: a `.gguf` file, or a directory
//! holding exactly one. Every tensor's shape is checked against the configuration before
//! its data is read, so a mismatched file fails at load with the tensor's name rather than
//! as an index error in the first forward pass.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::model::config::{ModelConfig, RopeScaling};
use crate::model::decoder::{Attention, Block, Decoder, KvCache};
use crate::model::layers::{dense, Linear, Mlp, RmsNorm, Rope};
use crate::tokenizer::Tokenizer;

/// A loaded model: configuration and weights (read-only, shareable across threads).
#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    /// The model file.
    pub path: PathBuf,
    pub num_parameters: usize,
    /// Bytes the weights occupy in memory (quantized blocks as stored).
    pub weight_bytes: usize,
    decoder: Decoder,
}

impl Model {
    pub fn device(&self) -> &Device {
        &self.decoder.device
    }

    /// A fresh, empty KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        self.decoder.new_cache()
    }

    /// See [`Decoder::forward`]: logits `[t, vocab]` or `[1, vocab]`.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        all_positions: bool,
    ) -> Result<Tensor> {
        self.decoder.forward(tokens, cache, all_positions)
    }

    /// Logits for `tokens` from an empty cache, as `(values, rows)` with
    /// `values.len() == rows * vocab_size`.
    pub fn logits(&self, tokens: &[u32], all_positions: bool) -> Result<(Vec<f32>, usize)> {
        let mut cache = self.new_cache();
        let logits = self.forward(tokens, &mut cache, all_positions)?;
        let rows = logits.dims()[0];
        Ok((logits.flatten_all()?.to_vec1::<f32>()?, rows))
    }
}

/// Finds the model file a reference points at: the file itself, or the single `.gguf`
/// file inside a directory.
pub fn resolve_model_path(reference: &Path) -> Result<PathBuf> {
    if reference.is_file() {
        return Ok(reference.to_path_buf());
    }
    if reference.is_dir() {
        let entries = std::fs::read_dir(reference).map_err(|e| Error::io(reference, e))?;
        let mut ggufs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            })
            .collect();
        ggufs.sort();
        return match ggufs.len() {
            0 => Err(Error::ModelNotFound {
                path: reference.to_path_buf(),
                message: "no model weights (.gguf file) in directory".into(),
            }),
            1 => Ok(ggufs.remove(0)),
            _ => Err(Error::ModelNotFound {
                path: reference.to_path_buf(),
                message: format!(
                    "several .gguf files in directory ({}); pass the one to load",
                    ggufs
                        .iter()
                        .filter_map(|p| p.file_name())
                        .map(|n| n.to_string_lossy())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        };
    }
    Err(Error::ModelNotFound {
        path: reference.to_path_buf(),
        message: "no such file or directory".into(),
    })
}

struct TensorSource<'a> {
    gguf: &'a GgufFile,
    device: &'a Device,
}

impl TensorSource<'_> {
    /// Reads `name` after checking its shape (slowest dimension first) is `expected`.
    fn get(&self, name: &str, expected: &[usize]) -> Result<Arc<QTensor>> {
        let info = self.gguf.tensors.get(name).ok_or_else(|| {
            Error::format(&self.gguf.path, None, format!("tensor '{name}' is missing"))
        })?;
        if info.shape.dims() != expected {
            return Err(Error::format(
                &self.gguf.path,
                None,
                format!(
                    "tensor '{name}' has shape {:?}, expected {expected:?}",
                    info.shape.dims()
                ),
            ));
        }
        Ok(Arc::new(self.gguf.tensor(name, self.device)?))
    }

    fn linear(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear> {
        Linear::new(self.get(name, &[out_dim, in_dim])?)
    }

    fn norm(&self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(
            dense(self.get(name, &[dim])?.as_ref(), self.device)?,
            eps,
        ))
    }
}

fn build_model(gguf: &GgufFile, device: &Device) -> Result<Model> {
    let cfg = ModelConfig::from_gguf(gguf)?;
    let src = TensorSource { gguf, device };
    let (d, hd) = (cfg.hidden_size, cfg.head_dim);
    let (nh, nkv, inter) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    );
    let eps = cfg.rms_norm_eps;

    let embed_tokens = src.get("token_embd.weight", &[cfg.vocab_size, d])?;
    let lm_head = if cfg.tie_word_embeddings {
        Linear::new(embed_tokens.clone())?
    } else {
        src.linear("output.weight", cfg.vocab_size, d)?
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        let optional_norm = |name: &str, dim: usize, present: bool| -> Result<Option<RmsNorm>> {
            present.then(|| src.norm(&p(name), dim, eps)).transpose()
        };
        // Gemma 3: every `pattern`-th layer is global, the rest slide.
        let local = cfg.sliding_window_pattern.is_some_and(|n| (i + 1) % n != 0);
        layers.push(Block {
            input_layernorm: src.norm(&p("attn_norm"), d, eps)?,
            self_attn: Attention {
                q_proj: src.linear(&p("attn_q"), nh * hd, d)?,
                k_proj: src.linear(&p("attn_k"), nkv * hd, d)?,
                v_proj: src.linear(&p("attn_v"), nkv * hd, d)?,
                o_proj: src.linear(&p("attn_output"), d, nh * hd)?,
                q_norm: optional_norm("attn_q_norm", hd, cfg.use_qk_norm)?,
                k_norm: optional_norm("attn_k_norm", hd, cfg.use_qk_norm)?,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                scale: 1.0 / cfg.query_pre_attn_scalar.sqrt(),
                local,
            },
            post_attention_layernorm: optional_norm("post_attention_norm", d, cfg.sandwich_norms)?,
            pre_feedforward_layernorm: src.norm(&p("ffn_norm"), d, eps)?,
            mlp: Mlp {
                gate_proj: src.linear(&p("ffn_gate"), inter, d)?,
                up_proj: src.linear(&p("ffn_up"), inter, d)?,
                down_proj: src.linear(&p("ffn_down"), d, inter)?,
                act: cfg.hidden_act,
            },
            post_feedforward_layernorm: optional_norm("post_ffw_norm", d, cfg.sandwich_norms)?,
        });
    }
    let norm = src.norm("output_norm.weight", d, eps)?;
    let interleaved = cfg.rope_interleaved;
    let rope = match &cfg.rope_scaling {
        Some(RopeScaling::Llama3) => {
            let factors = dense(src.get("rope_freqs.weight", &[hd / 2])?.as_ref(), device)?
                .to_vec1::<f32>()?;
            Rope::new(hd, cfg.rope_theta, Some(&factors), 1.0, interleaved)
        }
        Some(RopeScaling::Linear { factor }) => {
            Rope::new(hd, cfg.rope_theta, None, *factor, interleaved)
        }
        None => Rope::new(hd, cfg.rope_theta, None, 1.0, interleaved),
    };
    let local_rope = cfg
        .rope_local_base_freq
        .map(|base| Rope::new(hd, base, None, 1.0, interleaved));
    let num_parameters = gguf.tensors.values().map(|t| t.shape.elem_count()).sum();
    let weight_bytes = gguf
        .tensors
        .values()
        .map(|t| t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size())
        .sum();
    Ok(Model {
        path: gguf.path.clone(),
        num_parameters,
        weight_bytes,
        decoder: Decoder {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            local_rope,
            config: cfg.clone(),
            device: device.clone(),
        },
        config: cfg,
    })
}

/// Loads the model `reference` points at (weights only).
pub fn load_model(reference: &Path) -> Result<Model> {
    crate::threads::init_thread_pool();
    let path = resolve_model_path(reference)?;
    let gguf = GgufFile::open(&path)?;
    build_model(&gguf, &Device::Cpu)
}

/// The tokenizer for `reference`: `tokenizer.json` beside the weights when `reference` is a
/// directory that has one, else the GGUF metadata.
fn tokenizer_for(reference: &Path, gguf: &GgufFile) -> Result<Tokenizer> {
    if reference.is_dir() && reference.join("tokenizer.json").is_file() {
        Tokenizer::from_dir(reference)
    } else {
        Tokenizer::from_gguf(gguf)
    }
}

/// Loads model and tokenizer (see [`load_tokenizer`] for where the tokenizer comes from).
pub fn load(reference: &Path) -> Result<(Model, Tokenizer)> {
    crate::threads::init_thread_pool();
    let path = resolve_model_path(reference)?;
    let gguf = GgufFile::open(&path)?;
    let model = build_model(&gguf, &Device::Cpu)?;
    let tokenizer = tokenizer_for(reference, &gguf)?;
    Ok((model, tokenizer))
}

/// Loads only the tokenizer of `reference` (no weights are read): from `tokenizer.json`
/// when `reference` is a directory that has one, else from the GGUF metadata.
pub fn load_tokenizer(reference: &Path) -> Result<Tokenizer> {
    let path = resolve_model_path(reference)?;
    tokenizer_for(reference, &GgufFile::open(&path)?)
}
