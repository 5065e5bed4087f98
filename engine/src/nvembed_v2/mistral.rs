//! The bidirectional Mistral decoder of NV-Embed-v2: Mistral-7B's blocks with the causal mask
//! replaced by a padding-only key mask, and no sliding window.

use candle_core::{DType, Module, Result as CandleResult, Tensor};

use super::ops::{blocked_attention, in_token_chunks, RmsNorm};
use super::rotary;
use crate::config::Config;
use crate::error::Result;
use crate::matmul::{contiguous_as, Activation, Combine, Linear, MatmulBackend, Projections};
use crate::profile::{self, Stage};
use crate::weights::Weights;

const PREFIX: &str = "embedding_model";

struct SelfAttention {
    /// q, k and v projections fused into one matmul.
    qkv: Linear,
    /// The output projection, with the residual added to it.
    out: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Where the attention's own products run.
    backend: MatmulBackend,
}

impl SelfAttention {
    fn load(w: &Weights, cfg: &Config, prefix: &str, projections: Projections) -> Result<Self> {
        let t = &cfg.text_config;
        let hd = cfg.head_dim();
        let q = w.get_projection(&format!("{prefix}.q_proj.weight"), &[t.num_attention_heads * hd, t.hidden_size])?;
        let k = w.get_projection(&format!("{prefix}.k_proj.weight"), &[t.num_key_value_heads * hd, t.hidden_size])?;
        let v = w.get_projection(&format!("{prefix}.v_proj.weight"), &[t.num_key_value_heads * hd, t.hidden_size])?;
        let o = w.get_projection(&format!("{prefix}.o_proj.weight"), &[t.hidden_size, t.num_attention_heads * hd])?;
        Ok(Self {
            qkv: Linear::new(Tensor::cat(&[q, k, v], 0)?, None, projections)?,
            out: Linear::fused(o, None, Activation::None, Combine::Add, projections)?,
            heads: t.num_attention_heads,
            kv_heads: t.num_key_value_heads,
            head_dim: hd,
            backend: projections.backend,
        })
    }

    /// `residual + attention(xs)`.
    fn forward(
        &self,
        xs: &Tensor,
        residual: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        key_bias: &Tensor,
    ) -> CandleResult<Tensor> {
        let (b, l, _) = xs.dims3()?;
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        let qkv = self.qkv.forward(xs)?.reshape((b, l, h + 2 * kvh, hd))?;
        // Attention runs in f32 whatever the model dtype: rotary phases and score magnitudes
        // are where half precision loses the most.
        let (q, k, v) = profile::time(Stage::NormsRope, || rotary::split_heads(&qkv, h, kvh, cos, sin, self.backend))?;
        // Grouped-query attention without copying K/V: the n_rep query heads sharing one kv head
        // become extra query rows of that kv head, (b, kvh, n_rep * l, hd).
        let n_rep = h / kvh;
        let q = q.reshape((b, kvh, n_rep * l, hd))?;
        let attn = profile::time(Stage::Attention, || {
            blocked_attention(&q, &k, &v, Some(key_bias), 1.0 / (hd as f64).sqrt(), self.backend)
        })?;
        let attn = profile::time(Stage::Conversions, || {
            contiguous_as(&attn.reshape((b, h, l, hd))?.transpose(1, 2)?, xs.dtype(), self.backend)?.reshape((
                b,
                l,
                h * hd,
            ))
        })?;
        self.out.forward_with(&attn, residual)
    }
}

/// SwiGLU: down(silu(gate(x)) · up(x)), as three projections with the activation, the product
/// and the residual fused into them.
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn load(w: &Weights, cfg: &Config, prefix: &str, projections: Projections) -> Result<Self> {
        let t = &cfg.text_config;
        let (hs, is) = (t.hidden_size, t.intermediate_size);
        // One weight loaded at a time, each packed (or quantized) before the next is read.
        let weight = |name: &str, shape: [usize; 2]| w.get_projection(&format!("{prefix}.{name}.weight"), &shape);
        Ok(Self {
            gate: Linear::fused(weight("gate_proj", [is, hs])?, None, Activation::Silu, Combine::None, projections)?,
            up: Linear::fused(weight("up_proj", [is, hs])?, None, Activation::None, Combine::Mul, projections)?,
            down: Linear::fused(weight("down_proj", [hs, is])?, None, Activation::None, Combine::Add, projections)?,
        })
    }

    /// `residual + mlp(xs)`.
    fn forward(&self, xs: &Tensor, residual: &Tensor) -> CandleResult<Tensor> {
        let gate = self.gate.forward(xs)?;
        let gated = self.up.forward_with(xs, &gate)?;
        drop(gate);
        self.down.forward_with(&gated, residual)
    }
}

struct DecoderLayer {
    input_norm: RmsNorm,
    attention: SelfAttention,
    post_attention_norm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(w: &Weights, cfg: &Config, prefix: &str, projections: Projections) -> Result<Self> {
        let hs = cfg.text_config.hidden_size;
        let eps = cfg.text_config.rms_norm_eps;
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(w.get_as(&format!("{prefix}.{name}.weight"), &[hs], DType::F32)?, eps)?)
        };
        Ok(Self {
            input_norm: norm("input_layernorm")?,
            attention: SelfAttention::load(w, cfg, &format!("{prefix}.self_attn"), projections)?,
            post_attention_norm: norm("post_attention_layernorm")?,
            mlp: Mlp::load(w, cfg, &format!("{prefix}.mlp"), projections)?,
        })
    }

    fn forward(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor, key_bias: &Tensor) -> CandleResult<Tensor> {
        let xs = self
            .attention
            .forward(&self.input_norm.forward(xs)?, xs, cos, sin, key_bias)?;
        in_token_chunks(&xs, |chunk| self.mlp.forward(&self.post_attention_norm.forward(chunk)?, chunk))
    }
}

