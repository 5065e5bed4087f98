//! Where a checkpoint comes from: a local directory, explicit files, or a Hugging Face hub repo
//! fetched with `hf-hub` into its usual cache (honouring `HF_HOME`, `HF_ENDPOINT` and
//! `HF_HUB_OFFLINE`). A hub id may pin a revision as Hugging Face users write it:
//! `nvidia/NV-Embed-v2@<branch, tag or commit sha>`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The model nvembed serves unless told otherwise.
pub const DEFAULT_HUB_MODEL: &str = "nvidia/NV-Embed-v2";

const CONFIG_FILE: &str = "config.json";
const TOKENIZER_FILE: &str = "tokenizer.json";
const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";
const SHARD_INDEX_FILE: &str = "model.safetensors.index.json";

/// The three things a model needs, as local paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: Vec<PathBuf>,
}

/// Bytes of each weights file's tensor data that its fingerprint reads, from the start and
/// from the end: two checkpoints with the same layout (a fine-tune, another seed) differ there,
/// and a 15 GB checkpoint is fingerprinted in milliseconds.
const FINGERPRINT_SAMPLE_BYTES: u64 = 1 << 20;

impl ModelFiles {
    /// Identifies the checkpoint by its contents, not its path: `sha256:` and 16 hex digits of
    /// SHA-256 over the config, the tokenizer, and each weights file's length, safetensors header
    /// (every tensor's name, dtype, shape and offsets) and first and last
    /// `FINGERPRINT_SAMPLE_BYTES`. Servers that load the same files from different places agree;
    /// a different checkpoint differs (not a proof against a forgery, which the sample misses).
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        use std::io::{Read, Seek, SeekFrom};
        let mut hash = Sha256::new();
        for path in [&self.config, &self.tokenizer] {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(&bytes);
        }
        for path in &self.weights {
            let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
            hash.update(len.to_le_bytes());
            // The file's length bounds what is read: a header or sample never exceeds it.
            let mut sample = Vec::new();
            let head = FINGERPRINT_SAMPLE_BYTES.min(len);
            (&mut file).take(head).read_to_end(&mut sample).map_err(|e| Error::io(path, e))?;
            let header_len = sample.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
            let tail_start = len.saturating_sub(FINGERPRINT_SAMPLE_BYTES).max(head);
            let mut header = Vec::new();
            file.seek(SeekFrom::Start(8)).map_err(|e| Error::io(path, e))?;
            (&mut file).take(header_len.min(len.saturating_sub(8))).read_to_end(&mut header).map_err(|e| Error::io(path, e))?;
            file.seek(SeekFrom::Start(tail_start)).map_err(|e| Error::io(path, e))?;
            file.read_to_end(&mut sample).map_err(|e| Error::io(path, e))?;
            hash.update(&header);
            hash.update(&sample);
        }
        let digest = hash.finalize();
        Ok(format!("sha256:{}", digest[..8].iter().map(|b| format!("{b:02x}")).collect::<String>()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory laid out like a hub snapshot.
    Dir(PathBuf),
    /// Explicit files.
    Files(ModelFiles),
    /// A hub repository such as `nvidia/NV-Embed-v2`, at `revision` (a branch, tag or commit
    /// sha; the default branch `main` when `None`).
    Hub { repo: String, revision: Option<String> },
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// Distinct shard file names of an index, in a stable order.
fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let index: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::Safetensors {
        path: index_path.to_path_buf(),
        reason: format!("invalid shard index: {e}"),
    })?;
    let mut names: Vec<String> = index.weight_map.into_values().collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// The branch a hub source without a revision follows, as in `hf-hub`.
const DEFAULT_REVISION: &str = "main";

/// `org/name` or `org/name@rev`: how errors name a hub source.
fn hub_label(repo: &str, revision: Option<&str>) -> String {
    match revision {
        Some(rev) => format!("{repo}@{rev}"),
        None => repo.to_string(),
    }
}

/// A full commit sha, which the hub cache keeps as `snapshots/<sha>` (a `refs/<sha>` file exists
/// only when `hf-hub` itself downloaded that revision).
fn is_commit_sha(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Splits a hub id `repo[@revision]`, rejecting the malformed ones.
fn split_hub_id(spec: &str) -> Result<(String, Option<String>)> {
    let invalid = |why: &str| {
        Error::InvalidArgument(format!(
            "invalid hub model id {spec:?}: {why} (expected org/name or org/name@<branch, tag or commit sha>)"
        ))
    };
    let mut parts = spec.split('@');
    let repo = parts.next().unwrap_or_default();
    let revision = parts.next();
    if parts.next().is_some() {
        return Err(invalid("more than one '@'"));
    }
    if repo.is_empty() {
        return Err(invalid("empty repo id"));
    }
    if repo.split('/').any(str::is_empty) {
        return Err(invalid("empty segment in the repo id"));
    }
    let Some(revision) = revision else {
        return Ok((repo.to_string(), None));
    };
    if revision.is_empty() {
        return Err(invalid("empty revision after '@'"));
    }
    if revision
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
    {
        return Err(invalid("the revision contains whitespace, a control character or '\\'"));
    }
    // Revisions such as `refs/pr/1` name files under the cache's `refs/`: nothing may climb out.
    if revision
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(invalid("the revision has an empty, '.' or '..' path segment"));
    }
    Ok((repo.to_string(), Some(revision.to_string())))
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

impl ModelSource {
    /// A hub source on the default branch.
    pub fn hub(repo: impl Into<String>) -> Self {
        ModelSource::Hub {
            repo: repo.into(),
            revision: None,
        }
    }

    /// An existing path, or anything that looks like one (starts with `/` or `.`, or has more
    /// than two `/`-separated parts before any `@`), is a directory; otherwise a hub id
    /// `org/name` or `org/name@revision`. A malformed hub id (empty repo, empty revision, more
    /// than one `@`) is an [`Error::InvalidArgument`] naming the spec.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        let looks_like_path = spec.starts_with('/') || spec.starts_with('.');
        let repo_part = spec.split('@').next().unwrap_or_default();
        if looks_like_path || path.exists() || repo_part.split('/').count() > 2 {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        let (repo, revision) = split_hub_id(spec)?;
        Ok(ModelSource::Hub { repo, revision })
    }

    /// Local paths of the model's files, downloading them first for a hub source.
    pub fn resolve(&self) -> Result<ModelFiles> {
        match self {
            ModelSource::Files(files) => Ok(files.clone()),
            ModelSource::Dir(dir) => resolve_dir(dir),
            ModelSource::Hub { repo, revision } => resolve_hub(repo, revision.as_deref()),
        }
    }
}

impl FromStr for ModelSource {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        ModelSource::parse(spec)
    }
}

fn resolve_dir(dir: &Path) -> Result<ModelFiles> {
    if !dir.is_dir() {
        return Err(Error::MissingFile(dir.to_path_buf()));
    }
    let index = dir.join(SHARD_INDEX_FILE);
    let weights = if index.is_file() {
        shard_names(&index)?.into_iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join(SINGLE_WEIGHTS_FILE)]
    };
    Ok(ModelFiles {
        config: dir.join(CONFIG_FILE),
        tokenizer: dir.join(TOKENIZER_FILE),
        weights,
    })
}

/// Fetches one file: from the cache only when offline, else cache first, then the endpoint.
trait Fetch {
    fn fetch(&self, file: &str) -> std::result::Result<PathBuf, String>;
}

/// One repo at one revision in the local hub cache, laid out as `hf-hub` and `huggingface_hub`
/// write it: `refs/<revision>` holds a commit sha whose files are under `snapshots/<sha>/`.
/// Unlike `hf_hub::CacheRepo::get`, a commit-sha revision with no `refs/<sha>` file (as the
/// Python client leaves it) is found at `snapshots/<sha>/` directly.
struct LocalCache {
    repo_dir: PathBuf,
    revision: String,
}

impl LocalCache {
    fn new(cache: &Cache, repo: &Repo) -> Self {
        LocalCache {
            repo_dir: cache.path().join(repo.folder_name()),
            revision: repo.revision().to_string(),
        }
    }

