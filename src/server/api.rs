//! OpenAI's request and response schema for `/v1/chat/completions` and `/v1/completions`:
//! a request body becomes a [`Job`] (prompts as token ids, one [`SamplingParams`] per
//! choice), and each choice's events become response JSON, whole or as stream chunks.
//!
//! Parsing follows OpenAI's server: unknown fields are ignored, a wrong type names the
//! field's path (`messages[0].content`), and fields whose meaning Cortex cannot honour
//! (logit bias, audio, suffixes...) are refused by name instead of dropped.
//! `response_format` and `tools` constrain the output through the engine's grammars
//! (`engine::grammar`, `server::tools`).

use serde::Deserialize;
use serde_json::{json, Map, Value as Json};

use super::tools::{self, CallParser, ToolCall, Tools};
use crate::engine::grammar::Constraint;
use crate::engine::sampling::MAX_LOGPROBS;
use crate::engine::{SamplingParams, StepOutput, TokenLogprobs};
use crate::error::{Error, Result};
use crate::tokenizer::{ChatTemplate, Tokenizer};

/// Most choices one request may ask for (`n`, times the prompts of a completion).
pub const MAX_CHOICES: usize = 64;
/// Most top alternatives the completions API returns per token (`logprobs`).
const MAX_COMPLETION_LOGPROBS: usize = MAX_LOGPROBS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completions => "cmpl-",
        }
    }

    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            // OpenAI's legacy completions stream chunks carry the same object name.
            (Endpoint::Completions, _) => "text_completion",
        }
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Every field either endpoint reads; each endpoint ignores the other's, as OpenAI's server
/// ignores unknown fields (`user` among them: it identifies the end user to OpenAI).
#[derive(Debug, Deserialize)]
pub struct Body {
    model: Option<String>,
    messages: Option<Vec<Json>>,
    prompt: Option<Json>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    top_k: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    stop: Option<Stop>,
    seed: Option<i64>,
    n: Option<i64>,
    /// A bool for chat, a count of alternatives for completions.
    logprobs: Option<Json>,
    top_logprobs: Option<i64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    ignore_eos: Option<bool>,
    echo: Option<bool>,
    /// Extra chat template variables (vLLM's name), e.g. `{"enable_thinking": false}`.
    chat_template_kwargs: Option<Map<String, Json>>,
    /// `text`, `json_object` or `json_schema` (constrained decoding).
    response_format: Option<Json>,
    tools: Option<Json>,
    tool_choice: Option<Json>,
    parallel_tool_calls: Option<bool>,
    // OpenAI fields Cortex cannot honour: refused by name when they ask for anything.
    logit_bias: Option<Map<String, Json>>,
    functions: Option<Json>,
    function_call: Option<Json>,
    suffix: Option<String>,
    best_of: Option<i64>,
    audio: Option<Json>,
    prediction: Option<Json>,
    modalities: Option<Vec<String>>,
}

/// Why a body could not be read: the field path (`None` for malformed JSON) and the cause.
#[derive(Debug)]
pub struct ParseError {
    pub param: Option<String>,
    pub message: String,
}

impl Body {
    pub fn parse(bytes: &[u8]) -> std::result::Result<Body, ParseError> {
        // serde would also read a struct from a JSON array, field by position.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ParseError {
                param: None,
                message: "the body must be a JSON object".into(),
            });
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let body: Body = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let param = (path != "." && !inner.is_syntax() && !inner.is_eof()).then_some(path);
            let message = match &param {
                Some(p) => format!("invalid value for '{p}': {inner}"),
                None => format!("the body is not valid JSON: {inner}"),
            };
            ParseError { param, message }
        })?;
        de.end().map_err(|e| ParseError {
            param: None,
            message: format!("the body is not valid JSON: {e}"),
        })?;
        Ok(body)
    }

    /// The model the request names, if any.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    pub fn wants_stream(&self) -> bool {
        self.stream == Some(true)
    }
}

/// One prompt of a request: its tokens, and its text when `echo` returns it.
#[derive(Debug)]
pub struct Input {
    pub tokens: Vec<u32>,
    pub echo: Option<String>,
}

