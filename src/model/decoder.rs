//! The one decoder: a pre-norm transformer over a paged KV cache, running the rows of
//! many sequences in one pass — GQA attention with
//! RoPE, a gated MLP, RMSNorm — with the switches each family needs (q/k norms, sandwich
//! norms, embedding scale, sliding-window layers; see `ModelConfig`). Follows HF
//! transformers' `modeling_llama.py` / `modeling_gemma3.py` and llama.cpp's
//! `llm_build_llama` / `llm_build_gemma3`; candle-transformers' `quantized_llama.rs` serves
//! as an independent oracle in `tests/oracle_llama.rs`.

#[cfg(feature = "cuda")]
use std::sync::Arc;

use parking_lot::Mutex;

use crate::engine::kv::{KvDType, KvLayout, KvStorage, Ring, WindowLayers};
use crate::error::{Error, Result};
use crate::model::attention::SeqSpan;
use crate::model::config::ModelConfig;
use crate::model::layers::{Embedding, FeedForward, Linear, Norm, Rope};
use crate::model::ops::{Cpu, Ops};
use crate::quant::kernels::QuantizedRows;

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Per-head RMSNorm of q and k, before RoPE (Gemma 3).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·k.
    pub scale: f64,
    /// A local layer: attends to the last `sliding_window` positions, with the local RoPE.
    pub local: bool,
}

/// One layer. Norm names follow HF Gemma 3; in the llama family only `input_layernorm` and
/// `pre_feedforward_layernorm` (HF llama's `post_attention_layernorm`) exist.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: Norm,
    pub self_attn: Attention,
    /// Applied to the attention output before the residual add (sandwich norms).
    pub post_attention_layernorm: Option<Norm>,
    /// `None` in Phi's parallel block: the MLP reads the attention's (normalised) input and
    /// both outputs join the residual together.
    pub pre_feedforward_layernorm: Option<Norm>,
    pub mlp: FeedForward,
    /// Applied to the MLP output before the residual add (sandwich norms).
    pub post_feedforward_layernorm: Option<Norm>,
}

#[derive(Debug)]
pub struct Decoder {
    /// `[vocab, d]`, kept in its stored form; rows are dequantized on lookup.
    pub embed_tokens: Embedding,
    /// `[context, d]` learned absolute positions (GPT-2), added to the token embeddings.
    pub embed_positions: Option<Embedding>,
    pub layers: Vec<Block>,
    pub norm: Norm,
    /// `[vocab, d]`; shares `embed_tokens` when the embeddings are tied.
    pub lm_head: Linear,
    /// RoPE of global layers, and of local (sliding-window) layers where they differ.
    pub rope: Rope,
    pub local_rope: Option<Rope>,
    pub config: ModelConfig,
    /// Where the weights live and the passes run.
    pub backend: Backend,
}

/// Where a decoder runs, with the buffers its forward pass keeps between passes.
#[derive(Debug)]
pub enum Backend {
    Cpu(Box<Mutex<Workspace<Vec<f32>, QuantizedRows>>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<OnGpu>),
}

impl Backend {
    pub fn cpu() -> Backend {
        Backend::Cpu(Box::default())
    }
}

/// A decoder's GPU state: the GPU, the uploads of its small parameters, its buffers.
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub struct OnGpu {
    pub gpu: Arc<crate::cuda::Gpu>,
    params: crate::cuda::Params,
    workspace: Mutex<Workspace<crate::cuda::GpuBuf, crate::cuda::Scratch>>,
    /// Decode steps captured as CUDA graphs, when every layer allows it.
    graphs: Option<crate::cuda::graph::Graphs>,
}

/// The buffers a forward pass computes in, kept from one pass to the next: once they have
/// grown to the batch's size, decoding allocates nothing per token for them. `B` is the
/// backend's [`Ops::Buf`], `S` its [`Ops::Scratch`].
#[derive(Debug, Default)]
pub struct Workspace<B, S> {
    positions: Vec<usize>,
    /// `[rows, d]`: the residual stream.
    x: B,
    /// `[rows, d]`: its normalised copy, a sublayer's input.
    normed: B,
    /// `[rows, heads, head_dim]` and `[rows, kv_heads, head_dim]`.
    q: B,
    k: B,
    v: B,
    /// `[rows, heads * head_dim]`: the attention's output.
    attn: B,
    /// `[rows, d]`: a sublayer's output.
    h: B,
    /// `[rows, d]`: the MLP's output in a parallel block (Phi).
    mlp: B,
    /// `[rows, intermediate]`: the gate's projection, then the gated activations.
    gate: B,
    /// `[rows, intermediate]`.
    up: B,
    scratch: S,
}

