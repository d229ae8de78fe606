"""Independent numpy (float64) forward passes for the decoder families, written from the
papers and llama.cpp's graph definitions; shares no code with the Rust side.

Weights come as ``{gguf_tensor_name: array}`` in numpy order (a linear layer is
``[out, in]``, applied as ``x @ W.T``, plus its ``.bias`` when the dict has one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Family:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    theta: float
    #: RoPE on adjacent pairs (llama.cpp's permuted llama q/k) or on the two halves (NeoX).
    interleaved: bool
    gemma: bool = False
    #: Per-head RMSNorm of q and k before RoPE (Gemma 3 has it too; Qwen 3).
    qk_norm: bool = False
    window: int | None = None
    local_theta: float = 10000.0
    #: HF `rope_scaling` of type llama3: (factor, low_freq_factor, high_freq_factor,
    #: original_max_position_embeddings).
    llama3: tuple[float, float, float, int] | None = None
    #: HF `rope_scaling` of type yarn: (factor, original_max_position_embeddings); beta_fast
    #: 32, beta_slow 1, truncated ramp, attention factor 0.1 ln(factor) + 1.
    yarn: tuple[float, int] | None = None
    #: A mixture of experts in every layer: (experts chosen per token, renormalise their
    #: probabilities). Router ``blk.N.ffn_gate_inp``, experts ``blk.N.expert.E.ffn_*``.
    moe: tuple[int, bool] | None = None
    #: Phi: LayerNorm with biases, attention and a plain MLP (``ffn_up`` → GELU →
    #: ``ffn_down``, with biases) in parallel on one normalised input, a biased head.
    phi: bool = False
    #: Leading dimensions of each head that RoPE turns (all when None).
    rotary_dim: int | None = None
    #: GPT-2: learned absolute positions (``position_embd``) instead of RoPE, LayerNorms
    #: with biases, and a plain MLP (``ffn_up`` → GELU → ``ffn_down``) after attention.
    gpt2: bool = False


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def llama3_inv_freq(inv: np.ndarray, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """Llama 3.1's frequency scaling (Meta's reference `apply_scaling`): wavelengths longer
    than original/low are stretched by `factor`, shorter than original/high kept, and a
    linear blend in between."""
    out = []
    for f in inv:
        wavelen = 2 * np.pi / f
        if wavelen < original / high:
            out.append(f)
        elif wavelen > original / low:
            out.append(f / factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def yarn_inv_freq(d: int, theta: float, factor: float, original: int) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al. 2023) as HF configs describe it: each frequency blends its
    original value and the one divided by `factor` along a ramp between the dimensions
    that turn 32 and 1 times over the original context; cos/sin scaled by
    0.1 ln(factor) + 1."""

    def dim_for(turns: float) -> float:
        return d * np.log(original / (turns * 2 * np.pi)) / (2 * np.log(theta))

    low, high = max(np.floor(dim_for(32)), 0), min(np.ceil(dim_for(1)), d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / max(high - low, 1e-3), 0, 1)
    extra = theta ** (-np.arange(0, d, 2) / d)
    inv = extra / factor * ramp + extra * (1 - ramp)
    return inv, 0.1 * np.log(factor) + 1 if factor > 1 else 1.0