/// A request as the engine runs it.
#[derive(Debug)]
pub struct Job {
    pub endpoint: Endpoint,
    pub stream: bool,
    pub include_usage: bool,
    pub inputs: Vec<Input>,
    /// Choices per prompt; choice `k` is prompt `k / n`, sample `k % n`.
    pub n: usize,
    /// One per choice.
    pub params: Vec<SamplingParams>,
    /// Alternatives per token when logprobs were asked for.
    pub logprobs: Option<usize>,
    /// The tools a chat request offers (not with `tool_choice: none`): its output is
    /// parsed into calls.
    pub tools: Option<Tools>,
    /// The request field its constraint came from, for errors while it generates.
    pub constraint_field: Option<&'static str>,
}

impl Job {
    pub fn num_choices(&self) -> usize {
        self.params.len()
    }

    pub fn prompt_tokens(&self) -> usize {
        self.inputs.iter().map(|i| i.tokens.len()).sum()
    }

    /// A parser of one choice's output into text and tool calls, when tools are offered.
    pub fn call_parser(&self) -> Option<CallParser> {
        self.tools.as_ref().map(Tools::parser)
    }
}

fn unsupported(field: &str, why: &str) -> Error {
    Error::param(field, format!("is not supported by this server: {why}"))
}

/// A count from JSON in `range`, named `field` when it is not.
fn count(v: i64, field: &str, range: std::ops::RangeInclusive<usize>) -> Result<usize> {
    usize::try_from(v)
        .ok()
        .filter(|c| range.contains(c))
        .ok_or_else(|| {
            let want = if *range.end() == usize::MAX {
                format!("at least {}", range.start())
            } else {
                format!("in [{}, {}]", range.start(), range.end())
            };
            Error::param(field, format!("{v} is not {want}"))
        })
}

