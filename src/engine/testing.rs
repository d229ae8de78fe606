//! Fixtures of the engine's unit tests: a word-level tokenizer and the tiny random-weight
//! llama of `tests/fixtures/mlx_lm` (2 layers, hidden size 64, vocabulary 64), float and
//! 4-bit.

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
