//! Downloads from the Hugging Face Hub into the Hugging Face cache (layout in [`cache`]),
//! through the `hf-hub` crate.
//!
//! `hf-hub` does the transfers: the HEAD that tells a Xet-backed file from a plain one, the
//! GET (or Xet reconstruction) with a byte range, retries, redirects, and the token, which
//! reqwest drops when a download is redirected to another host (the Hub sends weight files
//! to a separate storage host). Around it we keep what it lacks (hf-hub 1.0):
//!
//! * the listing with sizes and content hashes (`/api/models/{id}/revision/{rev}?blobs=true`;
//!   hf-hub's tree and paths-info types lose the LFS sha256, and its `get_file_metadata`
//!   follows the storage redirect and loses the Hub's headers);
//! * resume: a cut download continues from the length of its `.incomplete` file, and starts
//!   over when the server ignores the range (hf-hub always starts over);
//! * checks: size, then sha256 (LFS) or the git blob id, before the blob enters the cache
//!   (hf-hub checks neither). A short file is `Hub` (a cut download, resumed by the next
//!   call); a content mismatch is `Checksum`, and that download is discarded;
//! * locks without a time limit (hf-hub gives up after 10 s, too short for a weight file
//!   another process is fetching), taken again-checked so the second process links the
//!   blob instead of downloading it twice;
//! * weight selection ([`select`]), `HF_HUB_OFFLINE`, the Hub's `X-Error-Code` (a missing
//!   repo answers 401 to a caller without a token), and huggingface_hub's fallback to a
//!   complete cached snapshot when offline or when the Hub fails for any reason but a
//!   missing repo or revision (404, `RevisionNotFound`).
//!
//! Environment: `HF_ENDPOINT`, `HF_TOKEN` / `HF_TOKEN_PATH` / `$HF_HOME/token`,
//! `HF_HUB_DISABLE_IMPLICIT_TOKEN`, `HF_HUB_OFFLINE`, the cache folder ([`cache_dir`]:
//! `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME`), and
//! `MAX_CONCURRENT_DOWNLOADS` (default 8 files at once).

mod cache;
mod select;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hf_hub::{HFClient, HFError, HFRepository, RepoTypeModel};
use serde::Deserialize;

pub use cache::{cache_dir, hf_home, RepoCache};
pub use select::Patterns;

use crate::progress::Progress;

/// How long a download may go without a byte (or a request without an answer) before it
/// is given up, to be resumed by the next call.
const STALL: Duration = Duration::from_secs(60);

/// Result alias for the Hub layer.
pub type Result<T> = std::result::Result<T, Error>;

/// Why a download from the Hub failed. `src/py/hub.rs` maps each variant onto one class of
/// `cortex.hub`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The repo, revision or file does not exist on the Hub (HTTP 404), or the repo has no
    /// file of the name asked for.
    #[error("not found on the Hub: {what}")]
    NotFound { what: String },

    /// Offline (or the Hub unreachable) and the cache does not hold a complete snapshot.
    #[error("{0}")]
    NotCached(String),

    /// A downloaded file has the size the Hub lists but not its checksum (sha256 or git
    /// blob id); it was discarded and never linked into the snapshot. (A file of the wrong
    /// size is `Hub`: a cut download, resumed by the next call.)
    #[error("checksum mismatch for {file}: the download was discarded")]
    Checksum { file: String },

    /// The Hub refused access (HTTP 401/403).
    #[error("access denied to {what} (HTTP {status}): for a gated or private repo, accept its license on the Hub and set HF_TOKEN")]
    Denied { what: String, status: u16 },

    /// The repo is gated (`X-Error-Code: GatedRepo`) and the token, if any, has not been
    /// granted access.
    #[error("{repo} is a gated repo (HTTP {status}): accept its license on its page on the Hub, then set HF_TOKEN to a token of that account")]
    Gated { repo: String, status: u16 },

    /// The Hub failed (`error`) and the cached snapshot could not stand in (`cache` says
    /// why); raised as `error` is.
    #[error("{error} (no complete cached snapshot to fall back on: {cache})")]
    NoFallback { error: Box<Error>, cache: String },

    /// Any other failure: transport, HTTP status, a malformed answer, a cut download, a
    /// listing the selection cannot use.
    #[error("{0}")]
    Hub(String),

    /// An argument is not valid (repo id, revision, pattern); `param` names it.
    #[error("invalid value for '{param}': {message}")]
    InvalidArgument { param: String, message: String },

    /// Reading or writing the cache failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The caller cancelled the download (Ctrl-C); what arrived stays, to be resumed.
    #[error("cancelled")]
    Cancelled,
}

