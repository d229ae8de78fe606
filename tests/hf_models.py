"""Tiny random-weight models in Hugging Face layout (config.json + safetensors, optionally
sharded with an index, optionally a word-level tokenizer.json), written by the tests, with
the same weights under the numpy reference's names (``numpy_reference.forward``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors_io as st
from numpy_reference import Family

TINY = {"hidden": 64, "inter": 128, "layers": 2, "heads": 4, "kv": 2, "vocab": 96}
HEAD_DIM = TINY["hidden"] // TINY["heads"]
#: Gemma 3: 7 layers so that layer 5 is global and the others slide over 3 positions.
GEMMA_LAYERS, GEMMA_WINDOW = 7, 3


#: Qwen 3 MoE: experts per layer, experts per token, expert width.
EXPERTS, TOP_K, EXPERT_WIDTH = 4, 2, 32


def family(model_type: str = "llama") -> Family:
    """The reference's description of a tiny model of `model_type` (HF row order: NeoX RoPE)."""
    if model_type == "gpt2":
        return Family(
            heads=TINY["heads"], kv_heads=TINY["heads"], head_dim=HEAD_DIM, eps=1e-5, theta=0.0,
            interleaved=False, gpt2=True,
        )  # fmt: skip
    if model_type == "phi":
        return Family(
            heads=TINY["heads"], kv_heads=TINY["heads"], head_dim=HEAD_DIM, eps=1e-5, theta=10000.0,
            interleaved=False, phi=True, rotary_dim=HEAD_DIM // 2,
        )  # fmt: skip
    if model_type == "qwen3_moe":
        return Family(
            heads=TINY["heads"], kv_heads=TINY["kv"], head_dim=HEAD_DIM, eps=1e-5, theta=10000.0,
            interleaved=False, qk_norm=True, moe=(TOP_K, True),
        )  # fmt: skip
    if model_type == "gemma3_text":
        return Family(
            heads=TINY["heads"], kv_heads=TINY["kv"], head_dim=HEAD_DIM, eps=1e-6, theta=1e6,
            interleaved=False, gemma=True, window=GEMMA_WINDOW, local_theta=10000.0,
        )  # fmt: skip
    return Family(
        heads=TINY["heads"], kv_heads=TINY["kv"], head_dim=HEAD_DIM, eps=1e-5, theta=10000.0,
        interleaved=False, qk_norm=model_type == "qwen3",
    )  # fmt: skip


