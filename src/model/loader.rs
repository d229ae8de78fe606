//! Loading a model (and its tokenizer) from a reference: a `.gguf` file, a directory
//! holding exactly one, or a directory with `config.json` and safetensors in HF or MLX
//! layout. The configuration comes from the source's metadata through the family's adapter
//! (`model::arch`), the weights through a [`WeightSource`] addressed by HF module paths, and
//! one builder assembles the decoder from either. Every tensor's shape is checked against
//! the configuration before its data is read, so a mismatched file fails at load with the
//! tensor's name rather than as an index error in the first forward pass.

use candle_core::Device;
use std::path::{Path, PathBuf};

use crate::engine::kv::KvStorage;
use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::model::attention::SeqSpan;
use crate::model::config::{ModelConfig, RopeScaling};
use crate::model::decoder::{Attention, Batch, Block, Decoder, Logits};
use crate::model::layers::{
    dense, Embedding, FeedForward, Linear, Mlp, MoeMlp, Norm, Rope, Weight,
};
use crate::model::weights::{FolderWeights, GgufWeights, WeightSource};
use crate::progress::Progress;
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
    /// This model on `device`: `"cpu"`, or `"cuda"` / `"cuda:N"` in a build with the `cuda`
    /// feature (where `"cuda"` is GPU 0).
    pub fn to_device(self, device: &str) -> Result<Model> {
        match device {
            "cpu" => Ok(self),
            #[cfg(feature = "cuda")]
            d if d == "cuda" || d.starts_with("cuda:") => {
                let ordinal = match d.strip_prefix("cuda:") {
                    None => 0,
                    Some(n) => n.parse().map_err(|_| {
                        Error::param("device", format!("{d:?} is not 'cuda:<GPU number>'"))
                    })?,
                };
                self.to_gpu(crate::cuda::Gpu::open(ordinal)?)
            }
            #[cfg(not(feature = "cuda"))]
            d if d == "cuda" || d.starts_with("cuda:") => Err(Error::param(
                "device",
                format!("{d:?}: this build of Cortex has no CUDA support (see README, GPU build)"),
            )),
            d => Err(Error::param(
                "device",
                format!("{d:?} is not 'cpu', 'cuda' or 'cuda:<GPU number>'"),
            )),
        }
    }

    /// The device the model runs on: `"cpu"` or `"cuda:N"`.
    pub fn device(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = self.decoder.gpu() {
            return format!("cuda:{}", gpu.ordinal());
        }
        "cpu".into()
    }

    /// This model on `gpu`: its linear layers uploaded (and their host copies dropped),
    /// the KV caches it makes in GPU memory.
    #[cfg(feature = "cuda")]
    pub fn to_gpu(self, gpu: std::sync::Arc<crate::cuda::Gpu>) -> Result<Model> {
        let Model {
            config,
            path,
            num_parameters,
            weight_bytes,
            decoder,
        } = self;
        let (decoder, delta) = decoder.to_gpu(gpu)?;
        Ok(Model {
            config,
            path,
            num_parameters,
            weight_bytes: (weight_bytes as isize + delta).max(0) as usize,
            decoder,
        })
    }

    /// A copy with every linear layer requantized to MLX affine groups (see
    /// [`Decoder::requantized`]); this model is left as it is.
    pub fn requantized(&self, bits: u32, head_bits: u32, group_size: usize) -> Result<Model> {
        Ok(self.with_decoder(self.decoder.requantized(bits, head_bits, group_size)?))
    }

    /// A copy computing in f32 from dequantized weights (see [`Decoder::dequantized`]).
    pub fn dequantized(&self) -> Result<Model> {
        Ok(self.with_decoder(self.decoder.dequantized()?))
    }

    /// This model with another decoder whose weights take `delta` more bytes.
    fn with_decoder(&self, (decoder, delta): (Decoder, isize)) -> Model {
        Model {
            config: self.config.clone(),
            path: self.path.clone(),
            num_parameters: self.num_parameters,
            weight_bytes: (self.weight_bytes as isize + delta).max(0) as usize,
            decoder,
        }
    }

    /// The decoder, for the engine's batched forward passes.
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// A fresh, empty KV cache for one sequence run outside the engine.
    pub fn new_cache(&self) -> Result<SequenceCache> {
        Ok(SequenceCache {
            storage: self
                .decoder
                .new_storage(0, SequenceCache::BLOCK, None, None)?,
            blocks: Vec::new(),
            len: 0,
        })
    }

    /// Runs `tokens` at positions `cache.len()..` as a batch of one sequence, extending
    /// `cache`. Logits are `[t, vocab]` when `all_positions`, else `[1, vocab]`.
    pub fn forward_with_cache(
        &self,
        tokens: &[u32],
        cache: &mut SequenceCache,
        all_positions: bool,
    ) -> Result<Logits> {
        let (start, t) = (cache.len, tokens.len());
        let context_length = self.config.max_position_embeddings;
        if start + t > context_length {
            return Err(Error::ContextLength {
                prompt_tokens: start + t,
                context_length,
            });
        }
        let need = (start + t).div_ceil(SequenceCache::BLOCK);
        if need > cache.blocks.len() {
            let more = need - cache.blocks.len();
            cache
                .blocks
                .extend((0..more).map(|i| (cache.storage.num_blocks() + i) as u32));
            cache.storage.grow(more)?;
        }
        let first = if all_positions {
            0
        } else {
            t.saturating_sub(1)
        };
        let batch = Batch {
            tokens: tokens.to_vec(),
            seqs: vec![SeqSpan {
                row: 0,
                len: t,
                start,
                blocks: &cache.blocks,
                window_blocks: &[],
            }],
            logits_rows: (first as u32..t as u32).collect(),
            draws: None,
        };
        let logits = self.decoder.forward(&batch, &mut cache.storage)?;
        cache.len = start + t;
        Ok(logits)
    }

    /// Logits for `tokens` from an empty cache, as `(values, rows)` with
    /// `values.len() == rows * vocab_size`.
    pub fn forward(&self, tokens: &[u32], all_positions: bool) -> Result<(Vec<f32>, usize)> {
        self.forward_batch(&[tokens], all_positions)
    }

    /// Logits for several independent sequences run side by side in one forward pass (as
    /// the engine batches them): rows for every position of each sequence in turn, or for
    /// the last position of each.
    pub fn forward_batch(&self, seqs: &[&[u32]], all_positions: bool) -> Result<(Vec<f32>, usize)> {
        let context_length = self.config.max_position_embeddings;
        if let Some(long) = seqs.iter().find(|s| s.len() > context_length) {
            return Err(Error::ContextLength {
                prompt_tokens: long.len(),
                context_length,
            });
        }
        if seqs.iter().any(|s| s.is_empty()) {
            return Err(Error::param("token_ids", "at least one token is required"));
        }
        // Each sequence gets its own run of blocks.
        let per_seq: Vec<usize> = seqs
            .iter()
            .map(|s| s.len().div_ceil(SequenceCache::BLOCK))
            .collect();
        let mut storage =
            self.decoder
                .new_storage(per_seq.iter().sum(), SequenceCache::BLOCK, None, None)?;
        let mut next = 0u32;
        let tables: Vec<Vec<u32>> = per_seq
            .iter()
            .map(|&n| {
                next += n as u32;
                (next - n as u32..next).collect()
            })
            .collect();
        let mut batch = Batch {
            tokens: Vec::new(),
            seqs: Vec::new(),
            logits_rows: Vec::new(),
            draws: None,
        };
        for (tokens, blocks) in seqs.iter().zip(&tables) {
            let row = batch.tokens.len();
            batch.tokens.extend_from_slice(tokens);
            batch.seqs.push(SeqSpan {
                row,
                len: tokens.len(),
                start: 0,
                blocks,
                window_blocks: &[],
            });
            let first = if all_positions {
                row
            } else {
                row + tokens.len() - 1
            };
            batch
                .logits_rows
                .extend(first as u32..(row + tokens.len()) as u32);
        }
        let logits = self.decoder.forward(&batch, &mut storage)?;
        let rows = logits.rows();
        Ok((logits.into_values(), rows))
    }
}

