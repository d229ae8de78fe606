//! Tokenizers: `tokenizers::Tokenizer` built from `tokenizer.json` or from GGUF metadata,
//! the model's chat template, and an incremental, UTF-8-safe detokenizer for streaming.

mod bytes;
pub mod chat;
pub mod detok;
mod gguf;
mod normalize;

use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

pub use chat::ChatTemplate;
pub use detok::StreamDecoder;
use normalize::NormalizerGuard;

use crate::engine::grammar::Grammars;
use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;

#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepended by `encode` when special tokens are asked for (GGUF `add_bos_token`);
    /// tokenizers loaded from `tokenizer.json` add it through their own post-processor.
    add_bos: bool,
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (eos, end-of-turn...).
    pub eos_token_ids: Vec<u32>,
    chat_template: Option<ChatTemplate>,
    /// Cached: `tokenizers` computes it by building the whole vocabulary map.
    vocab_size: usize,
    /// Refuses texts the normalizer would blow up (a hostile `tokenizer.json`).
    normalizer_guard: NormalizerGuard,
    /// The grammar compiler for constrained output, built on first use (0.2 s for 49,152
    /// tokens); a tokenizer it cannot serve keeps the reason.
    grammars: OnceLock<std::result::Result<Arc<Grammars>, String>>,
}

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::config(path.display().to_string(), format!("invalid JSON: {e}")))
}

