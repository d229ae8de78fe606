"""SentencePiece tokenizers built from GGUF metadata (`tokenizer.ggml.model = llama`),
checked on Gemma 3 270M against Hugging Face transformers (golden values), and on a tiny
vocabulary the test writes itself."""

from __future__ import annotations

import pytest
from gguf_writer import ARRAY, BOOL, F32, I32, STRING, U32, tiny_llama

import cortex


def test_gemma_tokenizer_matches_reference(gemma_path, gemma_golden):
    tok = cortex.load_tokenizer(gemma_path)
    assert tok.vocab_size == 262144 and tok.bos_token_id == 2 and 1 in tok.eos_token_ids
    for case in gemma_golden["tokenize"]:
        assert tok.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["decoded"]
    for case in gemma_golden["logits"] + gemma_golden["greedy"]:
        # add_bos_token is set in this file: the reference's ids start with <bos>.
        assert tok.encode(case["prompt"]) == case["input_ids"], case["prompt"]


def test_gemma_ends_turns(gemma_path):
    tok = cortex.load_tokenizer(gemma_path)
    # <eos> from the metadata, <end_of_turn> by name (the file does not list it).
    assert tok.eos_token_ids == [1, 106]


# A tiny SentencePiece vocabulary: byte tokens, pieces with scores, and a control token.
PIECES = ["<unk>", "<s>", "</s>", "<0x41>", "<0xC3>", "<0xA9>", "▁", "a", "b", "c", "ab", "▁a", "▁ab", "abc"]
SCORES = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0]
TYPES = [2, 3, 3, 6, 6, 6, 1, 1, 1, 1, 1, 1, 1, 1]


def write_spm(tmp_path, **overrides):
    g = tiny_llama(vocab=len(PIECES))
    kvs = {
        "tokenizer.ggml.model": (STRING, "llama"),
        "tokenizer.ggml.tokens": (ARRAY, (STRING, PIECES)),
        "tokenizer.ggml.scores": (ARRAY, (F32, SCORES)),
        "tokenizer.ggml.token_type": (ARRAY, (I32, TYPES)),
        "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
        "tokenizer.ggml.unknown_token_id": (U32, 0),
    }
    kvs.update(overrides)
    g.kvs += [(k, t, v) for k, (t, v) in kvs.items()]
    path = tmp_path / "spm.gguf"
    g.write(path)
    return path


def test_tiny_spm_with_space_prefix(tmp_path):
    tok = cortex.load_tokenizer(write_spm(tmp_path))
    # Derived merges, best score first: (a, b) -5, (▁, a) -6, (▁, ab) -7, (▁a, b) -7,
    # (ab, c) -8. "ab" gets a dummy prefix: ▁ a b -> ▁ ab -> ▁ab.
    assert tok.encode("ab", add_special_tokens=False) == [12]
    # "▁abc▁ab": (a, b) twice, then (▁, ab) twice; "abc" is never reached.
    ids = tok.encode("abc ab", add_special_tokens=False)
    assert ids == [12, 9, 12]
    assert tok.decode(ids) == "abc ab"


def test_tiny_spm_byte_fallback(tmp_path):
    tok = cortex.load_tokenizer(write_spm(tmp_path, **{"tokenizer.ggml.add_space_prefix": (BOOL, False)}))
    # "A" and "é" are not pieces: they are spelled with byte tokens and decode back.
    ids = tok.encode("Aé", add_special_tokens=False)
    assert ids == [3, 4, 5]
    assert tok.decode(ids) == "Aé"
    assert tok.encode("x", add_special_tokens=False) == [0]  # no byte token for "x": <unk>


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("tokenizer.ggml.scores", (ARRAY, (F32, [0.0])), "entries for 14 tokens"),
        ("tokenizer.ggml.scores", (ARRAY, (STRING, ["x"] * 14)), "expected finite f32 scores"),
        ("tokenizer.ggml.add_space_prefix", (U32, 1), "expected a bool"),
        ("tokenizer.ggml.unknown_token_id", (U32, 99), "outside the vocabulary"),
    ],
)
def test_bad_spm_metadata(tmp_path, key, value, fragment):
    with pytest.raises(cortex.ConfigError, match=fragment) as info:
        cortex.load_tokenizer(write_spm(tmp_path, **{key: value}))
    assert info.value.field == key
