//! Incremental detokenization for streaming, after text-generation-inference's
//! `decode_token`: decode a short window of recent tokens, compare with the window's
//! previous decode, and emit only text that is complete. A byte-level token may hold part
//! of a UTF-8 character; its decode then ends in U+FFFD and is held back until the next
//! token completes it, so chunks never split a character and concatenate exactly to the
//! decode of all tokens.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// Tokens before this index have been emitted.
    read_offset: usize,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text that became complete (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], false)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], false)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            if let Some(new) = full.strip_prefix(prefix.as_str()) {
                let new = new.to_string();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                return Ok(new);
            }
        }
        Ok(String::new())
    }

    /// Text of tokens pushed but not yet emitted (an incomplete character decodes as
    /// U+FFFD, exactly as a decode of the whole sequence would show it).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], false)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], false)?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full
            .strip_prefix(prefix.as_str())
            .unwrap_or(&full)
            .to_string())
    }
}
