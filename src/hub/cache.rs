//! The Hugging Face cache, laid out as huggingface_hub lays it out (its `file_download.py`),
//! so files fetched by either tool serve the other:
//!
//! ```text
//! <cache>/models--org--name/blobs/<etag>             file contents, named by sha256 (LFS) or git blob id
//! <cache>/models--org--name/blobs/<etag>.incomplete  a download under way, resumed from its length
//! <cache>/models--org--name/snapshots/<commit>/<file> relative symlink to the blob
//! <cache>/models--org--name/refs/<revision>          the commit a branch or tag pointed to
//! <cache>/.locks/models--org--name/<etag>.lock       held (flock) while a blob is written
//! ```
//!
//! A blob is written only under its lock, so two processes (or two files with the same
//! contents) never write one `.incomplete` at once; the lock is huggingface_hub's and
//! hf-hub's own file, so all three exclude each other. `flock` locks die with their process,
//! so a crashed download leaves no stale lock, only an `.incomplete` to resume.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::Digest;

use super::select::{PYTORCH_INDEX, SAFETENSORS_INDEX};
use super::{Error, Result};
use crate::progress::Progress;

/// The hub cache: `$HF_HUB_CACHE`, `$HUGGINGFACE_HUB_CACHE` (its old name), `$HF_HOME/hub`,
/// `$XDG_CACHE_HOME/huggingface/hub`, or `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    env_path("HF_HUB_CACHE")
        .or_else(|| env_path("HUGGINGFACE_HUB_CACHE"))
        .unwrap_or_else(|| hf_home().join("hub"))
}

/// `$HF_HOME`, `$XDG_CACHE_HOME/huggingface`, or `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    env_path("HF_HOME")
        .or_else(|| env_path("XDG_CACHE_HOME").map(|x| x.join("huggingface")))
        .unwrap_or_else(|| expand_home("~/.cache/huggingface"))
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| expand_home(&v))
}

/// `~/x` → `$HOME/x`, as Python's `expanduser` does for the variables above.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ if path == "~" => std::env::var_os("HOME").map_or_else(|| path.into(), PathBuf::from),
        _ => path.into(),
    }
}

/// A temporary-name suffix no other call makes: the process id (other processes), then a
/// process-wide counter (other threads, and other calls of this one). Two threads that
/// shared a name would remove or rename each other's half-made file.
fn unique_suffix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One repo's folder in the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    /// The hub cache (`cache_dir()`).
    pub root: PathBuf,
    /// `models--org--name`.
    pub folder: String,
}

impl RepoCache {
    pub fn new(root: PathBuf, repo_id: &str) -> Self {
        RepoCache {
            folder: format!("models--{}", repo_id.replace('/', "--")),
            root,
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.folder)
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir().join("blobs").join(etag)
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir().join("snapshots").join(commit)
    }

    fn lock_path(&self, etag: &str) -> PathBuf {
        self.root
            .join(".locks")
            .join(&self.folder)
            .join(format!("{etag}.lock"))
    }

