//! Builds a `tokenizers::Tokenizer` from GGUF metadata, following llama.cpp's
//! `llama-vocab.cpp` and transformers' GGUF/SentencePiece converters:
//!
//! * `tokenizer.ggml.model = gpt2`: byte-level BPE from `tokenizer.ggml.tokens` and
//!   `.merges`, split before BPE by the pre-tokenizer that `tokenizer.ggml.pre` names;
//! * `tokenizer.ggml.model = llama`: SentencePiece BPE (llama, mistral, gemma) with merges
//!   derived from `tokenizer.ggml.scores` and byte fallback.
//!
//! Control and user-defined tokens (`token_type` 3 and 4) are matched whole in text, as
//! transformers' added tokens are.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::model::config::meta_usize;

/// llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3` split pattern.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2` split pattern.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` values understood, each with the pre-tokenizer transformers uses
/// for that family.
pub const SUPPORTED_PRE: &[&str] = &[
    "default",
    "gpt2",
    "gpt-2",
    "smollm",
    "starcoder",
    "refact",
    "llama-bpe",
    "llama3",
    "qwen2",
    "deepseek-r1-qwen",
];

/// Control tokens that end generation whatever the metadata's eos id says.
const END_OF_GENERATION: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
];

/// Token attributes from `tokenizer.ggml.token_type` (llama.cpp `llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

pub(crate) struct GgufVocab {
    pub tokenizer: tokenizers::Tokenizer,
    pub tokens: Vec<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub add_bos_token: bool,
}

fn string_array<'a>(g: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>> {
    match g.get(key) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(Error::config(
                    key,
                    format!("expected an array of strings, found {other:?}"),
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(v) => Err(Error::config(
            key,
            format!("expected an array of strings, got {:?}", v.value_type()),
        )),
    }
}

fn split(pattern: &str) -> Result<PreTokenizerWrapper> {
    let split = Split::new(
        SplitPattern::Regex(pattern.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| Error::Tokenizer(format!("invalid pre-tokenizer pattern: {e}")))?;
    Ok(split.into())
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true).into(),
        // StarCoder-family vocabularies (SmolLM included) split every digit apart first.
        "smollm" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into()
        }
        "llama-bpe" | "llama3" => {
            Sequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false).into()]).into()
        }
        "qwen2" | "deepseek-r1-qwen" => {
            Sequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false).into()]).into()
        }
        other => {
            return Err(Error::config(
                "tokenizer.ggml.pre",
                format!(
                    "pre-tokenizer '{other}' is not supported; supported: {}",
                    SUPPORTED_PRE.join(", ")
                ),
            ))
        }
    })
}

fn token_id(g: &GgufFile, key: &str, vocab: usize) -> Result<Option<u32>> {
    match meta_usize(g, key)? {
        None => Ok(None),
        Some(id) if id < vocab => Ok(Some(id as u32)),
        Some(id) => Err(Error::config(
            key,
            format!("token id {id} is outside the vocabulary of {vocab} tokens"),
        )),
    }
}