/// The chat message list as the template takes it: roles checked, content flattened to a
/// string (text parts joined with newlines, as vLLM does), each earlier tool call's
/// `arguments` parsed to an object (templates write it with `tojson`). Where the template
/// knows no tools (`knows_tools` false), calls and tool results become text in the Hermes
/// form that Cortex's own tool prompt asks for.
fn chat_messages(messages: &[Json], knows_tools: bool) -> Result<Vec<Json>> {
    if messages.is_empty() {
        return Err(Error::param("messages", "must hold at least one message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let field = format!("messages[{i}]");
        let Json::Object(obj) = m else {
            return Err(Error::param(
                field,
                "must be an object with role and content",
            ));
        };
        let role = match obj.get("role") {
            Some(Json::String(r)) => r.as_str(),
            _ => return Err(Error::param(format!("{field}.role"), "must be a string")),
        };
        let role = match role {
            "system" | "user" | "assistant" | "tool" => role,
            // OpenAI's newer name for the system message.
            "developer" => "system",
            "function" => {
                return Err(unsupported(
                    &format!("{field}.role"),
                    "'function' messages are deprecated; send 'tool' messages",
                ))
            }
            other => {
                return Err(Error::param(
                    format!("{field}.role"),
                    format!("'{other}' is not one of system, user, assistant, tool, developer"),
                ))
            }
        };
        let calls = match (role, obj.get("tool_calls")) {
            (_, None | Some(Json::Null)) => Vec::new(),
            ("assistant", Some(Json::Array(calls))) => tool_calls(calls, &field)?,
            ("assistant", Some(_)) => {
                return Err(Error::param(
                    format!("{field}.tool_calls"),
                    "must be a list",
                ))
            }
            (_, Some(_)) => {
                return Err(Error::param(
                    format!("{field}.tool_calls"),
                    "only assistant messages carry tool calls",
                ))
            }
        };
        let mut content = match obj.get("content") {
            Some(Json::String(s)) => s.clone(),
            None | Some(Json::Null) if role == "assistant" => String::new(),
            Some(Json::Array(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, part) in parts.iter().enumerate() {
                    let pf = format!("{field}.content[{j}]");
                    match (part.get("type").and_then(Json::as_str), part.get("text")) {
                        (Some("text"), Some(Json::String(t))) => texts.push(t.as_str()),
                        (Some("text"), _) => {
                            return Err(Error::param(format!("{pf}.text"), "must be a string"))
                        }
                        (Some(other), _) => {
                            return Err(unsupported(
                                &format!("{pf}.type"),
                                &format!("'{other}' parts (only text)"),
                            ))
                        }
                        (None, _) => {
                            return Err(Error::param(format!("{pf}.type"), "must be a string"))
                        }
                    }
                }
                texts.join("\n")
            }
            _ => {
                return Err(Error::param(
                    format!("{field}.content"),
                    "must be a string or a list of text parts",
                ))
            }
        };
        let mut msg = obj.clone();
        let mut role = role;
        if knows_tools {
            if !calls.is_empty() {
                msg.insert("tool_calls".into(), Json::Array(calls));
            }
        } else {
            msg.remove("tool_calls");
            for call in &calls {
                let f = &call["function"];
                let call = json!({"name": f["name"], "arguments": f["arguments"]});
                if !content.is_empty() {
                    content.push('\n');
                }
                content.push_str("<tool_call>\n");
                content.push_str(&call.to_string());
                content.push_str("\n</tool_call>");
            }
            if role == "tool" {
                role = "user";
                content = format!("<tool_response>\n{content}\n</tool_response>");
            }
        }
        msg.insert("role".into(), role.into());
        msg.insert("content".into(), content.into());
        out.push(Json::Object(msg));
    }
    Ok(out)
}

/// An assistant message's earlier `tool_calls`, with each call's `arguments` (a JSON
/// string, as OpenAI sends it) parsed to a value.
fn tool_calls(calls: &[Json], field: &str) -> Result<Vec<Json>> {
    calls
        .iter()
        .enumerate()
        .map(|(j, call)| {
            let cf = format!("{field}.tool_calls[{j}].function");
            let f = call
                .get("function")
                .and_then(Json::as_object)
                .ok_or_else(|| Error::param(cf.clone(), "must be an object"))?;
            let name = f
                .get("name")
                .and_then(Json::as_str)
                .ok_or_else(|| Error::param(format!("{cf}.name"), "must be a string"))?;
            let arguments = match f.get("arguments") {
                Some(Json::String(a)) => serde_json::from_str::<Json>(a).map_err(|e| {
                    Error::param(format!("{cf}.arguments"), format!("is not JSON: {e}"))
                })?,
                Some(a @ Json::Object(_)) => a.clone(),
                _ => {
                    return Err(Error::param(
                        format!("{cf}.arguments"),
                        "must be a JSON string",
                    ))
                }
            };
            let mut call = call.clone();
            call["function"] = json!({"name": name, "arguments": arguments});
            Ok(call)
        })
        .collect()
}

/// `prompt` of a completion: a string, a list of strings, a list of token ids, or a list
/// of such lists.
fn completion_prompts(prompt: &Json, tokenizer: &Tokenizer) -> Result<Vec<Input>> {
    let vocab = tokenizer.vocab_size();
    let ids = |v: &[Json], field: &str| -> Result<Vec<u32>> {
        let ids = v
            .iter()
            .map(|t| {
                t.as_i64()
                    .ok_or_else(|| Error::param(field, "token ids must be integers"))
            })
            .collect::<Result<Vec<i64>>>()?;
        crate::tokenizer::check_token_ids(&ids, vocab, field)
    };
    let text = |s: &str| -> Result<Input> {
        Ok(Input {
            tokens: tokenizer.encode(s, true)?,
            echo: Some(s.to_string()),
        })
    };
    let bad = || {
        Error::param(
            "prompt",
            "must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        )
    };
    match prompt {
        Json::String(s) => Ok(vec![text(s)?]),
        Json::Array(items) if items.is_empty() => Err(bad()),
        Json::Array(items) => match &items[0] {
            Json::Number(_) => Ok(vec![Input {
                tokens: ids(items, "prompt")?,
                echo: None,
            }]),
            _ => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Json::String(s) => text(s),
                    Json::Array(v) => Ok(Input {
                        tokens: ids(v, &format!("prompt[{i}]"))?,
                        echo: None,
                    }),
                    _ => Err(bad()),
                })
                .collect(),
        },
        _ => Err(bad()),
    }
}

/// Refuses the OpenAI fields whose meaning Cortex cannot honour, by name.
fn refuse_unsupported(b: &Body, n: usize) -> Result<()> {
    if b.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported("logit_bias", "biasing logits is not available"));
    }
    for (name, v) in [
        ("functions", &b.functions),
        ("function_call", &b.function_call),
        ("audio", &b.audio),
        ("prediction", &b.prediction),
    ] {
        if v.as_ref().is_some_and(|v| !v.is_null()) {
            let why = if name.starts_with("function") {
                "deprecated by OpenAI; send tools and tool_choice"
            } else {
                "the server generates text only"
            };
            return Err(unsupported(name, why));
        }
    }
    if b.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported("suffix", "insertion is not available"));
    }
    if let Some(best_of) = b.best_of {
        if usize::try_from(best_of).ok() != Some(n) {
            return Err(unsupported("best_of", "only equal to n"));
        }
    }
    if let Some(m) = &b.modalities {
        if m.iter().any(|m| m != "text") {
            return Err(unsupported("modalities", "only [\"text\"]"));
        }
    }
    Ok(())
}

