//! Which files of a repo a model needs. Weights are chosen the way mlx-lm and transformers
//! load them: the shards named by `model.safetensors.index.json`, else `model*.safetensors`,
//! so adapters (`adapter_model.safetensors`) and Mistral's `consolidated.safetensors` beside
//! a model are never fetched (they would double the download and confuse the loader). Then,
//! as Cortex always did: other top-level safetensors, one GGUF (`filename` picks among
//! several), or PyTorch checkpoints. `allow_patterns` / `ignore_patterns` filter the listing
//! with fnmatch rules, as huggingface_hub's `snapshot_download` does.

use std::collections::BTreeSet;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::{Error, Result};

/// Files a model folder needs besides its weights (each fetched when the repo has it).
pub const SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
];

/// The safetensors index (transformers' `SAFE_WEIGHTS_INDEX_NAME`).
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
/// The PyTorch index (transformers' `WEIGHTS_INDEX_NAME`).
pub const PYTORCH_INDEX: &str = "pytorch_model.bin.index.json";

/// `allow_patterns` and `ignore_patterns`, compiled.
#[derive(Debug, Default)]
pub struct Patterns {
    allow: Option<GlobSet>,
    ignore: Option<GlobSet>,
}

impl Patterns {
    /// Compiles fnmatch-style patterns: `*` matches any run of characters, `/` included,
    /// `?` one character, `[abc]` / `[!abc]` a set; a pattern ending in `/` matches
    /// everything under that folder (huggingface_hub's `filter_repo_objects` rules).
    pub fn new(allow: Option<&[String]>, ignore: Option<&[String]>) -> Result<Self> {
        Ok(Patterns {
            allow: allow.map(|p| compile(p, "allow_patterns")).transpose()?,
            ignore: ignore.map(|p| compile(p, "ignore_patterns")).transpose()?,
        })
    }

    /// True when the caller listed the files it wants (then no weight selection runs).
    pub fn explicit(&self) -> bool {
        self.allow.is_some()
    }

    fn allowed(&self, name: &str) -> bool {
        self.allow.as_ref().is_none_or(|a| a.is_match(name))
    }

    fn ignored(&self, name: &str) -> bool {
        self.ignore.as_ref().is_some_and(|i| i.is_match(name))
    }
}

fn compile(patterns: &[String], param: &str) -> Result<GlobSet> {
    let mut set = GlobSetBuilder::new();
    for p in patterns {
        let p = if p.ends_with('/') {
            format!("{p}*")
        } else {
            p.clone()
        };
        // fnmatch has no escapes and lets `*` cross `/`; globset's defaults differ on both.
        let glob = GlobBuilder::new(&p)
            .literal_separator(false)
            .backslash_escape(false)
            .build()
            .map_err(|e| Error::InvalidArgument {
                param: param.into(),
                message: format!("pattern {p:?}: {e}"),
            })?;
        set.add(glob);
    }
    set.build().map_err(|e| Error::InvalidArgument {
        param: param.into(),
        message: e.to_string(),
    })
}

/// The files to fetch from a repo listing `names`, in the order to fetch them (side files
/// first, weights last). `read_index(name)` fetches an index file and returns the shard
/// names its `weight_map` lists; it is called only when an index decides the weights.
pub fn select(
    names: &[String],
    filename: Option<&str>,
    patterns: &Patterns,
    read_index: &mut dyn FnMut(&str) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    let all: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    if let Some(f) = filename {
        if !all.contains(f) {
            return Err(Error::NotFound {
                what: format!("file {f:?} (the repo has no such file)"),
            });
        }
    }
    let listed: BTreeSet<&str> = all.into_iter().filter(|n| !patterns.ignored(n)).collect();

    if patterns.explicit() {
        let mut out: BTreeSet<String> = listed
            .iter()
            .filter(|n| patterns.allowed(n))
            .map(std::string::ToString::to_string)
            .collect();
        out.extend(filename.map(str::to_string));
        if out.is_empty() {
            return Err(Error::Hub(
                "no file of the repo matches allow_patterns (less ignore_patterns)".into(),
            ));
        }
        return Ok(out.into_iter().collect());
    }

    let (index, weights) = match filename {
        Some(f) => (None, vec![f.to_string()]),
        None => weights(&listed, read_index)?,
    };
    let mut out: Vec<String> = SIDE_FILES
        .iter()
        .filter(|n| listed.contains(*n))
        .map(std::string::ToString::to_string)
        .collect();
    out.extend(index.map(str::to_string));
    out.extend(weights);
    Ok(out)
}

