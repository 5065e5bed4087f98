//! NV-Embed-v2's latent-attention pooling: token states attend to a trained latent array, then a
//! GEGLU feed-forward, both with residuals, then a masked mean over the pool mask.

use candle_core::{DType, Module, Result as CandleResult, Tensor, D};

use super::ops::{in_token_chunks, LayerNorm};
use crate::config::Config;
use crate::error::Result;
use crate::matmul::{contiguous_as, softmax_last_dim, Activation, Combine, Linear, MatmulBackend, Projections};
use crate::profile::{self, Stage};
use crate::weights::Weights;

const PREFIX: &str = "latent_attention_model";
/// Width multiplier of the reference `FeedForward` (fixed, not in the config).
const FEED_FORWARD_MULT: usize = 4;

struct CrossAttention {
    norm: LayerNorm,
    to_q: Linear,
    /// The output projection, with the residual added to it.
    to_out: Linear,
    /// Per head, the latent array's keys (latents × head_dim, times the attention scale) and
    /// values (as head_dim × latents), in f32, as the weights of two projections:
    /// scores = q·(scale·K)ᵀ, output = softmax(scores)·V.
    /// They do not depend on the input, so they are computed once at load time, packed once like
    /// every other weight, and shared by every row of every batch; `to_kv`, `norm_context` and
    /// the latents themselves are then not kept.
    latent_keys: Vec<Linear>,
    latent_values: Vec<Linear>,
    heads: usize,
    head_dim: usize,
    /// The dtype of the latent keys and values, so of the attention's products.
    attention_dtype: DType,
    backend: MatmulBackend,
}

impl CrossAttention {
    fn load(w: &Weights, cfg: &Config, projections: Projections) -> Result<Self> {
        let l = &cfg.latent_attention_config;
        let p = format!("{PREFIX}.cross_attend_blocks.0");
        let inner = l.num_cross_heads * l.cross_dim_head;
        let f32_param = |name: &str, width: usize| w.get_as(&format!("{p}.{name}"), &[width], DType::F32);
        let norm_context = LayerNorm::new(
            f32_param("norm_context.weight", l.hidden_dim)?,
            f32_param("norm_context.bias", l.hidden_dim)?,
        )?;
        // Used once, here: candle's matmul, whatever the backend.
        let to_kv = candle_nn::Linear::new(w.get(&format!("{p}.fn.to_kv.weight"), &[2 * inner, l.hidden_dim])?, None);
        let latents = w.get(&format!("{PREFIX}.latents"), &[l.num_latents_value, l.latent_dim])?;
        let kv = to_kv.forward(&norm_context.forward(&latents)?)?;
        let kv = kv.to_dtype(DType::F32)?;
        let head = |start: usize, h: usize| kv.narrow(D::Minus1, start + h * l.cross_dim_head, l.cross_dim_head);
        // Folded into the keys once instead of scaling every query (exact for a power-of-two
        // head size, NV-Embed-v2's 1024).
        let scale = 1.0 / (l.cross_dim_head as f64).sqrt();
        // In the model's dtype where oneDNN has a native kernel for it (as the reference runs
        // them), else in f32, with the scores and their softmax (which oneDNN has in f32 on
        // every CPU): converting the queries and scores for every product would cost more than
        // 16-bit keys save.
        let per_head = |dtype: DType| -> Result<(Vec<Linear>, Vec<Linear>)> {
            let mut keys = Vec::with_capacity(l.num_cross_heads);
            let mut values = Vec::with_capacity(l.num_cross_heads);
            for h in 0..l.num_cross_heads {
                let k = (head(0, h)? * scale)?.to_dtype(dtype)?.contiguous()?;
                let v = head(inner, h)?.t()?.to_dtype(dtype)?.contiguous()?;
                // Computed from the latents, not a checkpoint weight: kept in floating point.
                keys.push(Linear::new(k, None, projections.backend)?.charged_to(Stage::LatentBlock));
                values.push(Linear::new(v, None, projections.backend)?.charged_to(Stage::LatentBlock));
            }
            Ok((keys, values))
        };
        let mut attention_dtype = latents.dtype();
        let (mut latent_keys, mut latent_values) = per_head(attention_dtype)?;
        let native = |l: &Linear| l.runs_natively_in(attention_dtype);
        if attention_dtype != DType::F32 && !latent_keys.iter().chain(&latent_values).all(native) {
            attention_dtype = DType::F32;
            (latent_keys, latent_values) = per_head(attention_dtype)?;
        }
        Ok(Self {
            norm: LayerNorm::new(f32_param("norm.weight", l.latent_dim)?, f32_param("norm.bias", l.latent_dim)?)?,
            to_q: Linear::new(w.get_projection(&format!("{p}.fn.to_q.weight"), &[inner, l.latent_dim])?, None, projections)?,
            to_out: Linear::fused(
                w.get_projection(&format!("{p}.fn.to_out.weight"), &[l.latent_dim, inner])?,
                None,
                Activation::None,
                Combine::Add,
                projections,
            )?,
            latent_keys,
            latent_values,
            heads: l.num_cross_heads,
            head_dim: l.cross_dim_head,
            attention_dtype,
            backend: projections.backend,
        })
    }