/// One forward pass over several sequences: their tokens side by side, as `seqs`
/// describes them, and the rows whose logits are wanted.
#[derive(Debug)]
pub struct Batch<'a> {
    pub tokens: Vec<u32>,
    pub seqs: Vec<SeqSpan<'a>>,
    pub logits_rows: Vec<u32>,
    /// One per row of `logits_rows` when each row's token is all that is wanted: a GPU
    /// pass then draws the tokens where the logits are and returns only them
    /// ([`Logits::drawn`]); the host sampler would draw the same ones.
    pub draws: Option<Vec<Draw>>,
}

/// How a pass draws a row's token where its logits are (kernels.cu `sample_rows`): what
/// the host sampler (`engine::sampling`) draws from the same logits, bit for bit.
#[derive(Debug, Clone, PartialEq)]
pub struct Draw {
    /// 0: the argmax after the penalties; else at least `sampling::MIN_TEMPERATURE`.
    pub temperature: f32,
    /// 0: every token.
    pub top_k: u32,
    pub top_p: f32,
    /// The least weight min-p keeps (`sampling::min_p_floor`; 0: no floor).
    pub min_p_floor: u64,
    /// The 64-bit draw of the token's position.
    pub draw: u64,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `(token, times generated)` of each distinct token the penalties change.
    pub penalized: Vec<(u32, u32)>,
}

/// The parameters are validated finite, so equality is total.
impl Eq for Draw {}

impl Draw {
    /// The argmax, and nothing else.
    pub fn argmax() -> Draw {
        Draw {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p_floor: 0,
            draw: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalized: Vec::new(),
        }
    }
}

/// What a forward pass returns: the logits of `Batch::logits_rows`, on the host,
/// `[rows][vocab]` row-major in one allocation (the sampler reads rows in place), or, for
/// a GPU pass with `Batch::draws`, only each row's token.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    /// `[rows][vocab]`; empty when only the tokens came back.
    values: Vec<f32>,
    rows: usize,
    vocab: usize,
    /// Each row's token, drawn where the logits are (`u32::MAX`: the row held a NaN).
    drawn: Option<Vec<u32>>,
}

impl Logits {
    /// `values: [rows][vocab]`.
    pub fn new(values: Vec<f32>, rows: usize, vocab: usize) -> Result<Logits> {
        if vocab == 0 || values.len() != rows * vocab {
            return Err(Error::Internal(format!(
                "{} logits for {rows} rows of a vocabulary of {vocab}",
                values.len()
            )));
        }
        Ok(Logits {
            values,
            rows,
            vocab,
            drawn: None,
        })
    }

    /// Only each row's token, drawn where the logits are (`u32::MAX` for a row that held
    /// a NaN).
    pub fn drawn_only(ids: Vec<u32>, vocab: usize) -> Logits {
        Logits {
            values: Vec::new(),
            rows: ids.len(),
            vocab,
            drawn: Some(ids),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Every value, row after row (none when only the tokens came back).
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Each row's token, when that is all the pass returned.
    pub fn drawn(&self) -> Option<&[u32]> {
        self.drawn.as_deref()
    }

    pub fn into_values(self) -> Vec<f32> {
        self.values
    }
}

impl Attention {
    /// `ws.normed: [rows, d]` → `ws.h: [rows, d]`; `positions[r]` is row `r`'s position;
    /// `rope` and `window` are the layer's (global or local).
    fn forward<O: Ops>(
        &self,
        o: &O,
        ws: &mut Workspace<O::Buf, O::Scratch>,
        layer: usize,
        batch: &Batch<'_>,
        (rope, window): (&Rope, Option<usize>),
        kv: &mut KvStorage,
    ) -> Result<()> {
        let rows = ws.positions.len();
        let Workspace {
            positions,
            normed,
            q,
            k,
            v,
            attn,
            h,
            scratch,
            ..
        } = ws;
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj];
        o.linear(
            projections,
            normed,
            rows,
            [&mut *q, &mut *k, &mut *v],
            scratch,
        )?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            o.norm(qn, q)?;
            o.norm(kn, k)?;
        }
        o.attention(
            kv,
            layer,
            &batch.seqs,
            (rope, positions),
            (q, k, v),
            self.num_heads,
            self.scale as f32,
            window,
            attn,
            scratch,
        )?;
        o.linear([&self.o_proj], attn, rows, [h], scratch)
    }
}

