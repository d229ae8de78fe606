//! Chat templates rendered the way transformers renders them
//! (`transformers/utils/chat_template_utils.py`): Jinja with `trim_blocks` and
//! `lstrip_blocks`, the variables `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token` (and any extra keyword arguments), a `raise_exception(msg)` function, a
//! `tojson` filter that does not HTML-escape, and Python string methods (`.strip()`,
//! `.startswith()`...) through minijinja-contrib's pycompat layer.
//!
//! Templates come from model files, so they are untrusted. minijinja executes no host code;
//! a fuel budget bounds the instructions of one render (nested loops cannot hang the
//! process) and the recursion limit bounds nesting. Fuel does not bound memory: one `+`
//! can double a list or a string, so forty of them (or `replace`, `join`, `indent`,
//! `tojson(indent=...)`, `batch` with a huge count) ask for terabytes in a handful of
//! steps, and an allocation that fails aborts the process. So each render runs a guarded
//! copy of the compiled template (minijinja's `unstable_machinery`):
//!
//! * `+`, `*` and `~` become calls to checked functions that refuse a result larger than
//!   [`MAX_VALUE_BYTES`] before building it;
//! * the filters and string methods whose output size depends on an argument (`replace`,
//!   `join`, `indent`, `format`, `batch`, `slice`, `tojson`) check that size first;
//! * every value a filter, function, method, slice or list/map literal produces is measured
//!   (nesting depth, and a deep size that counts shared parts each time they would be
//!   printed, since printing is what multiplies them), and the strings built in one render
//!   are charged to [`MAX_BUILT_BYTES`];
//! * everything written, template text included and captured blocks counted again, is
//!   charged to [`MAX_EMITTED_BYTES`] as it is written, through the formatter.
//!
//! The measuring itself is charged to the fuel-like [`MAX_VISITS`], so the guard cannot be
//! turned into the slow part. Any breach is a `TemplateError`, and the process, the
//! tokenizer and other requests are unharmed.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use minijinja::machinery::{self, CodeGenerator, Instruction, Instructions, WhitespaceConfig};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, Output, State};

use crate::error::{Error, Result};

/// Instructions one render may execute; real templates use a few thousand.
const FUEL: u64 = 500_000;
/// Largest rendered prompt accepted.
const MAX_OUTPUT_BYTES: usize = 4 << 20;
const MAX_RECURSION: usize = 100;
/// Largest value (string, or list/map measured deeply) a render may build.
const MAX_VALUE_BYTES: usize = 16 << 20;
/// Bytes of strings all guarded operations of one render may build together.
const MAX_BUILT_BYTES: usize = 64 << 20;
/// Bytes one render may write, captured blocks (`{% set x %}...`) included.
const MAX_EMITTED_BYTES: usize = 16 << 20;
/// Items the guard may visit while measuring the values of one render.
const MAX_VISITS: usize = 20_000_000;
/// Deepest nesting of lists and maps a value may have (printing and dropping recurse).
const MAX_DEPTH: usize = 128;
/// Most items a list may hold (`batch`/`slice` counts included).
const MAX_ITEMS: usize = 1 << 20;
/// What one item costs in a measured size beyond its text: the `Value` that holds it.
const ITEM_BYTES: usize = std::mem::size_of::<Value>();
/// Largest `tojson` indent accepted (Python takes any; templates use 2 or 4).
const MAX_JSON_INDENT: usize = 64;
/// The source of a template must compile within this size (real ones are under 50 KB).
const MAX_TEMPLATE_BYTES: usize = 1 << 20;

const TEMPLATE_NAME: &str = "chat_template";

#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

/// The running totals of the render on this thread (renders are synchronous and never
/// nest, so one per thread suffices; [`Budget::start`] resets it).
struct Budget {
    built: Cell<usize>,
    emitted: Cell<usize>,
    visits: Cell<usize>,
}

thread_local! {
    static BUDGET: Budget = const {
        Budget { built: Cell::new(0), emitted: Cell::new(0), visits: Cell::new(0) }
    };
}

impl Budget {
    fn start() {
        BUDGET.with(|b| {
            b.built.set(0);
            b.emitted.set(0);
            b.visits.set(0);
        });
    }

    /// Adds `n` to the counter `pick` selects; false once its total passes `limit`.
    fn add(pick: fn(&Budget) -> &Cell<usize>, n: usize, limit: usize) -> bool {
        BUDGET.with(|b| {
            let c = pick(b);
            c.set(c.get().saturating_add(n));
            c.get() <= limit
        })
    }

