//! Numerical building blocks shared by the decoder and the latent-attention layer.

use candle_core::{DType, Module, Result, Tensor, D};

use super::half_norm::HalfNorm;
use crate::matmul::{attention, MatmulBackend};
use crate::profile::{self, Stage};

/// Whether a norm of `xs` runs in one pass (`HalfNorm`): 16-bit tensors on the CPU.
fn one_pass(xs: &Tensor) -> bool {
    xs.device().is_cpu() && matches!(xs.dtype(), DType::BF16 | DType::F16)
}

/// Upper bound on the f32 attention-score block materialised at once. A full L×L score tensor
/// for the real model at 32768 tokens would be ~137 GB; queries are processed in blocks so that
/// one block's scores stay under this size (the softmax makes one more block-sized buffer).
pub const ATTENTION_SCORE_BLOCK_BYTES: usize = 256 << 20;

/// Token rows pushed through a position-wise stage (decoder MLP, the whole latent-attention
/// block) at once, so their wide intermediate activations (intermediate_size, or the latent
/// block's 8 × hidden GEGLU and heads × cross_dim_head queries) stay bounded whatever the batch.
/// Large enough for full-speed matmuls.
pub const TOKEN_CHUNK_ROWS: usize = 512;

/// RMSNorm computed in f32 (weights kept in f32), result cast back to the input dtype.
pub struct RmsNorm {
    weight: Tensor,
    /// The same weights, for the one-pass 16-bit path.
    weight_values: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight_values: weight.to_vec1()?,
            weight,
            eps: eps as f32,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if one_pass(xs) {
            let norm = HalfNorm::Rms {
                weight: &self.weight_values,
                eps: self.eps,
            };
            return profile::time(Stage::NormsRope, || xs.contiguous()?.apply_op1_no_bwd(&norm));
        }
        let xs32 = profile::time(Stage::Conversions, || xs.to_dtype(DType::F32))?;
        let normed = profile::time(Stage::NormsRope, || candle_nn::ops::rms_norm(&xs32, &self.weight, self.eps))?;
        profile::time(Stage::Conversions, || normed.to_dtype(xs.dtype()))
    }
}

/// LayerNorm (PyTorch default eps 1e-5) computed in f32, result cast back to the input dtype.
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    /// The same parameters, for the one-pass 16-bit path.
    weight_values: Vec<f32>,
    bias_values: Vec<f32>,
}

impl LayerNorm {
    const EPS: f32 = 1e-5;

    pub fn new(weight: Tensor, bias: Tensor) -> Result<Self> {
        Ok(Self {
            weight_values: weight.to_vec1()?,
            bias_values: bias.to_vec1()?,
            weight,
            bias,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if one_pass(xs) {
            let norm = HalfNorm::Layer {
                weight: &self.weight_values,
                bias: &self.bias_values,
                eps: Self::EPS,
            };
            return profile::time(Stage::NormsRope, || xs.contiguous()?.apply_op1_no_bwd(&norm));
        }
        let xs32 = profile::time(Stage::Conversions, || xs.to_dtype(DType::F32))?;
        let normed =
            profile::time(Stage::NormsRope, || candle_nn::ops::layer_norm(&xs32, &self.weight, &self.bias, Self::EPS))?;
        profile::time(Stage::Conversions, || normed.to_dtype(xs.dtype()))
    }
}

/// Scaled dot-product attention over blocks of query rows, in f32.
///
/// `q`: (b, g, rows, d); `k`, `v`: (b or 1, g, keys, d) — a batch of 1 is broadcast (by candle's
/// matmul, whatever the backend). `key_bias`: optional additive
/// (b, 1, 1, keys) f32 mask. Returns (b, g, rows, d) in f32, computed on `backend`.
pub fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    scale: f64,
    backend: MatmulBackend,
) -> Result<Tensor> {
    attention_in_blocks(q, k, v, key_bias, scale, ATTENTION_SCORE_BLOCK_BYTES, backend)
}

fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    scale: f64,
    block_bytes: usize,
    backend: MatmulBackend,
) -> Result<Tensor> {
    let (b, g, rows, _) = q.dims4()?;
    let keys = k.dim(2)?;
    let row_bytes = b * g * keys * DType::F32.size_in_bytes();
    let block = (block_bytes / row_bytes.max(1)).clamp(1, rows.max(1));
    let mut outputs = Vec::with_capacity(rows.div_ceil(block));
    let mut start = 0;
    while start < rows {
        let len = block.min(rows - start);
        outputs.push(attention(&q.narrow(2, start, len)?, k, v, key_bias, scale, backend)?);
        start += len;
    }
    if outputs.len() == 1 {
        Ok(outputs.remove(0))
    } else {
        Tensor::cat(&outputs, 2)
    }
}

/// Applies a position-wise `f` to (b, l, h) in equal chunks of at most `TOKEN_CHUNK_ROWS` token
/// rows, each passed as (1, rows, h).
pub fn in_token_chunks(xs: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (b, l, h) = xs.dims3()?;
    if b * l <= TOKEN_CHUNK_ROWS {
        return f(xs);
    }
    let flat = xs.reshape((b * l, h))?;
    let count = (b * l).div_ceil(TOKEN_CHUNK_ROWS);
    // Chunks of equal size: no short last chunk that reads every weight again for a few rows.
    let rows = (b * l).div_ceil(count);
    let mut parts = Vec::with_capacity(count);
    let mut start = 0;
    while start < b * l {
        let len = rows.min(b * l - start);
        parts.push(f(&flat.narrow(0, start, len)?.unsqueeze(0)?)?.squeeze(0)?);
        start += len;
    }
    let out = Tensor::cat(&parts, 0)?;
    let width = out.dim(D::Minus1)?;
    out.reshape((b, l, width))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn blocks_give_the_same_result_as_one_full_score_matrix() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let mask = Tensor::from_iter((0..58).map(|i| if i % 29 > 20 { f32::MIN } else { 0.0 }), &dev)?
            .reshape((2, 1, 1, 29))?;
        let scale = 0.25;
        let full =
            candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?)?.matmul(&v)?;
        for backend in [MatmulBackend::Candle, MatmulBackend::for_device(&dev).unwrap()] {
            // 7 query rows per block with this budget: 6 blocks, the last one partial.
            let blocked = attention_in_blocks(&q, &k, &v, Some(&mask), scale, 7 * 2 * 3 * 29 * 4, backend)?;
            let diff = (&full - blocked)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{diff}");
            // A batch-1 key/value set is shared by every row.
            let shared = attention_in_blocks(&q, &k.narrow(0, 0, 1)?, &v.narrow(0, 0, 1)?, None, scale, 1, backend)?;
            let row0 =
                candle_nn::ops::softmax_last_dim(&(q.narrow(0, 1, 1)?.matmul(&k.narrow(0, 0, 1)?.t()?)? * scale)?)?
                    .matmul(&v.narrow(0, 0, 1)?)?;
            let diff = (shared.narrow(0, 1, 1)? - row0)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{diff}");
        }
        Ok(())
    }
}