/// The index that named the weights (if one did) and the weight files.
fn weights(
    listed: &BTreeSet<&str>,
    read_index: &mut dyn FnMut(&str) -> Result<Vec<String>>,
) -> Result<(Option<&'static str>, Vec<String>)> {
    let top = |n: &&&str| !n.contains('/');
    if listed.contains(SAFETENSORS_INDEX) {
        return Ok((
            Some(SAFETENSORS_INDEX),
            shards(listed, SAFETENSORS_INDEX, read_index)?,
        ));
    }
    let st: Vec<&str> = listed
        .iter()
        .filter(top)
        .filter(|n| n.ends_with(".safetensors"))
        .copied()
        .collect();
    let model: Vec<String> = st
        .iter()
        .filter(|n| n.starts_with("model"))
        .map(std::string::ToString::to_string)
        .collect();
    if !model.is_empty() {
        return Ok((None, model));
    }
    // Cortex's loader reads every safetensors file of a folder, so a repo that names its
    // weights otherwise still loads; adapters and `consolidated.*` are other things.
    let other: Vec<String> = st
        .iter()
        .filter(|n| !n.starts_with("adapter") && !n.starts_with("consolidated"))
        .map(std::string::ToString::to_string)
        .collect();
    if !other.is_empty() {
        return Ok((None, other));
    }
    let gguf: Vec<&str> = listed
        .iter()
        // Case-sensitive, as the loader's own test for a GGUF file is.
        .filter(|n| {
            #[allow(clippy::case_sensitive_file_extension_comparisons)]
            n.ends_with(".gguf")
        })
        .copied()
        .collect();
    match gguf.as_slice() {
        [one] => return Ok((None, vec![one.to_string()])),
        [] => {}
        several => {
            return Err(Error::Hub(format!(
                "several GGUF files in the repo ({}); pass filename=",
                several.join(", ")
            )))
        }
    }
    if listed.contains(PYTORCH_INDEX) {
        return Ok((
            Some(PYTORCH_INDEX),
            shards(listed, PYTORCH_INDEX, read_index)?,
        ));
    }
    let pt: Vec<String> = listed
        .iter()
        .filter(|n| is_pytorch_checkpoint(n))
        .map(std::string::ToString::to_string)
        .collect();
    if pt.is_empty() {
        return Err(Error::Hub(
            "the repo has no model weights (.safetensors, .gguf or pytorch_model.bin)".into(),
        ));
    }
    Ok((None, pt))
}

/// The distinct shards `index` names, each checked against the listing.
fn shards(
    listed: &BTreeSet<&str>,
    index: &str,
    read_index: &mut dyn FnMut(&str) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    let shards: BTreeSet<String> = read_index(index)?.into_iter().collect();
    if let Some(missing) = shards.iter().find(|s| !listed.contains(s.as_str())) {
        return Err(Error::Hub(format!(
            "{index} names the shard {missing:?}, which the repo does not have"
        )));
    }
    if shards.is_empty() {
        return Err(Error::Hub(format!("{index} names no shards")));
    }
    Ok(shards.into_iter().collect())
}