/// What to fetch.
#[derive(Debug, Clone)]
pub struct Request {
    /// `org/name`.
    pub repo_id: String,
    /// A branch, tag or commit.
    pub revision: String,
    /// The weights file to take (one GGUF among several); side files come with it.
    pub filename: Option<String>,
    /// When given, exactly the files matching these (fnmatch) patterns, no weight selection.
    pub allow_patterns: Option<Vec<String>>,
    /// Files matching these patterns are never fetched.
    pub ignore_patterns: Option<Vec<String>>,
}

/// Fetches what a model needs from `request.repo_id` and returns its snapshot folder in the
/// Hugging Face cache. Files already cached are not fetched again. Offline (`HF_HUB_OFFLINE`),
/// or when the Hub cannot be reached, the cached snapshot is used if it is complete.
/// `progress` counts MiB (a whole count the progress bar can draw); cancelling it stops
/// the download at its next chunk.
pub fn snapshot_download(request: &Request, progress: &Progress) -> Result<PathBuf> {
    check_repo_id(&request.repo_id)?;
    check_revision(&request.revision)?;
    let patterns = Patterns::new(
        request.allow_patterns.as_deref(),
        request.ignore_patterns.as_deref(),
    )?;
    let repo = RepoCache::new(cache_dir(), &request.repo_id);
    let filename = request.filename.as_deref();
    if offline() {
        return repo.cached_snapshot(&request.revision, filename);
    }
    let session = Session::new(&request.repo_id)?;
    let listing = match session.listing(&request.revision, progress)? {
        Answer::Listing(listing) => listing,
        Answer::Failed { error, reached } => {
            return repo
                .cached_snapshot(&request.revision, filename)
                .map_err(|miss| match (reached, miss) {
                    // Unreachable and not cached is a cache miss, as huggingface_hub has it
                    // (`LocalEntryNotFoundError`); the transport error says why.
                    (false, Error::NotCached(m)) => Error::NotCached(format!("{m}: {error}")),
                    // The Hub answered with an error: that is what the caller needs to see.
                    (_, miss) => Error::NoFallback {
                        error: Box::new(error),
                        cache: miss.to_string(),
                    },
                });
        }
    };
    let commit = listing.commit;

    let names: Vec<String> = listing.files.iter().map(|f| f.name.clone()).collect();
    let find = |name: &str| {
        listing
            .files
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| Error::Hub(format!("{name} is not in the repo listing")))
    };
    let mut read_index = |name: &str| -> Result<Vec<String>> {
        session.fetch(&repo, &commit, find(name)?, &Meter::new(progress, 0))?;
        let path = repo.link(&commit, name, &find(name)?.etag)?;
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        cache::index_shards(&path, &text)
    };
    let wanted = select::select(&names, filename, &patterns, &mut read_index)?;
    let files = wanted
        .iter()
        .map(|n| find(n))
        .collect::<Result<Vec<&Entry>>>()?;

    let missing: u64 = files
        .iter()
        .filter(|f| !is_complete(&repo.blob(&f.etag), f.size))
        .map(|f| f.size)
        .sum();
    let meter = Meter::new(progress, missing);
    session.fetch_all(&repo, &commit, &files, &meter)?;
    for f in &files {
        repo.link(&commit, &f.name, &f.etag)?;
    }
    repo.write_ref(&request.revision, &commit)?;
    Ok(repo.snapshot(&commit))
}

fn check_repo_id(repo_id: &str) -> Result<()> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    };
    let ok = match repo_id.split_once('/') {
        Some((org, name)) => {
            part_ok(org)
                && part_ok(name)
                && org.starts_with(|c: char| c.is_ascii_alphanumeric())
                && name != "."
                && name != ".."
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            param: "repo_id".into(),
            message: format!("{repo_id:?} is not a repo id (org/name)"),
        })
    }
}