    fn emit(n: usize) -> std::result::Result<(), minijinja::Error> {
        if Self::add(|b| &b.emitted, n, MAX_EMITTED_BYTES) {
            Ok(())
        } else {
            Err(emitted_too_large())
        }
    }

    fn build(n: usize) -> std::result::Result<(), minijinja::Error> {
        if Self::add(|b| &b.built, n, MAX_BUILT_BYTES) {
            Ok(())
        } else {
            Err(too_large(format!(
                "strings built by the template exceed {MAX_BUILT_BYTES} bytes"
            )))
        }
    }

    fn visit(n: usize) -> std::result::Result<(), minijinja::Error> {
        if Self::add(|b| &b.visits, n, MAX_VISITS) {
            Ok(())
        } else {
            Err(minijinja::Error::from(ErrorKind::OutOfFuel))
        }
    }
}

fn too_large(msg: String) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("too large for the template memory limit: {msg}"),
    )
}

fn emitted_too_large() -> minijinja::Error {
    too_large(format!(
        "bytes written by the template (captured blocks included) exceed {MAX_EMITTED_BYTES}"
    ))
}

fn check_size(n: usize, what: &str) -> std::result::Result<(), minijinja::Error> {
    if n > MAX_VALUE_BYTES {
        return Err(too_large(format!(
            "{what} would be {n} bytes (limit {MAX_VALUE_BYTES})"
        )));
    }
    Ok(())
}

/// A `fmt::Write` that counts (and, given a buffer, keeps) at most `limit` bytes and fails
/// past them, so printing a value never builds more than the limit.
struct Bounded<'a> {
    buf: Option<&'a mut String>,
    len: usize,
    limit: usize,
}

impl fmt::Write for Bounded<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.len = self.len.saturating_add(s.len());
        if self.len > self.limit {
            return Err(fmt::Error);
        }
        if let Some(buf) = self.buf.as_deref_mut() {
            buf.push_str(s);
        }
        Ok(())
    }
}

/// `value` printed as `{}` prints it, or an error when that would exceed `limit` bytes.
fn display_bounded(value: &Value, limit: usize) -> std::result::Result<String, minijinja::Error> {
    let mut s = String::new();
    let mut w = Bounded {
        buf: Some(&mut s),
        len: 0,
        limit,
    };
    write!(w, "{value}")
        .map_err(|_| too_large(format!("a printed value would exceed {limit} bytes")))?;
    Ok(s)
}

/// The number of bytes `value` prints as, if at most `limit`.
fn display_len(value: &Value, limit: usize) -> Option<usize> {
    let mut w = Bounded {
        buf: None,
        len: 0,
        limit,
    };
    write!(w, "{value}").ok().map(|()| w.len)
}

/// The deep size of `value`: the bytes of its strings plus [`ITEM_BYTES`] per item, a part
/// shared by several places counted at each (as printing would write it). Measured without
/// recursion; fails past [`MAX_VALUE_BYTES`], [`MAX_DEPTH`] or the render's visit budget.
fn deep_size(value: &Value) -> std::result::Result<usize, minijinja::Error> {
    let mut total = 0usize;
    let mut stack = vec![(value.clone(), 0usize)];
    let mut visits = 0usize;
    while let Some((v, depth)) = stack.pop() {
        visits += 1;
        if visits.is_multiple_of(4096) {
            Budget::visit(4096)?;
        }
        total = total.saturating_add(ITEM_BYTES);
        match v.kind() {
            ValueKind::String => total = total.saturating_add(v.as_str().map_or(0, str::len)),
            ValueKind::Bytes => total = total.saturating_add(v.as_bytes().map_or(0, <[u8]>::len)),
            ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
                if depth >= MAX_DEPTH {
                    return Err(too_large(format!(
                        "values nest deeper than {MAX_DEPTH} levels"
                    )));
                }
                let is_map = v.kind() == ValueKind::Map;
                for item in v.try_iter()? {
                    if is_map {
                        if let Ok(inner) = v.get_item(&item) {
                            stack.push((inner, depth + 1));
                        }
                    }
                    stack.push((item, depth + 1));
                    if stack.len() > MAX_ITEMS {
                        return Err(too_large(format!(
                            "a list holds more than {MAX_ITEMS} items"
                        )));
                    }
                }
            }
            _ => {}
        }
        check_size(total, "a value")?;
    }
    Budget::visit(visits % 4096)?;
    Ok(total)
}

/// Checks a value a guarded instruction produced and charges the strings it built.
fn checked(value: Value) -> std::result::Result<Value, minijinja::Error> {
    let size = deep_size(&value)?;
    if value.kind() == ValueKind::String {
        Budget::build(size)?;
    }
    Ok(value)
}