/// `pytorch_model.bin` or `pytorch_model-00001-of-00002.bin`.
fn is_pytorch_checkpoint(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("pytorch_model") else {
        return false;
    };
    let Some(rest) = rest.strip_suffix(".bin") else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    matches!(rest.strip_prefix('-').and_then(|r| r.split_once("-of-")), Some((a, b)) if digits(a) && digits(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(std::string::ToString::to_string).collect()
    }

    fn no_index(name: &str) -> Result<Vec<String>> {
        Err(Error::Hub(format!("unexpected read of {name}")))
    }

    #[test]
    fn index_shards_only_never_adapters_or_consolidated() -> Result<()> {
        let repo = names(&[
            "config.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "consolidated.safetensors",
            "adapter_model.safetensors",
            "README.md",
        ]);
        let mut read = |_: &str| {
            Ok(names(&[
                "model-00002-of-00002.safetensors",
                "model-00001-of-00002.safetensors",
            ]))
        };
        let got = select(&repo, None, &Patterns::default(), &mut read)?;
        assert_eq!(
            got,
            names(&[
                "config.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ])
        );
        Ok(())
    }

    #[test]
    fn model_star_without_an_index_then_the_fallbacks() -> Result<()> {
        let p = Patterns::default();
        let repo = names(&[
            "model.safetensors",
            "consolidated.safetensors",
            "adapter_model.safetensors",
        ]);
        assert_eq!(
            select(&repo, None, &p, &mut no_index)?,
            names(&["model.safetensors"])
        );
        let repo = names(&["weights.safetensors", "consolidated.safetensors", "x.gguf"]);
        assert_eq!(
            select(&repo, None, &p, &mut no_index)?,
            names(&["weights.safetensors"])
        );
        let repo = names(&["a.gguf", "b.gguf"]);
        assert!(
            matches!(select(&repo, None, &p, &mut no_index), Err(Error::Hub(m)) if m.contains("filename="))
        );
        assert_eq!(
            select(&repo, Some("b.gguf"), &p, &mut no_index)?,
            names(&["b.gguf"])
        );
        let repo = names(&[
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
            "optimizer.bin",
        ]);
        assert_eq!(select(&repo, None, &p, &mut no_index)?.len(), 2);
        assert!(matches!(
            select(&names(&["README.md"]), None, &p, &mut no_index),
            Err(Error::Hub(_))
        ));
        assert!(matches!(
            select(&repo, Some("nope.bin"), &p, &mut no_index),
            Err(Error::NotFound { .. })
        ));
        Ok(())
    }

    #[test]
    fn an_index_naming_a_missing_shard_is_refused() {
        let repo = names(&["model.safetensors.index.json", "model-1.safetensors"]);
        let mut read = |_: &str| Ok(names(&["model-1.safetensors", "model-2.safetensors"]));
        let err = select(&repo, None, &Patterns::default(), &mut read);
        assert!(matches!(err, Err(Error::Hub(m)) if m.contains("model-2.safetensors")));
    }

    #[test]
    fn patterns_follow_fnmatch() -> Result<()> {
        let repo = names(&[
            "config.json",
            "sub/dir/tokenizer.json",
            "model.safetensors",
            "x.gguf",
            "[a].txt",
        ]);
        let allow = names(&["*.json", "[[]a].txt"]);
        let p = Patterns::new(Some(&allow), None)?;
        let got = select(&repo, None, &p, &mut no_index)?;
        assert_eq!(
            got,
            names(&["[a].txt", "config.json", "sub/dir/tokenizer.json"])
        );
        let p = Patterns::new(Some(&names(&["sub/"])), None)?;
        assert_eq!(
            select(&repo, None, &p, &mut no_index)?,
            names(&["sub/dir/tokenizer.json"])
        );
        let p = Patterns::new(None, Some(&names(&["*.safetensors"])))?;
        assert_eq!(
            select(&repo, None, &p, &mut no_index)?,
            names(&["config.json", "x.gguf"])
        );
        assert!(matches!(
            Patterns::new(Some(&names(&["[unclosed"])), None),
            Err(Error::InvalidArgument { .. })
        ));
        Ok(())
    }
}
