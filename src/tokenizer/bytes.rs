//! Every token's bytes, as a grammar engine sees generated text (llguidance's `TokTrie`
//! takes one byte string per id). Both kinds of tokenizer Cortex builds (from
//! `tokenizer.json` or from GGUF metadata) are one `tokenizers::Tokenizer`, and its decoder
//! tells how a vocabulary entry becomes bytes:
//!
//! - byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): each char of the entry stands for one
//!   byte through GPT-2's table (printable bytes are themselves, the other 68 are U+0100..);
//! - SentencePiece with byte fallback (Llama 2, Gemma, Mistral): `<0xNN>` is byte NN, and the
//!   word-boundary char (`▁`, read from the decoder) is a space.
//!
//! Added tokens are their content; special ones are marked with a leading 0xFF, as
//! llguidance expects (a grammar reaches them only by name). An entry that cannot be
//! mapped gets no bytes: the grammar never allows it.

use serde_json::Value as Json;
use tokenizers::DecoderWrapper;

use crate::error::{Error, Result};

/// llguidance's marker for special tokens (`TokTrie::SPECIAL_TOKEN_MARKER`).
const SPECIAL: u8 = 0xFF;

/// The longest token kept, in bytes: a longer one (only a hostile vocabulary has it) is
/// never allowed, which bounds the trie.
const MAX_TOKEN_BYTES: usize = 1024;

/// How a vocabulary entry's chars become bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Convention {
    ByteLevel,
    /// SentencePiece: `<0xNN>` entries, `space` for the word boundary.
    SentencePiece {
        space: char,
    },
}

impl Convention {
    fn of(decoder: Option<&DecoderWrapper>) -> Result<Convention> {
        let unsupported = || {
            Error::Tokenizer(
                "structured output needs a byte-level BPE or SentencePiece tokenizer; this \
                 one's decoder maps tokens to text some other way"
                    .into(),
            )
        };
        let decoders = match decoder {
            Some(DecoderWrapper::Sequence(s)) => s.get_decoders().iter().collect(),
            Some(d) => vec![d],
            None => return Err(unsupported()),
        };
        if decoders
            .iter()
            .any(|d| matches!(d, DecoderWrapper::ByteLevel(_)))
        {
            return Ok(Convention::ByteLevel);
        }
        for d in &decoders {
            match d {
                DecoderWrapper::Metaspace(m) => {
                    return Ok(Convention::SentencePiece {
                        space: m.get_replacement(),
                    })
                }
                DecoderWrapper::Replace(r) => {
                    // `Replace` keeps its pattern private; its serialized form has it:
                    // {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}.
                    let json = serde_json::to_value(r).unwrap_or(Json::Null);
                    let pattern = json["pattern"]["String"].as_str().unwrap_or_default();
                    let mut chars = pattern.chars();
                    if let (Some(space), None, " ") = (chars.next(), chars.next(), &*r.content) {
                        return Ok(Convention::SentencePiece { space });
                    }
                }
                _ => {}
            }
        }
        if decoders
            .iter()
            .any(|d| matches!(d, DecoderWrapper::ByteFallback(_)))
        {
            return Ok(Convention::SentencePiece { space: '▁' });
        }
        Err(unsupported())
    }

    /// The bytes of vocabulary entry `piece`, or none when a char has no byte.
    fn bytes(self, piece: &str, byte_of: &[Option<u8>]) -> Option<Vec<u8>> {
        match self {
            Convention::ByteLevel => piece
                .chars()
                .map(|c| byte_of.get(c as usize).copied().flatten())
                .collect(),
            Convention::SentencePiece { space } => {
                if let Some(b) = byte_fallback(piece) {
                    return Some(vec![b]);
                }
                Some(piece.replace(space, " ").into_bytes())
            }
        }
    }
}

/// `<0xNN>` → byte NN.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// GPT-2's byte-to-char table inverted: `byte_of[c]` is the byte char `c` stands for.
fn byte_level_table() -> Vec<Option<u8>> {
    let mut byte_of = vec![None; 512];
    let mut next = 256;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            usize::from(b)
        } else {
            next += 1;
            next - 1
        };
        byte_of[c] = Some(b);
    }
    byte_of
}