/// What a request body asks for, checked and tokenized. `template` is the chat template
/// in use (the model's or the server's `--chat-template`); `context` the model's context.
pub fn job(
    endpoint: Endpoint,
    b: &Body,
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    context: usize,
) -> Result<Job> {
    let n = count(b.n.unwrap_or(1), "n", 1..=MAX_CHOICES)?;
    refuse_unsupported(b, n)?;
    let logprobs = match (endpoint, &b.logprobs) {
        (_, None | Some(Json::Null)) => {
            if b.top_logprobs.is_some() && endpoint == Endpoint::Chat {
                return Err(Error::param("top_logprobs", "needs logprobs set to true"));
            }
            None
        }
        (Endpoint::Chat, Some(Json::Bool(on))) => match (on, b.top_logprobs) {
            (true, top) => Some(count(top.unwrap_or(0), "top_logprobs", 0..=MAX_LOGPROBS)?),
            (false, Some(_)) => {
                return Err(Error::param("top_logprobs", "needs logprobs set to true"))
            }
            (false, None) => None,
        },
        (Endpoint::Chat, Some(_)) => return Err(Error::param("logprobs", "must be a boolean")),
        (Endpoint::Completions, Some(v)) => {
            let k = v
                .as_i64()
                .ok_or_else(|| Error::param("logprobs", "must be an integer"))?;
            Some(count(k, "logprobs", 0..=MAX_COMPLETION_LOGPROBS)?)
        }
    };
    let echo = b.echo == Some(true);
    let mut tools = None;
    let inputs = match endpoint {
        Endpoint::Chat => {
            let messages = b
                .messages
                .as_deref()
                .ok_or_else(|| Error::param("messages", "is required"))?;
            let template = template
                .or(tokenizer.chat_template())
                .ok_or_else(|| Error::Template("this model has no chat template".into()))?;
            let format = tools::Format::of_template(template.source());
            tools = Tools::parse(
                b.tools.as_ref(),
                b.tool_choice.as_ref(),
                b.parallel_tool_calls,
                format,
                tokenizer,
            )?;
            if tools.is_some() && logprobs.is_some() {
                return Err(unsupported("logprobs", "not together with tools"));
            }
            let mut messages = chat_messages(messages, format.1)?;
            let mut extra = b.chat_template_kwargs.clone().unwrap_or_default();
            if let Some(t) = &tools {
                t.prompt(&mut messages, &mut extra);
            }
            let text = template
                .render(&Json::Array(messages), true, &extra)
                .map_err(|e| match e {
                    Error::Template(m) => Error::param("messages", format!("chat template: {m}")),
                    e => e,
                })?;
            // The template writes any BOS the model wants.
            vec![Input {
                tokens: tokenizer.encode(&text, false)?,
                echo: None,
            }]
        }
        Endpoint::Completions => {
            for (name, v) in [("tools", &b.tools), ("tool_choice", &b.tool_choice)] {
                if v.as_ref().is_some_and(|v| !v.is_null()) {
                    return Err(unsupported(
                        name,
                        "tools are offered on /v1/chat/completions",
                    ));
                }
            }
            if echo && logprobs.is_some() {
                return Err(unsupported(
                    "echo",
                    "not together with logprobs (prompt logprobs are not computed)",
                ));
            }
            let prompt = b
                .prompt
                .as_ref()
                .ok_or_else(|| Error::param("prompt", "is required"))?;
            let mut inputs = completion_prompts(prompt, tokenizer)?;
            for input in &mut inputs {
                input.echo = match (echo, input.echo.take()) {
                    (false, _) => None,
                    (true, Some(text)) => Some(text),
                    (true, None) => Some(tokenizer.decode(&input.tokens, false)?),
                };
            }
            inputs
        }
    };
    if inputs.len() * n > MAX_CHOICES {
        return Err(Error::param(
            "n",
            format!(
                "{} prompts times n = {n} make more than {MAX_CHOICES} choices",
                inputs.len()
            ),
        ));
    }
    let (max_field, max_tokens) = match (b.max_completion_tokens, b.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    // Without a limit a choice may use the rest of the context (OpenAI's default).
    let max_tokens = match max_tokens {
        Some(m) => count(m, max_field, 1..=usize::MAX)?,
        None => context,
    };
    let top_k = match b.top_k {
        // vLLM's and OpenAI-compatible clients' "off".
        None | Some(-1) => 0,
        Some(k) => count(k, "top_k", 0..=usize::MAX)?,
    };
    let seed = b
        .seed
        .map(|s| SamplingParams::seed_from(Some(i128::from(s))))
        .transpose()?
        .flatten();
    let base = SamplingParams {
        // OpenAI's default temperature is 1.
        temperature: b.temperature.unwrap_or(1.0),
        top_k,
        top_p: b.top_p.unwrap_or(1.0),
        min_p: b.min_p.unwrap_or(0.0),
        repetition_penalty: b.repetition_penalty.unwrap_or(1.0),
        presence_penalty: b.presence_penalty.unwrap_or(0.0),
        frequency_penalty: b.frequency_penalty.unwrap_or(0.0),
        max_tokens,
        stop: match &b.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        },
        seed,
        logprobs,
        ignore_eos: b.ignore_eos == Some(true),
        constraint: output_constraint(b, tools.as_ref())?,
    };
    let constraint_field = base.constraint.as_ref().map(constraint_field);
    let rename = |e| rename_constraint_error(e, constraint_field);
    base.validate().map_err(rename)?;
    if let Some(c) = &base.constraint {
        // Compiled now, so a bad schema is a 400 before any engine work (the engine's
        // compile then finds it in the cache).
        tokenizer.grammars()?.compile(c).map_err(rename)?;
    }
    // Sample j of every prompt draws with seed + j: reproducible, yet the choices differ.
    let params = (0..inputs.len() * n)
        .map(|k| SamplingParams {
            seed: seed.map(|s| s.wrapping_add((k % n) as u64)),
            ..base.clone()
        })
        .collect();
    let stream = b.wants_stream();
    Ok(Job {
        endpoint,
        stream,
        include_usage: stream
            && b.stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        inputs,
        n,
        params,
        logprobs,
        tools,
        constraint_field,
    })
}