fn is_seq(v: &Value) -> bool {
    matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable)
}

/// minijinja's own operator on `a` and `b`, once the guard has checked the result's size.
fn native_op(
    state: &State,
    op: &str,
    a: Value,
    b: Value,
) -> std::result::Result<Value, minijinja::Error> {
    let expr = state.env().compile_expression(op)?;
    expr.eval(minijinja::context! { a => a, b => b })
}

/// `a + b`: strings and lists are measured before they are joined. Lists are joined into
/// a new list (minijinja would chain them lazily, which makes every later walk slower).
fn guarded_add(state: &State, a: Value, b: Value) -> std::result::Result<Value, minijinja::Error> {
    if is_seq(&a) && is_seq(&b) {
        // The item count alone may already be too large; only then walk the items.
        let items = a.len().unwrap_or(0).saturating_add(b.len().unwrap_or(0));
        check_size(items.saturating_mul(ITEM_BYTES), "the result of `+`")?;
        check_size(
            deep_size(&a)?.saturating_add(deep_size(&b)?),
            "the result of `+`",
        )?;
        let joined: Vec<Value> = a.try_iter()?.chain(b.try_iter()?).collect();
        return Ok(Value::from(joined));
    }
    if let (Some(x), Some(y)) = (a.as_str(), b.as_str()) {
        // What minijinja's `+` does with two strings, without compiling the operator.
        check_size(x.len().saturating_add(y.len()), "the result of `+`")?;
        return checked(Value::from([x, y].concat()));
    }
    checked(native_op(state, "a + b", a, b)?)
}

/// `a * b`: a repeated string is measured before it is built.
fn guarded_mul(state: &State, a: Value, b: Value) -> std::result::Result<Value, minijinja::Error> {
    for (s, n) in [(&a, &b), (&b, &a)] {
        if let (Some(s), Some(n)) = (s.as_str(), n.as_usize()) {
            check_size(s.len().saturating_mul(n), "the result of `*`")?;
        }
    }
    checked(native_op(state, "a * b", a, b)?)
}

/// `a ~ b`: printed into a buffer that stops at the size limit.
fn guarded_concat(a: Value, b: Value) -> std::result::Result<Value, minijinja::Error> {
    let mut s = display_bounded(&a, MAX_VALUE_BYTES)?;
    s.push_str(&display_bounded(&b, MAX_VALUE_BYTES - s.len())?);
    Budget::build(s.len())?;
    Ok(Value::from(s))
}

/// The size a `replace` of `old` by `new` in `s` would have (at most `count` times).
fn replaced_len(s: &str, old: &str, new: &str, count: Option<usize>) -> usize {
    let hits = if old.is_empty() {
        s.chars().count() + 1
    } else {
        s.matches(old).count()
    };
    let hits = count.map_or(hits, |c| c.min(hits));
    (s.len() - hits * old.len()).saturating_add(hits.saturating_mul(new.len()))
}

/// Bytes a `format` (printf `%` or Python `{}` style) may produce: each placeholder can
/// print the largest argument padded to any width written in the format.
fn formatted_len(fmt: &str, args: &[Value]) -> usize {
    let widths: usize = fmt
        .split(|c: char| !c.is_ascii_digit())
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<usize>().unwrap_or(usize::MAX))
        .fold(0, usize::saturating_add);
    let mut largest = 0;
    for a in args {
        largest = largest.max(display_len(a, MAX_VALUE_BYTES).unwrap_or(usize::MAX));
    }
    let slots = fmt.matches(['{', '%']).count();
    fmt.len()
        .saturating_add(slots.saturating_mul(largest.saturating_add(widths)))
}

/// `sep.join(items)` printed into a bounded buffer (minijinja's `join` and pycompat's).
fn bounded_join(items: &Value, sep: &str) -> std::result::Result<Value, minijinja::Error> {
    let what = "the result of `join`";
    let mut out = String::new();
    for (i, item) in items.try_iter()?.enumerate() {
        if i > 0 {
            check_size(out.len().saturating_add(sep.len()), what)?;
            out.push_str(sep);
        }
        let room = MAX_VALUE_BYTES - out.len();
        let text = display_bounded(&item, room)
            .map_err(|_| too_large(format!("{what} would exceed {MAX_VALUE_BYTES} bytes")))?;
        out.push_str(&text);
    }
    Ok(Value::from(out))
}

fn arg_str(args: &[Value], i: usize) -> &str {
    args.get(i).and_then(|v| v.as_str()).unwrap_or("")
}

