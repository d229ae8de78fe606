//! Chat templates rendered the way transformers renders them
//! (`transformers/utils/chat_template_utils.py`): Jinja with `trim_blocks` and
//! `lstrip_blocks`, the variables `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token` (and any extra keyword arguments), a `raise_exception(msg)` function, a
//! `tojson` filter that does not HTML-escape, and Python string methods (`.strip()`,
//! `.startswith()`...) through minijinja-contrib's pycompat layer.
//!
//! Templates come from model files, so they are untrusted: minijinja executes no host code,
//! a fuel budget bounds the work of one render (nested loops cannot hang the process), the
//! recursion limit bounds nesting, and the output size is capped.

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};

/// Instructions one render may execute; real templates use a few thousand.
const FUEL: u64 = 500_000;
/// Largest rendered prompt accepted.
const MAX_OUTPUT_BYTES: usize = 4 << 20;
const MAX_RECURSION: usize = 100;

#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' filter.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = match indent {
        None => python_compact_json(&json),
        Some(n) => {
            let indent = " ".repeat(n);
            let fmt = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            let mut out = Vec::new();
            let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
            serde::Serialize::serialize(&json, &mut ser).map_err(|e| {
                minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))
            })?;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    Ok(Value::from_safe_string(text))
}

/// JSON with Python's default separators (`", "` and `": "`).
fn python_compact_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(items) => {
            format!(
                "[{}]",
                items
                    .iter()
                    .map(python_compact_json)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        serde_json::Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!(
                    "{}: {}",
                    serde_json::Value::String(k.clone()),
                    python_compact_json(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported now, with its line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(MAX_RECURSION);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat_template", source.to_string())
            .map_err(|e| Error::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders `messages` (a JSON array of `{"role", "content", ...}` objects); `extra` holds
    /// further template variables (`tools`, `documents`, custom flags).
    pub fn render(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        if !messages.is_array() {
            return Err(Error::param(
                "messages",
                "must be a list of {\"role\": ..., \"content\": ...} objects",
            ));
        }
        let mut vars = extra.clone();
        vars.insert("messages".into(), messages.clone());
        vars.insert("add_generation_prompt".into(), add_generation_prompt.into());
        vars.insert("bos_token".into(), self.bos_token.clone().into());
        vars.insert("eos_token".into(), self.eos_token.clone().into());
        let template = self
            .env
            .get_template("chat_template")
            .map_err(|e| Error::Template(describe(&e)))?;
        let out = template
            .render(Value::from_serialize(&vars))
            .map_err(|e| Error::Template(describe(&e)))?;
        if out.len() > MAX_OUTPUT_BYTES {
            return Err(Error::Template(format!(
                "rendered prompt of {} bytes exceeds the limit of {MAX_OUTPUT_BYTES}",
                out.len()
            )));
        }
        Ok(out)
    }
}

fn describe(e: &minijinja::Error) -> String {
    let what = match e.kind() {
        ErrorKind::OutOfFuel => "template exceeded its evaluation budget".to_string(),
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
        _ => e.to_string(),
    };
    match e.line() {
        Some(line) if e.kind() != ErrorKind::InvalidOperation => format!("{what} (line {line})"),
        _ => what,
    }
}