/// The request field a constraint came from: `response_format`'s schema, or the tools
/// (whose required call is a Lark grammar).
fn constraint_field(c: &Constraint) -> &'static str {
    match c {
        Constraint::JsonSchema(_) => "response_format.json_schema.schema",
        Constraint::JsonObject => "response_format",
        Constraint::Regex(_) | Constraint::Lark(_) => "tools",
    }
}

/// `e` naming `field` (the request's spelling) where it names a constraint by its
/// engine name (`json_schema`, `grammar`...).
pub fn rename_constraint_error(e: Error, field: Option<&'static str>) -> Error {
    let Some(field) = field else { return e };
    match e {
        Error::Grammar { message, .. } => Error::Grammar {
            param: field.into(),
            message,
        },
        Error::InvalidParam { param, message }
            if ["json_schema", "json_object", "regex", "grammar"].contains(&param.as_str()) =>
        {
            Error::param(field, message)
        }
        e => e,
    }
}

/// What `response_format` and the tools make of the output: any JSON object, JSON valid
/// against a schema, or a valid tool call (`tool_choice` `required` or a named function).
fn output_constraint(b: &Body, tools: Option<&Tools>) -> Result<Option<Constraint>> {
    let format = match &b.response_format {
        None | Some(Json::Null) => None,
        Some(f) => response_format(f)?,
    };
    match (format, tools.and_then(Tools::constraint)) {
        (Some(_), Some(_)) => Err(Error::param(
            "response_format",
            "cannot hold the output while tool_choice requires a tool call",
        )),
        (format, call) => Ok(format.or(call)),
    }
}