/// Checks the size of a filter's result from its arguments (`args[0]` is the filtered
/// value) before the filter builds it.
fn precheck_filter(name: &str, args: &[Value]) -> std::result::Result<(), minijinja::Error> {
    let value = args.first().cloned().unwrap_or_default();
    match name {
        "indent" => {
            // The width is a count of spaces or a string put before each line.
            // (given by position or as `width=`).
            let width_of = |w: &Value| w.as_usize().or_else(|| w.as_str().map(str::len));
            let width = args
                .iter()
                .skip(1)
                .filter_map(|a| match a.kind() {
                    ValueKind::Map => a.get_attr("width").ok().as_ref().and_then(width_of),
                    _ => width_of(a),
                })
                .max()
                .unwrap_or(4);
            let text = display_len(&value, MAX_VALUE_BYTES).unwrap_or(usize::MAX);
            let lines = value.as_str().map_or(1, |s| s.matches('\n').count() + 1);
            check_size(
                text.saturating_add(lines.saturating_mul(width)),
                "the result of `indent`",
            )
        }
        "batch" | "slice" => match args.get(1).and_then(Value::as_usize) {
            Some(n) if n > MAX_ITEMS => Err(too_large(format!(
                "`{name}` into {n} parts (limit {MAX_ITEMS})"
            ))),
            _ => Ok(()),
        },
        "format" => check_size(
            formatted_len(value.as_str().unwrap_or(""), &args[1.min(args.len())..]),
            "the result of `format`",
        ),
        _ => Ok(()),
    }
}

