//! Tool calls on the chat endpoint: OpenAI's `tools` and `tool_choice` checked, offered to
//! the model through its chat template (or, where the template knows no tools, through a
//! system message in the Hermes form), the output held to a valid call when one is
//! required, and the model's text parsed back into `tool_calls`, whole or as stream deltas.
//!
//! Three output formats cover the templates in use (docs/design/structured_output.md §6):
//! - Hermes (Qwen 2.5 and 3, and our injected prompt): `<tool_call>\n{"name": ..,
//!   "arguments": {..}}\n</tool_call>`, one block per call;
//! - Llama 3.1+: the whole output is `{"name": .., "parameters": {..}}`, after an optional
//!   `<|python_tag|>`;
//! - Mistral: `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]`.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use serde_json::{json, Map, Value as Json};

use crate::engine::grammar::{Constraint, JSON_WHITESPACE};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Most tools one request may offer (OpenAI's limit).
const MAX_TOOLS: usize = 128;

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const LLAMA_TAG: &str = "<|python_tag|>";
const MISTRAL_MARK: &str = "[TOOL_CALLS]";

/// How a model writes its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Hermes,
    Llama,
    Mistral,
}

impl Format {
    /// The format a chat template's source asks for, and whether the template renders
    /// `tools` itself (if not, Cortex describes them in a system message, Hermes style).
    pub fn of_template(source: &str) -> (Format, bool) {
        let knows_tools = source.contains("tools");
        let format = if source.contains(MISTRAL_MARK) {
            Format::Mistral
        } else if source.contains(LLAMA_TAG)
            || (source.contains("<|start_header_id|>") && source.contains("parameters"))
        {
            Format::Llama
        } else {
            Format::Hermes
        };
        let in_template = knows_tools && (format != Format::Hermes || source.contains(HERMES_OPEN));
        // Where the template renders no tools, Cortex's own prompt asks for Hermes calls.
        (
            if in_template { format } else { Format::Hermes },
            in_template,
        )
    }

    /// The key a call's arguments go under.
    fn arguments_key(self) -> &'static str {
        match self {
            Format::Llama => "parameters",
            Format::Hermes | Format::Mistral => "arguments",
        }
    }
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Choice {
    Auto,
    Required,
    /// The index of the named function.
    Named(usize),
}

/// One function the request offers.
#[derive(Debug, Clone)]
struct Function {
    name: String,
    /// Its arguments' JSON schema (an object schema; `{"type": "object"}` when not given).
    parameters: Json,
}

/// The tools of one chat request, as they shape its prompt, its constraint and the parsing
/// of its output.
#[derive(Debug, Clone)]
pub struct Tools {
    format: Format,
    /// Whether the template renders `tools` (otherwise a system message describes them).
    in_template: bool,
    /// The tools as the request gave them, for the template or the system message.
    specs: Vec<Json>,
    functions: Vec<Function>,
    choice: Choice,
    parallel: bool,
    /// Mistral's `[TOOL_CALLS]` token, which the grammar must produce as that token (read
    /// for the Mistral format only, where `parse` found it; 0 otherwise).
    mistral_token: u32,
}