fn check_revision(revision: &str) -> Result<()> {
    // A revision becomes a path under refs/ (`refs/pr/1` nests, as in huggingface_hub).
    if revision.is_empty()
        || revision.starts_with('/')
        || revision.split('/').any(|p| matches!(p, "" | "." | ".."))
        || revision.contains('\\')
    {
        return Err(Error::InvalidArgument {
            param: "revision".into(),
            message: format!("{revision:?} is not a branch, tag or commit"),
        });
    }
    Ok(())
}

/// `HF_HUB_OFFLINE`: cache only, and not one socket opened.
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// The token as huggingface_hub finds it: `HF_TOKEN`, the file `HF_TOKEN_PATH` names, or
/// `$HF_HOME/token`; none when `HF_HUB_DISABLE_IMPLICIT_TOKEN` is set. Trimmed: a token
/// read from a file ends in a newline, which would make the header invalid.
fn token() -> Option<String> {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if set("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_some() {
        return None;
    }
    if let Some(t) = set("HF_TOKEN") {
        return Some(t.trim().to_string());
    }
    let path = set("HF_TOKEN_PATH").map_or_else(|| hf_home().join("token"), PathBuf::from);
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

fn is_complete(blob: &Path, size: u64) -> bool {
    blob.metadata()
        .is_ok_and(|m| m.is_file() && m.len() == size)
}

/// A revision as one URL path segment (`refs/pr/1` → `refs%2Fpr%2F1`), as the Hub expects.
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One file of the repo at a commit, as the Hub lists it.
#[derive(Debug)]
struct Entry {
    name: String,
    size: u64,
    /// The blob name: the sha256 for LFS (and Xet) files, the git blob id for the others;
    /// the same string the Hub sends as `X-Linked-Etag` / `ETag`.
    etag: String,
}

struct Listing {
    commit: String,
    files: Vec<Entry>,
}

/// What the Hub said about a revision.
enum Answer {
    Listing(Listing),
    /// No listing, for a reason the cached snapshot may stand in for: `reached` is false
    /// when the Hub could not be asked (connection, timeout, stall), true when it answered
    /// with an error status.
    Failed {
        error: Error,
        reached: bool,
    },
}

/// Our error for an HTTP error `status` about `what` in `repo_id`, read as huggingface_hub
/// reads it: the Hub's `X-Error-Code` first (it answers 401 for a repo that does not exist
/// when no token is sent, as it does for a private one), then the status.
fn status_error(
    status: u16,
    code: Option<&str>,
    message: Option<&str>,
    repo_id: &str,
    what: &str,
) -> Error {
    let hint = if status == 401 {
        " (HTTP 401: a private repo looks the same without a valid token; set HF_TOKEN if it is yours)"
    } else {
        ""
    };
    match code {
        Some("RepoNotFound") => Error::NotFound {
            what: format!("the repo {repo_id}{hint}"),
        },
        Some("RevisionNotFound" | "EntryNotFound") => Error::NotFound {
            what: format!("{what}{hint}"),
        },
        Some("GatedRepo") => Error::Gated {
            repo: repo_id.to_string(),
            status,
        },
        _ => match status {
            404 => Error::NotFound {
                what: what.to_string(),
            },
            401 | 403 => Error::Denied {
                what: what.to_string(),
                status,
            },
            s => Error::Hub(match message.filter(|m| !m.is_empty()) {
                Some(m) => format!("HTTP {s} from {what}: {m}"),
                None => format!("HTTP {s} from {what}"),
            }),
        },
    }
}

#[derive(Deserialize)]
struct RawListing {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<RawSibling>,
}

#[derive(Deserialize)]
struct RawSibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<RawLfs>,
}

#[derive(Deserialize)]
struct RawLfs {
    sha256: Option<String>,
    size: Option<u64>,
}

