//! The crate's one error type. Every variant names the file, field or value at fault and,
//! where it helps, what would have been valid; the Python bindings map each variant onto
//! one class of the `cortex.CortexError` tree (`src/py/errors.rs`).

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model reference names nothing on disk, or a directory without model weights.
    #[error("{message}: {}", path.display())]
    ModelNotFound { path: PathBuf, message: String },

    /// A model file is malformed, truncated or hostile (bad magic, offsets past the end,
    /// overflowing shapes, duplicate names...). `offset` is the byte position where the
    /// problem was found, when there is one.
    #[error("{}: {message}{}", path.display(), offset.map(|o| format!(" (at byte {o})")).unwrap_or_default())]
    ModelFormat {
        path: PathBuf,
        offset: Option<u64>,
        message: String,
    },

    /// The file is well formed but describes an architecture Cortex does not run.
    #[error("unsupported architecture '{architecture}'; supported: {}", supported.join(", "))]
    UnsupportedArchitecture {
        architecture: String,
        supported: Vec<String>,
    },

    /// A configuration value (GGUF metadata key or config.json field) is missing, of the
    /// wrong type, or out of range.
    #[error("invalid config field '{field}': {message}")]
    Config { field: String, message: String },

    /// The tokenizer could not be built, or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A chat template failed to parse or render (including running out of fuel).
    #[error("chat template: {0}")]
    Template(String),

    /// A request parameter is invalid; `param` is the field name as the user spells it.
    #[error("invalid value for '{param}': {message}")]
    InvalidParam { param: String, message: String },

    /// A request's JSON schema, regex or grammar could not be compiled, or its output can
    /// no longer satisfy it; `param` names the parameter that carried it (`json_schema`,
    /// `regex`, `response_format`...).
    #[error("invalid value for '{param}': {message}")]
    Grammar { param: String, message: String },

    /// The prompt (plus the tokens asked for) does not fit in the model's context.
    #[error(
        "prompt of {prompt_tokens} tokens does not fit in the context of {context_length} tokens"
    )]
    ContextLength {
        prompt_tokens: usize,
        context_length: usize,
    },

    /// A request needs more KV cache positions than the whole cache holds, so it could
    /// never run, however long it waited.
    #[error(
        "a request of {needed} tokens can never fit in the KV cache of {capacity} tokens (raise kv_cache_tokens)"
    )]
    CacheFull { needed: usize, capacity: usize },

    /// The caller cancelled the work (Ctrl-C, abort).
    #[error("cancelled")]
    Cancelled,

    /// A fault while generating that the input did not cause and cannot fix (NaN logits,
    /// a worker that stopped, compute threads lost to `fork`).
    #[error("engine: {0}")]
    Engine(String),

    /// A conversion could not be carried out as asked (a recipe the model cannot take, a
    /// tensor the target format cannot hold, a validation that failed).
    #[error("conversion: {0}")]
    Conversion(String),

    /// The GPU failed or ran out of memory (a driver call, an allocation, a kernel): not
    /// the input's fault, though a smaller cache or model may avoid it.
    #[error("GPU: {0}")]
    Device(String),

    /// A broken invariant of Cortex itself (a caught panic, a result that went missing):
    /// always a bug, never the input's fault.
    #[error("internal error (please report): {0}")]
    Internal(String),

    /// An I/O error while reading `path`.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An error from a tensor operation in candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A saved prefix (`Engine::save_prefix`) could not be written, or a file given to
    /// `load_prefix` is malformed or was saved from another model or cache layout.
    #[error("saved prefix {}: {message}", path.display())]
    SavedPrefix { path: PathBuf, message: String },
}

impl Error {
    pub(crate) fn format(
        path: impl Into<PathBuf>,
        offset: Option<u64>,
        message: impl Into<String>,
    ) -> Self {
        Error::ModelFormat {
            path: path.into(),
            offset,
            message: message.into(),
        }
    }

    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidParam {
            param: param.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Describes a caught panic payload as an engine error.
    pub(crate) fn from_panic(payload: Box<dyn std::any::Any + Send>) -> Self {
        let what = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| {
                payload
                    .downcast_ref::<&str>()
                    .map(std::string::ToString::to_string)
            })
            .unwrap_or_else(|| "unknown panic".into());
        Error::Internal(what)
    }

    /// Prefixes the message with `what`, keeping the kind (and so the Python class). A
    /// candle error becomes [`Error::Internal`]: a tensor operation that fails on checked
    /// input is a bug.
    pub(crate) fn context(self, what: impl std::fmt::Display) -> Self {
        let prefix = |m: String| format!("{what}: {m}");
        match self {
            Error::ModelNotFound { path, message } => Error::ModelNotFound {
                path,
                message: prefix(message),
            },
            Error::ModelFormat {
                path,
                offset,
                message,
            } => Error::ModelFormat {
                path,
                offset,
                message: prefix(message),
            },
            Error::Config { field, message } => Error::Config {
                field,
                message: prefix(message),
            },
            Error::InvalidParam { param, message } => Error::InvalidParam {
                param,
                message: prefix(message),
            },
            Error::Grammar { param, message } => Error::Grammar {
                param,
                message: prefix(message),
            },
            Error::SavedPrefix { path, message } => Error::SavedPrefix {
                path,
                message: prefix(message),
            },
            Error::Tokenizer(m) => Error::Tokenizer(prefix(m)),
            Error::Template(m) => Error::Template(prefix(m)),
            Error::Engine(m) => Error::Engine(prefix(m)),
            Error::Conversion(m) => Error::Conversion(prefix(m)),
            Error::Device(m) => Error::Device(prefix(m)),
            Error::Internal(m) => Error::Internal(prefix(m)),
            Error::Candle(e) => Error::Internal(prefix(e.to_string())),
            // Their messages are built from their fields; the context would be lost or
            // misleading, and they already say what is at fault.
            e @ (Error::UnsupportedArchitecture { .. }
            | Error::ContextLength { .. }
            | Error::CacheFull { .. }
            | Error::Cancelled
            | Error::Io { .. }) => e,
        }
    }
}

/// `.with_context(|| ...)` on any result whose error converts into [`Error`] (see
/// [`Error::context`]); the message is built only on failure.
pub(crate) trait Context<T> {
    fn with_context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn with_context<D: std::fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| e.into().context(what()))
    }
}

/// Returns early with a message variant of [`Error`]:
/// `bail!(Conversion, "group size {g} does not divide {cols}")`.
macro_rules! bail {
    ($variant:ident, $($fmt:tt)+) => {
        return Err($crate::error::Error::$variant(format!($($fmt)+)))
    };
}
pub(crate) use bail;