/// `response_format`: `{"type": "text"}`, `{"type": "json_object"}`, or `{"type":
/// "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}`. The schema
/// is always enforced, `strict` or not.
fn response_format(f: &Json) -> Result<Option<Constraint>> {
    let kind = f
        .get("type")
        .and_then(Json::as_str)
        .ok_or_else(|| Error::param("response_format.type", "must be a string"))?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Constraint::JsonObject)),
        "json_schema" => {
            let spec = f
                .get("json_schema")
                .and_then(Json::as_object)
                .ok_or_else(|| Error::param("response_format.json_schema", "must be an object"))?;
            let name = spec.get("name").and_then(Json::as_str).unwrap_or_default();
            tools::check_name(name, "response_format.json_schema.name")?;
            if !matches!(spec.get("strict"), None | Some(Json::Null | Json::Bool(_))) {
                return Err(Error::param(
                    "response_format.json_schema.strict",
                    "must be a boolean",
                ));
            }
            match spec.get("schema") {
                Some(schema @ (Json::Object(_) | Json::Bool(true))) => Ok(Some(
                    Constraint::JsonSchema(std::sync::Arc::new(schema.clone())),
                )),
                _ => Err(Error::param(
                    "response_format.json_schema.schema",
                    "must be a JSON Schema object",
                )),
            }
        }
        other => Err(Error::param(
            "response_format.type",
            format!("'{other}' is not one of text, json_object, json_schema"),
        )),
    }
}

/// One choice's output so far.
#[derive(Debug, Default)]
pub struct Choice {
    pub text: String,
    pub tokens: Vec<(u32, Option<TokenLogprobs>)>,
    /// "stop", "length" or "abort" once ended.
    pub finish: Option<&'static str>,
}

impl Choice {
    pub fn push(&mut self, step: &StepOutput) {
        self.text.push_str(&step.text);
        self.tokens.push((step.token, step.logprobs.clone()));
    }
}