/// A special token in tokenizer_config.json: a string, or an object with `content`.
fn token_content(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// GPT-2's end-of-text token, the default of every special token in its tokenizer.
const GPT2_EOS: &str = "<|endoftext|>";

/// A byte-level BPE tokenizer from GPT-2's original files (`vocab.json`, `merges.txt`), as
/// transformers' `GPT2TokenizerFast` builds it: no prefix space, the GPT-2 split regex,
/// `<|endoftext|>` special.
fn byte_level_bpe_files(vocab: &Path, merges: &Path) -> Result<tokenizers::Tokenizer> {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let (v, m) = (vocab.to_string_lossy(), merges.to_string_lossy());
    let bpe = tokenizers::models::bpe::BPE::from_file(&v, &m)
        .build()
        .map_err(|e| Error::Tokenizer(format!("{v} / {m}: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    if tokenizer.token_to_id(GPT2_EOS).is_some() {
        tokenizer
            .add_special_tokens([tokenizers::AddedToken::from(GPT2_EOS, true)])
            .map_err(|e| Error::Tokenizer(format!("adding {GPT2_EOS}: {e}")))?;
    }
    Ok(tokenizer)
}

/// The `added_tokens` of a `tokenizer.json` as (declared id, content); an id past 2^32 is
/// an error here, named, rather than a parse error deep in `tokenizers`.
fn declared_added_tokens(text: &str) -> Result<Vec<(u32, String)>> {
    #[derive(serde::Deserialize)]
    struct Added {
        id: u64,
        content: String,
    }
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        added_tokens: Vec<Added>,
    }
    let file: File = serde_json::from_str(text)
        .map_err(|e| Error::config(ADDED_TOKENS, format!("invalid entry: {e}")))?;
    file.added_tokens
        .into_iter()
        .map(|t| match u32::try_from(t.id) {
            Ok(id) => Ok((id, t.content)),
            Err(_) => Err(Error::config(
                ADDED_TOKENS,
                format!("token '{}' has id {}, past 2^32", t.content, t.id),
            )),
        })
        .collect()
}

const ADDED_TOKENS: &str = "tokenizer.json: added_tokens";

/// Checks that every added token got the id `tokenizer.json` declares: `tokenizers`
/// silently gives a token whose id is absurd (past the vocabulary, or taken by another
/// token) a different one, so prompts and stop ids would disagree with the model's training.
fn check_added_tokens(declared: &[(u32, String)], inner: &tokenizers::Tokenizer) -> Result<()> {
    for (id, content) in declared {
        let got = inner.token_to_id(content);
        if got != Some(*id) {
            let what = match got {
                Some(other) => format!("the tokenizer gives it id {other}"),
                None => "the tokenizer does not know it".to_string(),
            };
            return Err(Error::config(
                ADDED_TOKENS,
                format!(
                    "token '{content}' is declared with id {id}, but {what}: the id is out of range or taken"
                ),
            ));
        }
    }
    Ok(())
}

impl Tokenizer {
    /// The tokenizer stored in a GGUF file's metadata, with its chat template.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let vocab = gguf::from_gguf(g)?;
        let token_text = |id: Option<u32>| {
            id.map(|i| vocab.tokens[i as usize].clone())
                .unwrap_or_default()
        };
        let chat_template = match g.get("tokenizer.chat_template") {
            None => None,
            Some(Value::String(src)) => Some(ChatTemplate::new(
                src,
                &token_text(vocab.bos_token_id),
                &token_text(vocab.eos_token_ids.first().copied()),
            )?),
            Some(v) => {
                return Err(Error::config(
                    "tokenizer.chat_template",
                    format!("expected a string, got {:?}", v.value_type()),
                ))
            }
        };
        Ok(Tokenizer {
            vocab_size: vocab.tokenizer.get_vocab_size(true),
            normalizer_guard: NormalizerGuard::new(vocab.tokenizer.get_normalizer())?,
            grammars: OnceLock::new(),
            inner: vocab.tokenizer,
            add_bos: vocab.add_bos_token,
            bos_token_id: vocab.bos_token_id,
            eos_token_ids: vocab.eos_token_ids,
            chat_template,
        })
    }

    /// A Hugging Face tokenizer folder: `tokenizer.json`, with `tokenizer_config.json`
    /// (special tokens, chat template) and `generation_config.json` (eos ids) when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let (vocab_file, merges_file) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let gpt2_files = !path.is_file() && vocab_file.is_file() && merges_file.is_file();
        let inner = if gpt2_files {
            byte_level_bpe_files(&vocab_file, &merges_file)?
        } else {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let declared = declared_added_tokens(&text)?;
            let inner = text
                .parse::<tokenizers::Tokenizer>()
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
            check_added_tokens(&declared, &inner)?;
            inner
        };
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
        // A special token the model names must exist: without it generation would never
        // stop (eos) or prompts would silently lack their first token (bos).
        let id_of = |key: &str, tok: &Option<String>| -> Result<Option<u32>> {
            match tok.as_deref() {
                None => Ok(None),
                Some(t) => inner.token_to_id(t).map(Some).ok_or_else(|| {
                    Error::config(
                        format!("tokenizer_config.json: {key}"),
                        format!("'{t}' is not in the vocabulary"),
                    )
                }),
            }
        };
        let bos_token = token_content(config.get("bos_token"));
        let eos_token = token_content(config.get("eos_token"));
        let bos_token_id = id_of("bos_token", &bos_token)?;
        let mut eos_token_ids: Vec<u32> = id_of("eos_token", &eos_token)?.into_iter().collect();
        let vocab_size = inner.get_vocab_size(true);
        if let Some(gen) = read_json(&dir.join("generation_config.json"))? {
            let field = "generation_config.json: eos_token_id";
            let id = |v: &Json| {
                v.as_u64().ok_or_else(|| {
                    Error::config(
                        field,
                        format!("expected a token id or a list of them, got {v}"),
                    )
                })
            };
            let ids = match gen.get("eos_token_id") {
                None | Some(Json::Null) => vec![],
                Some(Json::Array(items)) => items.iter().map(id).collect::<Result<Vec<_>>>()?,
                Some(v) => vec![id(v)?],
            };
            let vocab = vocab_size as u64;
            for id in ids {
                if id >= vocab {
                    return Err(Error::config(
                        field,
                        format!("{id} is outside the vocabulary of {vocab} tokens"),
                    ));
                }
                if !eos_token_ids.contains(&(id as u32)) {
                    eos_token_ids.push(id as u32);
                }
            }
        }
        let source = match config.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            // A list of named templates: transformers uses the one named "default".
            Some(Json::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Json::as_str))
                .map(str::to_string),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let chat_template = source
            .map(|s| {
                ChatTemplate::new(
                    &s,
                    bos_token.as_deref().unwrap_or(""),
                    eos_token.as_deref().unwrap_or(""),
                )
            })
            .transpose()?;
        // GPT-2's tokenizer class defaults every special token to <|endoftext|>.
        if gpt2_files && eos_token_ids.is_empty() {
            eos_token_ids.extend(inner.token_to_id(GPT2_EOS));
        }
        Ok(Tokenizer {
            vocab_size,
            normalizer_guard: NormalizerGuard::new(inner.get_normalizer())?,
            grammars: OnceLock::new(),
            inner,
            add_bos: false,
            bos_token_id,
            eos_token_ids,
            chat_template,
        })
    }

    /// Token ids of `text`. With `add_special_tokens` the model's BOS is added where the
    /// model asks for one; special tokens written in the text are always recognised.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.normalizer_guard.check(text)?;
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos {
            if let Some(bos) = self.bos_token_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::param(
                "ids",
                format!("token id {bad} is out of vocabulary (size {vocab})"),
            ));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The grammar compiler for this tokenizer's vocabulary (built once, on first use).
    pub fn grammars(&self) -> Result<Arc<Grammars>> {
        self.grammars
            .get_or_init(|| Grammars::new(self).map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(Error::Tokenizer)
    }

    /// Every id's bytes as generated text has them, special tokens marked with a leading
    /// 0xFF (`bytes.rs`): what a grammar engine matches tokens by.
    pub fn token_bytes(&self) -> Result<Vec<Vec<u8>>> {
        bytes::token_bytes(&self.inner)
    }

    /// Hugging Face tokenizer files for this tokenizer: `tokenizer.json` (BOS added by a
    /// post-processor where the model wants one, so `tokenizers` alone encodes as Cortex
    /// does), `tokenizer_config.json` (special tokens, `chat_template`) and
    /// `generation_config.json` (every end-of-generation id).
    pub fn hf_files(&self, chat_template: Option<&str>) -> Result<Vec<(String, String)>> {
        let err = |e: &dyn std::fmt::Display| {
            Error::Tokenizer(format!("serialising tokenizer.json: {e}"))
        };
        let mut json: Json =
            serde_json::from_str(&self.inner.to_string(false).map_err(|e| err(&e))?)
                .map_err(|e| err(&e))?;
        let text = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let bos = text(self.bos_token_id);
        let eos = text(self.eos_token_ids.first().copied());
        if let (true, Some(bos), Some(bos_id)) = (self.add_bos, &bos, self.bos_token_id) {
            let special =
                |type_id: u32| serde_json::json!({"SpecialToken": {"id": bos, "type_id": type_id}});
            let seq = |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
            let template = serde_json::json!({
                "type": "TemplateProcessing",
                "single": [special(0), seq("A", 0)],
                "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
                "special_tokens": {bos.clone(): {"id": bos, "ids": [bos_id], "tokens": [bos]}},
            });
            let processor = match json.get("post_processor") {
                Some(existing) if !existing.is_null() => {
                    serde_json::json!({"type": "Sequence", "processors": [existing, template]})
                }
                _ => template,
            };
            json["post_processor"] = processor;
        }
        let tokenizer_json = serde_json::to_string(&json).map_err(|e| err(&e))?;
        // Check the result loads before anyone else relies on it.
        tokenizer_json
            .parse::<tokenizers::Tokenizer>()
            .map_err(|e| {
                Error::Tokenizer(format!("generated tokenizer.json does not load: {e}"))
            })?;
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
            "add_bos_token": self.add_bos,
            "bos_token": bos,
            "eos_token": eos,
        });
        if let Some(t) = chat_template {
            config["chat_template"] = Json::String(t.to_string());
        }
        let generation = serde_json::json!({
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
        });
        let pretty = |v: &Json| serde_json::to_string_pretty(v).map_err(|e| err(&e));
        Ok(vec![
            ("tokenizer.json".into(), tokenizer_json),
            ("tokenizer_config.json".into(), pretty(&config)?),
            ("generation_config.json".into(), pretty(&generation)?),
        ])
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Compiles `source` as a chat template for this tokenizer (its BOS and first EOS
    /// token as `bos_token` / `eos_token`): a template given in place of the model's own.
    pub fn chat_template_from(&self, source: &str) -> Result<ChatTemplate> {
        let text = |id: Option<u32>| id.and_then(|i| self.id_to_token(i)).unwrap_or_default();
        ChatTemplate::new(
            source,
            &text(self.bos_token_id),
            &text(self.eos_token_ids.first().copied()),
        )
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Json>,
    ) -> Result<String> {
        self.chat_template
            .as_ref()
            .ok_or_else(|| Error::Template("this model has no chat template".into()))?
            .render(messages, add_generation_prompt, extra)
    }
}