impl FeedForward {
    /// `ws.normed: [rows, d]` → `out: [rows, d]`.
    fn forward<O: Ops>(
        &self,
        o: &O,
        ws: &mut Workspace<O::Buf, O::Scratch>,
        rows: usize,
        out: Ffn,
    ) -> Result<()> {
        let Workspace {
            normed,
            h,
            mlp,
            gate,
            up,
            scratch,
            ..
        } = ws;
        let out = match out {
            Ffn::H => h,
            Ffn::Mlp => mlp,
        };
        match self {
            FeedForward::Dense(m) => {
                o.linear(
                    [&m.gate_proj, &m.up_proj],
                    normed,
                    rows,
                    [&mut *gate, &mut *up],
                    scratch,
                )?;
                o.gated(m.act, gate, up, scratch)?;
                o.linear([&m.down_proj], gate, rows, [out], scratch)
            }
            FeedForward::Plain { fc1, fc2, act } => {
                o.linear([fc1], normed, rows, [&mut *gate], scratch)?;
                o.activation(*act, gate)?;
                o.linear([fc2], gate, rows, [out], scratch)
            }
            FeedForward::Moe(moe) => o.moe(moe, normed, rows, out),
        }
    }
}

/// Which workspace buffer a feed-forward writes: `h` (after the attention's residual), or
/// `mlp` (a parallel block, whose `h` still holds the attention's output).
#[derive(Debug, Clone, Copy)]
enum Ffn {
    H,
    Mlp,
}