fn is_hex(s: &str, lens: &[usize]) -> bool {
    lens.contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A client for one repo: hf-hub's, the runtime that drives it, and a plain reqwest client
/// for the one call hf-hub has no typed answer for (the listing with hashes).
struct Session {
    /// Owned only to be shut down in `Drop` (always `Some` until then); `handle` drives it.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    http: reqwest::Client,
    repo: HFRepository<RepoTypeModel>,
    endpoint: String,
    token: Option<String>,
    repo_id: String,
}

impl Session {
    fn new(repo_id: &str) -> Result<Self> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let token = token();
        let user_agent = format!("cortex/{}", env!("CARGO_PKG_VERSION"));
        let mut builder = HFClient::builder()
            .endpoint(&endpoint)
            .cache_dir(cache_dir())
            .user_agent(&user_agent);
        if let Some(t) = &token {
            builder = builder.token(t);
        }
        let client = builder
            .build()
            .map_err(|e| Error::Hub(format!("HF_ENDPOINT={endpoint:?}: {e}")))?;
        let (owner, name) = hf_hub::split_id(repo_id);
        // Two workers drive the sockets; the download threads block on them. hf-xet brings
        // its own pool for Xet transfers.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cortex-hub")
            .enable_all()
            .build()
            .map_err(|e| Error::Hub(format!("cannot start the download runtime: {e}")))?;
        let http = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::Hub(format!("cannot build the HTTP client: {e}")))?;
        Ok(Session {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            http,
            repo: client.model(owner, name),
            endpoint,
            token,
            repo_id: repo_id.to_string(),
        })
    }

    /// The commit `revision` points to and the files there, or why the Hub gave none when
    /// the cached snapshot may stand in. A missing repo or revision (404,
    /// `RevisionNotFound`) is an error here: the Hub has answered, and a snapshot of a
    /// revision that no longer exists is not what was asked for.
    fn listing(&self, revision: &str, progress: &Progress) -> Result<Answer> {
        let url = format!(
            "{}/api/models/{}/revision/{}?blobs=true",
            self.endpoint,
            self.repo_id,
            encode_segment(revision)
        );
        let mut request = self.http.get(&url);
        if let Some(t) = &self.token {
            request = request.bearer_auth(t);
        }
        let header = |r: &reqwest::Response, name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let answer = self.wait(
            async {
                let response = request.send().await?;
                let status = response.status().as_u16();
                let code = header(&response, "x-error-code");
                let message = header(&response, "x-error-message");
                Ok::<_, reqwest::Error>((status, code, message, response.bytes().await?))
            },
            progress,
        )?;
        let (status, code, message, body) = match answer {
            Some(Ok(answer)) => answer,
            None => {
                return Ok(Answer::Failed {
                    error: Error::Hub(format!("{url}: no answer within {} s", STALL.as_secs())),
                    reached: false,
                })
            }
            Some(Err(e)) => {
                return Ok(Answer::Failed {
                    error: Error::Hub(format!("{url}: {e}")),
                    reached: false,
                })
            }
        };
        if !(200..=299).contains(&status) {
            let error = status_error(
                status,
                code.as_deref(),
                message.as_deref(),
                &self.repo_id,
                &format!("{}@{revision} ({url})", self.repo_id),
            );
            if status == 404 || code.as_deref() == Some("RevisionNotFound") {
                return Err(error);
            }
            return Ok(Answer::Failed {
                error,
                reached: true,
            });
        }
        let raw: RawListing = serde_json::from_slice(&body)
            .map_err(|e| Error::Hub(format!("{url}: not a repo listing: {e}")))?;
        let commit = raw.sha.unwrap_or_default();
        if !is_hex(&commit, &[40]) {
            return Err(Error::Hub(format!(
                "the Hub gave no commit for {}@{revision}",
                self.repo_id
            )));
        }
        // A name that leaves the snapshot folder is a hostile listing, whether or not the
        // file would be selected.
        for s in &raw.siblings {
            cache::safe_name(&s.rfilename)?;
        }
        let files = raw
            .siblings
            .into_iter()
            .map(|s| {
                let (size, etag) = match s.lfs {
                    Some(lfs) => (lfs.size.or(s.size), lfs.sha256),
                    None => (s.size, s.blob_id),
                };
                match (size, etag) {
                    (Some(size), Some(etag)) if is_hex(&etag, &[40, 64]) => Ok(Entry {
                        name: s.rfilename,
                        size,
                        etag,
                    }),
                    _ => Err(Error::Hub(format!(
                        "the Hub listed {} without a size and blob id",
                        s.rfilename
                    ))),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Answer::Listing(Listing { commit, files }))
    }

    /// Drives `future` on the runtime in short slices, so that a cancellation (Ctrl-C)
    /// lands within ~100 ms even while a server is silent; `None` once it has been silent
    /// for `STALL` (neither hf-hub's client nor a storage host bounds that wait).
    fn wait<F: std::future::Future>(
        &self,
        future: F,
        progress: &Progress,
    ) -> Result<Option<F::Output>> {
        let mut future = std::pin::pin!(future);
        let start = Instant::now();
        loop {
            if progress.is_cancelled() {
                return Err(Error::Cancelled);
            }
            // The timer must be made inside the runtime (it registers with its clock).
            let slice =
                async { tokio::time::timeout(Duration::from_millis(100), &mut future).await };
            if let Ok(output) = self.handle.block_on(slice) {
                return Ok(Some(output));
            }
            if start.elapsed() > STALL {
                return Ok(None);
            }
        }
    }

    /// Fetches `files` into their blobs, `MAX_CONCURRENT_DOWNLOADS` at a time. The first
    /// failure stops the others from starting new files and is returned.
    fn fetch_all(
        &self,
        repo: &RepoCache,
        commit: &str,
        files: &[&Entry],
        meter: &Meter<'_>,
    ) -> Result<()> {
        let workers = std::env::var("MAX_CONCURRENT_DOWNLOADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(8)
            .clamp(1, files.len().max(1));
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let errors: Mutex<Vec<(usize, Error)>> = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    while !failed.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(file) = files.get(i) else { break };
                        if let Err(e) = self.fetch(repo, commit, file, meter) {
                            failed.store(true, Ordering::Relaxed);
                            if let Ok(mut errors) = errors.lock() {
                                errors.push((i, e));
                            }
                        }
                    }
                });
            }
        });
        let mut errors = errors
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        errors.sort_by_key(|(i, _)| *i);
        // A cancellation seen by one worker makes the others fail too; report it as such.
        if errors.iter().any(|(_, e)| matches!(e, Error::Cancelled)) {
            return Err(Error::Cancelled);
        }
        match errors.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Brings one file's blob into the cache: under its lock, resumed from its
    /// `.incomplete`, checked, then renamed into place.
    fn fetch(&self, repo: &RepoCache, commit: &str, file: &Entry, meter: &Meter<'_>) -> Result<()> {
        let name = cache::safe_name(&file.name)?;
        let blob = repo.blob(&file.etag);
        if is_complete(&blob, file.size) {
            return Ok(());
        }
        let _lock = repo.lock(&file.etag, meter.progress)?;
        if is_complete(&blob, file.size) {
            // Another process (or a file with the same contents) brought it meanwhile.
            meter.add(file.size);
            return Ok(());
        }
        let mut part = blob.clone().into_os_string();
        part.push(".incomplete");
        let part = PathBuf::from(part);
        self.download(name, commit, &part, file.size, meter)?;
        if !cache::verify(&part, &file.etag, file.size)? {
            let _ = std::fs::remove_file(&part);
            return Err(Error::Checksum {
                file: name.to_string(),
            });
        }
        std::fs::rename(&part, &blob).map_err(|source| Error::Io { path: blob, source })
    }

    /// Writes `name` at `commit` into `part`, continuing from what `part` already holds.
    fn download(
        &self,
        name: &str,
        commit: &str,
        part: &Path,
        size: u64,
        meter: &Meter<'_>,
    ) -> Result<()> {
        let io = |source| Error::Io {
            path: part.to_path_buf(),
            source,
        };
        if let Some(parent) = part.parent() {
            std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let mut have = part.metadata().map_or(0, |m| m.len());
        if have > size {
            have = 0; // longer than the file: it cannot be right
        }
        // Made (or cut back) before anything is asked: an empty file has nothing to fetch,
        // yet its `.incomplete` must exist to be checked and renamed into place.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(part)
            .map_err(io)?;
        out.set_len(have).map_err(io)?;
        meter.add(have);
        if have < size {
            let range = (have > 0).then_some(have..size);
            let sent = self.wait(
                self.repo
                    .download_file_stream()
                    .filename(name)
                    .revision(commit.to_string())
                    .maybe_range(range)
                    .send(),
                meter.progress,
            )?;
            let Some(sent) = sent else {
                return Err(Error::Hub(format!(
                    "{name}: the Hub did not answer within {} s",
                    STALL.as_secs()
                )));
            };
            // hf-hub's length cannot tell an honoured range from an ignored one: it prefers
            // `X-Linked-Size` (the whole file's size, which a proxy may pass along with a
            // 206) over `Content-Length`. The bytes that arrive decide (see `Part`).
            let (_length, mut stream) =
                sent.map_err(|e| hub_error(e, name, commit, &self.repo_id))?;
            let mut writer = Part::new(out, have, size).map_err(io)?;
            // Until the stream is cut, stalls or ends: what arrived stays in `.incomplete`,
            // and the size check below says which it was.
            while let Some(Some(Ok(chunk))) = self.wait(stream.next(), meter.progress)? {
                if writer.write(&chunk).map_err(io)? {
                    meter.restart(have);
                }
                meter.add(chunk.len() as u64);
            }
            writer.flush().map_err(io)?;
        }
        let got = part.metadata().map_or(0, |m| m.len());
        if got != size {
            if got > size {
                let _ = std::fs::remove_file(part);
            }
            return Err(Error::Hub(format!(
                "{name}: received {got} of {size} bytes; run again to resume"
            )));
        }
        Ok(())
    }
}

