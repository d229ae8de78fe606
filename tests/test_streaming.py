"""Streaming: chunks concatenate to the non-streamed text and never split a character;
stop strings and finish reasons."""

from __future__ import annotations

import pytest

import cortex


def _stream(smollm, prompt, **kw):
    model, tok = smollm
    return list(cortex.stream_generate(model, tok, prompt, **kw))


def test_stream_equals_generate(smollm):
    model, tok = smollm
    prompt = [{"role": "user", "content": "Write a haiku about the sea."}]
    chunks = _stream(smollm, prompt, max_tokens=40)
    text = "".join(r.text for r in chunks)
    assert text == cortex.generate(model, tok, prompt, max_tokens=40)
    assert text == tok.decode([r.token for r in chunks if r.token not in tok.eos_token_ids])
    assert chunks[-1].finish_reason in ("stop", "length")
    assert all(r.finish_reason is None for r in chunks[:-1])
    last = chunks[-1]
    assert last.generation_tokens == len(chunks) and last.prompt_tokens > 0
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory > 0


def _splits_a_character(tok, ids):
    """Whether some token of `ids` holds only part of a UTF-8 character."""
    return any("\ufffd" in tok.decode([t]) for t in ids)


@pytest.mark.parametrize(
    "content",
    ["Repeat exactly: 🚀🔥🎉😀👍", "请用中文介绍一下你自己。", "日本語で自己紹介してください。"],
)
def test_multibyte_output_is_never_split(smollm, content):
    _, tok = smollm
    # Sample until the output really has characters spread over several tokens (byte-level
    # BPE splits most emoji and many CJK characters), so the check below is exercised.
    for seed in range(8):
        chunks = _stream(
            smollm, [{"role": "user", "content": content}], max_tokens=48, temperature=1.0, seed=seed
        )
        ids = [r.token for r in chunks if r.token not in tok.eos_token_ids]
        if _splits_a_character(tok, ids):
            break
    else:
        pytest.fail("no sampled output split a character across tokens")
    full = tok.decode(ids)
    # Every prefix of the stream is a prefix of the final text: a chunk that ended inside
    # a character would show U+FFFD where the full text has the character. (U+FFFD can
    # still appear when sampling picks bytes that are not valid UTF-8 at all; then the
    # full decode shows it too.)
    so_far = ""
    for r in chunks:
        so_far += r.text
        assert full.startswith(so_far), (so_far, full)
    assert so_far == full


def test_stop_string_spanning_tokens(smollm):
    model, tok = smollm
    prompt = "The capital of France is"
    chunks = _stream(smollm, prompt, max_tokens=24, ignore_eos=True)
    full = "".join(r.text for r in chunks)
    # A stop string made of the text of generated tokens 6 and 7 (ending inside token 8),
    # so matching has to look across token boundaries.
    ids = [r.token for r in chunks]
    stop = tok.decode(ids[6:8]) + tok.decode(ids[8:9])[:1]
    assert len(stop) > 2
    cut = cortex.generate(model, tok, prompt, max_tokens=24, ignore_eos=True, stop=[stop])
    assert cut == full[: full.index(stop)]
    stopped = _stream(smollm, prompt, max_tokens=24, ignore_eos=True, stop=["zzz-never", stop])
    assert stopped[-1].finish_reason == "stop"
    assert len(stopped) < len(chunks)


def test_max_tokens_gives_length(smollm):
    chunks = _stream(smollm, "Count: 1, 2, 3,", max_tokens=5, ignore_eos=True)
    assert len(chunks) == 5 and chunks[-1].finish_reason == "length"


def test_eos_stops_with_stop(smollm):
    _, tok = smollm
    # A short chat answer ends with <|im_end|>, the model's EOS.
    chunks = _stream(smollm, [{"role": "user", "content": "What is 2+2?"}], max_tokens=64)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].token in tok.eos_token_ids
    assert "<|im_end|>" not in "".join(r.text for r in chunks)


def test_context_overflow_is_a_clear_error(smollm):
    model, tok = smollm
    too_long = [504] * (model.config["max_position_embeddings"] + 1)
    with pytest.raises(cortex.ContextLengthError, match="does not fit"):
        cortex.generate(model, tok, too_long, max_tokens=1)


def test_empty_prompt_rejected(smollm):
    model, tok = smollm
    with pytest.raises(cortex.RequestValidationError) as info:
        cortex.generate(model, tok, "", max_tokens=1)
    assert info.value.param == "prompt"
