"""Tokenizers built from GGUF metadata and chat templates (RELIABILITY.md A18, B8-B11),
on a tiny model whose vocabulary the test writes itself."""

from __future__ import annotations

import time

import pytest
from gguf_writer import ARRAY, BOOL, I32, STRING, U32, tiny_llama

import cortex

TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "d", "e",
          "ab", "cd", "Ġ", "Ġa", "Ġab", "\n", "Ċ", "x"]  # fmt: skip
MERGES = ["Ġ a", "Ġa b", "a b", "c d"]
TYPES = [3, 3, 3] + [1] * 13
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write(tmp_path, template: str | None = CHATML, **overrides):
    kvs = {
        "tokenizer.ggml.model": (STRING, "gpt2"),
        "tokenizer.ggml.pre": (STRING, "smollm"),
        "tokenizer.ggml.tokens": (ARRAY, (STRING, TOKENS)),
        "tokenizer.ggml.merges": (ARRAY, (STRING, MERGES)),
        "tokenizer.ggml.token_type": (ARRAY, (I32, TYPES)),
        "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
        "tokenizer.ggml.add_bos_token": (BOOL, False),
    }
    if template is not None:
        kvs["tokenizer.chat_template"] = (STRING, template)
    kvs.update(overrides)
    g = tiny_llama()
    g.kvs += [(k, t, v) for k, (t, v) in kvs.items() if t is not None]
    path = tmp_path / "tiny.gguf"
    g.write(path)
    return path


def test_tiny_tokenizer(tmp_path):
    _, tok = cortex.load(write(tmp_path))
    assert tok.encode("ab ab", add_special_tokens=False) == [8, 12]
    assert tok.encode("<|im_start|>ab<|im_end|>", add_special_tokens=False) == [1, 8, 2]
    assert tok.decode([8, 12, 2]) == "ab ab<|im_end|>"
    assert tok.decode([8, 12, 2], skip_special_tokens=True) == "ab ab"
    # The eos id, then <|endoftext|>: a control token that ends generation by its name.
    assert tok.eos_token_ids == [2, 0] and tok.bos_token_id == 1


def test_add_bos_token(tmp_path):
    _, tok = cortex.load(write(tmp_path, **{"tokenizer.ggml.add_bos_token": (BOOL, True)}))
    assert tok.encode("ab") == [1, 8]
    assert tok.encode("ab", add_special_tokens=False) == [8]


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("tokenizer.ggml.token_type", (ARRAY, (I32, [1, 1])), "entries for 16 tokens"),
        ("tokenizer.ggml.token_type", (ARRAY, (STRING, ["x"] * 16)), "expected integers"),
        ("tokenizer.ggml.eos_token_id", (U32, 16), "outside the vocabulary"),
        ("tokenizer.ggml.bos_token_id", (U32, 10**6), "outside the vocabulary"),
        ("tokenizer.ggml.merges", (ARRAY, (STRING, ["ab"])), "not two tokens"),
        ("tokenizer.ggml.merges", (ARRAY, (STRING, ["q r"])), "not in the vocabulary"),
        ("tokenizer.ggml.tokens", (ARRAY, (STRING, ["a"] * 16)), "appears twice"),
        ("tokenizer.ggml.model", (STRING, "bert"), "not supported"),
        ("tokenizer.ggml.pre", (STRING, "mystery"), "supported:"),
    ],
)
def test_bad_tokenizer_metadata(tmp_path, key, value, fragment):
    with pytest.raises(cortex.ConfigError, match=fragment) as info:
        cortex.load(write(tmp_path, **{key: value}))
    assert info.value.field == key


def chat(tmp_path, template: str, messages=None, **kwargs):
    _, tok = cortex.load(write(tmp_path, template))
    return tok.apply_chat_template(messages or [{"role": "user", "content": "ab"}], **kwargs)


def test_chat_template_renders_like_transformers(tmp_path):
    assert chat(tmp_path, CHATML) == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    assert chat(tmp_path, CHATML, add_generation_prompt=False) == "<|im_start|>user\nab<|im_end|>\n"
    # trim_blocks / lstrip_blocks as in transformers: block tags leave no blank lines.
    template = "{% for m in messages %}\n    {% if true %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}"
    assert chat(tmp_path, template) == "[ab]\n"
    # Python string methods, bos/eos variables, extra keyword arguments, tojson.
    template = (
        "{{ bos_token }}{{ messages[0].content.upper() }}{{ eos_token }}{{ flag }}{{ {'k': 'é'} | tojson }}"
    )
    assert chat(tmp_path, template, flag=7) == '<|im_start|>AB<|im_end|>7{"k": "é"}'


def test_chat_template_tokenize(tmp_path):
    template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    _, tok = cortex.load(write(tmp_path, template))
    ids = tok.apply_chat_template([{"role": "user", "content": "ab cd"}], tokenize=True)
    # Special tokens in the rendered text are matched whole; no BOS is added on top.
    assert ids == [1, 8, 10, 9, 2]


@pytest.mark.parametrize(
    "template",
    [
        "{{ lipsum.__globals__ }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ messages|attr('__class__') }}",
    ],
)
def test_template_escape_attempts_do_nothing(tmp_path, template):
    try:
        out = chat(tmp_path, template)
    except cortex.TemplateError:
        return
    assert "uid=" not in out and "class" not in out


def test_template_fuel_limit(tmp_path):
    template = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(cortex.TemplateError, match="evaluation budget"):
        chat(tmp_path, template)
    assert time.monotonic() - start < 10  # bounded, not a hang


def test_template_recursion_limit(tmp_path):
    template = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
    with pytest.raises(cortex.TemplateError):
        chat(tmp_path, template)


def test_template_syntax_error_reported_at_load(tmp_path):
    with pytest.raises(cortex.TemplateError, match="line"):
        cortex.load(write(tmp_path, "{% for m in messages %}{{ m }"))


def test_template_raise_exception(tmp_path):
    template = (
        "{% if messages[0].role != 'system' %}{{ raise_exception('system message required') }}{% endif %}"
    )
    with pytest.raises(cortex.TemplateError, match="system message required"):
        chat(tmp_path, template)


def test_no_template(tmp_path):
    _, tok = cortex.load(write(tmp_path, None))
    assert not tok.has_chat_template
    with pytest.raises(cortex.TemplateError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_messages_must_be_serialisable(tmp_path):
    with pytest.raises(cortex.RequestValidationError) as info:
        chat(tmp_path, CHATML, messages=[{"role": "user", "content": object()}])
    assert info.value.param == "messages"


@pytest.mark.parametrize("text", ["a" * 100_000, "_" * 100_000, "ab " * 30_000])
def test_long_unbroken_text_tokenizes(smollm, text):
    """RELIABILITY B7: 100k characters without whitespace tokenize (pytest-timeout bounds
    the time) and round-trip."""
    _, tok = smollm
    ids = tok.encode(text, add_special_tokens=False)
    assert ids and tok.decode(ids) == text


def test_template_huge_string_is_refused(tmp_path):
    with pytest.raises(cortex.TemplateError, match="too large"):
        chat(tmp_path, "{{ 'x' * 2000000000 }}")
