//! `cortex._core.Tokenizer`.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::tokenizer::{check_token_ids, Tokenizer};

#[pyclass(name = "Tokenizer", module = "cortex._core", frozen)]
pub struct PyTokenizer {
    pub(crate) inner: Arc<Tokenizer>,
}

#[pymethods]
impl PyTokenizer {
    /// Token ids of `text`; with `add_special_tokens` the model's BOS is added if it wants one.
    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: String, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let tok = self.inner.clone();
        super::run_detached(py, move || tok.encode(&text, add_special_tokens))
    }

    /// Text of `ids`.
    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, ids: Vec<i64>, skip_special_tokens: bool) -> PyResult<String> {
        let ids = check_token_ids(&ids, self.inner.vocab_size(), "ids")?;
        Ok(self.inner.decode(&ids, skip_special_tokens)?)
    }

    /// Renders chat `messages` with the model's chat template, as transformers does.
    ///
    /// Args:
    ///     messages: a list of `{"role": ..., "content": ...}` dicts.
    ///     add_generation_prompt: end with the header of an assistant turn.
    ///     tokenize: return token ids instead of text.
    ///     **kwargs: further template variables (`tools`, custom flags).
    ///
    /// Returns:
    ///     str | list[int]: the prompt.
    #[pyo3(signature = (messages, add_generation_prompt = true, tokenize = false, **kwargs))]
    fn apply_chat_template<'py>(
        &self,
        py: Python<'py>,
        messages: Bound<'py, PyAny>,
        add_generation_prompt: bool,
        tokenize: bool,
        kwargs: Option<Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let dumps = py.import("json")?.getattr("dumps")?;
        let parse = |field: &str, obj: Bound<'py, PyAny>| -> PyResult<serde_json::Value> {
            let text: String = dumps
                .call1((obj,))
                .map_err(|e| crate::Error::param(field, format!("not JSON-serialisable: {e}")))?
                .extract()?;
            serde_json::from_str(&text)
                .map_err(|e| crate::Error::param(field, e.to_string()).into())
        };
        let messages = parse("messages", messages)?;
        let extra = match kwargs {
            Some(k) => match parse("kwargs", k.into_any())? {
                serde_json::Value::Object(map) => map,
                _ => serde_json::Map::new(),
            },
            None => serde_json::Map::new(),
        };
        let prompt = self
            .inner
            .apply_chat_template(&messages, add_generation_prompt, &extra)?;
        if tokenize {
            // The template already wrote any BOS it wants.
            Ok(self
                .inner
                .encode(&prompt, false)?
                .into_pyobject(py)?
                .into_any())
        } else {
            Ok(prompt.into_pyobject(py)?.into_any())
        }
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.inner.eos_token_ids.clone()
    }

    #[getter]
    fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_token_id
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    #[getter]
    fn has_chat_template(&self) -> bool {
        self.inner.has_chat_template()
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer(vocab_size={}, eos_token_ids={:?})",
            self.inner.vocab_size(),
            self.inner.eos_token_ids
        )
    }
}
