//! Builds a `tokenizers::Tokenizer` from GGUF metadata, following llama.cpp's
//! `llama-vocab.cpp`: `tokenizer.ggml.model = gpt2` is byte-level BPE from
//! `tokenizer.ggml.tokens` and `.merges`, split before BPE by the pre-tokenizer that
//! `tokenizer.ggml.pre` names; control and user-defined tokens (`token_type` 3 and 4) are
//! matched whole in text, as transformers' added tokens are.

use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

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
    if model != "gpt2" {
        return Err(Error::config(
            "tokenizer.ggml.model",
            format!("tokenizer model '{model}' is not supported yet (supported: gpt2, i.e. byte-level BPE)"),
        ));
    }
    let tokens = string_array(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::config("tokenizer.ggml.tokens", "missing"))?;
    let merges = string_array(g, "tokenizer.ggml.merges")?
        .ok_or_else(|| Error::config("tokenizer.ggml.merges", "missing (required for BPE)"))?;
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

    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(n);
    for (id, tok) in tokens.iter().enumerate() {
        // Later duplicates would silently shadow earlier ids.
        if vocab.insert((*tok).to_string(), id as u32).is_some() {
            return Err(Error::config(
                "tokenizer.ggml.tokens",
                format!("token '{tok}' appears twice"),
            ));
        }
    }
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
    let ignore_merges = matches!(g.get("tokenizer.ggml.pre"), Some(Value::String(p)) if p == "llama-bpe" || p == "llama3");
    let bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .into_iter()
                .collect::<tokenizers::models::bpe::Vocab>(),
            merge_pairs,
        )
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("building BPE from GGUF metadata: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
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
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == TOKEN_CONTROL)
        .map(|(t, _)| AddedToken::from(t.to_string(), true))
        .collect();
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| ty == TOKEN_USER_DEFINED)
        .map(|(t, _)| AddedToken::from(t.to_string(), false))
        .collect();
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&user);

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
        tokens: tokens.iter().map(|s| s.to_string()).collect(),
        bos_token_id,
        eos_token_ids,
        add_bos_token,
    })
}