impl Decoder {
    /// Runs a batch, reading and extending each sequence's keys and values in `kv` (whose
    /// block tables must cover every position of the batch). Returns logits
    /// `[logits_rows.len()][vocab]`.
    pub fn forward(&self, batch: &Batch<'_>, kv: &mut KvStorage) -> Result<Logits> {
        match &self.backend {
            Backend::Cpu(workspace) => {
                // Another pass on this decoder (another engine) holds the buffers: use
                // fresh ones.
                let mut held = workspace.try_lock();
                let mut fresh = Workspace::default();
                let ws = held.as_deref_mut().unwrap_or(&mut fresh);
                self.run(&Cpu, ws, batch, kv)
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(g) => self.forward_gpu(g, batch, kv),
        }
    }

    /// [`Decoder::forward`] on the GPU: decode steps through CUDA graphs where the layers
    /// allow (see `cuda::graph`), every other pass launched op by op.
    #[cfg(feature = "cuda")]
    fn forward_gpu(&self, g: &OnGpu, batch: &Batch<'_>, kv: &mut KvStorage) -> Result<Logits> {
        use crate::cuda::graph::Key;
        use crate::cuda::{Meta, Pass};
        let gpu = &*g.gpu;
        gpu.bind()?;
        // GPU passes of one decoder take turns (one stream runs them in order anyway); the
        // buffers are kept.
        let mut ws = g.workspace.lock();
        let graphs = g
            .graphs
            .as_ref()
            .filter(|_| !crate::model::profile::profiling());
        let key = graphs.and_then(|graphs| {
            Key::of(gpu, batch, kv, graphs.max_rows()).filter(|&k| graphs.seen_before(k))
        });
        let (Some(graphs), Some(key)) = (graphs, key) else {
            let meta = Meta::new(gpu, batch, kv)?;
            return self.run(&Pass::new(gpu, &g.params, &meta), &mut ws, batch, kv);
        };
        let vocab = self.config.vocab_size;
        let mut step = graphs.take(gpu, key, vocab)?;
        step.meta.update(gpu, batch, kv)?;
        self.embed(&Pass::new(gpu, &g.params, &step.meta), &mut ws, batch)?;
        if !step.is_captured() {
            let captured = step.capture(gpu, |step| {
                let pass = Pass::new(gpu, &g.params, &step.meta);
                self.layers_and_head(&pass, &mut ws, batch, kv, &mut step.logits)
            });
            if let Err(e) = captured {
                // Nothing ran while capturing: the step runs op by op instead.
                graphs.fail(&e);
                let meta = Meta::new(gpu, batch, kv)?;
                return self.run(&Pass::new(gpu, &g.params, &meta), &mut ws, batch, kv);
            }
        }
        step.launch()?;
        let logits = if let Some(draws) = &batch.draws {
            gpu.sample_rows(step.logits.slice()?, vocab, draws)
                .map(|ids| Logits::drawn_only(ids, vocab))
        } else {
            gpu.download(step.logits.slice()?, key.rows * vocab)
                .and_then(|values| Logits::new(values, key.rows, vocab))
        };
        graphs.put(key, step);
        logits
    }

    /// The GPU this decoder runs on, if any.
    #[cfg(feature = "cuda")]
    pub fn gpu(&self) -> Option<&Arc<crate::cuda::Gpu>> {
        match &self.backend {
            Backend::Cuda(g) => Some(&g.gpu),
            Backend::Cpu(_) => None,
        }
    }

    /// Whether the decoder runs on a GPU.
    pub fn on_gpu(&self) -> bool {
        !matches!(self.backend, Backend::Cpu(_))
    }

    /// This decoder with its linear layers uploaded to `gpu` (their host copies go with
    /// `self`) and its embeddings copied there (the host keeps them too); norms and RoPE
    /// frequencies go up on first use. Returns it and the change in weight bytes.
    #[cfg(feature = "cuda")]
    pub fn to_gpu(self, gpu: Arc<crate::cuda::Gpu>) -> Result<(Decoder, isize)> {
        if let Some(a) = self
            .layers
            .iter()
            .map(|b| &b.self_attn)
            .find(|a| !crate::cuda::attention_takes(a.head_dim))
        {
            return Err(Error::config(
                "head_dim",
                format!(
                    "{} on the GPU, whose attention takes multiples of 8 up to 256",
                    a.head_dim
                ),
            ));
        }
        gpu.bind()?;
        // Decode steps go through CUDA graphs up to the rows at which every layer runs our
        // own kernels, when no layer routes on the host (a mixture of experts).
        let moe = self
            .layers
            .iter()
            .any(|b| matches!(b.mlp, FeedForward::Moe(_)));
        let mut graph_rows = if moe { 0 } else { usize::MAX };
        let (mut decoder, mut delta) = self.map_linears(|l, _| {
            let up = l.to_gpu(&gpu)?;
            graph_rows = graph_rows.min(up.gpu().map_or(0, crate::cuda::GpuLinear::graph_rows));
            Ok(up)
        })?;
        let (embed_tokens, bytes) = decoder.embed_tokens.to_gpu(&gpu)?;
        decoder.embed_tokens = embed_tokens;
        delta += bytes as isize;
        if let Some(table) = &decoder.embed_positions {
            let (table, bytes) = table.to_gpu(&gpu)?;
            decoder.embed_positions = Some(table);
            delta += bytes as isize;
        }
        decoder.backend = Backend::Cuda(Box::new(OnGpu {
            gpu,
            params: crate::cuda::Params::default(),
            workspace: Mutex::default(),
            graphs: (graph_rows > 0).then(|| crate::cuda::graph::Graphs::new(graph_rows)),
        }));
        Ok((decoder, delta))
    }

    /// The forward pass, on backend `o`.
    fn run<O: Ops>(
        &self,
        o: &O,
        ws: &mut Workspace<O::Buf, O::Scratch>,
        batch: &Batch<'_>,
        kv: &mut KvStorage,
    ) -> Result<Logits> {
        self.embed(o, ws, batch)?;
        if batch.logits_rows.is_empty() {
            self.layers(o, ws, batch, kv)?;
            // A step of prompt chunks only: the cache is filled, no logits are wanted.
            return Logits::new(Vec::new(), 0, self.config.vocab_size);
        }
        let mut logits = O::Buf::default();
        self.layers_and_head(o, ws, batch, kv, &mut logits)?;
        o.to_host(
            logits,
            batch.logits_rows.len(),
            self.config.vocab_size,
            batch.draws.as_deref(),
        )
    }

    /// The batch's tokens checked and embedded into `ws.x`.
    fn embed<O: Ops>(
        &self,
        o: &O,
        ws: &mut Workspace<O::Buf, O::Scratch>,
        batch: &Batch<'_>,
    ) -> Result<()> {
        let rows = batch.tokens.len();
        if rows == 0 {
            return Err(Error::param("token_ids", "at least one token is required"));
        }
        let vocab = self.config.vocab_size;
        if let Some(bad) = batch.tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::param(
                "token_ids",
                format!("token id {bad} is out of vocabulary (size {vocab})"),
            ));
        }
        ws.positions.clear();
        ws.positions
            .extend(batch.seqs.iter().flat_map(|s| s.start..s.start + s.len));
        if ws.positions.len() != rows {
            return Err(Error::Internal(format!(
                "batch of {rows} tokens describes {} positions",
                ws.positions.len()
            )));
        }
        let d = self.config.hidden_size;
        o.embed(&self.embed_tokens, &batch.tokens, d, &mut ws.x)?;
        if let Some(table) = &self.embed_positions {
            let context_length = self.config.max_position_embeddings;
            if let Some(&p) = ws.positions.iter().find(|&&p| p >= context_length) {
                return Err(Error::ContextLength {
                    prompt_tokens: p + 1,
                    context_length,
                });
            }
            let ids: Vec<u32> = ws.positions.iter().map(|&p| p as u32).collect();
            o.embed(table, &ids, d, &mut ws.h)?;
            o.add(&mut ws.x, &ws.h, None)?;
        }
        if self.config.scale_embeddings {
            // Gemma: HF computes the factor in the activation dtype, f32 here.
            o.scale(&mut ws.x, (d as f32).sqrt())?;
        }
        Ok(())
    }

    /// The layers over the embedded batch, then the output head on the wanted rows into
    /// `logits: [logits_rows, vocab]`.
    fn layers_and_head<O: Ops>(
        &self,
        o: &O,
        ws: &mut Workspace<O::Buf, O::Scratch>,
        batch: &Batch<'_>,
        kv: &mut KvStorage,
        logits: &mut O::Buf,
    ) -> Result<()> {
        self.layers(o, ws, batch, kv)?;
        // The wanted rows, normalised, through the head.
        let rows = batch.tokens.len();
        let all = batch.logits_rows.len() == rows
            && batch
                .logits_rows
                .iter()
                .enumerate()
                .all(|(i, &r)| r as usize == i);
        if all {
            o.norm_into(&self.norm, &ws.x, &mut ws.normed, &mut ws.scratch)?;
        } else {
            let d = self.config.hidden_size;
            o.gather_rows(&ws.x, &batch.logits_rows, d, &mut ws.normed)?;
            o.norm(&self.norm, &mut ws.normed)?;
        }
        let n = batch.logits_rows.len();
        o.linear([&self.lm_head], &ws.normed, n, [logits], &mut ws.scratch)
    }

    /// The layers over the embedded batch in `ws.x`.
    fn layers<O: Ops>(
        &self,
        o: &O,
        ws: &mut Workspace<O::Buf, O::Scratch>,
        batch: &Batch<'_>,
        kv: &mut KvStorage,
    ) -> Result<()> {
        let rows = batch.tokens.len();
        // A layer's residual branches (`ws.h`, and `ws.mlp` in a parallel block) are added
        // into `ws.x` together with the next layer's input norm.
        let mut pending: Option<bool> = None;
        for (i, block) in self.layers.iter().enumerate() {
            let attn = &block.self_attn;
            let (rope, window) = if attn.local {
                let rope = self.local_rope.as_ref().unwrap_or(&self.rope);
                (rope, self.config.sliding_window)
            } else {
                (&self.rope, None)
            };
            let ln = &block.input_layernorm;
            match pending.take() {
                None => o.norm_into(ln, &ws.x, &mut ws.normed, &mut ws.scratch)?,
                Some(parallel) => {
                    let branches = (&ws.h, parallel.then_some(&ws.mlp));
                    o.add_norm(&mut ws.x, branches, ln, &mut ws.normed, &mut ws.scratch)?;
                }
            }
            attn.forward(o, ws, i, batch, (rope, window), kv)?;
            if let Some(norm) = &block.post_attention_layernorm {
                o.norm(norm, &mut ws.h)?;
            }
            let Some(pre_mlp) = &block.pre_feedforward_layernorm else {
                // Parallel block: the MLP reads the attention's input too.
                block.mlp.forward(o, ws, rows, Ffn::Mlp)?;
                pending = Some(true);
                continue;
            };
            o.add_norm(
                &mut ws.x,
                (&ws.h, None),
                pre_mlp,
                &mut ws.normed,
                &mut ws.scratch,
            )?;
            block.mlp.forward(o, ws, rows, Ffn::H)?;
            if let Some(norm) = &block.post_feedforward_layernorm {
                o.norm(norm, &mut ws.h)?;
            }
            pending = Some(false);
        }
        if let Some(parallel) = pending {
            o.add(&mut ws.x, &ws.h, parallel.then_some(&ws.mlp))?;
        }
        Ok(())
    }

    /// A copy whose linear layers are requantized to MLX affine groups: `bits` for every
    /// layer, `head_bits` for the output head. Embeddings and norms are shared as they
    /// are. Returns the decoder and the change in weight bytes.
    pub fn requantized(
        &self,
        bits: u32,
        head_bits: u32,
        group_size: usize,
    ) -> Result<(Decoder, isize)> {
        self.map_linears(|l, head| l.requantized(if head { head_bits } else { bits }, group_size))
    }

    /// A copy whose linear layers hold their weights as f32 values, computed in f32 (a
    /// reference for the quantized kernels, which round activations to 8 bits). Returns
    /// the decoder and the change in weight bytes.
    pub fn dequantized(&self) -> Result<(Decoder, isize)> {
        self.map_linears(|l, _| l.dequantized())
    }

    /// A copy with `f(layer, is_output_head)` applied to every linear layer, and the change
    /// in weight bytes. Embeddings and norms are shared as they are.
    fn map_linears(
        &self,
        mut f: impl FnMut(&Linear, bool) -> Result<Linear>,
    ) -> Result<(Decoder, isize)> {
        if self.on_gpu() {
            // Requantizing reads host weights; a GPU decoder has none left.
            return Err(Error::param(
                "device",
                "a model on the GPU cannot be requantized or dequantized; load it on the CPU",
            ));
        }
        let mut delta = 0isize;
        let mut f = |l: &Linear, head: bool| -> Result<Linear> {
            let new = f(l, head)?;
            delta += new.nbytes() as isize - l.nbytes() as isize;
            Ok(new)
        };
        let mut layers = Vec::with_capacity(self.layers.len());
        for block in &self.layers {
            let mut f = |l: &Linear| f(l, false);
            let a = &block.self_attn;
            let self_attn = Attention {
                q_proj: f(&a.q_proj)?,
                k_proj: f(&a.k_proj)?,
                v_proj: f(&a.v_proj)?,
                o_proj: f(&a.o_proj)?,
                ..a.clone()
            };
            let mlp = block.mlp.map(&mut f)?;
            layers.push(Block {
                self_attn,
                mlp,
                ..block.clone()
            });
        }
        let lm_head = f(&self.lm_head, true)?;
        let decoder = Decoder {
            embed_tokens: self.embed_tokens.clone(),
            embed_positions: self.embed_positions.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head,
            rope: self.rope.clone(),
            local_rope: self.local_rope.clone(),
            config: self.config.clone(),
            backend: Backend::cpu(),
        };
        Ok((decoder, delta))
    }

    /// Whether the linear layers hold quantized blocks rather than float values, judged by
    /// the first attention projection (a mixed GGUF keeps its norms and sometimes its
    /// embeddings or head as floats, never its attention). This is what picks the KV
    /// cache's dtype ([`Decoder::kv_dtype`]).
    pub fn quantized(&self) -> bool {
        !self
            .layers
            .first()
            .is_some_and(|b| b.self_attn.q_proj.is_float())
    }

    /// How the cache stores keys and values: f16 for quantized weights (half the memory
    /// and half the bytes each decoded token reads), f32 for float weights (whose
    /// computation is the exact reference for the quantized ones).
    pub fn kv_dtype(&self) -> KvDType {
        #[cfg(feature = "cuda")]
        if self.on_gpu() {
            // On the GPU: bf16 for bf16 checkpoints (their range), f16 otherwise.
            let bf16 = self
                .layers
                .first()
                .is_some_and(|b| b.self_attn.q_proj.is_bf16());
            return if bf16 { KvDType::BF16 } else { KvDType::F16 };
        }
        if self.quantized() {
            KvDType::F16
        } else {
            KvDType::F32
        }
    }

    /// Bytes of keys and values one cached position takes, over all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        let a = &self.layers[0].self_attn;
        KvStorage::bytes_per_token(
            self.kv_dtype(),
            self.layers.len(),
            a.num_kv_heads,
            a.head_dim,
        )
    }

    /// The sliding-window layers, if any: which they are, and their window.
    pub fn window_layers(&self) -> Option<(Vec<bool>, usize)> {
        let window = self.config.sliding_window?;
        let local: Vec<bool> = self.layers.iter().map(|l| l.self_attn.local).collect();
        local.contains(&true).then_some((local, window))
    }

    /// A cache for these layers: `num_blocks` blocks of `block_size` positions; with
    /// `window_blocks`, the sliding-window layers keep only their window, in that many
    /// blocks of their own.
    pub fn new_storage(
        &self,
        num_blocks: usize,
        block_size: usize,
        ring: Option<Ring>,
        window_blocks: Option<usize>,
    ) -> Result<KvStorage> {
        let a = &self.layers[0].self_attn;
        let layout = KvLayout {
            block_size,
            kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            ring,
        };
        let windows = match (window_blocks, self.window_layers()) {
            (Some(num_blocks), Some((layers, window))) => Some(WindowLayers {
                layers,
                window,
                num_blocks,
            }),
            (None, _) => None,
            (Some(_), None) => {
                return Err(Error::Internal(
                    "window blocks for a model without windows".into(),
                ))
            }
        };
        #[cfg(feature = "cuda")]
        if let Backend::Cuda(g) = &self.backend {
            return KvStorage::on_gpu(
                g.gpu.clone(),
                self.kv_dtype(),
                self.layers.len(),
                num_blocks,
                layout,
                windows,
            );
        }
        KvStorage::with_windows(
            self.kv_dtype(),
            self.layers.len(),
            num_blocks,
            layout,
            windows,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::engine::testing::tiny_model;
    use crate::error::Result;

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    /// On the tiny llama, float and 4-bit: a prompt run whole, run as a prefill then one
    /// decode step at a time, and run side by side with another sequence of a different
    /// length in one batch, gives the same logits at every position.
    #[test]
    fn one_pass_steps_and_batches_agree() -> Result<()> {
        for variant in ["source", "q4g32"] {
            let model = tiny_model(variant)?;
            let vocab = model.config.vocab_size;
            let a: Vec<u32> = (0..13).map(|i| (i * 7 + 3) % vocab as u32).collect();
            let b: Vec<u32> = (0..5).map(|i| (i * 11 + 1) % vocab as u32).collect();
            let (whole, rows) = model.forward(&a, true)?;
            assert_eq!(rows, a.len());
            // Prefill 4 tokens, then one token per step.
            let mut cache = model.new_cache()?;
            let mut stepped = model
                .forward_with_cache(&a[..4], &mut cache, true)?
                .into_values();
            for &t in &a[4..] {
                stepped.extend(
                    model
                        .forward_with_cache(&[t], &mut cache, false)?
                        .into_values(),
                );
            }
            assert_eq!(cache.len(), a.len());
            assert!(
                close(&whole, &stepped, 1e-4),
                "{variant}: steps differ from one pass"
            );
            // Batched with `b`: `a`'s rows first, then `b`'s.
            let (batched, rows) = model.forward_batch(&[&a, &b], true)?;
            assert_eq!(rows, a.len() + b.len());
            let (alone_b, _) = model.forward(&b, true)?;
            let (ba, bb) = batched.split_at(a.len() * vocab);
            assert!(close(ba, &whole, 1e-4), "{variant}: batching changed a");
            assert!(close(bb, &alone_b, 1e-4), "{variant}: batching changed b");
        }
        Ok(())
    }
}
