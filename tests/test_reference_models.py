"""Tiny random-weight models of each family (written by the tests as GGUF) against the
independent numpy reference in ``numpy_reference.py``: all positions without a cache, and
greedy decoding one token at a time through the KV cache.

Tolerance: our f32 arithmetic against float64, logits of size ~1-10 after a few layers;
1e-4 relative (plus 1e-5 absolute for logits near zero) leaves room for f32 rounding only.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf_writer import ARRAY, I32, STRING, tiny_gemma3, tiny_llama
from numpy_reference import Family, forward
from test_tokenizer import MERGES, TOKENS, TYPES

import cortex

IDS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]

CASES = {
    "llama": (
        lambda: tiny_llama(vocab=16, hidden=16, heads=4, kv_heads=2, ff=32, layers=2),
        Family(heads=4, kv_heads=2, head_dim=4, eps=1e-5, theta=10000.0, interleaved=True),
    ),
    "gemma3": (
        # 7 layers: layer 5 is global, the others slide over 3 positions.
        lambda: tiny_gemma3(vocab=16, hidden=8, heads=2, head_dim=4, ff=16, layers=7, window=3),
        Family(heads=2, kv_heads=1, head_dim=4, eps=1e-6, theta=1e6, interleaved=False, gemma=True, window=3),
    ),
}


def _write(tmp_path, name: str):
    make, family = CASES[name]
    g = make()
    g.kvs += [
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, TOKENS)),
        ("tokenizer.ggml.merges", ARRAY, (STRING, MERGES)),
        ("tokenizer.ggml.token_type", ARRAY, (I32, TYPES)),
    ]
    path = tmp_path / f"{name}.gguf"
    g.write(path)
    return path, g.arrays, family


@pytest.mark.parametrize("name", list(CASES))
def test_all_positions_match_numpy(tmp_path, name):
    path, arrays, family = _write(tmp_path, name)
    model = cortex.load_model(path)
    ours = model.forward(IDS, all_positions=True)
    np.testing.assert_allclose(ours, forward(arrays, family, IDS), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_cached_greedy_decoding_matches_numpy(tmp_path, name):
    path, arrays, family = _write(tmp_path, name)
    model, tok = cortex.load(path)
    ids = list(IDS[:4])
    for r in cortex.stream_generate(model, tok, ids, max_tokens=8, ignore_eos=True):
        expected = forward(arrays, family, ids)[-1]
        top2 = np.sort(expected)[-2:]
        if top2[1] - top2[0] > 1e-3:  # skip exact near-ties, which f32 may order either way
            assert r.token == int(np.argmax(expected))
        ids.append(r.token)
    assert len(ids) == 12