/// The KV cache of one sequence outside the engine (tests, oracles, conversion checks):
/// blocks are added as it grows.
#[derive(Debug)]
pub struct SequenceCache {
    storage: KvStorage,
    blocks: Vec<u32>,
    len: usize,
}

impl SequenceCache {
    const BLOCK: usize = 64;

    /// Positions already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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

/// Builds the decoder from `src`, checking every tensor against `cfg`, and counts the bytes
/// its weights occupy in memory. `rope_factors` are llama 3's per-frequency divisors when
/// the file stores them.
fn build_decoder(
    cfg: ModelConfig,
    src: &dyn WeightSource,
    rope_factors: Option<&[f32]>,
    progress: &Progress,
) -> Result<(Decoder, usize)> {
    progress.start(cfg.num_hidden_layers);
    let bytes = std::cell::Cell::new(0usize);
    let matrix = |m: &str, out: usize, inp: usize| -> Result<Weight> {
        let w = src.matrix(m, out, inp)?;
        bytes.set(bytes.get() + w.nbytes());
        Ok(w)
    };
    let (d, hd) = (cfg.hidden_size, cfg.head_dim);
    let (nh, nkv, inter) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.intermediate_size,
    );
    let eps = cfg.rms_norm_eps;
    let norm = |m: &str, dim: usize| -> Result<Norm> {
        bytes.set(bytes.get() + 4 * dim);
        if cfg.layer_norm {
            bytes.set(bytes.get() + 4 * dim);
            return Norm::layer(src.vector(m, dim)?, src.bias(m, dim)?, eps);
        }
        Norm::rms(src.vector(m, dim)?, eps)
    };
    let linear =
        |m: &str, out: usize, inp: usize| -> Result<Linear> { Linear::new(matrix(m, out, inp)?) };
    // A linear layer whose bias the configuration requires.
    let biased = |m: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
        let b = bias.then(|| src.bias(m, out)).transpose()?;
        bytes.set(bytes.get() + b.as_ref().map_or(0, |_| 4 * out));
        linear(m, out, inp)?.with_bias(b)
    };

    let embed_tokens = matrix("model.embed_tokens", cfg.vocab_size, d)?;
    let embed_positions = cfg
        .learned_positions
        .then(|| matrix("model.embed_positions", cfg.max_position_embeddings, d))
        .transpose()?
        .map(Embedding::new);
    let lm_head = if src.has("lm_head") {
        biased("lm_head", cfg.vocab_size, d, cfg.phi_block)?
    } else if cfg.tie_word_embeddings {
        Linear::new(embed_tokens.clone())?
    } else {
        return Err(Error::format(
            src.path(),
            None,
            "tensor 'lm_head.weight' is missing and the embeddings are not tied",
        ));
    };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        let optional_norm = |name: &str, dim: usize, present: bool| -> Result<Option<Norm>> {
            present.then(|| norm(&p(name), dim)).transpose()
        };
        // Gemma 3: every `pattern`-th layer is global, the rest slide; a window without a
        // pattern (Mistral) applies to every layer.
        let local = match cfg.sliding_window_pattern {
            Some(n) => (i + 1) % n != 0,
            None => cfg.sliding_window.is_some(),
        };
        // The llama family has one norm before the MLP, which HF calls
        // `post_attention_layernorm`; Gemma's is `pre_feedforward_layernorm`.
        let pre_mlp_norm = if cfg.sandwich_norms {
            "pre_feedforward_layernorm"
        } else {
            "post_attention_layernorm"
        };
        // Phi names the attention output `dense`.
        let o_proj = if cfg.phi_block {
            "self_attn.dense"
        } else {
            "self_attn.o_proj"
        };
        // Phi 3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`: split by
        // rows at load, so the decoder sees the usual projections.
        let (q_proj, k_proj, v_proj) = if cfg.fused_projections {
            let qkv_name = p("self_attn.qkv_proj");
            let qkv = matrix(&qkv_name, (nh + 2 * nkv) * hd, d)?;
            // GPT-2's fused projection has a fused bias, split the same way.
            let bias = cfg
                .qkv_bias
                .then(|| src.bias(&qkv_name, (nh + 2 * nkv) * hd))
                .transpose()?;
            bytes.set(bytes.get() + bias.as_ref().map_or(0, |_| 4 * (nh + 2 * nkv) * hd));
            let part = |start: usize, len: usize| -> Result<Linear> {
                let b = bias.as_ref().map(|b| b.narrow(0, start, len)).transpose()?;
                Linear::new(qkv.rows(start, len)?)?.with_bias(b)
            };
            (
                part(0, nh * hd)?,
                part(nh * hd, nkv * hd)?,
                part((nh + nkv) * hd, nkv * hd)?,
            )
        } else {
            (
                biased(&p("self_attn.q_proj"), nh * hd, d, cfg.qkv_bias)?,
                biased(&p("self_attn.k_proj"), nkv * hd, d, cfg.qkv_bias)?,
                biased(&p("self_attn.v_proj"), nkv * hd, d, cfg.qkv_bias)?,
            )
        };
        // A gated MLP under `prefix` (`mlp` or one of its experts) of width `width`.
        let gated = |prefix: &str, width: usize| -> Result<Mlp> {
            let (gate_proj, up_proj) = if cfg.fused_projections {
                let gate_up = matrix(&p(&format!("{prefix}.gate_up_proj")), 2 * width, d)?;
                (
                    Linear::new(gate_up.rows(0, width)?)?,
                    Linear::new(gate_up.rows(width, width)?)?,
                )
            } else {
                (
                    biased(&p(&format!("{prefix}.gate_proj")), width, d, cfg.mlp_bias)?,
                    biased(&p(&format!("{prefix}.up_proj")), width, d, cfg.mlp_bias)?,
                )
            };
            Ok(Mlp {
                gate_proj,
                up_proj,
                down_proj: biased(&p(&format!("{prefix}.down_proj")), d, width, cfg.mlp_bias)?,
                act: cfg.hidden_act,
            })
        };
        let mlp = match &cfg.moe {
            Some(moe) if moe.is_sparse(i) => FeedForward::Moe(MoeMlp {
                gate: linear(&p("mlp.gate"), moe.num_experts, d)?,
                experts: if src.has(&p("mlp.switch_mlp.gate_proj")) {
                    // mlx-lm's layout: each projection of all experts stacked in one tensor.
                    let (n, w) = (moe.num_experts, moe.moe_intermediate_size);
                    let stack = |name: &str, out: usize, inp: usize| -> Result<Weight> {
                        let w = src.stacked(&p(&format!("mlp.switch_mlp.{name}")), n, out, inp)?;
                        bytes.set(bytes.get() + w.nbytes());
                        Ok(w)
                    };
                    let (gate, up, down) = (
                        stack("gate_proj", w, d)?,
                        stack("up_proj", w, d)?,
                        stack("down_proj", d, w)?,
                    );
                    (0..n)
                        .map(|e| {
                            Ok(Mlp {
                                gate_proj: Linear::new(gate.rows(e * w, w)?)?,
                                up_proj: Linear::new(up.rows(e * w, w)?)?,
                                down_proj: Linear::new(down.rows(e * d, d)?)?,
                                act: cfg.hidden_act,
                            })
                        })
                        .collect::<Result<_>>()?
                } else {
                    (0..moe.num_experts)
                        .map(|e| gated(&format!("mlp.experts.{e}"), moe.moe_intermediate_size))
                        .collect::<Result<_>>()?
                },
                top_k: moe.num_experts_per_tok,
                norm_topk_prob: moe.norm_topk_prob,
            }),
            _ if cfg.plain_mlp => FeedForward::Plain {
                fc1: biased(&p("mlp.fc1"), inter, d, true)?,
                fc2: biased(&p("mlp.fc2"), d, inter, true)?,
                act: cfg.hidden_act,
            },
            _ => FeedForward::Dense(gated("mlp", inter)?),
        };
        progress.advance()?;
        layers.push(Block {
            input_layernorm: norm(&p("input_layernorm"), d)?,
            self_attn: Attention {
                q_proj,
                k_proj,
                v_proj,
                o_proj: biased(&p(o_proj), d, nh * hd, cfg.o_bias)?,
                q_norm: optional_norm("self_attn.q_norm", hd, cfg.use_qk_norm)?,
                k_norm: optional_norm("self_attn.k_norm", hd, cfg.use_qk_norm)?,
                num_heads: nh,
                num_kv_heads: nkv,
                head_dim: hd,
                scale: 1.0 / cfg.query_pre_attn_scalar.sqrt(),
                local,
            },
            post_attention_layernorm: optional_norm(
                "post_attention_layernorm",
                d,
                cfg.sandwich_norms,
            )?,
            // None: Phi's parallel block, whose MLP reads the attention's input.
            pre_feedforward_layernorm: if cfg.phi_block {
                None
            } else {
                Some(norm(&p(pre_mlp_norm), d)?)
            },
            mlp,
            post_feedforward_layernorm: optional_norm(
                "post_feedforward_layernorm",
                d,
                cfg.sandwich_norms,
            )?,
        });
    }
    let final_norm = norm(
        if cfg.phi_block {
            "model.final_layernorm"
        } else {
            "model.norm"
        },
        d,
    )?;
    let position_scale = match cfg.rope_scaling {
        Some(RopeScaling::Linear { factor }) => factor,
        _ => 1.0,
    };
    let rope = Rope::new(
        cfg.rotary_dim,
        cfg.rope_theta,
        rope_factors,
        position_scale,
        cfg.rope_interleaved,
    )
    .with_attention_factor(
        cfg.rope_scaling
            .as_ref()
            .map_or(1.0, super::config::RopeScaling::attention_factor),
    );
    let local_rope = match (cfg.rope_local_base_freq, cfg.sliding_window) {
        (Some(base), _) => Some(Rope::new(
            cfg.rotary_dim,
            base,
            None,
            1.0,
            cfg.rope_interleaved,
        )),
        (None, Some(_)) => Some(rope.clone()),
        (None, None) => None,
    };
    let decoder = Decoder {
        embed_tokens: Embedding::new(embed_tokens),
        embed_positions,
        layers,
        norm: final_norm,
        lm_head,
        rope,
        local_rope,
        config: cfg,
        backend: super::decoder::Backend::cpu(),
    };
    Ok((decoder, bytes.get()))
}

