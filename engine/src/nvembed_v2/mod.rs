//! NV-Embed-v2: a bidirectional Mistral decoder followed by latent-attention pooling.
//!
//! Config-driven: every size comes from `config.json`, and the model runs in f32, f16 or bf16.

mod latent_attention;
mod mistral;
mod ops;

use candle_core::{Result as CandleResult, Tensor};

pub use ops::{ATTENTION_SCORE_BLOCK_BYTES, TOKEN_CHUNK_ROWS};

use crate::config::Config;
use crate::error::Result;
use crate::weights::Weights;

pub struct Model {
    decoder: mistral::Decoder,
    latent_attention: latent_attention::LatentAttention,
}

impl Model {
    pub fn load(weights: &Weights, config: &Config) -> Result<Self> {
        Ok(Self {
            decoder: mistral::Decoder::load(weights, config)?,
            latent_attention: latent_attention::LatentAttention::load(weights, config)?,
        })
    }

    /// `input_ids` (b, l) u32, `attention_mask` and `pool_mask` (b, l) u32 0/1.
    /// Returns (b, embedding_dim) f32, L2-normalised when the config says so.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, pool_mask: &Tensor) -> CandleResult<Tensor> {
        let hidden = self.decoder.forward(input_ids, attention_mask)?;
        self.latent_attention.forward(&hidden, pool_mask)
    }

    /// The decoder's output alone (after its final RMSNorm), for checking against references.
    pub fn decoder_hidden_states(&self, input_ids: &Tensor, attention_mask: &Tensor) -> CandleResult<Tensor> {
        self.decoder.forward(input_ids, attention_mask)
    }
}