/// minijinja's filters that are replaced by guarded versions wrapping them (each checks
/// its result's size from its arguments first, see [`precheck_filter`]).
fn guarded_builtins() -> [(&'static str, Value); 4] {
    use minijinja::filters::{batch, format, indent, slice};
    [
        ("indent", Value::from_function(indent)),
        ("batch", Value::from_function(batch)),
        ("slice", Value::from_function(slice)),
        ("format", Value::from_function(format)),
    ]
}

/// Jinja's `replace(old, new, count=None)` with the result measured first.
fn replace_filter(
    value: String,
    old: String,
    new: String,
    count: Option<usize>,
) -> std::result::Result<Value, minijinja::Error> {
    check_size(
        replaced_len(&value, &old, &new, count),
        "the result of `replace`",
    )?;
    Ok(Value::from(match count {
        Some(n) => value.replacen(&old, &new, n),
        None => value.replace(&old, &new),
    }))
}

/// minijinja's `join(d="")` into a bounded buffer.
fn join_filter(value: Value, sep: Option<String>) -> std::result::Result<Value, minijinja::Error> {
    bounded_join(&value, sep.as_deref().unwrap_or(""))
}

/// pycompat's string methods, with `replace`, `join` and `format` measured first.
fn guarded_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str() {
        match method {
            "replace" => {
                let count = args
                    .get(2)
                    .and_then(minijinja::Value::as_i64)
                    .and_then(|c| usize::try_from(c).ok());
                check_size(
                    replaced_len(s, arg_str(args, 0), arg_str(args, 1), count),
                    "the result of `replace`",
                )?;
            }
            "join" => return bounded_join(args.first().unwrap_or(&Value::UNDEFINED), s),
            "format" => check_size(formatted_len(s, args), "the result of `format`")?,
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`, as transformers' filter.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    if indent.is_some_and(|n| n > MAX_JSON_INDENT) {
        return Err(too_large(format!("tojson indent above {MAX_JSON_INDENT}")));
    }
    // Every node may be printed on its own line, indented by its depth.
    let size = deep_size(&value)?;
    check_size(
        size.saturating_mul(1 + indent.unwrap_or(0).saturating_mul(MAX_DEPTH).min(64)),
        "the result of `tojson`",
    )?;
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
    check_size(text.len(), "the result of `tojson`")?;
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

/// Writes a value as the default formatter does without auto-escaping, charging it to the
/// render's output budget as it goes (printing stops at the budget, so a value that would
/// print as gigabytes costs no more than the budget).
fn guarded_formatter(
    out: &mut Output,
    _state: &State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    let room = BUDGET.with(|b| MAX_EMITTED_BYTES.saturating_sub(b.emitted.get()));
    let text = display_bounded(value, room).map_err(|_| emitted_too_large())?;
    Budget::emit(text.len())?;
    out.write_str(&text).map_err(minijinja::Error::from)
}

/// Names of the checked functions the guarded code calls (a `__` prefix keeps them out of
/// the way of template variables; a template that shadows one only breaks itself, since
/// its own operators are guarded too).
const ADD: &str = "__cortex_add";
const MUL: &str = "__cortex_mul";
const CONCAT: &str = "__cortex_concat";
const CHECK: &str = "__cortex_check";

/// Rewrites compiled instructions so every size-changing step passes the guard. Operators
/// are replaced in place by calls with the same stack effect (two values in, one out).
/// Instructions whose result must be measured, and raw text (which must be charged to the
/// output budget), jump to a snippet appended after the program that runs the original
/// instruction, then the check (or emits the text through the formatter), then jumps back.
fn guard(instructions: &mut Instructions<'_>) {
    let n = instructions.len() as u32;
    // The appended snippets run only when jumped to: the program stops at its old end.
    let end_line = n
        .checked_sub(1)
        .and_then(|i| instructions.get_line(i))
        .unwrap_or(1) as u16;
    instructions.add_with_line(Instruction::Return, end_line);
    for i in 0..n {
        let Some(instr) = instructions.get(i).cloned() else {
            continue;
        };
        let line = instructions.get_line(i).map_or(end_line, |l| l as u16);
        let snippet = match instr {
            Instruction::Add => Err(ADD),
            Instruction::Mul => Err(MUL),
            Instruction::StringConcat => Err(CONCAT),
            Instruction::EmitRaw(text) => Ok(vec![
                Instruction::LoadConst(Value::from(text)),
                Instruction::Emit,
            ]),
            // `loop(...)` re-enters a recursive loop and `super()` a parent block: both
            // return to the instruction after theirs, so they stay where they are.
            Instruction::CallFunction(name, _) if name == "loop" || name == "super" => continue,
            Instruction::ApplyFilter(..)
            | Instruction::CallFunction(..)
            | Instruction::CallMethod(..)
            | Instruction::CallObject(..)
            | Instruction::Slice
            | Instruction::BuildList(..)
            | Instruction::BuildMap(..) => {
                Ok(vec![instr, Instruction::CallFunction(CHECK, Some(1))])
            }
            _ => continue,
        };
        let replacement = match snippet {
            Err(function) => Instruction::CallFunction(function, Some(2)),
            Ok(snippet) => {
                let start = instructions.len() as u32;
                for s in snippet {
                    instructions.add_with_line(s, line);
                }
                instructions.add_with_line(Instruction::Jump(i + 1), line);
                Instruction::Jump(start)
            }
        };
        if let Some(slot) = instructions.get_mut(i) {
            *slot = replacement;
        }
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported now, with its line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(Error::Template(format!(
                "chat template of {} bytes exceeds the limit of {MAX_TEMPLATE_BYTES}",
                source.len()
            )));
        }
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(MAX_RECURSION);
        env.set_unknown_method_callback(guarded_method);
        env.set_formatter(guarded_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function(ADD, guarded_add);
        env.add_function(MUL, guarded_mul);
        env.add_function(CONCAT, guarded_concat);
        env.add_function(CHECK, checked);
        env.add_filter("tojson", tojson);
        env.add_filter("replace", replace_filter);
        env.add_filter("join", join_filter);
        for (name, builtin) in guarded_builtins() {
            env.add_filter(name, move |state: &State, args: Rest<Value>| {
                precheck_filter(name, &args)?;
                checked(builtin.call(state, &args)?)
            });
        }
        let template = ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        };
        template
            .compile()
            .map_err(|e| Error::Template(describe(&e)))?;
        Ok(template)
    }

    /// The template's source, as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The guarded program: parsed and compiled as minijinja compiles a template with
    /// `trim_blocks` and `lstrip_blocks`, then rewritten by [`guard`]. Compiling costs tens
    /// of microseconds, so it is done per render rather than kept beside its source.
    #[allow(clippy::type_complexity)]
    fn compile(
        &self,
    ) -> std::result::Result<(Instructions<'_>, BTreeMap<&str, Instructions<'_>>), minijinja::Error>
    {
        let ws = WhitespaceConfig {
            keep_trailing_newline: false,
            lstrip_blocks: true,
            trim_blocks: true,
        };
        let ast = machinery::parse(&self.source, TEMPLATE_NAME, SyntaxConfig, ws)?;
        let mut generator = CodeGenerator::new(TEMPLATE_NAME, &self.source);
        generator.compile_stmt(&ast);
        let (mut instructions, mut blocks) = generator.finish();
        guard(&mut instructions);
        for block in blocks.values_mut() {
            guard(block);
        }
        Ok((instructions, blocks))
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
        let (instructions, blocks) = self.compile().map_err(|e| Error::Template(describe(&e)))?;
        Budget::start();
        let mut out = String::new();
        machinery::Vm::new(&self.env)
            .eval(
                &instructions,
                Value::from_serialize(&vars),
                &blocks,
                &mut machinery::make_string_output(&mut out),
                AutoEscape::None,
            )
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