    /// Takes the blob's lock, waiting as long as another download holds it (a large file
    /// takes minutes; hf-hub's own 10 s limit would fail the second of two processes), and
    /// stopping when `progress` is cancelled.
    pub fn lock(&self, etag: &str, progress: &Progress) -> Result<File> {
        let path = self.lock_path(etag);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
            if progress.is_cancelled() {
                return Err(Error::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Points `snapshots/<commit>/<name>` at the blob. A link that already points there is
    /// left alone, so a cached snapshot costs no write (a read-only cache keeps working, and
    /// a reader never races a replacement). Otherwise the link is made under a temporary
    /// name and renamed over the old one, so a reader (or a second process linking the same
    /// file) never sees it missing.
    pub fn link(&self, commit: &str, name: &str, etag: &str) -> Result<PathBuf> {
        let target = self.snapshot(commit).join(name);
        let depth = name.matches('/').count() + 2; // snapshots/<commit>/<dirs...>/ up to the repo folder
        let relative = Path::new(&"../".repeat(depth)).join("blobs").join(etag);
        if self.linked(&target, &relative, etag) {
            return Ok(target);
        }
        let parent = target.parent().unwrap_or(&target).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        let tmp = parent.join(format!(
            ".{}.{}.link",
            target
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("file"),
            unique_suffix()
        ));
        let _ = std::fs::remove_file(&tmp);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&relative, &tmp).map_err(io(&tmp))?;
        // No symlinks (Windows without developer mode): a copy serves as well.
        #[cfg(not(unix))]
        std::fs::copy(self.blob(etag), &tmp).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &target).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(&target)(e)
        })?;
        Ok(target)
    }

    /// True when `target` already stands for the blob: the same relative symlink (or, where
    /// links are copies, a file of the blob's size).
    #[cfg_attr(unix, allow(clippy::unused_self))] // `self` is needed where links are copies
    fn linked(&self, target: &Path, relative: &Path, etag: &str) -> bool {
        #[cfg(unix)]
        {
            let _ = etag;
            std::fs::read_link(target).is_ok_and(|l| l == relative)
        }
        #[cfg(not(unix))]
        {
            let _ = relative;
            match (target.symlink_metadata(), self.blob(etag).metadata()) {
                (Ok(t), Ok(b)) => t.is_file() && t.len() == b.len(),
                _ => false,
            }
        }
    }

    /// Records that `revision` (a branch or tag) pointed to `commit`; a ref that already
    /// says so is not written again (a read-only cache keeps working).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.dir().join("refs").join(revision);
        if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
            return Ok(());
        }
        let parent = path.parent().unwrap_or(&path).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        let tmp = parent.join(format!(".ref.{}.tmp", unique_suffix()));
        std::fs::write(&tmp, commit).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(&path)(e)
        })
    }

    /// The cached snapshot of `revision`, checked for completeness: `filename` present,
    /// and every shard an index in it names (a download cut between shards must not look
    /// like a model). Used offline and when the Hub cannot be reached.
    pub fn cached_snapshot(&self, revision: &str, filename: Option<&str>) -> Result<PathBuf> {
        let ref_path = self.dir().join("refs").join(revision);
        let commit = std::fs::read_to_string(&ref_path)
            .map_or_else(|_| revision.to_string(), |c| c.trim().to_string());
        let snapshot = self.snapshot(&commit);
        if !snapshot.is_dir() {
            return Err(Error::NotCached(format!(
                "{} at revision {revision:?} is not in the cache ({}) and the Hub cannot be asked (offline or unreachable)",
                self.folder,
                self.root.display()
            )));
        }
        let mut missing: Vec<String> = filename
            .filter(|f| !snapshot.join(f).exists())
            .map(str::to_string)
            .into_iter()
            .collect();
        for index in [SAFETENSORS_INDEX, PYTORCH_INDEX] {
            let path = snapshot.join(index);
            if let Ok(text) = std::fs::read_to_string(&path) {
                for shard in index_shards(&path, &text)? {
                    if !snapshot.join(safe_name(&shard)?).exists() {
                        missing.push(shard);
                    }
                }
            }
        }
        if !missing.is_empty() {
            missing.sort();
            missing.dedup();
            return Err(Error::NotCached(format!(
                "the cached snapshot {} is incomplete; missing: {}",
                snapshot.display(),
                missing.join(", ")
            )));
        }
        Ok(snapshot)
    }
}

/// The shard names of an index file's `weight_map`.
pub fn index_shards(path: &Path, text: &str) -> Result<Vec<String>> {
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::Hub(format!("{}: invalid JSON: {e}", path.display())))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Hub(format!("{}: no 'weight_map' object", path.display())))?;
    map.values()
        .map(|v| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                Error::Hub(format!(
                    "{}: a weight_map value is not a string",
                    path.display()
                ))
            })
        })
        .collect()
}

/// A repo file name that stays inside the snapshot folder.
pub fn safe_name(name: &str) -> Result<&str> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.split('/').any(|p| matches!(p, "" | "." | ".."));
    if bad {
        return Err(Error::Hub(format!(
            "refusing file name {name:?}: it points outside the repo"
        )));
    }
    Ok(name)
}