def rope(
    x: np.ndarray,
    positions: np.ndarray,
    theta: float,
    interleaved: bool,
    llama3: tuple | None = None,
    yarn: tuple | None = None,
) -> np.ndarray:
    """``x: [T, H, D]`` rotated by position (Su et al. 2021)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    scale = 1.0
    if llama3 is not None:
        inv = llama3_inv_freq(inv, *llama3)
    if yarn is not None:
        inv, scale = yarn_inv_freq(d, theta, *yarn)
    ang = positions[:, None] * inv[None, :]
    cos, sin = scale * np.cos(ang)[:, None, :], scale * np.sin(ang)[:, None, :]
    out = np.empty_like(x)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., : d // 2], x[..., d // 2 :]
        out[..., : d // 2], out[..., d // 2 :] = a * cos - b * sin, b * cos + a * sin
    return out


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def forward(w: dict[str, np.ndarray], f: Family, ids: list[int]) -> np.ndarray:
    """Logits ``[len(ids), vocab]``."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    t = len(ids)
    pos = np.arange(t, dtype=np.float64)

    def norm(x: np.ndarray, name: str) -> np.ndarray:
        if f.phi or f.gpt2:
            return layer_norm(x, w[name + ".weight"], w[name + ".bias"], f.eps)
        return rms_norm(x, w[name + ".weight"], f.eps)

    def turn(x: np.ndarray, theta: float) -> np.ndarray:
        if f.gpt2:
            return x
        rd = f.rotary_dim or x.shape[-1]
        rotated = rope(x[..., :rd], pos, theta, f.interleaved, f.llama3, f.yarn)
        return np.concatenate([rotated, x[..., rd:]], axis=-1)

    x = w["token_embd.weight"][ids]
    if f.gemma:
        x = x * np.sqrt(x.shape[-1])
    if f.gpt2:
        x = x + w["position_embd.weight"][:t]
    layers = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blk."))
    for i in range(layers):

        def p(name: str, i: int = i) -> np.ndarray:
            return w[f"blk.{i}.{name}.weight"]

        def lin(h: np.ndarray, name: str, i: int = i) -> np.ndarray:
            y = h @ w[f"blk.{i}.{name}.weight"].T
            bias = w.get(f"blk.{i}.{name}.bias")
            return y if bias is None else y + bias

        local = f.window is not None and (i + 1) % 6 != 0
        h = norm(x, f"blk.{i}.attn_norm")
        q = lin(h, "attn_q").reshape(t, f.heads, f.head_dim)
        k = lin(h, "attn_k").reshape(t, f.kv_heads, f.head_dim)
        v = lin(h, "attn_v").reshape(t, f.kv_heads, f.head_dim)
        if f.gemma or f.qk_norm:
            q, k = rms_norm(q, p("attn_q_norm"), f.eps), rms_norm(k, p("attn_k_norm"), f.eps)
        theta = f.local_theta if local else f.theta
        q, k = turn(q, theta), turn(k, theta)
        visible = np.tril(np.ones((t, t), dtype=bool))
        if local:
            visible &= np.arange(t)[:, None] - np.arange(t)[None, :] < f.window
        out = np.empty((t, f.heads, f.head_dim))
        for head in range(f.heads):
            kv = head // (f.heads // f.kv_heads)
            scores = q[:, head] @ k[:, kv].T / np.sqrt(f.head_dim)
            scores = np.where(visible, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[:, head] = probs @ v[:, kv]
        o = lin(out.reshape(t, -1), "attn_output")
        if f.phi:
            x = x + o + lin(gelu_tanh(lin(h, "ffn_up")), "ffn_down")
            continue
        if f.gpt2:
            x = x + o
            x = x + lin(gelu_tanh(lin(norm(x, f"blk.{i}.ffn_norm"), "ffn_up")), "ffn_down")
            continue
        if f.gemma:
            o = rms_norm(o, p("post_attention_norm"), f.eps)
        x = x + o
        h = rms_norm(x, p("ffn_norm"), f.eps)

        def mlp(h: np.ndarray, prefix: str, p=p) -> np.ndarray:  # `p=p` binds this layer
            act = gelu_tanh if f.gemma else silu
            gate, up, down = (p(prefix + n) for n in ("ffn_gate", "ffn_up", "ffn_down"))
            return (act(h @ gate.T) * (h @ up.T)) @ down.T

        if f.moe is None:
            m = mlp(h, "")
        else:
            top_k, renormalise = f.moe
            logits = h @ p("ffn_gate_inp").T
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            m = np.zeros_like(h)
            for tok in range(t):
                chosen = np.argsort(-probs[tok], kind="stable")[:top_k]
                weights = probs[tok, chosen]
                if renormalise:
                    weights = weights / weights.sum()
                for e, wgt in zip(chosen, weights):
                    m[tok] += wgt * mlp(h[tok : tok + 1], f"expert.{e}.")[0]
        if f.gemma:
            m = rms_norm(m, p("post_ffw_norm"), f.eps)
        x = x + m
    x = norm(x, "output_norm")
    logits = x @ w.get("output.weight", w["token_embd.weight"]).T
    return logits + w["output.bias"] if "output.bias" in w else logits


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(p) ‖ softmax(q)), in float64."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))  # type: ignore[no-any-return]

    p, q = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(p) * (p - q)).sum(-1).mean())