/// The text of one token, as OpenAI's `token` field gives it.
fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// Chat's `logprobs.content` entries for `tokens`.
fn chat_logprobs(tokenizer: &Tokenizer, tokens: &[(u32, Option<TokenLogprobs>)]) -> Json {
    let entry = |id: u32, logprob: f32| {
        let text = token_text(tokenizer, id);
        json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
    };
    let content: Vec<Json> = tokens
        .iter()
        .filter_map(|(id, lp)| {
            let lp = lp.as_ref()?;
            let mut e = entry(*id, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
            Some(e)
        })
        .collect();
    json!({ "content": content })
}

/// The completions API's `logprobs` object for `tokens`; `offset` is where their text
/// starts in the returned text.
fn completion_logprobs(
    tokenizer: &Tokenizer,
    tokens: &[(u32, Option<TokenLogprobs>)],
    mut offset: usize,
) -> Json {
    let (mut texts, mut logprobs, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (id, lp) in tokens {
        let Some(lp) = lp else { continue };
        let text = token_text(tokenizer, *id);
        offsets.push(offset);
        offset += text.len();
        texts.push(text);
        logprobs.push(lp.logprob);
        let top: Map<String, Json> = lp
            .top
            .iter()
            .map(|&(t, l)| (token_text(tokenizer, t), json!(l)))
            .collect();
        tops.push(Json::Object(top));
    }
    json!({"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets})
}

/// Usage counts of a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    fn json(self) -> Json {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// What every response and chunk of one request repeats.
#[derive(Debug, Clone)]
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// The whole (non-streamed) response.
pub fn response(
    job: &Job,
    h: &Header,
    choices: &[Choice],
    usage: Usage,
    tokenizer: &Tokenizer,
) -> Json {
    let choices: Vec<Json> = choices
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let finish = c.finish.unwrap_or("abort");
            match job.endpoint {
                Endpoint::Chat => {
                    let mut message = json!({"role": "assistant", "content": c.text});
                    let mut finish = finish;
                    if let Some(mut parser) = job.call_parser() {
                        let mut pieces = parser.push(&c.text);
                        pieces.extend(parser.finish());
                        let (text, calls) = tools::assemble(pieces);
                        if !calls.is_empty() {
                            let calls: Vec<Json> = calls.iter().map(ToolCall::json).collect();
                            message["content"] = if text.is_empty() { Json::Null } else { text.into() };
                            message["tool_calls"] = calls.into();
                            finish = call_finish(finish);
                        }
                    }
                    json!({
                        "index": index,
                        "message": message,
                        "logprobs": job.logprobs.map(|_| chat_logprobs(tokenizer, &c.tokens)),
                        "finish_reason": finish,
                    })
                }
                Endpoint::Completions => {
                    let echo = job.inputs[index / job.n].echo.as_deref().unwrap_or("");
                    json!({
                        "index": index,
                        "text": format!("{echo}{}", c.text),
                        "logprobs": job.logprobs.map(|_| completion_logprobs(tokenizer, &c.tokens, echo.len())),
                        "finish_reason": finish,
                    })
                }
            }
        })
        .collect();
    json!({
        "id": h.id,
        "object": job.endpoint.object(false),
        "created": h.created,
        "model": h.model,
        "choices": choices,
        "usage": usage.json(),
    })
}

/// The finish reason of a choice that made tool calls: `tool_calls` where the model
/// stopped by itself.
pub fn call_finish(finish: &'static str) -> &'static str {
    if finish == "stop" {
        "tool_calls"
    } else {
        finish
    }
}

/// A stream chunk for choice `index` that carries `call`, one entry of a tool-call delta
/// (`{"index": k, "id", "type", "function": {"name", "arguments"}}`, or later fragments
/// `{"index": k, "function": {"arguments"}}`).
pub fn call_chunk(job: &Job, h: &Header, index: usize, call: Json) -> Json {
    let choice = json!({
        "index": index,
        "delta": {"tool_calls": [call]},
        "logprobs": null,
        "finish_reason": null,
    });
    stream_chunk(job, h, choice)
}

/// A stream chunk around one choice's delta.
fn stream_chunk(job: &Job, h: &Header, choice: Json) -> Json {
    let mut out = json!({
        "id": h.id,
        "object": job.endpoint.object(true),
        "created": h.created,
        "model": h.model,
        "choices": [choice],
    });
    if job.include_usage {
        out["usage"] = Json::Null;
    }
    out
}

/// One stream chunk for choice `index`: `text` (a delta), the tokens it came from (for
/// logprobs), and the finish reason on its last chunk. `first` marks a chat choice's
/// opening chunk, which carries the role.
pub struct Delta<'a> {
    pub index: usize,
    pub text: &'a str,
    pub tokens: &'a [(u32, Option<TokenLogprobs>)],
    pub finish: Option<&'static str>,
    pub first: bool,
}

pub fn chunk(job: &Job, h: &Header, d: &Delta<'_>, tokenizer: &Tokenizer) -> Json {
    let choice = match job.endpoint {
        Endpoint::Chat => {
            let delta = if d.first {
                json!({"role": "assistant", "content": d.text})
            } else if d.text.is_empty() && d.finish.is_some() {
                json!({})
            } else {
                json!({"content": d.text})
            };
            json!({
                "index": d.index,
                "delta": delta,
                "logprobs": job.logprobs.map(|_| chat_logprobs(tokenizer, d.tokens)),
                "finish_reason": d.finish,
            })
        }
        Endpoint::Completions => json!({
            "index": d.index,
            "text": d.text,
            "logprobs": job.logprobs.map(|_| completion_logprobs(tokenizer, d.tokens, 0)),
            "finish_reason": d.finish,
        }),
    };
    stream_chunk(job, h, choice)
}

/// The last chunk when `stream_options.include_usage` is set: no choices, the usage.
pub fn usage_chunk(job: &Job, h: &Header, usage: Usage) -> Json {
    json!({
        "id": h.id,
        "object": job.endpoint.object(true),
        "created": h.created,
        "model": h.model,
        "choices": [],
        "usage": usage.json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_type_names_its_path() {
        let e = Body::parse(br#"{"temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = Body::parse(br#"{"messages": [{"role": "user"}], "stop": 3}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stop"));
        let e = Body::parse(br#"{"stream_options": {"include_usage": 1}}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream_options.include_usage"));
    }

    #[test]
    fn malformed_json_names_no_field() {
        for body in [
            &b"{"[..],
            b"{\"n\": 1,}",
            b"{} trailing",
            b"",
            b"[1, 2]",
            b"  7",
        ] {
            let e = Body::parse(body).unwrap_err();
            assert_eq!(e.param, None, "{:?}", std::str::from_utf8(body));
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_unsupported_ones_refused() {
        let b = Body::parse(br#"{"prompt": "x", "no_such_field": {"a": 1}}"#).unwrap();
        assert!(refuse_unsupported(&b, 1).is_ok());
        for (body, field) in [
            (&br#"{"logit_bias": {"1": 5}}"#[..], "logit_bias"),
            (br#"{"functions": [{"name": "f"}]}"#, "functions"),
            (br#"{"suffix": "end"}"#, "suffix"),
            (br#"{"best_of": 3}"#, "best_of"),
            (br#"{"modalities": ["text", "audio"]}"#, "modalities"),
        ] {
            let b = Body::parse(body).unwrap();
            match refuse_unsupported(&b, 1) {
                Err(Error::InvalidParam { param, .. }) => assert_eq!(param, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        for body in [
            &br#"{"logit_bias": {}}"#[..],
            br#"{"tool_choice": "none"}"#,
            br#"{"response_format": {"type": "text"}}"#,
            br#"{"best_of": 1, "tools": null}"#,
        ] {
            let b = Body::parse(body).unwrap();
            assert!(refuse_unsupported(&b, 1).is_ok());
        }
    }

    #[test]
    fn messages_are_checked_and_flattened() {
        let ok = chat_messages(&[
            json!({"role": "developer", "content": "be brief"}),
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            json!({"role": "assistant", "content": null}),
        ], true)
        .unwrap();
        assert_eq!(ok[0]["role"], "system");
        assert_eq!(ok[1]["content"], "a\nb");
        assert_eq!(ok[2]["content"], "");
        for (msgs, field) in [
            (
                vec![json!({"role": "user", "content": 5})],
                "messages[0].content",
            ),
            (
                vec![json!({"role": "wizard", "content": "x"})],
                "messages[0].role",
            ),
            (
                vec![
                    json!({"role": "user", "content": "x"}),
                    json!({"role": "user", "content": [{"type": "image_url"}]}),
                ],
                "messages[1].content[0].type",
            ),
            (vec![json!("hello")], "messages[0]"),
            (vec![], "messages"),
        ] {
            match chat_messages(&msgs, true) {
                Err(Error::InvalidParam { param, .. }) => assert_eq!(param, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn earlier_tool_calls_reach_the_template_or_become_hermes_text() {
        let msgs = [
            json!({"role": "user", "content": "weather?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "call_1", "content": "sunny"}),
        ];
        let native = chat_messages(&msgs, true).unwrap();
        assert_eq!(
            native[1]["tool_calls"][0]["function"]["arguments"]["city"],
            "Paris"
        );
        assert_eq!(native[2]["role"], "tool");
        let text = chat_messages(&msgs, false).unwrap();
        assert_eq!(
            text[1]["content"],
            "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>"
        );
        assert!(text[1].get("tool_calls").is_none());
        assert_eq!(text[2]["role"], "user");
        assert_eq!(
            text[2]["content"],
            "<tool_response>\nsunny\n</tool_response>"
        );
        for (msg, field) in [
            (
                json!({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                json!({"role": "user", "content": "x", "tool_calls": []}),
                "messages[0].tool_calls",
            ),
            (
                json!({"role": "function", "content": "x"}),
                "messages[0].role",
            ),
        ] {
            match chat_messages(&[msg], true) {
                Err(Error::InvalidParam { param, .. }) => assert_eq!(param, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn response_formats_become_constraints() {
        let parse = |v: Json| response_format(&v);
        assert_eq!(parse(json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            parse(json!({"type": "json_object"})).unwrap(),
            Some(Constraint::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            parse(json!({"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": true}}))
                .unwrap(),
            Some(Constraint::JsonSchema(std::sync::Arc::new(schema)))
        );
        for (v, field) in [
            (json!({"type": "yaml"}), "response_format.type"),
            (json!({}), "response_format.type"),
            (
                json!({"type": "json_schema"}),
                "response_format.json_schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
                "response_format.json_schema.name",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}),
                "response_format.json_schema.strict",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
                "response_format.json_schema.schema",
            ),
        ] {
            match parse(v) {
                Err(Error::InvalidParam { param, .. }) => assert_eq!(param, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