    fn snapshot(&self) -> Option<PathBuf> {
        let snapshots = self.repo_dir.join("snapshots");
        if let Ok(commit) = std::fs::read_to_string(self.repo_dir.join("refs").join(&self.revision)) {
            let commit = commit.trim();
            if !commit.is_empty() && !commit.contains(['/', '\\']) && commit != "." && commit != ".." {
                return Some(snapshots.join(commit));
            }
        }
        if is_commit_sha(&self.revision) {
            let dir = snapshots.join(&self.revision);
            if dir.is_dir() {
                return Some(dir);
            }
        }
        None
    }

    fn get(&self, file: &str) -> Option<PathBuf> {
        let path = self.snapshot()?.join(file);
        path.exists().then_some(path)
    }
}

struct OfflineCache(LocalCache);

impl Fetch for OfflineCache {
    fn fetch(&self, file: &str) -> std::result::Result<PathBuf, String> {
        self.0
            .get(file)
            .ok_or_else(|| "not in the local hub cache and HF_HUB_OFFLINE is set".to_string())
    }
}

/// The local cache first (as `ApiRepo::get` does, plus commit-sha snapshots), then the endpoint.
struct Online(LocalCache, hf_hub::api::sync::ApiRepo);

impl Fetch for Online {
    fn fetch(&self, file: &str) -> std::result::Result<PathBuf, String> {
        match self.0.get(file) {
            Some(path) => Ok(path),
            None => self.1.get(file).map_err(|e| e.to_string()),
        }
    }
}

fn resolve_hub(repo_id: &str, revision: Option<&str>) -> Result<ModelFiles> {
    let label = hub_label(repo_id, revision);
    let repo =
        Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.unwrap_or(DEFAULT_REVISION).to_string());
    // The same cache `ApiBuilder::from_env` downloads into.
    let local = LocalCache::new(&Cache::from_env(), &repo);
    let fetcher: Box<dyn Fetch> = if hub_offline() {
        Box::new(OfflineCache(local))
    } else {
        let api = ApiBuilder::from_env()
            .with_progress(std::io::stderr().is_terminal())
            .build()
            .map_err(|e| Error::Hub {
                repo: label.clone(),
                file: String::new(),
                reason: e.to_string(),
            })?;
        Box::new(Online(local, api.repo(repo)))
    };
    let get = |file: &str| {
        fetcher.fetch(file).map_err(|reason| Error::Hub {
            repo: label.clone(),
            file: file.to_string(),
            reason,
        })
    };
    let config = get(CONFIG_FILE)?;
    let tokenizer = get(TOKENIZER_FILE)?;
    let weights = match get(SHARD_INDEX_FILE) {
        Ok(index) => shard_names(&index)?
            .iter()
            .map(|name| get(name))
            .collect::<Result<Vec<_>>>()?,
        Err(_) => vec![get(SINGLE_WEIGHTS_FILE)?],
    };
    Ok(ModelFiles {
        config,
        tokenizer,
        weights,
    })
}
