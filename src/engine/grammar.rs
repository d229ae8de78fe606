//! Constrained decoding: a request's JSON schema, regex or Lark grammar compiled by
//! llguidance into a `Matcher` that, step by step, gives the set of tokens that keep the
//! output valid (the mask applied before sampling) and says when the output is complete.
//!
//! One [`Grammars`] per tokenizer holds llguidance's token trie (built from
//! `tokenizer::bytes`) and parser factory; compiling a constraint takes about a
//! millisecond, a mask tens of microseconds (docs/design/structured_output.md §2).

use std::sync::Arc;

use parking_lot::Mutex;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// The largest grammar source (or serialized schema) accepted, in bytes.
pub const MAX_GRAMMAR_BYTES: usize = 256 << 10;

/// Whitespace JSON may have between its tokens unless the schema says otherwise (in
/// `x-guidance`): llguidance's default is unbounded, where a small model can spend its
/// whole budget on spaces.
pub(crate) const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{0,32}";

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// A JSON document valid against this JSON Schema.
    JsonSchema(Arc<Json>),
    /// Any JSON object.
    JsonObject,
    /// The whole output matches this regular expression (Rust `regex` syntax).
    Regex(String),
    /// The whole output is a sentence of this Lark grammar (llguidance's dialect).
    Lark(String),
}

impl Constraint {
    /// The request parameter that carries it, as the user spells it.
    pub fn param(&self) -> &'static str {
        match self {
            Constraint::JsonSchema(_) => "json_schema",
            Constraint::JsonObject => "json_object",
            Constraint::Regex(_) => "regex",
            Constraint::Lark(_) => "grammar",
        }
    }

    /// Checks what can be checked without a tokenizer: size, and a schema's type.
    pub fn validate(&self) -> Result<()> {
        let size = match self {
            Constraint::JsonSchema(s) => s.to_string().len(),
            Constraint::JsonObject => 0,
            Constraint::Regex(s) | Constraint::Lark(s) => s.len(),
        };
        if size > MAX_GRAMMAR_BYTES {
            return Err(Error::param(
                self.param(),
                format!("{size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted"),
            ));
        }
        match self {
            Constraint::JsonSchema(s) if !matches!(**s, Json::Object(_) | Json::Bool(true)) => {
                Err(Error::param(
                    "json_schema",
                    "a JSON Schema is an object (or `true`, which allows any JSON)",
                ))
            }
            Constraint::Regex(s) | Constraint::Lark(s) if s.trim().is_empty() => {
                Err(Error::param(self.param(), "empty"))
            }
            _ => Ok(()),
        }
    }

    /// Identifies the compiled grammar: the kind and the source as written (a schema's keys
    /// keep their order, which the output follows).
    fn cache_key(&self) -> String {
        match self {
            Constraint::JsonSchema(s) => format!("json_schema {s}"),
            Constraint::JsonObject => "json_object".into(),
            Constraint::Regex(s) => format!("regex {s}"),
            Constraint::Lark(s) => format!("grammar {s}"),
        }
    }

    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Constraint::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(with_defaults(schema))
            }
            Constraint::JsonObject => TopLevelGrammar::from_json_schema(with_defaults(
                &serde_json::json!({"type": "object"}),
            )),
            Constraint::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Constraint::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        }
    }
}

/// `schema` with Cortex's JSON defaults where it sets none (`x-guidance` options).
fn with_defaults(schema: &Json) -> Json {
    let defaults = serde_json::json!({"whitespace_pattern": JSON_WHITESPACE});
    match schema {
        Json::Object(o) if !o.contains_key("x-guidance") => {
            let mut o = o.clone();
            o.insert("x-guidance".into(), defaults);
            Json::Object(o)
        }
        // `true`: any JSON, with the same defaults.
        Json::Bool(true) => serde_json::json!({"x-guidance": defaults}),
        other => other.clone(),
    }
}

/// Compiled constraints kept per tokenizer: a server sees the same few schemas again and
/// again, and a deep clone of a compiled matcher costs microseconds against a millisecond
/// or more to compile.
const CACHED_GRAMMARS: usize = 64;

/// A tokenizer's grammar compiler: llguidance's token trie and parser factory, and the
/// most recently compiled constraints.
pub struct Grammars {
    factory: ParserFactory,
    /// `(key, fresh matcher)`, the most recently used last; the key is the constraint's
    /// kind and source (`Constraint::cache_key`).
    cache: Mutex<Vec<(String, Matcher)>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grammars")
    }
}

