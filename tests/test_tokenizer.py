"""Tokenizers built from GGUF metadata and chat templates (RELIABILITY.md A18, B8-B11),
on a tiny model whose vocabulary the test writes itself."""

from __future__ import annotations

import re
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


def test_template_guard_renders_like_jinja2(tmp_path):
    """The guarded program (operators as checked calls, raw text through the formatter,
    results measured) renders exactly what Jinja renders: macros with `caller`, recursive
    loops, filter blocks, captures, namespaces, numeric and string operators, slices and
    the guarded filters and methods."""
    jinja2 = pytest.importorskip("jinja2")
    template = (
        "{% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}"
        "{% set ns = namespace(n=0, parts=[]) %}"
        "{% for m in messages %}"
        "{% set ns.n = ns.n + m['content']|length * 2 %}{% set ns.parts = ns.parts + [m['role']] %}"
        "{% set rest = m['content'][1:] %}"
        "{% call wrap(m['role'] ~ loop.index) %}{{ rest|replace('b', 'B') }}{% endcall %}\n"
        "{% endfor %}"
        "{% set block %}{% filter upper %}{{ ns.parts|join(', ') }}{% endfilter %}{% endset %}"
        "{{ block|indent(2, true) }}|{{ '%s-%d'|format('n', ns.n) }}|{{ 'x' * 3 }}|{{ (2.5 + 1) }}\n"
        "{% for item in tree recursive %}{{ item.name }}({{ loop(item.children) }}){% endfor %}\n"
        "{{ ', '.join(['a', 'b']) }} {{ 'a-b'.replace('-', '+') }} {{ [1, 2][::-1] }} {{ ns.n > 3 }}"
    )
    messages = [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "bcd"}]
    tree = [{"name": "r", "children": [{"name": "c", "children": []}]}]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    want = env.from_string(template).render(messages=messages, tree=tree, add_generation_prompt=False)
    _, tok = cortex.load(write(tmp_path, template))
    assert tok.apply_chat_template(messages, tree=tree) == want