impl Drop for Session {
    /// Without waiting for the runtime's blocking pool: a DNS lookup runs there and cannot
    /// be cancelled, and dropping a `Runtime` would wait for it (up to the resolver's own
    /// timeout) after a Ctrl-C or a stall has already given up on it.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A download written into its `.incomplete` file from offset `start` (the length it had).
/// A server that honours the range sends the `size - start` bytes from `start`; one that
/// ignores it sends the whole file from byte 0. Until more than `size - start` bytes have
/// arrived the two look alike and the bytes go at `start`; past that, it was the whole
/// file, and what was written at `start` moves to 0. (Cut before that point, an ignored
/// range leaves a wrong `.incomplete`: the next call's overflow moves it likewise, or the
/// checksum discards it.)
struct Part {
    file: std::fs::File,
    start: u64,
    written: u64,
    rest: u64,
}

impl Part {
    fn new(mut file: std::fs::File, start: u64, size: u64) -> std::io::Result<Self> {
        file.seek(SeekFrom::Start(start))?;
        Ok(Part {
            file,
            start,
            written: 0,
            rest: size.saturating_sub(start),
        })
    }

    /// Writes `chunk`; true when this showed the server to have ignored the range (the
    /// file now holds only the bytes of this response, from offset 0).
    fn write(&mut self, chunk: &[u8]) -> std::io::Result<bool> {
        let mut restarted = false;
        if self.start > 0 && self.written + chunk.len() as u64 > self.rest {
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < self.written {
                let n = buf
                    .len()
                    .min(usize::try_from(self.written - off).unwrap_or(usize::MAX));
                self.file.seek(SeekFrom::Start(self.start + off))?;
                self.file.read_exact(&mut buf[..n])?;
                self.file.seek(SeekFrom::Start(off))?;
                self.file.write_all(&buf[..n])?;
                off += n as u64;
            }
            self.file.set_len(self.written)?;
            self.file.seek(SeekFrom::Start(self.written))?;
            self.start = 0;
            restarted = true;
        }
        self.file.write_all(chunk)?;
        self.written += chunk.len() as u64;
        Ok(restarted)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Counts bytes as they arrive and shows them on `progress` in MiB.
struct Meter<'a> {
    progress: &'a Progress,
    bytes: AtomicU64,
}

impl<'a> Meter<'a> {
    const MIB: u64 = 1 << 20;