fn model_from_gguf(gguf: &GgufFile, device: &Device, progress: &Progress) -> Result<Model> {
    let cfg = ModelConfig::from_gguf(gguf)?;
    let src = GgufWeights {
        gguf,
        family: cfg.model_type,
        device,
    };
    let rope_factors = match cfg.rope_scaling {
        Some(RopeScaling::Llama3) => {
            let factors = dense(&gguf.tensor("rope_freqs.weight", device)?, device)?;
            if factors.dims() != [cfg.head_dim / 2] {
                return Err(Error::format(
                    &gguf.path,
                    None,
                    format!(
                        "tensor 'rope_freqs.weight' has shape {:?}, expected [{}]",
                        factors.dims(),
                        cfg.head_dim / 2
                    ),
                ));
            }
            Some(factors.to_vec1::<f32>()?)
        }
        _ => None,
    };
    let num_parameters = src.num_parameters();
    let (decoder, weight_bytes) =
        build_decoder(cfg.clone(), &src, rope_factors.as_deref(), progress)?;
    Ok(Model {
        config: cfg,
        path: gguf.path.clone(),
        num_parameters,
        weight_bytes,
        decoder,
    })
}

/// Reads and parses `dir/config.json`.
pub fn read_config_json(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::ModelNotFound {
            path: dir.to_path_buf(),
            message: "no config.json beside the safetensors weights".into(),
        },
        _ => Error::io(&path, e),
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::config("config.json", format!("invalid JSON: {e}")))
}