impl Grammars {
    /// The compiler for `tokenizer` (0.2 s for a vocabulary of 49,152 on one core).
    pub fn new(tokenizer: &Tokenizer) -> Result<Grammars> {
        let mut bytes = tokenizer.token_bytes()?;
        // The trie's EOS ids: the tokenizer's, or a placeholder id past its vocabulary
        // (special, so never produced) when it has none.
        let mut eos: Vec<u32> = (tokenizer.eos_token_ids.iter().copied())
            .filter(|&id| (id as usize) < bytes.len())
            .collect();
        if eos.is_empty() {
            eos.push(bytes.len() as u32);
            bytes.push(b"\xFF<|cortex-eos|>".to_vec());
        }
        let info = TokRxInfo::new(bytes.len() as u32, eos[0]);
        let trie = TokTrie::from(&info, &bytes).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::Tokenizer(format!("building the grammar compiler: {e}")))?;
        factory.quiet();
        Ok(Grammars {
            factory,
            cache: Mutex::new(Vec::with_capacity(CACHED_GRAMMARS)),
        })
    }

    /// A fresh matcher for `constraint` (from the cache when it was compiled lately); a
    /// schema or grammar that does not compile is [`Error::Grammar`] naming its parameter.
    ///
    /// Every matcher handed out is a deep clone (7 µs): a plain clone would share the
    /// cached matcher's lexer, which then grows with every request and, once one request
    /// exhausts its budget, fails all later ones (llguidance keeps a lexer error).
    pub fn compile(&self, constraint: &Constraint) -> Result<Matcher> {
        let key = constraint.cache_key();
        if let Some(m) = self.cached(&key) {
            return Ok(m);
        }
        constraint.validate()?;
        let parser = self
            .factory
            .create_parser(constraint.top_level())
            .map_err(|e| Error::Grammar {
                param: constraint.param().into(),
                message: short(&e.to_string()),
            })?;
        let matcher = Matcher::new(Ok(parser));
        let mut cache = self.cache.lock();
        // Another request may have compiled the same constraint meanwhile.
        if !cache.iter().any(|(k, _)| *k == key) {
            if cache.len() == CACHED_GRAMMARS {
                cache.remove(0);
            }
            cache.push((key, matcher.deep_clone()));
        }
        Ok(matcher)
    }

    /// A deep clone of the cached matcher for `key`, now the most recently used.
    fn cached(&self, key: &str) -> Option<Matcher> {
        let mut cache = self.cache.lock();
        let i = cache.iter().position(|(k, _)| k == key)?;
        let entry = cache.remove(i);
        let matcher = entry.1.deep_clone();
        cache.push(entry);
        Some(matcher)
    }

    /// The vocabulary the masks cover (the tokenizer's, plus a placeholder EOS).
    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }
}