def write_tiny_hf(
    folder: Path, seed: int = 0, shards: int = 2, model_type: str = "llama", tokenizer: str | None = None
) -> dict[str, np.ndarray]:
    """Writes the model; returns its weights under the reference's (GGUF-style) names.

    `model_type` picks the family's extras: qwen2 has q/k/v biases, qwen3 per-head q/k
    RMSNorm, qwen3_moe that plus a mixture of experts in every layer, phi3 fused qkv and
    gate_up projections (all these untie the output head),
    gemma3_text its norms, scaled embeddings and sliding-window layers. `tokenizer`: None, "word" or "bpe"."""
    rng = np.random.default_rng(seed)
    d, i, hd = TINY["hidden"], TINY["inter"], HEAD_DIM
    hf: dict[str, np.ndarray] = {}
    ref: dict[str, np.ndarray] = {}

    def t(hf_name: str, ref_name: str, *shape: int, scale: float = 0.2, offset: float = 0.0) -> None:
        a = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
        hf[hf_name], ref[ref_name] = a, a

    if model_type in ("phi", "gpt2"):
        ref = (_write_tiny_phi if model_type == "phi" else _write_tiny_gpt2)(folder, rng, shards)
        _write_tokenizer(folder, tokenizer)
        return ref
    qwen = model_type in ("qwen2", "qwen3", "qwen3_moe")
    moe = model_type == "qwen3_moe"
    gemma = model_type == "gemma3_text"
    phi3 = model_type == "phi3"
    layers = GEMMA_LAYERS if gemma else TINY["layers"]

    def norm(hf_name: str, ref_name: str, dim: int) -> None:
        # Gemma stores `w` and scales by `1 + w`; the reference multiplies by what it is given.
        t(hf_name, ref_name, dim, scale=0.1, offset=0.0 if gemma else 1.0)
        if gemma:
            ref[ref_name] = hf[hf_name] + 1.0

    t("model.embed_tokens.weight", "token_embd.weight", TINY["vocab"], d, scale=0.5)
    for n in range(layers):
        p, g = f"model.layers.{n}.", f"blk.{n}."
        norm(p + "input_layernorm.weight", g + "attn_norm.weight", d)
        t(p + "self_attn.q_proj.weight", g + "attn_q.weight", TINY["heads"] * hd, d)
        t(p + "self_attn.k_proj.weight", g + "attn_k.weight", TINY["kv"] * hd, d)
        t(p + "self_attn.v_proj.weight", g + "attn_v.weight", TINY["kv"] * hd, d)
        if model_type == "qwen2":
            t(p + "self_attn.q_proj.bias", g + "attn_q.bias", TINY["heads"] * hd, scale=0.5)
            t(p + "self_attn.k_proj.bias", g + "attn_k.bias", TINY["kv"] * hd, scale=0.5)
            t(p + "self_attn.v_proj.bias", g + "attn_v.bias", TINY["kv"] * hd, scale=0.5)
        if model_type in ("qwen3", "qwen3_moe") or gemma:
            norm(p + "self_attn.q_norm.weight", g + "attn_q_norm.weight", hd)
            norm(p + "self_attn.k_norm.weight", g + "attn_k_norm.weight", hd)
        t(p + "self_attn.o_proj.weight", g + "attn_output.weight", d, TINY["heads"] * hd)
        if gemma:
            norm(p + "post_attention_layernorm.weight", g + "post_attention_norm.weight", d)
            norm(p + "pre_feedforward_layernorm.weight", g + "ffn_norm.weight", d)
            norm(p + "post_feedforward_layernorm.weight", g + "post_ffw_norm.weight", d)
        else:
            norm(p + "post_attention_layernorm.weight", g + "ffn_norm.weight", d)
        if moe:
            t(p + "mlp.gate.weight", g + "ffn_gate_inp.weight", EXPERTS, d, scale=1.0)
            for e in range(EXPERTS):
                x, y = f"{p}mlp.experts.{e}.", f"{g}expert.{e}."
                t(x + "gate_proj.weight", y + "ffn_gate.weight", EXPERT_WIDTH, d)
                t(x + "up_proj.weight", y + "ffn_up.weight", EXPERT_WIDTH, d)
                t(x + "down_proj.weight", y + "ffn_down.weight", d, EXPERT_WIDTH)
        else:
            t(p + "mlp.gate_proj.weight", g + "ffn_gate.weight", i, d)
            t(p + "mlp.up_proj.weight", g + "ffn_up.weight", i, d)
            t(p + "mlp.down_proj.weight", g + "ffn_down.weight", d, i)
        if phi3:
            # Fused as Phi 3 stores them; the reference keeps the parts.
            for fused, parts in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                 ("mlp.gate_up_proj", ("gate_proj", "up_proj"))):  # fmt: skip
                prefix = fused.split(".")[0]
                hf[p + fused + ".weight"] = np.concatenate([hf.pop(f"{p}{prefix}.{x}.weight") for x in parts])
    norm("model.norm.weight", "output_norm.weight", d)
    if qwen or phi3:
        t("lm_head.weight", "output.weight", TINY["vocab"], d, scale=0.5)
    _write_shards(folder, hf, shards)
    config = {
        "model_type": model_type, "hidden_size": d, "intermediate_size": i,
        "num_hidden_layers": layers, "num_attention_heads": TINY["heads"],
        "num_key_value_heads": TINY["kv"], "vocab_size": TINY["vocab"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": not (qwen or phi3), "torch_dtype": "float32",
        "max_position_embeddings": 512, "head_dim": hd,
    }  # fmt: skip
    if gemma:
        config.update({
            "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
            "query_pre_attn_scalar": hd, "sliding_window": GEMMA_WINDOW, "sliding_window_pattern": 6,
            "hidden_activation": "gelu_pytorch_tanh",
        })  # fmt: skip
    if phi3:
        # Phi-3-mini's window, longer than any test sequence.
        config.update({"sliding_window": 2047, "hidden_act": "silu"})
    if moe:
        config.update({
            "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "moe_intermediate_size": EXPERT_WIDTH,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        })  # fmt: skip
    if qwen:
        # As real Qwen configs: a window that applies only with use_sliding_window.
        config.update({"sliding_window": 4, "use_sliding_window": False})
    (folder / "config.json").write_text(json.dumps(config))
    _write_tokenizer(folder, tokenizer)
    return ref


def _write_shards(folder: Path, hf: dict[str, np.ndarray], shards: int) -> None:
    """The tensors as f32 safetensors in `shards` files, with the index mapping them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(hf)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        st.write(folder / fname, {n: ("F32", hf[n]) for n in part}, {"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def _write_tokenizer(folder: Path, kind: str | None) -> None:
    if kind == "word":
        write_word_tokenizer(folder)
    elif kind == "bpe":
        write_bpe_tokenizer(folder)


def write_word_tokenizer(folder: Path) -> None:
    """A word-level `tokenizer.json` over the tiny vocabulary (`w0` … `w95`, `w1` as EOS
    never reached in tests that ignore it)."""
    vocab = {f"w{i}": i for i in range(TINY["vocab"])}
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"},
    }  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w1"}))


def write_bpe_tokenizer(folder: Path) -> None:
    """A byte-level BPE `tokenizer.json` (GPT-2 style, ChatML template) over the small
    vocabulary of test_tokenizer.py; model ids past it have no token."""
    from test_tokenizer import CHATML, MERGES, TOKENS, TYPES

    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    special = [{"id": i, "content": t, **flags} for i, t in enumerate(TOKENS) if TYPES[i] == 3]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    byte_level["use_regex"] = True
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(TOKENS)}, "merges": MERGES},
    }  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    config = {"eos_token": "<|endoftext|>", "bos_token": None, "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _write_tiny_phi(folder: Path, rng: np.random.Generator, shards: int) -> dict[str, np.ndarray]:
    """Phi (phi-2 layout): biases everywhere, LayerNorms, `dense` attention output, plain
    `fc1`/`fc2` MLP, `final_layernorm`, a biased untied head, half the head rotary."""
    d, i, hd, heads = TINY["hidden"], TINY["inter"], HEAD_DIM, TINY["heads"]
    hf: dict[str, np.ndarray] = {}
    ref: dict[str, np.ndarray] = {}

    def t(hf_name: str, ref_name: str, *shape: int, scale: float = 0.2, offset: float = 0.0) -> None:
        a = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
        hf[hf_name], ref[ref_name] = a, a

    def linear(hf_name: str, ref_name: str, out: int, inp: int) -> None:
        t(hf_name + ".weight", ref_name + ".weight", out, inp)
        t(hf_name + ".bias", ref_name + ".bias", out, scale=0.1)

    def norm(hf_name: str, ref_name: str) -> None:
        t(hf_name + ".weight", ref_name + ".weight", d, scale=0.1, offset=1.0)
        t(hf_name + ".bias", ref_name + ".bias", d, scale=0.1)

    t("model.embed_tokens.weight", "token_embd.weight", TINY["vocab"], d, scale=0.5)
    for n in range(TINY["layers"]):
        p, g = f"model.layers.{n}.", f"blk.{n}."
        norm(p + "input_layernorm", g + "attn_norm")
        for hf_proj, ref_proj in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            linear(p + "self_attn." + hf_proj, g + ref_proj, heads * hd, d)
        linear(p + "self_attn.dense", g + "attn_output", d, heads * hd)
        linear(p + "mlp.fc1", g + "ffn_up", i, d)
        linear(p + "mlp.fc2", g + "ffn_down", d, i)
    norm("model.final_layernorm", "output_norm")
    linear("lm_head", "output", TINY["vocab"], d)
    _write_shards(folder, hf, shards)
    config = {
        "model_type": "phi", "hidden_size": d, "intermediate_size": i, "num_hidden_layers": TINY["layers"],
        "num_attention_heads": heads, "vocab_size": TINY["vocab"], "layer_norm_eps": 1e-5,
        "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "hidden_act": "gelu_new",
        "tie_word_embeddings": False, "torch_dtype": "float32", "max_position_embeddings": 512,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return ref


def _write_tiny_gpt2(folder: Path, rng: np.random.Generator, shards: int) -> dict[str, np.ndarray]:
    """GPT-2 as `GPT2LMHeadModel` saves it: `transformer.`-prefixed names, Conv1D weights
    stored `[in, out]` (q, k and v fused in `c_attn`), learned positions `wpe`, the causal
    mask buffer `attn.bias`, and a head tied to `wte`."""
    d, i, heads = TINY["hidden"], TINY["inter"], TINY["heads"]
    hf: dict[str, np.ndarray] = {}
    ref: dict[str, np.ndarray] = {}

    def rand(*shape: int, scale: float = 0.2, offset: float = 0.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale + offset).astype(np.float32)

    def conv1d(hf_name: str, ref_names: list[str], inp: int, out: int) -> None:
        w, b = rand(inp, out), rand(out, scale=0.1)
        hf[hf_name + ".weight"], hf[hf_name + ".bias"] = w, b
        width = out // len(ref_names)
        for k, r in enumerate(ref_names):  # the reference takes [out, in] parts
            ref[r + ".weight"] = np.ascontiguousarray(w[:, k * width : (k + 1) * width].T)
            ref[r + ".bias"] = b[k * width : (k + 1) * width]

    def norm(hf_name: str, ref_name: str) -> None:
        hf[hf_name + ".weight"] = ref[ref_name + ".weight"] = rand(d, scale=0.1, offset=1.0)
        hf[hf_name + ".bias"] = ref[ref_name + ".bias"] = rand(d, scale=0.1)

    p = "transformer."
    hf[p + "wte.weight"] = ref["token_embd.weight"] = rand(TINY["vocab"], d, scale=0.5)
    hf[p + "wpe.weight"] = ref["position_embd.weight"] = rand(512, d, scale=0.5)
    for n in range(TINY["layers"]):
        h, g = f"{p}h.{n}.", f"blk.{n}."
        norm(h + "ln_1", g + "attn_norm")
        conv1d(h + "attn.c_attn", [g + "attn_q", g + "attn_k", g + "attn_v"], d, 3 * d)
        conv1d(h + "attn.c_proj", [g + "attn_output"], d, d)
        hf[h + "attn.bias"] = np.tril(np.ones((1, 1, 512, 512), dtype=np.float32))
        norm(h + "ln_2", g + "ffn_norm")
        conv1d(h + "mlp.c_fc", [g + "ffn_up"], d, i)
        conv1d(h + "mlp.c_proj", [g + "ffn_down"], i, d)
    norm(p + "ln_f", "output_norm")
    _write_shards(folder, hf, shards)
    config = {
        "model_type": "gpt2", "n_embd": d, "n_inner": i, "n_layer": TINY["layers"], "n_head": heads,
        "n_positions": 512, "n_ctx": 512, "vocab_size": TINY["vocab"], "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new", "torch_dtype": "float32", "architectures": ["GPT2LMHeadModel"],
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return ref
