//! One error type for the engine. Every variant names the file or tensor it is about, because the
//! people reading these messages are operators pointing a server at a directory of weights.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid model config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("model file not found: {0}")]
    MissingFile(PathBuf),
    #[error("invalid safetensors file {path}: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("tensor {name} is missing from the checkpoint ({files})")]
    MissingTensor { name: String, files: String },
    #[error("tensor {name} has shape {found:?} in the checkpoint but the config implies {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
    #[error(
        "nothing left to pool in input {index}: the instruction uses all {tokens} tokens allowed by max_length; \
         raise max_length or shorten the instruction"
    )]
    NothingToPool { index: usize, tokens: usize },
    #[error(
        "the model produced a non-finite value (NaN or infinity) for input {index}: the checkpoint's weights \
         or the chosen dtype overflow"
    )]
    NonFinite { index: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the caller gave up")]
    Cancelled,
    #[error("hub download of {file} from {repo} failed: {reason}")]
    Hub {
        repo: String,
        file: String,
        reason: String,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