/// Converts user-supplied token ids (any integer type from Python or JSON) after checking
/// each lies in `0..vocab_size`.
pub fn check_token_ids(ids: &[i64], vocab_size: usize, field: &str) -> Result<Vec<u32>> {
    ids.iter()
        .map(|&id| {
            u32::try_from(id)
                .ok()
                .filter(|&u| (u as usize) < vocab_size)
                .ok_or_else(|| {
                    Error::param(
                        field,
                        format!("token id {id} is out of vocabulary (size {vocab_size})"),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A word-level `tokenizer.json` of four tokens, `</s>` declared as an added token.
    const TOKENIZER_JSON: &str = r#"{"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 3, "content": "</s>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"hello": 0, "world": 1, "[UNK]": 2, "</s>": 3},
            "unk_token": "[UNK]"}}"#;

    /// A tokenizer folder holding `files` (name, contents) beside [`TOKENIZER_JSON`].
    fn folder(name: &str, files: &[(&str, &str)]) -> Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("cortex-tok-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        for (file, text) in [("tokenizer.json", TOKENIZER_JSON)].iter().chain(files) {
            let path = dir.join(file);
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        }
        Ok(dir)
    }

    fn config_field(result: Result<Tokenizer>) -> String {
        match result {
            Err(Error::Config { field, .. }) => field,
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    #[test]
    fn a_folder_gives_ids_special_tokens_and_template() -> Result<()> {
        let dir = folder(
            "ok",
            &[
                (
                    "tokenizer_config.json",
                    r#"{"eos_token": "</s>", "chat_template":
                        "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}"#,
                ),
                ("generation_config.json", r#"{"eos_token_id": [3]}"#),
            ],
        )?;
        let tok = Tokenizer::from_dir(&dir)?;
        assert_eq!(tok.vocab_size(), 4);
        assert_eq!(tok.encode("hello world </s>", true)?, [0, 1, 3]);
        assert_eq!(tok.encode("goodbye", false)?, [2]);
        assert_eq!(tok.eos_token_ids, [3], "eos named twice counts once");
        assert_eq!(tok.bos_token_id, None);
        assert_eq!(tok.token_to_id("world"), Some(1));
        assert!(tok.decode(&[0, 1, 3], true)?.starts_with("hello"));
        let messages = serde_json::json!([{"role": "user", "content": "hello"}]);
        assert_eq!(
            tok.apply_chat_template(&messages, false, &serde_json::Map::new())?,
            "hello</s>"
        );
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))
    }

    #[test]
    fn special_tokens_outside_the_vocabulary_are_refused() -> Result<()> {
        let cases = [
            (
                "tokenizer_config.json",
                r#"{"bos_token": "<s>"}"#,
                "bos_token",
            ),
            (
                "generation_config.json",
                r#"{"eos_token_id": 4}"#,
                "eos_token_id",
            ),
            (
                "generation_config.json",
                r#"{"eos_token_id": "x"}"#,
                "eos_token_id",
            ),
        ];
        for (i, (file, text, key)) in cases.into_iter().enumerate() {
            let dir = folder(&format!("bad{i}"), &[(file, text)])?;
            assert_eq!(
                config_field(Tokenizer::from_dir(&dir)),
                format!("{file}: {key}")
            );
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        Ok(())
    }

    #[test]
    fn user_token_ids_are_range_checked() {
        assert_eq!(check_token_ids(&[0, 3], 4, "prompt").ok(), Some(vec![0, 3]));
        for bad in [-1, 4, i64::MAX] {
            match check_token_ids(&[0, bad], 4, "prompt") {
                Err(Error::InvalidParam { param, message }) => {
                    assert_eq!(param, "prompt");
                    assert!(message.contains(&bad.to_string()), "{message}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