impl Tools {
    /// The tools of a request, or `None` when it offers none or `tool_choice` is `none`.
    /// `template` is what [`Format::of_template`] makes of the chat template.
    pub fn parse(
        tools: Option<&Json>,
        tool_choice: Option<&Json>,
        parallel: Option<bool>,
        (format, in_template): (Format, bool),
        tokenizer: &Tokenizer,
    ) -> Result<Option<Tools>> {
        let specs = match tools {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(list)) => list.clone(),
            Some(_) => return Err(Error::param("tools", "must be a list of tools")),
        };
        if specs.len() > MAX_TOOLS {
            return Err(Error::param(
                "tools",
                format!("{} tools; at most {MAX_TOOLS} are accepted", specs.len()),
            ));
        }
        let functions = specs
            .iter()
            .enumerate()
            .map(|(i, t)| function(t, i))
            .collect::<Result<Vec<_>>>()?;
        for (i, f) in functions.iter().enumerate() {
            if functions[..i].iter().any(|g| g.name == f.name) {
                return Err(Error::param(
                    format!("tools[{i}].function.name"),
                    format!("'{}' is offered twice", f.name),
                ));
            }
        }
        let choice = match tool_choice {
            None | Some(Json::Null) => Choice::Auto,
            Some(Json::String(s)) => match s.as_str() {
                "none" => return Ok(None),
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(Error::param(
                        "tool_choice",
                        format!("'{other}' is not one of none, auto, required, or a named function"),
                    ))
                }
            },
            Some(Json::Object(o)) => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Json::as_str)
                    .ok_or_else(|| {
                        Error::param("tool_choice.function.name", "must be a string")
                    })?;
                let k = functions.iter().position(|f| f.name == name).ok_or_else(|| {
                    Error::param(
                        "tool_choice.function.name",
                        format!("'{name}' is not one of the tools offered"),
                    )
                })?;
                Choice::Named(k)
            }
            Some(_) => {
                return Err(Error::param(
                    "tool_choice",
                    "must be none, auto, required, or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ))
            }
        };
        if functions.is_empty() {
            return match choice {
                Choice::Auto => Ok(None),
                _ => Err(Error::param("tool_choice", "needs tools to choose from")),
            };
        }
        let mistral_token = match format {
            Format::Mistral => tokenizer.token_to_id(MISTRAL_MARK).ok_or_else(|| {
                Error::Template(format!(
                    "the template writes Mistral tool calls, but the tokenizer has no {MISTRAL_MARK} token"
                ))
            })?,
            _ => 0,
        };
        Ok(Some(Tools {
            format,
            in_template,
            specs,
            functions,
            choice,
            parallel: parallel.unwrap_or(true),
            mistral_token,
        }))
    }

    /// Offers the tools to the model: as the template's `tools` variable, or as a system
    /// message (merged into the first one, if any) where the template knows no tools.
    pub fn prompt(&self, messages: &mut Vec<Json>, extra: &mut Map<String, Json>) {
        if self.in_template {
            extra.insert("tools".into(), Json::Array(self.specs.clone()));
            return;
        }
        let listing: Vec<String> = self.specs.iter().map(Json::to_string).collect();
        let text = format!(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n\
             <tools>\n{}\n</tools>\n\n\
             For each function call, return a JSON object with the function name and arguments \
             within <tool_call></tool_call> XML tags:\n\
             <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
            listing.join("\n")
        );
        match messages.first_mut() {
            Some(Json::Object(m)) if m.get("role").and_then(Json::as_str) == Some("system") => {
                let before = m.get("content").and_then(Json::as_str).unwrap_or_default();
                let merged = if before.is_empty() {
                    text
                } else {
                    format!("{before}\n\n{text}")
                };
                m.insert("content".into(), merged.into());
            }
            _ => messages.insert(0, json!({"role": "system", "content": text})),
        }
    }

    /// The constraint that makes the output a valid call: with `tool_choice` `required`
    /// (one call or more, of any tool; exactly one without `parallel_tool_calls` and in
    /// Llama's format, whose template takes one) or a
    /// named function (one call to it). `None` under `auto`.
    pub fn constraint(&self) -> Option<Constraint> {
        let candidates: Vec<&Function> = match self.choice {
            Choice::Auto => return None,
            Choice::Required => self.functions.iter().collect(),
            Choice::Named(k) => vec![&self.functions[k]],
        };
        let key = self.format.arguments_key();
        // The name first: llguidance writes properties in schema order, so the name is
        // forced text and the arguments come last.
        let calls: Vec<Json> = candidates
            .iter()
            .map(|f| {
                let mut properties = Map::new();
                properties.insert("name".into(), json!({"const": f.name}));
                properties.insert(key.into(), f.parameters.clone());
                json!({
                    "type": "object",
                    "properties": properties,
                    "required": ["name", key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let many = self.parallel && matches!(self.choice, Choice::Required);
        let guidance = json!({"whitespace_pattern": JSON_WHITESPACE});
        let call = json!({"anyOf": calls, "x-guidance": guidance});
        let grammar = match self.format {
            Format::Hermes => {
                let repeat = if many { " (\"\\n\" call)*" } else { "" };
                format!("start: call{repeat}\ncall: \"{HERMES_OPEN}\\n\" %json {call} \"\\n{HERMES_CLOSE}\"\n")
            }
            Format::Llama => format!("start: %json {call}\n"),
            Format::Mistral => {
                let mut array = json!({"type": "array", "items": {"anyOf": calls}, "minItems": 1, "x-guidance": guidance});
                if !many {
                    array["maxItems"] = 1.into();
                }
                format!("start: <[{}]> %json {array}\n", self.mistral_token)
            }
        };
        Some(Constraint::Lark(grammar))
    }

    /// A parser for one choice's output.
    pub fn parser(&self) -> CallParser {
        CallParser::new(
            self.format,
            self.functions.iter().map(|f| f.name.clone()).collect(),
        )
    }
}

/// `tools[i]`: `{"type": "function", "function": {"name", "description"?, "parameters"?}}`.
fn function(tool: &Json, i: usize) -> Result<Function> {
    let field = format!("tools[{i}]");
    if tool.get("type").and_then(Json::as_str) != Some("function") {
        return Err(Error::param(
            format!("{field}.type"),
            "must be \"function\" (the only kind of tool)",
        ));
    }
    let f = tool
        .get("function")
        .and_then(Json::as_object)
        .ok_or_else(|| Error::param(format!("{field}.function"), "must be an object"))?;
    let name = f.get("name").and_then(Json::as_str).unwrap_or_default();
    check_name(name, &format!("{field}.function.name"))?;
    let parameters = match f.get("parameters") {
        None | Some(Json::Null) => json!({"type": "object"}),
        Some(p @ Json::Object(_)) => p.clone(),
        Some(_) => {
            return Err(Error::param(
                format!("{field}.function.parameters"),
                "must be a JSON Schema object",
            ))
        }
    };
    Ok(Function {
        name: name.to_string(),
        parameters,
    })
}

/// A function's or a response format's `name`, as OpenAI takes them: 1 to 64 letters,
/// digits, underscores or dashes; `field` names it in the error.
pub fn check_name(name: &str, field: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(Error::param(
            field,
            "must be 1 to 64 letters, digits, underscores or dashes",
        ))
    }
}

/// A call the model made, as OpenAI returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, as the model wrote them.
    pub arguments: String,
}

impl ToolCall {
    pub fn json(&self) -> Json {
        json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// What a stretch of output turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    /// A call begins: its id and function; its arguments follow as [`Piece::Args`].
    Call {
        id: String,
        name: String,
    },
    /// More of the latest call's arguments (JSON text).
    Args(String),
}

/// The text and the calls among `pieces`, as a whole message has them.
pub fn assemble(pieces: Vec<Piece>) -> (String, Vec<ToolCall>) {
    let mut text = String::new();
    let mut calls: Vec<ToolCall> = Vec::new();
    for p in pieces {
        match p {
            Piece::Text(t) => text.push_str(&t),
            Piece::Call { id, name } => calls.push(ToolCall {
                id,
                name,
                arguments: String::new(),
            }),
            Piece::Args(a) => {
                if let Some(c) = calls.last_mut() {
                    c.arguments.push_str(&a);
                }
            }
        }
    }
    (text, calls)
}

/// Splits one choice's output, as it streams, into text and calls, as OpenAI streams them:
/// a call's id and name once its arguments open, then the arguments as they come. Text that
/// may open a call is held until it does or cannot. A call written in the usual shape
/// (`{"name": .., "arguments": {..}}`, name first) streams; any other shape is held to its
/// end and parsed whole, and what does not parse as a call of an offered function is given
/// back as text.
#[derive(Debug)]
pub struct CallParser {
    format: Format,
    /// The functions offered.
    names: Arc<[String]>,
    /// Outside a call: text held (a possible marker). Inside: the call's text since its
    /// marker, scanned again as it grows.
    buf: String,
    /// Inside a call (after its opening marker; for Llama, from the start).
    in_call: bool,
    /// Llama output that did not open with a call: text to the end.
    plain: bool,
    /// Whitespace held: given out only if more text follows, so the blank lines around
    /// calls (and at the end) do not become content.
    blank: String,
    /// Calls begun so far, in all and in the current block.
    calls: usize,
    block_calls: usize,
    /// Bytes of the latest call's arguments given out.
    args_sent: usize,
}

impl CallParser {
    fn new(format: Format, names: Arc<[String]>) -> CallParser {
        CallParser {
            format,
            names,
            buf: String::new(),
            in_call: false,
            plain: false,
            blank: String::new(),
            calls: 0,
            block_calls: 0,
            args_sent: 0,
        }
    }

    /// Calls begun so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Takes the next stretch of output.
    pub fn push(&mut self, chunk: &str) -> Vec<Piece> {
        let mut text = std::mem::take(&mut self.buf);
        text.push_str(chunk);
        let mut out = Vec::new();
        // Where the text not yet settled starts: each turn opens a block or carries the
        // open one on; a block that ends hands what follows it to the next turn.
        let mut at = 0;
        loop {
            if !self.in_call {
                let (used, opened) = self.open(&text[at..], &mut out);
                at += used;
                if !opened {
                    break;
                }
                self.in_call = true;
                self.block_calls = 0;
            }
            let block = &text[at..];
            let (calls, stop) = scan_block(self.format, block, &self.names);
            self.give_out(&calls, &mut out);
            let end = match stop {
                Stop::Open => None,
                Stop::End(end) => Some(end),
                // The calls given out stand; what left the shape is text.
                Stop::Broke(from) if self.block_calls > 0 => Some(from),
                // Nothing given out: a Hermes block in another shape is parsed whole once
                // it closes (the others once the output ends).
                Stop::Broke(_) => match (self.format, block.find(HERMES_CLOSE)) {
                    (Format::Hermes, Some(close)) => {
                        let end = close + HERMES_CLOSE.len();
                        self.whole(&block[..end], &mut out);
                        Some(end)
                    }
                    _ => None,
                },
            };
            let Some(end) = end else { break };
            at += end;
            self.in_call = false;
        }
        self.buf = text[at..].to_string();
        out
    }

    /// The output has ended: what is still held.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let text = std::mem::take(&mut self.buf);
        if !self.in_call {
            self.text(&text, &mut out);
            return out;
        }
        self.in_call = false;
        let (calls, stop) = scan_block(self.format, &text, &self.names);
        // Cut off mid-call (at `max_tokens`): the call as far as it went.
        self.give_out(&calls, &mut out);
        match stop {
            _ if self.block_calls == 0 => self.whole(&text, &mut out),
            Stop::Broke(from) => self.text(&text[from..], &mut out),
            Stop::Open | Stop::End(_) => {}
        }
        out
    }

    /// Outside a call, `text` (what follows the settled output): gives out what cannot
    /// open a call, and says how many bytes it used and whether a call opened (its marker
    /// used; for Llama, whose call is the whole output, no byte is used).
    fn open(&mut self, text: &str, out: &mut Vec<Piece>) -> (usize, bool) {
        let mark = match self.format {
            Format::Hermes => HERMES_OPEN,
            Format::Mistral => MISTRAL_MARK,
            Format::Llama => {
                if !self.plain {
                    let start = text.trim_start();
                    if start.is_empty() || LLAMA_TAG.starts_with(start) {
                        return (0, false);
                    }
                    // A call is the whole output: it starts with the tag or a brace.
                    if start.starts_with(LLAMA_TAG) || start.starts_with('{') {
                        return (0, true);
                    }
                    self.plain = true;
                }
                self.text(text, out);
                return (text.len(), false);
            }
        };
        if let Some(p) = text.find(mark) {
            self.text(&text[..p], out);
            return (p + mark.len(), true);
        }
        let free = text.len() - partial_suffix(text, mark);
        self.text(&text[..free], out);
        (free, false)
    }

    /// Gives out `text`, holding its trailing whitespace until more text follows (however
    /// the output is cut into stretches, the same text comes out).
    fn text(&mut self, text: &str, out: &mut Vec<Piece>) {
        let body = text.trim_end();
        if !body.is_empty() {
            let mut t = std::mem::take(&mut self.blank);
            t.push_str(body);
            out.push(Piece::Text(t));
        }
        self.blank.push_str(&text[body.len()..]);
    }

    /// What is new in `calls` (the block's calls as scanned so far): the rest of the
    /// latest call's arguments, then each call begun since.
    fn give_out(&mut self, calls: &[Partial<'_>], out: &mut Vec<Piece>) {
        for (k, (name, args)) in calls.iter().enumerate() {
            if k + 1 < self.block_calls {
                continue;
            }
            if k + 1 > self.block_calls {
                self.begin(name.clone(), out);
            }
            if args.len() > self.args_sent {
                out.push(Piece::Args(args[self.args_sent..].to_string()));
                self.args_sent = args.len();
            }
        }
    }

    fn begin(&mut self, name: String, out: &mut Vec<Piece>) {
        self.blank.clear();
        self.calls += 1;
        self.block_calls += 1;
        self.args_sent = 0;
        out.push(Piece::Call {
            id: call_id(self.format),
            name,
        });
    }

    /// A block in another shape of which nothing was given out (`block`: its text after
    /// the marker), parsed whole: its calls, or, if any part is not a call of an offered
    /// function, the block as text.
    fn whole(&mut self, block: &str, out: &mut Vec<Piece>) {
        let Some(calls) = self.parse_calls(block) else {
            let text = match self.format {
                Format::Hermes => format!("{HERMES_OPEN}{block}"),
                Format::Mistral => format!("{MISTRAL_MARK}{block}"),
                Format::Llama => block.to_string(),
            };
            self.text(&text, out);
            return;
        };
        for (name, arguments) in calls {
            self.begin(name, out);
            out.push(Piece::Args(arguments));
        }
    }

    /// `(name, arguments as JSON text)` of each call in `body`, or `None` unless every one
    /// is a well-formed call of an offered function.
    fn parse_calls(&self, body: &str) -> Option<Vec<(String, String)>> {
        let body = body.trim();
        let body = body.strip_suffix(HERMES_CLOSE).unwrap_or(body);
        let values: Vec<Json> = match self.format {
            Format::Hermes => vec![serde_json::from_str(body).ok()?],
            Format::Mistral => match serde_json::from_str(body).ok()? {
                Json::Array(v) => v,
                v => vec![v],
            },
            Format::Llama => {
                let body = body.strip_prefix(LLAMA_TAG).unwrap_or(body).trim();
                match serde_json::from_str(body) {
                    Ok(v) => vec![v],
                    // Several calls are written separated by semicolons.
                    Err(_) => body
                        .split(';')
                        .map(|s| serde_json::from_str(s.trim()).ok())
                        .collect::<Option<Vec<Json>>>()?,
                }
            }
        };
        if values.is_empty() {
            return None;
        }
        values
            .into_iter()
            .map(|v| {
                let name = v.get("name")?.as_str()?;
                if !self.names.iter().any(|n| n == name) {
                    return None;
                }
                let args = v.get("arguments").or_else(|| v.get("parameters"))?;
                let arguments = match args {
                    Json::String(s) => s.clone(),
                    Json::Object(_) => args.to_string(),
                    _ => return None,
                };
                Some((name.to_string(), arguments))
            })
            .collect()
    }
}

/// A call as scanned so far: its function, and its arguments' text so far.
type Partial<'a> = (String, &'a str);

/// Where the scan of a block stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// At the end of the text, still in the usual shape.
    Open,
    /// The block ended here (after Hermes's closing tag, Mistral's `]`).
    End(usize),
    /// The text leaves the usual shape here: the calls before it stand, the rest is text.
    Broke(usize),
}

/// The calls of a block's text so far (after its marker), in the usual shape, and where
/// the scan stopped. Scanning a longer text never takes back a call a shorter one gave:
/// whichever way the output is cut into stretches, the same calls come out.
fn scan_block<'a>(format: Format, text: &'a str, names: &[String]) -> (Vec<Partial<'a>>, Stop) {
    let mut calls = Vec::new();
    let mut i = skip_ws(text, 0);
    match format {
        Format::Hermes => {}
        Format::Mistral => match text[i..].chars().next() {
            None => return (calls, Stop::Open),
            Some('[') => i = skip_ws(text, i + 1),
            Some(_) => return (calls, Stop::Broke(0)),
        },
        Format::Llama => {
            let rest = &text[i..];
            if rest.len() < LLAMA_TAG.len() && LLAMA_TAG.starts_with(rest) {
                return (calls, Stop::Open);
            }
            if rest.starts_with(LLAMA_TAG) {
                i = skip_ws(text, i + LLAMA_TAG.len());
            }
        }
    }
    loop {
        let (call, next) = match scan_call(text, i, names) {
            Scanned::Partial(call) => {
                calls.extend(call);
                return (calls, Stop::Open);
            }
            Scanned::Broke(call, from) => {
                calls.extend(call);
                return (calls, Stop::Broke(from));
            }
            Scanned::Whole(call, next) => (call, next),
        };
        calls.push(call);
        let j = skip_ws(text, next);
        let rest = &text[j..];
        // What may follow a call: Hermes's closing tag; another call after `,` in
        // Mistral's array (or its `]`); another after `;` in Llama's output.
        let stop = match (format, rest.chars().next()) {
            (_, None) => Stop::Open,
            (Format::Hermes, _) if rest.starts_with(HERMES_CLOSE) => {
                Stop::End(j + HERMES_CLOSE.len())
            }
            (Format::Hermes, _) if HERMES_CLOSE.starts_with(rest) => Stop::Open,
            (Format::Mistral, Some(']')) => Stop::End(j + 1),
            (Format::Mistral, Some(',')) | (Format::Llama, Some(';')) => {
                i = skip_ws(text, j + 1);
                continue;
            }
            _ => Stop::Broke(next),
        };
        return (calls, stop);
    }
}