/// How a blob's contents are checked: LFS files are named by their sha256 (64 hex digits),
/// the others by their git blob id, `sha1("blob <size>\0" + data)` (40). The listing admits
/// no other names; one would not equal a sha1 in hex, so it would fail the check.
pub fn verify(path: &Path, etag: &str, size: u64) -> Result<bool> {
    let mut file = File::open(path).map_err(io(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let hex = |d: &[u8]| {
        d.iter()
            .fold(String::with_capacity(2 * d.len()), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
    };
    let mut feed = |update: &mut dyn FnMut(&[u8])| -> Result<()> {
        loop {
            let n = file.read(&mut buf).map_err(io(path))?;
            if n == 0 {
                return Ok(());
            }
            update(&buf[..n]);
        }
    };
    Ok(if etag.len() == 64 {
        let mut h = sha2::Sha256::new();
        feed(&mut |b| h.update(b))?;
        hex(&h.finalize()) == etag
    } else {
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {size}\0").as_bytes());
        feed(&mut |b| h.update(b))?;
        hex(&h.finalize()) == etag
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_ids_and_sha256_are_checked() -> Result<()> {
        let dir = scratch("verify")?;
        let path = dir.join("f");
        std::fs::write(&path, b"hello\n").map_err(io(&path))?;
        // `git hash-object` and `sha256sum` of "hello\n".
        assert!(verify(
            &path,
            "ce013625030ba8dba906f756967f9e9ca394464a",
            6
        )?);
        assert!(verify(
            &path,
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03",
            6
        )?);
        assert!(!verify(
            &path,
            "ce013625030ba8dba906f756967f9e9ca394464b",
            6
        )?);
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        Ok(())
    }

    fn scratch(name: &str) -> Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("cortex-hub-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(dir)
    }

    #[test]
    fn the_empty_file_is_checked() -> Result<()> {
        let dir = scratch("empty")?;
        let path = dir.join("f");
        std::fs::write(&path, b"").map_err(io(&path))?;
        // `git hash-object /dev/null` and `sha256sum /dev/null`.
        assert!(verify(
            &path,
            "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391",
            0
        )?);
        assert!(verify(
            &path,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            0
        )?);
        assert!(!verify(&path, "not-a-hash", 0)?);
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        Ok(())
    }

    /// Threads of one process linking the same names at once: with temporary names unique
    /// per process only, one thread removed or renamed another's half-made link.
    #[cfg(unix)] // the links are symlinks to blobs this test never writes
    #[test]
    fn concurrent_links_and_refs_do_not_collide() -> Result<()> {
        let dir = scratch("links")?;
        let repo = RepoCache::new(dir.clone(), "org/x");
        let commits = ["a".repeat(40), "b".repeat(40)];
        let failures = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..8 {
                let (repo, commits, failures) = (&repo, &commits, &failures);
                scope.spawn(move || {
                    for i in 0..200 {
                        // Alternate targets, so every call has to replace the link or ref.
                        let etag = if (i + t) % 2 == 0 { "1" } else { "2" };
                        let ok = repo.link(&commits[0], "sub/f.json", etag).is_ok()
                            && repo.write_ref("main", &commits[(i + t) % 2]).is_ok();
                        if !ok {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(failures.load(Ordering::Relaxed), 0);
        let leftovers: Vec<_> = std::fs::read_dir(repo.snapshot(&commits[0]).join("sub"))
            .map_err(io(&dir))?
            .filter_map(std::result::Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        Ok(())
    }

    /// A second call over a cached snapshot writes nothing: a read-only cache keeps working.
    #[cfg(unix)]
    #[test]
    fn an_unchanged_link_or_ref_is_not_rewritten() -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let dir = scratch("relink")?;
        let repo = RepoCache::new(dir.clone(), "org/x");
        let commit = "c".repeat(40);
        let link = repo.link(&commit, "sub/f.json", "1")?;
        repo.write_ref("main", &commit)?;
        let ref_path = repo.dir().join("refs").join("main");
        let inode = |p: &Path| p.symlink_metadata().map(|m| m.ino()).map_err(io(p));
        let before = (inode(&link)?, inode(&ref_path)?);
        repo.link(&commit, "sub/f.json", "1")?;
        repo.write_ref("main", &commit)?;
        assert_eq!((inode(&link)?, inode(&ref_path)?), before);
        repo.link(&commit, "sub/f.json", "2")?; // a different blob is relinked
        assert_ne!(inode(&link)?, before.0);
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        Ok(())
    }

    #[test]
    fn names_outside_the_repo_are_refused() {
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", "a\\b", ""] {
            assert!(safe_name(bad).is_err(), "{bad}");
        }
        assert!(safe_name("sub/dir/model.safetensors").is_ok());
    }
}