    /// `xs + cross_attention(xs)`.
    fn forward(&self, xs: &Tensor) -> CandleResult<Tensor> {
        let (b, l, _) = xs.dims3()?;
        let q = self.to_q.forward(&self.norm.forward(xs)?)?;
        let q = q.reshape((b * l, self.heads * self.head_dim))?;
        let mut heads = Vec::with_capacity(self.heads);
        for (h, (keys, values)) in self.latent_keys.iter().zip(&self.latent_values).enumerate() {
            // One head's queries in the keys' dtype, copied out of the projection's output in one
            // pass.
            let q_h = profile::time(Stage::Conversions, || {
                contiguous_as(&q.narrow(1, h * self.head_dim, self.head_dim)?, self.attention_dtype, self.backend)
            })?;
            let scores = keys.forward(&q_h)?;
            let probs = profile::time(Stage::LatentBlock, || softmax_last_dim(&scores, self.backend))?;
            let head = values.forward(&probs)?;
            heads.push(profile::time(Stage::Conversions, || contiguous_as(&head, xs.dtype(), self.backend))?);
        }
        let attn =
            profile::time(Stage::Conversions, || Tensor::cat(&heads, 1)?.reshape((b, l, self.heads * self.head_dim)))?;
        self.to_out.forward_with(&attn, xs)
    }
}

/// GEGLU feed-forward: proj_out(value(x) · gelu(gate(x))), where value and gate are the two
/// halves of the reference's `net.0`; the activation, the product and the residual are fused
/// into the projections.
struct FeedForward {
    norm: LayerNorm,
    value: Linear,
    gate: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn load(w: &Weights, cfg: &Config, projections: Projections) -> Result<Self> {
        let d = cfg.latent_attention_config.latent_dim;
        let inner = d * FEED_FORWARD_MULT;
        let p = format!("{PREFIX}.cross_attend_blocks.1");
        let proj_in = w.get_projection(&format!("{p}.fn.net.0.weight"), &[2 * inner, d])?;
        let proj_in_bias = w.get(&format!("{p}.fn.net.0.bias"), &[2 * inner])?;
        let half = |t: &Tensor, start: usize| t.narrow(0, start, inner)?.contiguous();
        Ok(Self {
            norm: LayerNorm::new(
                w.get_as(&format!("{p}.norm.weight"), &[d], DType::F32)?,
                w.get_as(&format!("{p}.norm.bias"), &[d], DType::F32)?,
            )?,
            value: Linear::fused(
                half(&proj_in, 0)?,
                Some(half(&proj_in_bias, 0)?),
                Activation::None,
                Combine::Mul,
                projections,
            )?,
            gate: Linear::fused(
                half(&proj_in, inner)?,
                Some(half(&proj_in_bias, inner)?),
                Activation::GeluErf,
                Combine::None,
                projections,
            )?,
            proj_out: Linear::fused(
                w.get_projection(&format!("{p}.fn.net.2.weight"), &[d, inner])?,
                Some(w.get(&format!("{p}.fn.net.2.bias"), &[d])?),
                Activation::None,
                Combine::Add,
                projections,
            )?,
        })
    }