/// A batch part-way through the decoder: the hidden states after `next_layer` layers, and what
/// the remaining layers need. The scheduler of the model server advances it one layer at a time,
/// so other work can run between layers and rows whose caller left can be dropped.
pub struct DecoderState {
    xs: Tensor,
    cos: Tensor,
    sin: Tensor,
    key_bias: Tensor,
    /// Unpadded length of each row; the padded width is their maximum.
    lengths: Vec<usize>,
    next_layer: usize,
}

impl DecoderState {
    pub fn rows(&self) -> usize {
        self.lengths.len()
    }

    /// Padded length: the longest row.
    pub fn width(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0)
    }

    /// Padded tokens (rows × width) a layer of this batch processes.
    pub fn padded_tokens(&self) -> usize {
        self.lengths.len() * self.width()
    }

    /// Keeps only the rows at `keep` (indices into the current rows, in order; `index` holds the
    /// same as a u32 tensor) and trims the padding that only the dropped rows needed. Padding
    /// never changes a result, so the kept rows end exactly as they would have in the full batch.
    pub fn retain(&mut self, keep: &[usize], index: &Tensor) -> CandleResult<()> {
        self.lengths = keep.iter().map(|&i| self.lengths[i]).collect();
        let width = self.width();
        self.xs = self.xs.index_select(index, 0)?.narrow(1, 0, width)?.contiguous()?;
        self.key_bias = self
            .key_bias
            .index_select(index, 0)?
            .narrow(3, 0, width)?
            .contiguous()?;
        self.cos = self.cos.narrow(0, 0, width)?;
        self.sin = self.sin.narrow(0, 0, width)?;
        Ok(())
    }
}

/// The decoder: token ids in, final-RMSNorm hidden states out.
pub struct Decoder {
    embed_tokens: candle_nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    head_dim: usize,
    rope_theta: f64,
}

impl Decoder {
    pub fn load(w: &Weights, cfg: &Config, projections: Projections) -> Result<Self> {
        let t = &cfg.text_config;
        let embed = w.get(&format!("{PREFIX}.embed_tokens.weight"), &[t.vocab_size, t.hidden_size])?;
        let layers = (0..t.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, cfg, &format!("{PREFIX}.layers.{i}"), projections))
            .collect::<Result<Vec<_>>>()?;
        let norm = w.get_as(&format!("{PREFIX}.norm.weight"), &[t.hidden_size], DType::F32)?;
        Ok(Self {
            embed_tokens: candle_nn::Embedding::new(embed, t.hidden_size),
            layers,
            norm: RmsNorm::new(norm, t.rms_norm_eps)?,
            head_dim: cfg.head_dim(),
            rope_theta: t.rope_theta,
        })
    }

    /// Every projection of every layer.
    pub fn projections(&self) -> impl Iterator<Item = &Linear> {
        self.layers.iter().flat_map(|layer| {
            let (attention, mlp) = (&layer.attention, &layer.mlp);
            [&attention.qkv, &attention.out, &mlp.gate, &mlp.up, &mlp.down]
        })
    }

    /// Embeds the tokens of a batch. `input_ids`: (b, l) u32; `attention_mask`: (b, l) 0/1.
    pub fn begin(&self, input_ids: &Tensor, attention_mask: &Tensor) -> CandleResult<DecoderState> {
        let (b, l) = input_ids.dims2()?;
        let device = input_ids.device();
        let (cos, sin) = rotary::tables(self.head_dim, self.rope_theta, l, device)?;
        let mask = attention_mask.to_dtype(DType::F32)?;
        let lengths = mask.sum(1)?.to_vec1::<f32>()?.into_iter().map(|n| n as usize).collect();
        // Padding keys get a large negative bias (the reference uses the dtype's minimum);
        // every other pair attends both ways.
        let key_bias = ((mask - 1.0)? * f32::MAX as f64)?.reshape((b, 1, 1, l))?;
        Ok(DecoderState {
            xs: self.embed_tokens.forward(input_ids)?,
            cos,
            sin,
            key_bias,
            lengths,
            next_layer: 0,
        })
    }

    /// Runs the next layer; false once every layer has run.
    pub fn step(&self, state: &mut DecoderState) -> CandleResult<bool> {
        let Some(layer) = self.layers.get(state.next_layer) else {
            return Ok(false);
        };
        state.xs = layer.forward(&state.xs, &state.cos, &state.sin, &state.key_bias)?;
        state.next_layer += 1;
        Ok(state.next_layer < self.layers.len())
    }

    /// The final RMSNorm of a batch that went through every layer: (b, l, hidden).
    pub fn finish(&self, state: &DecoderState) -> CandleResult<Tensor> {
        debug_assert_eq!(state.next_layer, self.layers.len());
        self.norm.forward(&state.xs)
    }

    /// `input_ids`: (b, l) u32; `attention_mask`: (b, l) 0/1. Returns (b, l, hidden).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> CandleResult<Tensor> {
        let mut state = self.begin(input_ids, attention_mask)?;
        while self.step(&mut state)? {}
        self.finish(&state)
    }
}

/// Floating-point operations per token of one decoder layer's projections (attention scores
/// excluded: they depend on the length): what the latent block's steps are measured against.
pub fn layer_flops_per_token(cfg: &Config) -> usize {
    let t = &cfg.text_config;
    let hd = cfg.head_dim();
    let qkv = t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * hd;
    let out = t.num_attention_heads * hd * t.hidden_size;
    2 * (qkv + out + 3 * t.hidden_size * t.intermediate_size)
}