enum Scanned<'a> {
    /// The text ends inside the call: the call once its arguments have opened.
    Partial(Option<Partial<'a>>),
    /// A whole call, and where its text ends.
    Whole(Partial<'a>, usize),
    /// The text leaves the shape: the call if its arguments had opened (and closed), and
    /// where the text that is not a call starts (the object's start, or its arguments'
    /// end).
    Broke(Option<Partial<'a>>, usize),
}

/// One call object at `i`: `{"name": "<offered>", "arguments" | "parameters": {...}}`. The
/// call begins once its arguments' brace is there (arguments in another form, a JSON
/// string say, are parsed whole at the block's end).
fn scan_call<'a>(text: &'a str, i: usize, names: &[String]) -> Scanned<'a> {
    let broke = Scanned::Broke(None, i);
    let mut i = i;
    for lit in ["{", "\"name\"", ":"] {
        match expect(text, skip_ws(text, i), &[lit]) {
            Lit::Found(next) => i = next,
            Lit::Cut => return Scanned::Partial(None),
            Lit::Other => return broke,
        }
    }
    let start = skip_ws(text, i);
    match text[start..].chars().next() {
        None => return Scanned::Partial(None),
        Some('"') => {}
        Some(_) => return broke,
    }
    let Some(end) = value_end(text, start) else {
        return Scanned::Partial(None);
    };
    let name = match serde_json::from_str::<String>(&text[start..end]) {
        Ok(name) if names.contains(&name) => name,
        _ => return broke,
    };
    let mut i = end;
    for lits in [&[","][..], &["\"arguments\"", "\"parameters\""], &[":"]] {
        match expect(text, skip_ws(text, i), lits) {
            Lit::Found(next) => i = next,
            Lit::Cut => return Scanned::Partial(None),
            Lit::Other => return broke,
        }
    }
    let args = skip_ws(text, i);
    match text[args..].chars().next() {
        None => return Scanned::Partial(None),
        Some('{') => {}
        Some(_) => return broke,
    }
    let Some(end) = value_end(text, args) else {
        return Scanned::Partial(Some((name, &text[args..])));
    };
    let call = (name, &text[args..end]);
    match expect(text, skip_ws(text, end), &["}"]) {
        Lit::Found(next) => Scanned::Whole(call, next),
        Lit::Cut => Scanned::Partial(Some(call)),
        Lit::Other => Scanned::Broke(Some(call), end),
    }
}