/// The bytes of every id in `0..tokenizer.get_vocab_size(true)`: ids the tokenizer does not
/// know, and entries that cannot be mapped, get none.
pub(crate) fn token_bytes(tokenizer: &tokenizers::Tokenizer) -> Result<Vec<Vec<u8>>> {
    let convention = Convention::of(tokenizer.get_decoder())?;
    let byte_of = byte_level_table();
    let added = tokenizer.get_added_tokens_decoder();
    let vocab = tokenizer.get_vocab_size(true);
    let mut out = Vec::with_capacity(vocab);
    for id in 0..vocab as u32 {
        let bytes = match added.get(&id) {
            Some(t) if t.special => [&[SPECIAL][..], t.content.as_bytes()].concat(),
            Some(t) => t.content.clone().into_bytes(),
            None => tokenizer
                .id_to_token(id)
                .and_then(|piece| convention.bytes(&piece, &byte_of))
                .unwrap_or_default(),
        };
        out.push(if bytes.len() > MAX_TOKEN_BYTES {
            Vec::new()
        } else {
            bytes
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::bpe_json;

    /// `(piece, id)` for pieces numbered in order.
    fn pieces(p: &[&str]) -> Vec<(String, u32)> {
        p.iter()
            .zip(0..)
            .map(|(p, i)| ((*p).to_string(), i))
            .collect()
    }

    /// A tokenizer from `tokenizer.json` text.
    fn from_json(json: &str) -> tokenizers::Tokenizer {
        json.parse().expect("a valid tokenizer.json")
    }

    #[test]
    fn the_byte_level_table_is_a_bijection() {
        let table = byte_level_table();
        let mut seen = [false; 256];
        for b in table.iter().flatten() {
            assert!(!seen[*b as usize], "byte {b} twice");
            seen[*b as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        // GPT-2's table: space is U+0120 ('Ġ'), newline U+010A ('Ċ'), 'a' itself.
        assert_eq!(table['Ġ' as usize], Some(b' '));
        assert_eq!(table['Ċ' as usize], Some(b'\n'));
        assert_eq!(table['a' as usize], Some(b'a'));
    }

    #[test]
    fn byte_level_entries_specials_and_unmappable_chars() {
        let decoder = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true});
        let tok = from_json(&bpe_json(
            &pieces(&["Ġhi", "Ċ", "é", "世"]),
            &[(4, "<|end|>", true), (5, "<tool>", false)],
            &Json::Null,
            &decoder,
            false,
        ));
        let bytes = token_bytes(&tok).unwrap();
        assert_eq!(bytes.len(), 6);
        assert_eq!(bytes[0], b" hi");
        assert_eq!(bytes[1], b"\n");
        // 'é' (U+00E9) is printable Latin-1: byte 0xE9, one byte of a UTF-8 sequence.
        assert_eq!(bytes[2], [0xE9]);
        // '世' stands for no byte: never allowed.
        assert!(bytes[3].is_empty());
        assert_eq!(bytes[4], b"\xFF<|end|>");
        assert_eq!(bytes[5], b"<tool>");
    }

    #[test]
    fn sentencepiece_entries() {
        let decoder = serde_json::json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
        let vocab = pieces(&["<0x0A>", "▁hello", "wörld", "<0xZZ>", "<0x4142>"]);
        let tok = from_json(&bpe_json(&vocab, &[], &Json::Null, &decoder, true));
        let bytes = token_bytes(&tok).unwrap();
        assert_eq!(bytes[0], b"\n");
        assert_eq!(bytes[1], b" hello");
        assert_eq!(bytes[2], "wörld".as_bytes());
        // Not byte-fallback entries: text, as written.
        assert_eq!(bytes[3], b"<0xZZ>");
        assert_eq!(bytes[4], b"<0x4142>");
    }

    #[test]
    fn other_decoders_are_refused_by_name() {
        let tok = from_json(
            r#"{"version": "1.0", "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}}"#,
        );
        let e = token_bytes(&tok).unwrap_err().to_string();
        assert!(e.contains("byte-level BPE or SentencePiece"), "{e}");
    }
}