fn model_from_folder(dir: &Path, progress: &Progress) -> Result<Model> {
    let json = read_config_json(dir)?;
    let cfg = ModelConfig::from_hf(&json)?;
    // llama.cpp's files hold the norm weights as applied; HF checkpoints may not (Gemma).
    let norm_offset = cfg.model_type.traits().norm_offset;
    let src = FolderWeights::open(dir, &json, cfg.model_type, norm_offset)?;
    let num_parameters = src.num_parameters();
    let rope_factors = cfg
        .rope_scaling
        .as_ref()
        .and_then(|r| r.frequency_factors(cfg.rotary_dim, cfg.rope_theta));
    let (decoder, weight_bytes) =
        build_decoder(cfg.clone(), &src, rope_factors.as_deref(), progress)?;
    Ok(Model {
        config: cfg,
        path: dir.to_path_buf(),
        num_parameters,
        weight_bytes,
        decoder,
    })
}

/// What a reference resolves to.
enum ModelFiles {
    Gguf(PathBuf),
    /// A folder with `config.json` and safetensors (HF or MLX layout).
    Folder(PathBuf),
}

fn locate(reference: &Path) -> Result<ModelFiles> {
    if reference.is_dir() && reference.join("config.json").is_file() && has_safetensors(reference) {
        return Ok(ModelFiles::Folder(reference.to_path_buf()));
    }
    if reference.is_dir() && has_safetensors(reference) {
        // Weights without a config: say what is missing rather than "no .gguf".
        read_config_json(reference)?;
    }
    resolve_model_path(reference).map(ModelFiles::Gguf)
}

