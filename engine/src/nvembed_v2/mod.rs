//! NV-Embed-v2: a bidirectional Mistral decoder followed by latent-attention pooling.
//!
//! Config-driven: every size comes from `config.json`, and the model runs in f32, f16 or bf16.

mod half_norm;
mod latent_attention;
mod mistral;
mod ops;
mod rotary;

use candle_core::{Result as CandleResult, Tensor};

pub use ops::{ATTENTION_SCORE_BLOCK_BYTES, TOKEN_CHUNK_ROWS};

use crate::config::Config;
use crate::error::Result;
use crate::matmul::Projections;
use crate::weights::Weights;

/// Fewest token rows a latent step processes (a shorter remainder joins the step before it): the
/// latent block of a smaller pass (a query) runs in one step. Below a few tens of rows a CPU's
/// products are bound by reading their weights (its 16-bit rate over its memory bandwidth), so
/// splitting there would read the whole block's weights once per step and make no step
/// meaningfully shorter.
const LATENT_STEP_MIN_ROWS: usize = 64;

pub struct Model {
    decoder: mistral::Decoder,
    latent_attention: latent_attention::LatentAttention,
    /// About how many steps the latent block of a large pass is cut into, so that each costs
    /// about one decoder layer (see `latent_step_rows`).
    latent_steps: usize,
}

/// A batch on its way through the model, advanced one step per `Model::step`: each decoder
/// layer, then the latent block in steps of about 1/`latent_steps` of its tokens, so no step
/// costs much more than a layer (NV-Embed-v2's latent block costs about two and a half layers
/// per token); a small pass's latent block runs in one step (see `LATENT_STEP_MIN_ROWS`).
pub struct Pass {
    decoder: mistral::DecoderState,
    pool_mask: Tensor,
    /// Set once every decoder layer has run.
    latent: Option<LatentStage>,
}

struct LatentStage {
    /// Final-norm decoder states, (b·l, d), and the (b, l, d) shape to pool them in.
    states: Tensor,
    shape: (usize, usize, usize),
    /// Transformed token states so far, in order.
    done: Vec<Tensor>,
    chunk: usize,
    /// Rows of the batch still wanted. Rows dropped during this stage are still transformed
    /// (at most `latent_steps` layers' worth) and left out when pooled.
    keep: Vec<usize>,
}

impl LatentStage {
    fn transformed(&self) -> usize {
        self.done.iter().map(|t| t.dim(0).unwrap_or(0)).sum()
    }
}

impl Pass {
    pub fn rows(&self) -> usize {
        match &self.latent {
            None => self.decoder.rows(),
            Some(stage) => stage.keep.len(),
        }
    }

    /// Whether the next step is a decoder layer.
    pub fn in_decoder(&self) -> bool {
        self.latent.is_none()
    }

    /// Padded tokens of this pass: what one decoder layer processes.
    pub fn padded_tokens(&self) -> usize {
        self.decoder.padded_tokens()
    }

    /// Keeps only the rows at `keep` (indices into the current rows, in order); in the decoder
    /// the others stop costing anything from the next layer on.
    pub fn retain(&mut self, keep: &[usize]) -> CandleResult<()> {
        if let Some(stage) = self.latent.as_mut() {
            stage.keep = keep.iter().map(|&i| stage.keep[i]).collect();
            return Ok(());
        }
        let index = Tensor::new(keep.iter().map(|&i| i as u32).collect::<Vec<u32>>(), self.pool_mask.device())?;
        self.decoder.retain(keep, &index)?;
        self.pool_mask = self
            .pool_mask
            .index_select(&index, 0)?
            .narrow(1, 0, self.decoder.width())?;
        Ok(())
    }
}

/// Floating-point operations a forward pass over rows of these unpadded `lengths` needs: every
/// projection, the decoder's attention (4·L² per head dimension per layer), and the latent block
/// per token; not the latent keys/values, computed once at load. What efficiency is measured by.
pub fn useful_flops(config: &Config, lengths: &[usize]) -> f64 {
    let t = &config.text_config;
    let per_token = (t.num_hidden_layers * mistral::layer_flops_per_token(config)
        + latent_attention::flops_per_token(config)) as f64;
    let attention_width = (t.num_attention_heads * config.head_dim()) as f64;
    lengths
        .iter()
        .map(|&l| {
            let l = l as f64;
            l * per_token + t.num_hidden_layers as f64 * 4.0 * l * l * attention_width
        })
        .sum()
}

/// Token rows per latent step for a pass of `tokens` rows cut into about `steps` steps: at
/// least `LATENT_STEP_MIN_ROWS`, and whole `TOKEN_CHUNK_ROWS` chunks when larger, so that each
/// read of the block's weights serves a full chunk (683 rows would run as two reads of ~342).
fn latent_step_rows(tokens: usize, steps: usize) -> usize {
    let share = tokens.div_ceil(steps.max(1)).max(LATENT_STEP_MIN_ROWS);
    if share > TOKEN_CHUNK_ROWS {
        share / TOKEN_CHUNK_ROWS * TOKEN_CHUNK_ROWS
    } else {
        share
    }
}

