//! nvembed-engine: NV-Embed-v2 text embeddings on Candle, with no knowledge of Postgres.
//!
//! ```no_run
//! use nvembed_engine::{Embedder, EmbedOptions, ModelSource, QUERY_INSTRUCTION};
//! let files = ModelSource::parse("nvidia/NV-Embed-v2")?.resolve()?;
//! let embedder = Embedder::load(&files, candle_core::DType::BF16, &candle_core::Device::Cpu)?;
//! let vectors = embedder.embed(QUERY_INSTRUCTION, &["how do I vacuum a table?"], &EmbedOptions::default())?;
//! # Ok::<(), nvembed_engine::Error>(())
//! ```

pub mod chunking;
pub mod config;
pub mod embedder;
pub mod encoding;
pub mod error;
pub mod matmul;
pub mod nvembed_v2;
pub mod profile;
pub mod random_checkpoint;
pub mod source;
pub mod weights;

pub use candle_core::{DType, Device};
pub use chunking::{chunk_spans, chunk_text_budget};
pub use config::Config;
pub use embedder::{
    choose_dtype, dtype_name, ensure_finite, parse_dtype, set_compute_threads, EmbedOptions, EmbedPass, EmbedStats, Embedder,
    ModelDtype, TextEncoder,
    DEFAULT_BATCH_TOKENS, DEFAULT_DTYPE,
};
pub use encoding::{
    task_instruction, EncodedInput, InputEncoder, DEFAULT_MAX_LENGTH, PASSAGE_INSTRUCTION, QUERY_INSTRUCTION,
};
pub use error::{Error, Result};
pub use matmul::{MatmulBackend, MATMUL_ENV};
pub use source::{ModelFiles, ModelSource, DEFAULT_HUB_MODEL};