    /// A new count of `total` bytes (0: leave `progress` as it is, as for an index file
    /// fetched before the total is known).
    fn new(progress: &'a Progress, total: u64) -> Self {
        if total > 0 {
            let mib = total.div_ceil(Self::MIB);
            progress.start(usize::try_from(mib).unwrap_or(usize::MAX));
        }
        Meter {
            progress,
            bytes: AtomicU64::new(0),
        }
    }

    /// Takes back `bytes` counted as already there (a resume that turned out to restart);
    /// the bar stays where it is until the count passes it again.
    fn restart(&self, bytes: u64) {
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            });
    }

    fn add(&self, bytes: u64) {
        let now = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let mib = usize::try_from(now / Self::MIB).unwrap_or(usize::MAX);
        self.progress.done.fetch_max(mib, Ordering::Relaxed);
    }
}

/// hf-hub's error for one file, as ours: read from the HTTP answer when there was one
/// (its `X-Error-Code` tells a gated repo from a private or missing one).
fn hub_error(e: HFError, name: &str, commit: &str, repo_id: &str) -> Error {
    let what = format!("{name} in {repo_id} at {commit}");
    let context = match &e {
        HFError::Http { context }
        | HFError::AuthRequired { context }
        | HFError::Forbidden { context }
        | HFError::Conflict { context }
        | HFError::RateLimited { context, .. } => Some(context.as_ref()),
        HFError::RepoNotFound { context, .. }
        | HFError::RevisionNotFound { context, .. }
        | HFError::EntryNotFound { context, .. } => context.as_deref(),
        _ => None,
    };
    if let Some(c) = context {
        return status_error(
            c.status.as_u16(),
            c.error_code.as_deref(),
            c.server_message.as_deref(),
            repo_id,
            &what,
        );
    }
    match e {
        HFError::RepoNotFound { .. }
        | HFError::RevisionNotFound { .. }
        | HFError::EntryNotFound { .. } => Error::NotFound { what },
        other => Error::Hub(format!("{name}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_revisions() {
        assert!(check_repo_id("HuggingFaceTB/SmolLM2-135M").is_ok());
        for bad in ["x", "/a/b", "a/b/c", "a/..", "../b", "a b/c", "a/"] {
            assert!(check_repo_id(bad).is_err(), "{bad}");
        }
        assert!(check_revision("refs/pr/1").is_ok());
        for bad in ["", "../x", "a/../b", "/abs"] {
            assert!(check_revision(bad).is_err(), "{bad}");
        }
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
    }

    #[test]
    fn error_codes_come_before_the_status() {
        let e = |status, code| status_error(status, code, None, "org/x", "f");
        assert!(
            matches!(e(401, Some("RepoNotFound")), Error::NotFound { what } if what.contains("HF_TOKEN"))
        );
        assert!(matches!(
            e(404, Some("RevisionNotFound")),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            e(401, Some("EntryNotFound")),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            e(403, Some("GatedRepo")),
            Error::Gated { status: 403, .. }
        ));
        assert!(matches!(e(401, None), Error::Denied { status: 401, .. }));
        assert!(matches!(e(404, None), Error::NotFound { .. }));
        assert!(matches!(e(500, None), Error::Hub(m) if m.contains("HTTP 500")));
    }

    fn part_file(name: &str, contents: &[u8]) -> std::io::Result<(PathBuf, std::fs::File)> {
        let path = std::env::temp_dir().join(format!("cortex-hub-{name}-{}", std::process::id()));
        std::fs::write(&path, contents)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        Ok((path, file))
    }

    /// A resume whose range was honoured appends; one whose range was ignored (the whole
    /// file from byte 0, whatever length hf-hub reported) ends as the whole file, whether
    /// the overflow shows inside a chunk or at a chunk boundary.
    #[test]
    fn a_resume_is_written_where_its_bytes_belong() -> std::io::Result<()> {
        let whole = b"0123456789abcdef";
        for (name, chunks) in [
            ("honoured", vec![&whole[6..10], &whole[10..]]),
            ("ignored", vec![&whole[..5], &whole[5..12], &whole[12..]]),
            ("ignored-boundary", vec![&whole[..10], &whole[10..]]),
            ("ignored-first-chunk", vec![&whole[..]]),
        ] {
            let (path, file) = part_file(name, &whole[..6])?;
            let mut part = Part::new(file, 6, whole.len() as u64)?;
            let mut restarted = false;
            for c in chunks {
                restarted |= part.write(c)?;
            }
            part.flush()?;
            assert_eq!(std::fs::read(&path)?, whole, "{name}");
            assert_eq!(restarted, name != "honoured", "{name}");
            std::fs::remove_file(&path)?;
        }
        Ok(())
    }

    /// Dropping a session must not wait for its blocking pool (where DNS lookups run).
    #[test]
    fn a_session_drops_without_waiting_for_blocking_tasks() -> Result<()> {
        let session = Session::new("org/x")?;
        let (started, running) = std::sync::mpsc::channel();
        session.handle.spawn_blocking(move || {
            let _ = started.send(());
            std::thread::sleep(Duration::from_secs(3));
        });
        let _ = running.recv_timeout(Duration::from_secs(5));
        let start = Instant::now();
        drop(session);
        assert!(start.elapsed() < Duration::from_secs(1));
        Ok(())
    }
}