fn has_safetensors(dir: &Path) -> bool {
    dir.join("model.safetensors.index.json").is_file()
        || std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .filter_map(std::result::Result::ok)
                .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        })
}

fn model_from(files: &ModelFiles, progress: &Progress) -> Result<Model> {
    match files {
        ModelFiles::Gguf(path) => model_from_gguf(&GgufFile::open(path)?, &Device::Cpu, progress),
        ModelFiles::Folder(dir) => model_from_folder(dir, progress),
    }
}

/// Loads the model `reference` points at (weights only): a `.gguf` file, a directory
/// holding one, or a directory with `config.json` and safetensors (HF or MLX layout).
pub fn load_model(reference: &Path) -> Result<Model> {
    load_model_with(reference, &Progress::default())
}

/// [`load_model`], reporting layers built to `progress` (and stopping with
/// `Error::Cancelled` when it is cancelled).
pub fn load_model_with(reference: &Path, progress: &Progress) -> Result<Model> {
    crate::threads::init_thread_pool();
    model_from(&locate(reference)?, progress)
}

/// The tokenizer for `reference`: `tokenizer.json` beside the weights when `reference` is a
/// directory that has one, else the GGUF metadata.
fn tokenizer_for(reference: &Path, files: &ModelFiles) -> Result<Tokenizer> {
    match files {
        _ if has_tokenizer_files(reference) => Tokenizer::from_dir(reference),
        ModelFiles::Gguf(path) => Tokenizer::from_gguf(&GgufFile::open(path)?),
        ModelFiles::Folder(dir) => Err(Error::ModelNotFound {
            path: dir.clone(),
            message:
                "no tokenizer.json (or GPT-2's vocab.json and merges.txt) in the model folder \
                 (cortex.load_model loads weights alone)"
                    .into(),
        }),
    }
}