    /// `xs + feed_forward(xs)`.
    fn forward(&self, xs: &Tensor) -> CandleResult<Tensor> {
        let normed = self.norm.forward(xs)?;
        let gate = self.gate.forward(&normed)?;
        let gated = self.value.forward_with(&normed, &gate)?;
        drop(gate);
        self.proj_out.forward_with(&gated, xs)
    }
}

pub struct LatentAttention {
    cross_attention: CrossAttention,
    feed_forward: FeedForward,
    output_normalize: bool,
    /// Multiply-adds per token ×2, counted from the config: what `steps_per_pass` compares
    /// with a decoder layer.
    flops_per_token: usize,
}

impl LatentAttention {
    /// Its projections of checkpoint weights (not the keys and values made from the latents).
    pub fn projections(&self) -> impl Iterator<Item = &Linear> {
        let (c, f) = (&self.cross_attention, &self.feed_forward);
        [&c.to_q, &c.to_out, &f.value, &f.gate, &f.proj_out].into_iter()
    }

    pub fn load(w: &Weights, cfg: &Config, projections: Projections) -> Result<Self> {
        Ok(Self {
            cross_attention: CrossAttention::load(w, cfg, projections)?,
            feed_forward: FeedForward::load(w, cfg, projections)?,
            output_normalize: cfg.latent_attention_config.output_normalize,
            flops_per_token: flops_per_token(cfg),
        })
    }

    pub fn flops_per_token(&self) -> usize {
        self.flops_per_token
    }

    /// Cross-attention and feed-forward, both with residuals, for (1, rows, d) token states.
    /// Every token is processed independently (the keys/values are the latents), so any split
    /// of the tokens into chunks gives the same result.
    pub fn transform(&self, tokens: &Tensor) -> CandleResult<Tensor> {
        in_token_chunks(tokens, |chunk| self.feed_forward.forward(&self.cross_attention.forward(chunk)?))
    }

    /// Masked mean of transformed states `xs` (b, l, d) over `pool_mask` (b, l), normalised
    /// when the config says so. Returns (b, d) in f32.
    pub fn pool(&self, xs: &Tensor, pool_mask: &Tensor) -> CandleResult<Tensor> {
        profile::time(Stage::LatentBlock, || self.masked_mean(xs, pool_mask))
    }

    fn masked_mean(&self, xs: &Tensor, pool_mask: &Tensor) -> CandleResult<Tensor> {
        let mask = pool_mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let summed = xs.to_dtype(DType::F32)?.broadcast_mul(&mask)?.sum(1)?;
        let pooled = summed.broadcast_div(&mask.sum(1)?)?;
        if self.output_normalize {
            pooled.broadcast_div(&pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?)
        } else {
            Ok(pooled)
        }
    }
}

/// Floating-point operations per token of the latent block: the to_q / to_out projections, the
/// GEGLU feed-forward, and attention over the latents (scores and weighted sum).
pub(super) fn flops_per_token(cfg: &Config) -> usize {
    let l = &cfg.latent_attention_config;
    let inner = l.num_cross_heads * l.cross_dim_head;
    let ff = l.latent_dim * FEED_FORWARD_MULT;
    2 * (2 * l.latent_dim * inner + l.latent_dim * 2 * ff + ff * l.latent_dim) + 4 * l.num_latents_value * inner
}
