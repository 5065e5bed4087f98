//! Where a checkpoint comes from: a local directory, explicit files, or a Hugging Face hub repo
//! fetched with `hf-hub` into its usual cache (honouring `HF_HOME`, `HF_ENDPOINT` and
//! `HF_HUB_OFFLINE`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory laid out like a hub snapshot.
    Dir(PathBuf),
    /// Explicit files.
    Files(ModelFiles),
    /// A hub repository id such as `nvidia/NV-Embed-v2`.
    Hub(String),
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

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

impl ModelSource {
    /// An existing path, or anything that looks like one, is a directory; otherwise a hub id.
    pub fn parse(spec: &str) -> Self {
        let path = Path::new(spec);
        let looks_like_path = spec.starts_with('/') || spec.starts_with('.');
        if looks_like_path || path.exists() || spec.split('/').count() > 2 {
            ModelSource::Dir(path.to_path_buf())
        } else {
            ModelSource::Hub(spec.to_string())
        }
    }

    /// Local paths of the model's files, downloading them first for a hub source.
    pub fn resolve(&self) -> Result<ModelFiles> {
        match self {
            ModelSource::Files(files) => Ok(files.clone()),
            ModelSource::Dir(dir) => resolve_dir(dir),
            ModelSource::Hub(repo) => resolve_hub(repo),
        }
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

struct OfflineCache(hf_hub::CacheRepo);

impl Fetch for OfflineCache {
    fn fetch(&self, file: &str) -> std::result::Result<PathBuf, String> {
        self.0
            .get(file)
            .ok_or_else(|| "not in the local hub cache and HF_HUB_OFFLINE is set".to_string())
    }
}

impl Fetch for hf_hub::api::sync::ApiRepo {
    fn fetch(&self, file: &str) -> std::result::Result<PathBuf, String> {
        self.get(file).map_err(|e| e.to_string())
    }
}

fn resolve_hub(repo_id: &str) -> Result<ModelFiles> {
    let repo = Repo::model(repo_id.to_string());
    let fetcher: Box<dyn Fetch> = if hub_offline() {
        Box::new(OfflineCache(Cache::from_env().repo(repo)))
    } else {
        let api = ApiBuilder::from_env()
            .with_progress(std::io::stderr().is_terminal())
            .build()
            .map_err(|e| Error::Hub {
                repo: repo_id.to_string(),
                file: String::new(),
                reason: e.to_string(),
            })?;
        Box::new(api.repo(repo))
    };
    let get = |file: &str| {
        fetcher.fetch(file).map_err(|reason| Error::Hub {
            repo: repo_id.to_string(),
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