/// What the text holds where a literal is expected.
enum Lit {
    /// One of the literals, ending here.
    Found(usize),
    /// The text ends inside (or before) one.
    Cut,
    /// Something else.
    Other,
}

fn expect(text: &str, i: usize, lits: &[&str]) -> Lit {
    let rest = &text[i..];
    if let Some(lit) = lits.iter().find(|l| rest.starts_with(**l)) {
        Lit::Found(i + lit.len())
    } else if lits.iter().any(|l| l.starts_with(rest)) {
        Lit::Cut
    } else {
        Lit::Other
    }
}

fn skip_ws(text: &str, i: usize) -> usize {
    i + text[i..].len() - text[i..].trim_start().len()
}

/// The end of the JSON string, object or array that starts at `i`, or `None` when the text
/// ends first.
fn value_end(text: &str, i: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (k, b) in text.bytes().enumerate().skip(i) {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => {
                    in_string = false;
                    if depth == 0 {
                        return Some(k + 1);
                    }
                }
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(k + 1);
                }
            }
            _ => {}
        }
    }
    None
}

/// The length of the longest end of `text` that begins `mark` (held: it may open a call).
fn partial_suffix(text: &str, mark: &str) -> usize {
    (1..mark.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && mark.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// A fresh call id: `call_` and 24 letters and digits, or 9 for Mistral, whose template
/// checks the length.
fn call_id(format: Format) -> String {
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let (prefix, len) = match format {
        Format::Mistral => ("", 9),
        _ => ("call_", 24),
    };
    // `RandomState`'s keys come from the OS once per thread and step with each instance:
    // distinct and unpredictable enough for ids.
    let mut bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let mut id = String::from(prefix);
    for i in 0..len {
        if i % 10 == 0 && i > 0 {
            bits = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
        }
        id.push(ALNUM[(bits % ALNUM.len() as u64) as usize] as char);
        bits /= ALNUM.len() as u64;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pieces of `text` fed `step` bytes (on char boundaries) at a time, with
    /// neighbouring text pieces joined and ids dropped.
    fn split(format: Format, text: &str, step: usize) -> Vec<(bool, String)> {
        let mut p = CallParser::new(format, ["get_weather".into(), "add".into()].into());
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + step).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            pieces.extend(p.push(&text[start..end]));
            start = end;
        }
        pieces.extend(p.finish());
        let mut out: Vec<(bool, String)> = Vec::new();
        for piece in pieces {
            match (piece, out.last_mut()) {
                (Piece::Text(t), Some((false, prev))) => prev.push_str(&t),
                (Piece::Text(t), _) => out.push((false, t)),
                (Piece::Call { id, name }, _) => {
                    assert!(id.len() == 29 || id.len() == 9, "{id}");
                    out.push((true, format!("{name} ")));
                }
                (Piece::Args(a), Some((true, call))) => call.push_str(&a),
                (Piece::Args(a), _) => panic!("arguments {a:?} before a call"),
            }
        }
        out
    }

    /// Every chunking gives the same pieces as the whole text at once.
    fn check(format: Format, text: &str, want: &[(bool, &str)]) {
        let want: Vec<(bool, String)> = want.iter().map(|(c, s)| (*c, (*s).to_string())).collect();
        for step in [1, 2, 3, 7, text.len().max(1)] {
            assert_eq!(
                split(format, text, step),
                want,
                "{format:?} step {step}: {text:?}"
            );
        }
    }

    #[test]
    fn hermes_calls_are_parsed_and_text_around_them_kept() {
        check(
            Format::Hermes,
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1}}\n</tool_call>",
            &[
                (false, "Let me look."),
                (true, "get_weather {\"city\": \"Paris\"}"),
                (true, "add {\"a\": 1}"),
            ],
        );
        // A call cut off at the end still parses when its JSON is whole.
        check(
            Format::Hermes,
            "<tool_call>{\"name\": \"add\", \"arguments\": \"{}\"}",
            &[(true, "add {}")],
        );
        // Unknown functions, broken JSON and near-markers stay text.
        for text in [
            "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"add\"</tool_call>",
            "a <tool_cal> b <tool_call",
            "plain text, ünïcode ✓",
            "two\n\nparagraphs",
        ] {
            check(Format::Hermes, text, &[(false, text)]);
        }
    }

    #[test]
    fn calls_stand_and_what_leaves_the_shape_is_text() {
        check(
            Format::Hermes,
            "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1}} junk</tool_call>",
            &[(true, "add {\"a\": 1}"), (false, " junk</tool_call>")],
        );
        check(
            Format::Hermes,
            "<tool_call>{\"name\": \"add\", \"arguments\": {}} {\"name\": \"add\", \"arguments\": {}}</tool_call>",
            &[
                (true, "add {}"),
                (false, " {\"name\": \"add\", \"arguments\": {}}</tool_call>"),
            ],
        );
        check(
            Format::Hermes,
            "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1}, \"id\": 3}</tool_call> ok",
            &[
                (true, "add {\"a\": 1}"),
                (false, ", \"id\": 3}</tool_call> ok"),
            ],
        );
        check(
            Format::Llama,
            "{\"name\": \"add\", \"parameters\": {\"a\": 2}} and more",
            &[(true, "add {\"a\": 2}"), (false, " and more")],
        );
        check(
            Format::Mistral,
            "[TOOL_CALLS][{\"name\": \"add\", \"arguments\": {}}] Done.",
            &[(true, "add {}"), (false, " Done.")],
        );
    }

    #[test]
    fn arguments_stream_as_they_come_and_a_cut_call_keeps_what_came() {
        let mut p = CallParser::new(Format::Hermes, ["add".into()].into());
        let text =
            "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 12, \"b\": 3}}\n</tool_call>";
        let pieces: Vec<Piece> = text.chars().flat_map(|c| p.push(&c.to_string())).collect();
        // The call opens as soon as its arguments do.
        let open = pieces.iter().position(|p| matches!(p, Piece::Call { .. }));
        assert_eq!(open, Some(0), "{pieces:?}");
        let args: Vec<&str> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Args(a) => Some(a.as_str()),
                _ => None,
            })
            .collect();
        assert!(args.len() > 10, "{args:?}");
        assert_eq!(args.concat(), "{\"a\": 12, \"b\": 3}");
        assert!(p.finish().is_empty());
        // Cut off at max_tokens mid-arguments.
        let mut p = CallParser::new(Format::Hermes, ["add".into()].into());
        let mut pieces = p.push("<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1");
        pieces.extend(p.finish());
        let (text, calls) = assemble(pieces);
        assert_eq!((text.as_str(), calls.len()), ("", 1));
        assert_eq!(calls[0].arguments, "{\"a\": 1");
        // A marker and nothing after it stays text.
        let mut p = CallParser::new(Format::Hermes, ["add".into()].into());
        let mut pieces = p.push("Hi <tool_call>");
        pieces.extend(p.finish());
        assert_eq!(assemble(pieces).0, "Hi <tool_call>");
    }

    #[test]
    fn llama_and_mistral_calls_are_parsed() {
        check(
            Format::Llama,
            "<|python_tag|>{\"name\": \"add\", \"parameters\": {\"a\": 2}}",
            &[(true, "add {\"a\": 2}")],
        );
        check(
            Format::Llama,
            " {\"name\": \"add\", \"parameters\": {\"a\": 2}}; {\"name\": \"get_weather\", \"parameters\": {}}",
            &[(true, "add {\"a\": 2}"), (true, "get_weather {}")],
        );
        check(Format::Llama, "It is sunny.", &[(false, "It is sunny.")]);
        check(Format::Llama, "{not a call", &[(false, "{not a call")]);
        check(
            Format::Mistral,
            "Sure.[TOOL_CALLS][{\"name\": \"add\", \"arguments\": {\"a\": 3}}, {\"name\": \"get_weather\", \"arguments\": {}}]",
            &[
                (false, "Sure."),
                (true, "add {\"a\": 3}"),
                (true, "get_weather {}"),
            ],
        );
    }

    #[test]
    fn templates_tell_the_format() {
        let hermes = "{% if tools %}<tools>{% endif %}{{ '<tool_call>' }}";
        assert_eq!(Format::of_template(hermes), (Format::Hermes, true));
        let llama = "<|start_header_id|>{% if tools %}{{ '\"parameters\"' }}{% endif %}";
        assert_eq!(Format::of_template(llama), (Format::Llama, true));
        let mistral = "{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]";
        assert_eq!(Format::of_template(mistral), (Format::Mistral, true));
        // A template that never mentions tools: Cortex describes them itself.
        let plain = "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}";
        assert_eq!(Format::of_template(plain), (Format::Hermes, false));
    }

    #[test]
    fn requests_are_checked_and_required_calls_compile() {
        use crate::engine::grammar::Grammars;
        use crate::engine::testing::char_tokenizer;
        let tok = char_tokenizer();
        let tools = json!([
            {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
                "properties": {"a": {"type": "integer"}}, "required": ["a"]}}},
            {"type": "function", "function": {"name": "now"}},
        ]);
        let parse = |choice: Json, template: &str| {
            Tools::parse(
                Some(&tools),
                Some(&choice),
                None,
                Format::of_template(template),
                &tok,
            )
        };
        let plain = "{% for m in messages %}{{ m.content }}{% endfor %}";
        assert!(parse(json!("none"), plain).unwrap().is_none());
        assert!(parse(json!("auto"), plain)
            .unwrap()
            .unwrap()
            .constraint()
            .is_none());
        let grammars = Grammars::new(&tok).unwrap();
        let llama = "<|start_header_id|>{{ tools }}<|python_tag|>";
        for (choice, template) in [
            (json!("required"), plain),
            (
                json!({"type": "function", "function": {"name": "now"}}),
                plain,
            ),
            (json!("required"), llama),
        ] {
            let t = parse(choice.clone(), template).unwrap().unwrap();
            let c = t.constraint().expect("a call is required");
            grammars
                .compile(&c)
                .unwrap_or_else(|e| panic!("{choice}: {e}"));
        }
        for (tools, choice, field) in [
            (
                json!([{"type": "retrieval"}]),
                json!("auto"),
                "tools[0].type",
            ),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                json!("auto"),
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]),
                json!("auto"),
                "tools[0].function.parameters",
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                json!("auto"),
                "tools[1].function.name",
            ),
            (json!([]), json!("required"), "tool_choice"),
            (
                json!([{"type": "function", "function": {"name": "f"}}]),
                json!("always"),
                "tool_choice",
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}}]),
                json!({"type": "function", "function": {"name": "g"}}),
                "tool_choice.function.name",
            ),
        ] {
            match Tools::parse(
                Some(&tools),
                Some(&choice),
                None,
                Format::of_template(plain),
                &tok,
            ) {
                Err(Error::InvalidParam { param, .. }) => assert_eq!(param, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        // A Mistral template needs its [TOOL_CALLS] token.
        let e = parse(json!("auto"), "{{ tools }}[TOOL_CALLS]").unwrap_err();
        assert!(e.to_string().contains("[TOOL_CALLS]"), "{e}");
    }

    #[test]
    fn ids_are_random_and_shaped() {
        let a = call_id(Format::Hermes);
        assert!(a.starts_with("call_") && a.len() == 29, "{a}");
        assert!(a[5..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(a, call_id(Format::Hermes));
        let m = call_id(Format::Mistral);
        assert!(
            m.len() == 9 && m.bytes().all(|b| b.is_ascii_alphanumeric()),
            "{m}"
        );
    }
}