/// Rows of the next latent step with `rest` rows left: `chunk`, or all of them when fewer than
/// `LATENT_STEP_MIN_ROWS` would be left after it.
fn next_latent_step(rest: usize, chunk: usize) -> usize {
    if rest < chunk + LATENT_STEP_MIN_ROWS {
        rest
    } else {
        chunk
    }
}

impl Model {
    pub fn load(weights: &Weights, config: &Config, projections: Projections) -> Result<Self> {
        let latent_attention = latent_attention::LatentAttention::load(weights, config, projections)?;
        let layer = mistral::layer_flops_per_token(config).max(1);
        Ok(Self {
            decoder: mistral::Decoder::load(weights, config, projections)?,
            latent_steps: latent_attention.flops_per_token().div_ceil(layer).max(1),
            latent_attention,
        })
    }

    /// `input_ids` (b, l) u32, `attention_mask` and `pool_mask` (b, l) u32 0/1.
    pub fn begin(&self, input_ids: &Tensor, attention_mask: &Tensor, pool_mask: &Tensor) -> CandleResult<Pass> {
        Ok(Pass {
            decoder: self.decoder.begin(input_ids, attention_mask)?,
            pool_mask: pool_mask.clone(),
            latent: None,
        })
    }

    /// How the projections of checkpoint weights run: each distinct way, `; `-separated (one,
    /// unless some projection fell back to another kernel than the others).
    pub fn matmul(&self) -> String {
        let mut kinds: Vec<String> = Vec::new();
        for linear in self.decoder.projections().chain(self.latent_attention.projections()) {
            let kind = linear.describe();
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        if kinds.is_empty() {
            "none".into()
        } else {
            kinds.join("; ")
        }
    }

    /// Runs the next step of `pass`; false once all have run and it can be pooled.
    pub fn step(&self, pass: &mut Pass) -> CandleResult<bool> {
        let Some(stage) = pass.latent.as_mut() else {
            if self.decoder.step(&mut pass.decoder)? {
                return Ok(true);
            }
            let hidden = self.decoder.finish(&pass.decoder)?;
            let (b, l, d) = hidden.dims3()?;
            pass.latent = Some(LatentStage {
                states: hidden.reshape((b * l, d))?,
                shape: (b, l, d),
                done: Vec::new(),
                chunk: latent_step_rows(b * l, self.latent_steps),
                keep: (0..b).collect(),
            });
            return Ok(true);
        };
        let total = stage.states.dim(0)?;
        let start = stage.transformed();
        let len = next_latent_step(total - start, stage.chunk);
        let part = self
            .latent_attention
            .transform(&stage.states.narrow(0, start, len)?.unsqueeze(0)?)?;
        stage.done.push(part.squeeze(0)?);
        Ok(start + len < total)
    }

    /// Pools a pass whose steps have all run: (rows, embedding_dim) f32, L2-normalised when
    /// the config says so.
    pub fn finish(&self, pass: &Pass) -> CandleResult<Tensor> {
        let stage = pass
            .latent
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("a pass was pooled before its steps ran".into()))?;
        let xs = Tensor::cat(&stage.done, 0)?.reshape(stage.shape)?;
        let pooled = self.latent_attention.pool(&xs, &pass.pool_mask)?;
        if stage.keep.len() == stage.shape.0 {
            return Ok(pooled);
        }
        let index = Tensor::new(stage.keep.iter().map(|&i| i as u32).collect::<Vec<u32>>(), pooled.device())?;
        pooled.index_select(&index, 0)
    }

    /// The decoder's output alone (after its final RMSNorm), for checking against references.
    pub fn decoder_hidden_states(&self, input_ids: &Tensor, attention_mask: &Tensor) -> CandleResult<Tensor> {
        self.decoder.forward(input_ids, attention_mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows of each latent step of a pass of `tokens` rows.
    fn latent_steps(tokens: usize, steps: usize) -> Vec<usize> {
        let chunk = latent_step_rows(tokens, steps);
        let mut lengths = Vec::new();
        let mut done = 0;
        while done < tokens {
            lengths.push(next_latent_step(tokens - done, chunk));
            done += lengths.last().copied().unwrap_or(0);
        }
        lengths
    }

    #[test]
    fn latent_steps_are_never_weight_bound_slivers() {
        // A query's latent block runs whole.
        assert_eq!(latent_steps(30, 3), [30]);
        assert_eq!(latent_steps(LATENT_STEP_MIN_ROWS, 3), [LATENT_STEP_MIN_ROWS]);
        // 64 + 36 would end in a sliver: one step.
        assert_eq!(latent_steps(100, 3), [100]);
        // A bulk pass is shared out as before.
        assert_eq!(latent_steps(300, 3), [100, 100, 100]);
        // Above a token chunk, whole chunks: 2048 / 3 = 683 rows would each run as 512 + 171.
        assert_eq!(latent_steps(2048, 3), [512; 4]);
        // A remainder under the minimum joins the last step (512 + 4 would end in 4 rows).
        assert_eq!(latent_steps(1540, 3), [512, 512, 516]);
        assert_eq!(latent_steps(5000, 2), [2048, 2048, 904]);
    }
}
