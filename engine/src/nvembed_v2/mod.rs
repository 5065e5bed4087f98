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

/// A batch on its way through the model, advanced one decoder layer per `Model::step`.
pub struct Pass {
    decoder: mistral::DecoderState,
    pool_mask: Tensor,
}

impl Pass {
    pub fn rows(&self) -> usize {
        self.decoder.rows()
    }

    /// Padded tokens one layer of this pass processes.
    pub fn padded_tokens(&self) -> usize {
        self.decoder.padded_tokens()
    }

    /// Keeps only the rows at `keep` (indices into the current rows, in order); the others stop
    /// costing anything from the next layer on.
    pub fn retain(&mut self, keep: &[usize]) -> CandleResult<()> {
        let index = Tensor::new(keep.iter().map(|&i| i as u32).collect::<Vec<u32>>(), self.pool_mask.device())?;
        self.decoder.retain(keep, &index)?;
        self.pool_mask = self.pool_mask.index_select(&index, 0)?.narrow(1, 0, self.decoder.width())?;
        Ok(())
    }
}

impl Model {
    pub fn load(weights: &Weights, config: &Config) -> Result<Self> {
        Ok(Self {
            decoder: mistral::Decoder::load(weights, config)?,
            latent_attention: latent_attention::LatentAttention::load(weights, config)?,
        })
    }

    /// Decoder layers, i.e. how many `step`s a pass takes.
    pub fn layer_count(&self) -> usize {
        self.decoder.layer_count()
    }

    /// `input_ids` (b, l) u32, `attention_mask` and `pool_mask` (b, l) u32 0/1.
    pub fn begin(&self, input_ids: &Tensor, attention_mask: &Tensor, pool_mask: &Tensor) -> CandleResult<Pass> {
        Ok(Pass {
            decoder: self.decoder.begin(input_ids, attention_mask)?,
            pool_mask: pool_mask.clone(),
        })
    }

    /// Runs the next decoder layer of `pass`; false once all have run.
    pub fn step(&self, pass: &mut Pass) -> CandleResult<bool> {
        self.decoder.step(&mut pass.decoder)
    }

    /// Pools a pass that went through every decoder layer: (b, embedding_dim) f32,
    /// L2-normalised when the config says so.
    pub fn finish(&self, pass: &Pass) -> CandleResult<Tensor> {
        let hidden = self.decoder.finish(&pass.decoder)?;
        self.latent_attention.forward(&hidden, &pass.pool_mask)
    }

    /// The decoder's output alone (after its final RMSNorm), for checking against references.
    pub fn decoder_hidden_states(&self, input_ids: &Tensor, attention_mask: &Tensor) -> CandleResult<Tensor> {
        self.decoder.forward(input_ids, attention_mask)
    }
}