/// An llguidance message cut to 1 KiB (a grammar error can quote a large grammar).
fn short(message: &str) -> String {
    const MAX: usize = 1024;
    if message.len() <= MAX {
        return message.to_string();
    }
    let mut end = MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// Sets every logit the mask forbids to −∞. `logits` may be longer than the mask (a model
/// vocabulary padded past the tokenizer's): those ids are never allowed.
pub fn apply_mask(mask: &SimpleVob, logits: &mut [f32]) {
    let words = mask.as_slice();
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = words.get(w).copied().unwrap_or(0);
        if bits == u32::MAX && chunk.len() == 32 {
            continue;
        }
        for (i, l) in chunk.iter_mut().enumerate() {
            if bits >> i & 1 == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{char_tokenizer, CHARS};

    const EOS: u32 = 63;

    fn id(c: u8) -> u32 {
        CHARS
            .bytes()
            .position(|b| b == c)
            .expect("a char of the test tokenizer") as u32
    }

    /// Greedy decoding where the "model" prefers, in order, the bytes of `wish` and then
    /// EOS: returns what the grammar let through.
    fn decode(g: &Grammars, c: &Constraint, wish: &str) -> (String, bool) {
        let mut m = g.compile(c).unwrap();
        let mut out = String::new();
        let mut wishes = wish.bytes();
        for _ in 0..200 {
            let mask = m.compute_mask().unwrap();
            let preferred = wishes.next().map_or(EOS, id);
            let token = if mask.is_allowed(preferred) {
                preferred
            } else {
                // The first allowed token, the space last: what a model with no better
                // idea would take (whitespace is allowed almost everywhere in JSON).
                (1..=EOS)
                    .chain([0])
                    .find(|&t| mask.is_allowed(t))
                    .expect("some token allowed")
            };
            m.consume_token(token).unwrap();
            if token == EOS {
                return (out, true);
            }
            out.push(CHARS.as_bytes()[token as usize] as char);
            if m.is_stopped() {
                return (out, true);
            }
        }
        (out, false)
    }

    #[test]
    fn a_regex_shapes_the_output_and_ends_it() {
        let g = Grammars::new(&char_tokenizer()).unwrap();
        assert_eq!(g.vocab_size(), 64);
        let c = Constraint::Regex("[0-9]{3}-[a-z]+".into());
        // Wishing for letters where digits must come: the grammar substitutes.
        let (out, done) = decode(&g, &c, "ab1-xyz");
        assert!(done);
        let re = regex_lite(&out);
        assert!(re, "{out:?}");
    }

    /// `[0-9]{3}-[a-z]+` by hand (the crate does not depend on a regex engine).
    fn regex_lite(s: &str) -> bool {
        let (digits, rest) = s.split_at(3.min(s.len()));
        digits.len() == 3
            && digits.bytes().all(|b| b.is_ascii_digit())
            && rest.starts_with('-')
            && rest.len() > 1
            && rest[1..].bytes().all(|b| b.is_ascii_lowercase())
    }

    #[test]
    fn json_schemas_give_valid_json_and_eos_only_when_complete() {
        let g = Grammars::new(&char_tokenizer()).unwrap();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
            "required": ["a", "b"], "additionalProperties": false
        });
        let c = Constraint::JsonSchema(Arc::new(schema));
        // A "model" that wants to stop at once: EOS is not allowed before the object is whole.
        let (out, done) = decode(&g, &c, "");
        assert!(done, "{out:?}");
        let v: Json = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out:?}: {e}"));
        // JSON Schema's integers are numbers without a fraction: `-0.0` is one.
        let a = v["a"].as_f64().expect("a number");
        assert!(a.fract() == 0.0 && (v["b"] == "x" || v["b"] == "y"), "{v}");
        let (out, _) = decode(&g, &Constraint::JsonObject, "{\"k\": [1, 2]}");
        assert_eq!(serde_json::from_str::<Json>(&out).unwrap()["k"][1], 2);
        // Recursion through `$ref`: as deep as the output goes, and complete when it closes.
        let tree = serde_json::json!({"$defs": {"node": {
            "type": "object",
            "properties": {"v": {"type": "integer"}, "c": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["v"], "additionalProperties": false
        }}, "$ref": "#/$defs/node"});
        let nested = r#"{"v": 1, "c": [{"v": 2, "c": [{"v": 3, "c": []}]}]}"#;
        let (out, done) = decode(&g, &Constraint::JsonSchema(Arc::new(tree)), nested);
        assert!(done, "{out:?}");
        assert_eq!(out, nested);
    }

    #[test]
    fn bad_grammars_are_errors_naming_the_parameter() {
        let g = Grammars::new(&char_tokenizer()).unwrap();
        for (c, param) in [
            (Constraint::Regex("(".into()), "regex"),
            (Constraint::Lark("start: foo".into()), "grammar"),
            (Constraint::Lark("  ".into()), "grammar"),
            (
                Constraint::JsonSchema(Arc::new(serde_json::json!({"type": "frob"}))),
                "json_schema",
            ),
            (
                Constraint::JsonSchema(Arc::new(serde_json::json!([1, 2]))),
                "json_schema",
            ),
            (
                Constraint::Regex("a".repeat(MAX_GRAMMAR_BYTES + 1)),
                "regex",
            ),
        ] {
            match g.compile(&c) {
                // Compile errors are grammar errors; what fails before compiling (size,
                // shape) is a plain invalid value.
                Err(
                    Error::Grammar { param: p, message }
                    | Error::InvalidParam { param: p, message },
                ) => {
                    assert_eq!(p, param, "{message}");
                    assert!(message.len() <= 1100, "{}", message.len());
                }
                Err(e) => panic!("{c:?}: {e}"),
                Ok(_) => panic!("{c:?} compiled"),
            }
        }
    }

    #[test]
    fn cached_grammars_give_independent_fresh_matchers() {
        let g = Grammars::new(&char_tokenizer()).unwrap();
        let c = Constraint::Regex("[0-9]{3}-[a-z]+".into());
        let first = decode(&g, &c, "123-abc");
        // From the cache, after the first ran to completion: fresh, and the same.
        assert_eq!(decode(&g, &c, "123-abc"), first);
        let mut a = g.compile(&c).unwrap();
        let b = g.compile(&c).unwrap();
        a.consume_token(id(b'7')).unwrap();
        assert!(!a.compute_mask().unwrap().is_allowed(id(b'-')));
        let mut b = b;
        assert!(b.compute_mask().unwrap().is_allowed(id(b'7')));
        assert_eq!(g.cache.lock().len(), 1);
    }

    #[test]
    fn masks_forbid_and_leave_padding_forbidden() {
        let mut mask = SimpleVob::alloc(40);
        mask.allow_token(3);
        mask.allow_token(35);
        let mut logits = vec![1f32; 70];
        apply_mask(&mask, &mut logits);
        let allowed: Vec<usize> = (0..70).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(allowed, [3, 35]);
    }
}