/// Loads model and tokenizer (see [`load_tokenizer`] for where the tokenizer comes from).
pub fn load(reference: &Path) -> Result<(Model, Tokenizer)> {
    load_with(reference, &Progress::default())
}

/// [`load`], reporting layers built to `progress` (see [`load_model_with`]).
pub fn load_with(reference: &Path, progress: &Progress) -> Result<(Model, Tokenizer)> {
    crate::threads::init_thread_pool();
    let files = locate(reference)?;
    let model = model_from(&files, progress)?;
    let tokenizer = tokenizer_for(reference, &files)?;
    Ok((model, tokenizer))
}

/// Loads only the tokenizer of `reference` (no weights are read): from `tokenizer.json`
/// when `reference` is a directory that has one, else from the GGUF metadata.
pub fn load_tokenizer(reference: &Path) -> Result<Tokenizer> {
    if has_tokenizer_files(reference) {
        return Tokenizer::from_dir(reference);
    }
    tokenizer_for(reference, &locate(reference)?)
}

/// A folder with `tokenizer.json`, or GPT-2's `vocab.json` and `merges.txt`.
fn has_tokenizer_files(dir: &Path) -> bool {
    dir.is_dir()
        && (dir.join("tokenizer.json").is_file()
            || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file()))
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file::Value;
    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::formats::gguf::{write_gguf, GgufTensorSpec};
    use crate::model::arch::Family;

    /// A scratch folder for one test.
    fn scratch(name: &str) -> Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("cortex-loader-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(dir)
    }

    /// A one-layer llama-family GGUF (hidden 8, 2 heads of 4, 1 KV head, MLP 16, 16 tokens)
    /// with small f32 weights, `general.architecture` = `arch`, without the tensors `skip`.
    fn tiny_gguf(path: &Path, arch: &str, skip: &str) -> Result<()> {
        let k = |s: &str| format!("{arch}.{s}");
        let metadata = vec![
            (
                "general.architecture".to_string(),
                Value::String(arch.into()),
            ),
            (k("block_count"), Value::U32(1)),
            (k("context_length"), Value::U32(32)),
            (k("embedding_length"), Value::U32(8)),
            (k("feed_forward_length"), Value::U32(16)),
            (k("attention.head_count"), Value::U32(2)),
            (k("attention.head_count_kv"), Value::U32(1)),
            (k("vocab_size"), Value::U32(16)),
        ];
        let specs: Vec<GgufTensorSpec> = [
            ("token_embd.weight", vec![16, 8]),
            ("blk.0.attn_norm.weight", vec![8]),
            ("blk.0.attn_q.weight", vec![8, 8]),
            ("blk.0.attn_k.weight", vec![4, 8]),
            ("blk.0.attn_v.weight", vec![4, 8]),
            ("blk.0.attn_output.weight", vec![8, 8]),
            ("blk.0.ffn_norm.weight", vec![8]),
            ("blk.0.ffn_gate.weight", vec![16, 8]),
            ("blk.0.ffn_up.weight", vec![16, 8]),
            ("blk.0.ffn_down.weight", vec![8, 16]),
            ("output_norm.weight", vec![8]),
        ]
        .into_iter()
        .filter(|(name, _)| *name != skip)
        .map(|(name, dims)| GgufTensorSpec {
            name: name.into(),
            dims,
            dtype: GgmlDType::F32,
        })
        .collect();
        let data = |i: usize| {
            let n: usize = specs[i].dims.iter().product();
            Ok((0..n)
                .flat_map(|x| ((x % 7) as f32 * 0.1 - 0.3).to_le_bytes())
                .collect())
        };
        write_gguf(path, &metadata, &specs, data)
    }

    #[test]
    fn a_gguf_alias_loads_as_its_family() -> Result<()> {
        let dir = scratch("alias")?;
        let path = dir.join("m.gguf");
        tiny_gguf(&path, "mistral", "")?;
        // A folder holding one GGUF resolves to it.
        let model = load_model(&dir)?;
        assert_eq!(model.config.model_type, Family::Llama);
        // Embedding, q and o, k and v, the MLP, three norms.
        let parameters = 16 * 8 + 2 * 8 * 8 + 2 * 4 * 8 + 3 * 16 * 8 + 3 * 8;
        assert_eq!(model.num_parameters, parameters);
        let (logits, rows) = model.forward(&[1, 2, 3], true)?;
        assert_eq!((logits.len(), rows), (3 * 16, 3));
        assert!(logits.iter().all(|x| x.is_finite()));
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))
    }

    #[test]
    fn a_missing_tensor_is_named_at_load() -> Result<()> {
        let dir = scratch("missing")?;
        let path = dir.join("m.gguf");
        tiny_gguf(&path, "llama", "blk.0.ffn_down.weight")?;
        let message = load_model(&path).err().map(|e| e.to_string());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("'blk.0.ffn_down.weight' is missing")),
            "{message:?}"
        );
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))
    }

    #[test]
    fn safetensors_without_config_json_are_refused() -> Result<()> {
        let dir = scratch("no-config")?;
        std::fs::write(dir.join("model.safetensors"), b"").map_err(|e| Error::io(&dir, e))?;
        match load_model(&dir) {
            Err(Error::ModelNotFound { message, .. }) => {
                assert!(message.contains("no config.json"), "{message}");
            }
            other => panic!("expected ModelNotFound, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))
    }
}