/// Byte-level BPE (GPT-2 style): merges from `tokenizer.ggml.merges`, the pre-tokenizer
/// that `tokenizer.ggml.pre` names.
fn byte_level_bpe(g: &GgufFile, vocab: &HashMap<&str, u32>) -> Result<tokenizers::Tokenizer> {
    let merges = string_array(g, "tokenizer.ggml.merges")?
        .ok_or_else(|| Error::config("tokenizer.ggml.merges", "missing (required for BPE)"))?;
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            Error::config(
                "tokenizer.ggml.merges",
                format!("merge {i} ('{m}') is not two tokens separated by a space"),
            )
        })?;
        if !vocab.contains_key(a) || !vocab.contains_key(b) {
            return Err(Error::config(
                "tokenizer.ggml.merges",
                format!("merge {i} ('{m}') uses a token not in the vocabulary"),
            ));
        }
        merge_pairs.push((a.to_string(), b.to_string()));
    }
    let pre = match g.get("tokenizer.ggml.pre") {
        None => "default",
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(Error::config(
                "tokenizer.ggml.pre",
                format!("expected a string, got {v:?}"),
            ))
        }
    };
    let bpe = BPE::builder()
        .vocab_and_merges(owned_vocab(vocab), merge_pairs)
        .ignore_merges(matches!(pre, "llama-bpe" | "llama3"))
        .build()
        .map_err(|e| Error::Tokenizer(format!("building BPE from GGUF metadata: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

fn owned_vocab(vocab: &HashMap<&str, u32>) -> tokenizers::models::bpe::Vocab {
    vocab.iter().map(|(k, &v)| ((*k).to_string(), v)).collect()
}

/// SentencePiece BPE (llama, mistral, gemma: `tokenizer.ggml.model = llama`), as
/// transformers converts it: spaces become U+2581 (with one prepended when
/// `tokenizer.ggml.add_space_prefix`), BPE over the whole text with merges derived from the
/// vocabulary — every split of a piece into two pieces, ordered by the merged piece's score
/// (`tokenizer.ggml.scores`, higher first) — and unknown characters spelled as `<0xNN>`
/// byte tokens.
fn sentencepiece_bpe(
    g: &GgufFile,
    tokens: &[&str],
    vocab: &HashMap<&str, u32>,
) -> Result<tokenizers::Tokenizer> {
    let key = "tokenizer.ggml.scores";
    let scores: Vec<f32> = match g.get(key) {
        Some(Value::Array(items)) if items.len() == tokens.len() => items
            .iter()
            .map(|v| match *v {
                Value::F32(x) if x.is_finite() => Ok(x),
                ref other => Err(Error::config(
                    key,
                    format!("expected finite f32 scores, found {other:?}"),
                )),
            })
            .collect::<Result<_>>()?,
        Some(Value::Array(items)) => {
            return Err(Error::config(
                key,
                format!("has {} entries for {} tokens", items.len(), tokens.len()),
            ))
        }
        Some(v) => {
            return Err(Error::config(
                key,
                format!("expected an array, got {:?}", v.value_type()),
            ))
        }
        None => return Err(Error::config(key, "missing (required for SentencePiece)")),
    };
    // (score, left id, right id) for every piece that splits into two pieces.
    let mut merges: Vec<(f32, u32, u32)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(&scores) {
        for (i, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (vocab.get(&piece[..i]), vocab.get(&piece[i..])) {
                merges.push((score, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = merges
        .into_iter()
        .map(|(_, l, r)| {
            (
                tokens[l as usize].to_string(),
                tokens[r as usize].to_string(),
            )
        })
        .collect();
    let unk = token_id(g, "tokenizer.ggml.unknown_token_id", tokens.len())?
        .map(|id| &tokens[id as usize])
        .or_else(|| tokens.iter().find(|t| **t == "<unk>"))
        .ok_or_else(|| {
            Error::config(
                "tokenizer.ggml.unknown_token_id",
                "missing, and no <unk> token",
            )
        })?;
    let bpe = BPE::builder()
        .vocab_and_merges(owned_vocab(vocab), merges)
        .unk_token((*unk).to_string())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| {
            Error::Tokenizer(format!(
                "building SentencePiece BPE from GGUF metadata: {e}"
            ))
        })?;
    let add_prefix = match g.get("tokenizer.ggml.add_space_prefix") {
        None => true, // SentencePiece's add_dummy_prefix default
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(Error::config(
                "tokenizer.ggml.add_space_prefix",
                format!("expected a bool, got {v:?}"),
            ))
        }
    };
    let replace = |from: &str, to: &str| {
        Replace::new(from, to)
            .map_err(|e| Error::Tokenizer(format!("SentencePiece normaliser: {e}")))
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    let mut decoders: Vec<DecoderWrapper> = vec![
        replace("\u{2581}", " ")?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if add_prefix {
        normalizers.push(Prepend::new("\u{2581}".into()).into());
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    normalizers.push(replace(" ", "\u{2581}")?.into());
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| Error::Tokenizer(format!("SentencePiece normaliser: {e}")))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

pub(crate) fn from_gguf(g: &GgufFile) -> Result<GgufVocab> {
    let model = match g.get("tokenizer.ggml.model") {
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(Error::config(
                "tokenizer.ggml.model",
                format!("expected a string, got {v:?}"),
            ))
        }
        None => {
            return Err(Error::config(
                "tokenizer.ggml.model",
                "missing: the file carries no tokenizer",
            ))
        }
    };
    let tokens = string_array(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::config("tokenizer.ggml.tokens", "missing"))?;
    let n = tokens.len();
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        None => vec![1; n],
        Some(Value::Array(items)) if items.len() == n => items
            .iter()
            .map(|v| match *v {
                Value::I32(x) => Ok(i64::from(x)),
                Value::U32(x) => Ok(i64::from(x)),
                Value::I8(x) => Ok(i64::from(x)),
                Value::U8(x) => Ok(i64::from(x)),
                ref other => Err(Error::config(
                    "tokenizer.ggml.token_type",
                    format!("expected integers, found {other:?}"),
                )),
            })
            .collect::<Result<_>>()?,
        Some(Value::Array(items)) => {
            return Err(Error::config(
                "tokenizer.ggml.token_type",
                format!("has {} entries for {n} tokens", items.len()),
            ))
        }
        Some(v) => {
            return Err(Error::config(
                "tokenizer.ggml.token_type",
                format!("expected an array, got {:?}", v.value_type()),
            ))
        }
    };
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(n);
    for (id, tok) in tokens.iter().enumerate() {
        // Later duplicates would silently shadow earlier ids.
        if vocab.insert(tok, id as u32).is_some() {
            return Err(Error::config(
                "tokenizer.ggml.tokens",
                format!("token '{tok}' appears twice"),
            ));
        }
    }
    let mut tokenizer = match model {
        "gpt2" => byte_level_bpe(g, &vocab)?,
        "llama" => sentencepiece_bpe(g, &tokens, &vocab)?,
        other => {
            return Err(Error::config(
                "tokenizer.ggml.model",
                format!("tokenizer model '{other}' is not supported (supported: gpt2 = byte-level BPE, llama = SentencePiece BPE)"),
            ))
        }
    };

    // Control tokens are special (skipped by `decode(skip_special_tokens=True)`);
    // user-defined ones are ordinary text. Both are matched whole in the raw input, before
    // any normalisation, as transformers' added tokens are.
    let added = |kind: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == kind)
            .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
            .collect()
    };
    let add_failed = |e: tokenizers::Error| Error::Tokenizer(format!("adding special tokens: {e}"));
    tokenizer
        .add_special_tokens(added(TOKEN_CONTROL, true))
        .map_err(add_failed)?;
    tokenizer
        .add_tokens(added(TOKEN_USER_DEFINED, false))
        .map_err(add_failed)?;

    // Every special-token id the file names must lie in the vocabulary, also those this
    // loader does not use (unknown, padding, separator, mask, fill-in-the-middle...): an
    // id outside it means the metadata does not describe this vocabulary.
    for key in g.metadata.keys() {
        if key.starts_with("tokenizer.ggml.") && key.ends_with("_token_id") {
            token_id(g, key, n)?;
        }
    }
    let bos_token_id = token_id(g, "tokenizer.ggml.bos_token_id", n)?;
    let mut eos_token_ids = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = token_id(g, key, n)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    // Files often name only one end token while chat models end turns with another
    // (Gemma's <end_of_turn>, ChatML's <|im_end|>); llama.cpp (`llama-vocab.cpp`) treats
    // these control tokens as end-of-generation too.
    for (id, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == TOKEN_CONTROL
            && END_OF_GENERATION.contains(tok)
            && !eos_token_ids.contains(&(id as u32))
        {
            eos_token_ids.push(id as u32);
        }
    }
    let add_bos_token = match g.get("tokenizer.ggml.add_bos_token") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(Error::config(
                "tokenizer.ggml.add_bos_token",
                format!("expected a bool, got {v:?}"),
            ))
        }
    };
    if add_bos_token && bos_token_id.is_none() {
        return Err(Error::config(
            "tokenizer.ggml.bos_token_id",
            "missing while add_bos_token is true",
        ));
    }
    Ok(GgufVocab {
        tokenizer,
        tokens: tokens
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
        bos_token_id,
        eos_token_ids,
        add_bos_token,
    })
}
