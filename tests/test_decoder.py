"""Decoder properties on tiny random models the tests write, checked against facts that do
not depend on our code: RoPE attention sees only relative positions, so a layer that
attends to a window of w positions must give, at position p, exactly what it gives for the
w tokens ending at p fed alone."""

from __future__ import annotations

import numpy as np
from gguf_writer import ARRAY, I32, STRING, tiny_gemma3
from test_tokenizer import MERGES, TOKENS, TYPES

import cortex

IDS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]


def _load(tmp_path, **kw):
    path = tmp_path / "gemma3.gguf"
    tiny_gemma3(**kw).write(path)
    return cortex.load_model(path)


def test_sliding_window_layer_sees_only_its_window(tmp_path):
    model = _load(tmp_path, window=4)  # one layer: local
    every = model.forward(IDS, all_positions=True)
    for p in range(len(IDS)):
        alone = model.forward(IDS[max(0, p - 3) : p + 1])
        np.testing.assert_allclose(every[p], alone, rtol=0, atol=1e-4, err_msg=f"position {p}")


def test_the_window_matters(tmp_path):
    """Control: with a window covering everything, position 8 does see older tokens."""
    model = _load(tmp_path, window=64)
    every = model.forward(IDS, all_positions=True)
    assert np.abs(every[8] - model.forward(IDS[5:9])).max() > 1e-3


def test_cached_decode_respects_the_window(tmp_path):
    """Greedy generation through the KV cache (one token per step, past the window) picks
    at every step the argmax of a fresh forward over the last 4 tokens."""
    g = tiny_gemma3(window=4)
    g.kvs += [
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, TOKENS)),
        ("tokenizer.ggml.merges", ARRAY, (STRING, MERGES)),
        ("tokenizer.ggml.token_type", ARRAY, (I32, TYPES)),
    ]
    path = tmp_path / "gemma3.gguf"
    g.write(path)
    model, tok = cortex.load(path)
    ids = list(IDS[:6])
    for r in cortex.stream_generate(model, tok, ids, max_tokens=10, ignore_eos=True):
        assert r.token == int(np.argmax(model.forward(ids[-4:])))
        ids.append(r.token)
    assert len(ids) == 16