# Templates that build huge values in a few steps (RELIABILITY.md B15). Each would ask for
# gigabytes to terabytes (or abort the process on a failed allocation) without the guard.
HOSTILE_TEMPLATES = {
    "list doubling": "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}"
    "{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
    "string doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "concat doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "straight-line doubling": "{% set a = 'x' * 1000 %}" + "{% set a = a + a %}" * 40 + "{{ a|length }}",
    "shared strings printed": "{% set s = 'x' * 10000000 %}{% set ns = namespace(l=[s]) %}"
    "{% for i in range(30) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l }}",
    "chained replace": "{% set s = 'a' * 10000000 %}"
    "{{ s|replace('a', 'aaaaaaaaaa')|replace('a', 'aaaaaaaaaa')|length }}",
    "replace method": "{{ ('a' * 10000000).replace('a', 'a' * 1000) }}",
    "huge join": "{{ range(100000)|join('x' * 1000000) }}",
    "join method": "{{ ('x' * 1000000).join(range(100000)) }}",
    "tojson indent": "{{ messages|tojson(indent=1000000000) }}",
    "indent width": "{{ ('a\\n' * 100000)|indent(100000000) }}",
    "batch count": "{{ [1]|batch(1000000000, 'x') }}",
    "format width": "{{ '%1000000000s'|format('x') }}",
    "string repeat": "{{ 'x' * 50000000 }}",
    "deep nesting": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
    "{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l }}",
    "captured text": "{% for i in range(100000) %}{% set x %}" + "y" * 1000 + "{% endset %}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_template_memory_bounded(tmp_path, name):
    import resource

    _, tok = cortex.load(write(tmp_path, HOSTILE_TEMPLATES[name]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.monotonic()
    with pytest.raises(cortex.TemplateError, match=r"too large|evaluation budget"):
        tok.apply_chat_template([{"role": "user", "content": "ab"}])
    assert time.monotonic() - start < 1.0
    # Memory stayed bounded: the process's high-water mark rose by less than 512 MiB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 << 10
    # The tokenizer is unharmed.
    assert tok.encode("ab", add_special_tokens=False) == [8]


@pytest.mark.parametrize(
    "key",
    ["tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.mask_token_id"],
)
@pytest.mark.parametrize("token_id", [16, 2**32 + 1])
def test_every_special_token_id_in_range(tmp_path, key, token_id):
    """Issue 14 item 4: ids the loader does not use are checked too (also past 2^32)."""
    from gguf_writer import U64

    with pytest.raises(cortex.ConfigError, match="outside the vocabulary") as info:
        cortex.load(write(tmp_path, **{key: (U64, token_id)}))
    assert info.value.field == key


END_TOKEN = {
    "id": 3,
    "content": "<|end|>",
    "single_word": False,
    "lstrip": False,
    "rstrip": False,
    "normalized": False,
    "special": True,
}


def hf_tokenizer_dir(tmp_path, added=None, config=None, generation=None, normalizer=None):
    """A byte-level BPE `tokenizer.json` folder written by hand (the format transformers
    reads), with `tokenizer_config.json` and `generation_config.json` when given."""
    import json

    vocab = {"a": 0, "b": 1, "ab": 2, "<|end|>": 3}
    tok = {
        "version": "1.0",
        "added_tokens": [END_TOKEN] if added is None else added,
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE",
            "vocab": vocab,
            "merges": [["a", "b"]],
            "dropout": None,
            "unk_token": None,
            "fuse_unk": False,
            "byte_fallback": False,
        },
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_hf_tokenizer_folder_loads(tmp_path):
    tok = cortex.load_tokenizer(hf_tokenizer_dir(tmp_path, config={"eos_token": "<|end|>"}))
    assert tok.encode("abab<|end|>") == [2, 2, 3]
    assert tok.eos_token_ids == [3]


@pytest.mark.parametrize("bad_id", [1, 99, 2**32 + 3])
def test_added_token_with_absurd_id(tmp_path, bad_id):
    """Issue 14 item 4: `tokenizers` silently renumbers an added token whose declared id is
    taken (1 is "b"), past the vocabulary (99) or past 2^32; Cortex refuses the file."""
    added = [{**END_TOKEN, "id": bad_id}]
    with pytest.raises(cortex.ConfigError, match=re.escape("<|end|>")) as info:
        cortex.load_tokenizer(hf_tokenizer_dir(tmp_path, added=added))
    assert info.value.field == "tokenizer.json: added_tokens"


@pytest.mark.parametrize("key", ["eos_token", "bos_token"])
def test_special_token_absent_from_vocabulary(tmp_path, key):
    with pytest.raises(cortex.ConfigError, match="not in the vocabulary") as info:
        cortex.load_tokenizer(hf_tokenizer_dir(tmp_path, config={key: "</s>"}))
    assert key in info.value.field


@pytest.mark.parametrize("eos", [[3, "x"], "3", [2**33]])
def test_generation_config_eos_ids_checked(tmp_path, eos):
    with pytest.raises(cortex.ConfigError, match="eos_token_id"):
        cortex.load_tokenizer(hf_tokenizer_dir(tmp_path, generation={"eos_token_id": eos}))


def _replace(pattern: dict, content: str) -> dict:
    return {"type": "Replace", "pattern": pattern, "content": content}


@pytest.mark.parametrize("pattern", [{"String": "a"}, {"Regex": "a"}])
def test_normalizer_that_multiplies_its_input(tmp_path, pattern):
    """Issue 14 item 5 (RELIABILITY B16): `Replace "a" -> "a" x 1000` chained three times
    would turn each "a" into 10^9 bytes (and 16 bytes of alignments per byte). A text the
    normalizer would blow up is refused at once; others still encode."""
    normalizer = {"type": "Sequence", "normalizers": [_replace(pattern, "a" * 1000)] * 3}
    tok = cortex.load_tokenizer(hf_tokenizer_dir(tmp_path, normalizer=normalizer))
    start = time.monotonic()
    with pytest.raises(cortex.TokenizerError, match="normalizer"):
        tok.encode("a" * 100)
    with pytest.raises(cortex.TokenizerError, match="normalizer"):
        tok.encode("ba")
    assert time.monotonic() - start < 1.0
    assert tok.encode("bb") == [1, 1]


def test_normalizer_growth_within_bounds_is_untouched(tmp_path):
    """A normalizer that grows text by a bounded factor (SentencePiece's " " -> "▁" is 3x in
    bytes) encodes long texts as before: the guard only steps in past 64x."""
    normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "a"},
                                                      _replace({"String": "b"}, "ab")]}  # fmt: skip
    tok = cortex.load_tokenizer(hf_tokenizer_dir(tmp_path, normalizer=normalizer))
    assert tok.encode("b" * 1000, add_special_tokens=False) == [0] + [2] * 1000
