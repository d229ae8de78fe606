//! Fixtures of the engine's unit tests: a word-level tokenizer, a byte-level one of 64
//! single characters (for constrained output), and the tiny random-weight llama of
//! `tests/fixtures/mlx_lm` (2 layers, hidden size 64, vocabulary 64), float and 4-bit.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};
use crate::model::{load_model, Model};
use crate::tokenizer::Tokenizer;

/// A word-level tokenizer of `vocab` words `w0 w1 ...` (`w0` doubles as unknown), written
/// to a scratch folder once per size and process.
pub fn word_tokenizer(vocab: usize) -> Arc<Tokenizer> {
    /// The tokenizers built so far, by vocabulary size.
    type Built = parking_lot::Mutex<Vec<(usize, Arc<Tokenizer>)>>;
    static BUILT: OnceLock<Built> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock();
    if let Some((_, t)) = built.iter().find(|(v, _)| *v == vocab) {
        return t.clone();
    }
    let words: Vec<String> = (0..vocab).map(|i| format!("\"w{i}\": {i}")).collect();
    let json = format!(
        r#"{{"version": "1.0", "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null, "decoder": null,
        "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "w0"}}}}"#,
        words.join(", ")
    );
    let dir = std::env::temp_dir().join(format!("cortex-words-{vocab}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch folder for the test tokenizer");
    std::fs::write(dir.join("tokenizer.json"), json).expect("the test tokenizer written");
    let tokenizer = Arc::new(Tokenizer::from_dir(&dir).expect("the test tokenizer loads"));
    built.push((vocab, tokenizer.clone()));
    tokenizer
}

/// The characters of [`char_tokenizer`], token `i` being `CHARS[i]`; id 63 is `<eos>`.
pub const CHARS: &str = " {}[]\":,.-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ";

/// A byte-level BPE tokenizer with one token per char of [`CHARS`] (63 of them, JSON's
/// punctuation, digits and letters) and `<eos>` (id 63, special, the end-of-sequence
/// token): the tiny llama's vocabulary of 64, in a form a grammar can constrain.
pub fn char_tokenizer() -> Arc<Tokenizer> {
    static BUILT: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // GPT-2's byte-level table maps the space to 'Ġ'; the other chars are themselves.
            let vocab: Vec<(String, u32)> = CHARS
                .chars()
                .zip(0..)
                .map(|(c, i)| (if c == ' ' { 'Ġ' } else { c }.to_string(), i))
                .collect();
            let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                "trim_offsets": true, "use_regex": false});
            let json = bpe_json(
                &vocab,
                &[(63, "<eos>", true)],
                &byte_level,
                &byte_level,
                false,
            );
            let dir = std::env::temp_dir().join(format!("cortex-chars-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("a scratch folder for the test tokenizer");
            std::fs::write(dir.join("tokenizer.json"), json).expect("the tokenizer written");
            std::fs::write(
                dir.join("tokenizer_config.json"),
                r#"{"eos_token": "<eos>"}"#,
            )
            .expect("its config written");
            Arc::new(Tokenizer::from_dir(&dir).expect("the test tokenizer loads"))
        })
        .clone()
}

/// A `tokenizer.json` of a BPE model without merges: `vocab` (piece, id), `added` tokens
/// (id, content, special), a pre-tokenizer and a decoder (as `tokenizer.json` writes them),
/// byte fallback on or off.
pub fn bpe_json(
    vocab: &[(String, u32)],
    added: &[(u32, &str, bool)],
    pre_tokenizer: &serde_json::Value,
    decoder: &serde_json::Value,
    byte_fallback: bool,
) -> String {
    let added: Vec<serde_json::Value> = added
        .iter()
        .map(|&(id, content, special)| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": special})
        })
        .collect();
    let vocab: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .map(|(p, i)| (p.clone(), (*i).into()))
        .collect();
    serde_json::json!({
        "version": "1.0", "normalizer": null, "post_processor": null,
        "pre_tokenizer": pre_tokenizer, "decoder": decoder, "added_tokens": added,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": byte_fallback, "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// The tiny llama: `"source"` (bf16 weights, computed in f32, f32 cache) or `"q4g32"` (MLX
/// 4-bit groups of 32, f16 cache).
pub fn tiny_model(variant: &str) -> Result<Arc<Model>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mlx_lm")
        .join(variant);
    if !dir.is_dir() {
        return Err(Error::Internal(format!(
            "test model {} missing",
            dir.display()
        )));
    }
    Ok(Arc::new(load_model(&dir)?))
}
