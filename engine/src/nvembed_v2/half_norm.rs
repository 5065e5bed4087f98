//! RMSNorm and LayerNorm of 16-bit tensors on the CPU in one pass: each row's statistics are
//! accumulated in f32 and every output rounded once — the same arithmetic as widening the
//! tensor to f32, normalising and narrowing it back (up to summation order), without the two f32
//! copies.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use half::{bf16, f16};
use rayon::prelude::*;

/// Up to this many rows (a query's tokens) are normalised on the calling thread: waking the
/// thread pool costs more than the work.
const SEQUENTIAL_ROWS: usize = 32;

/// The norm and its f32 parameters.
pub enum HalfNorm<'a> {
    Rms {
        weight: &'a [f32],
        eps: f32,
    },
    Layer {
        weight: &'a [f32],
        bias: &'a [f32],
        eps: f32,
    },
}

/// A 16-bit element, widened and narrowed exactly as `to_dtype` does.
trait Half: Copy + Send + Sync {
    fn widen(self) -> f32;
    fn narrow(value: f32) -> Self;
}

impl Half for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(value: f32) -> Self {
        bf16::from_f32(value)
    }
}

impl Half for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(value: f32) -> Self {
        f16::from_f32(value)
    }
}

/// Partial sums a row's statistics are accumulated in: independent adds the compiler turns into
/// vector instructions (one running sum is a chain of dependent adds, ~4 cycles per element).
const SUM_LANES: usize = 16;

/// The sum of `f` over `values`, in `SUM_LANES` interleaved partial sums.
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut partial = [0f32; SUM_LANES];
    let chunks = values.chunks_exact(SUM_LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (p, &v) in partial.iter_mut().zip(chunk) {
            *p += f(v);
        }
    }
    partial.iter().sum::<f32>() + tail
}

impl HalfNorm<'_> {
    /// Normalises one row, widened first into `widened` (a row of scratch).
    fn normalize_row<H: Half>(&self, row: &[H], widened: &mut [f32], out: &mut [H]) {
        for (w, v) in widened.iter_mut().zip(row) {
            *w = v.widen();
        }
        let n = row.len() as f32;
        match *self {
            HalfNorm::Rms { weight, eps } => {
                let inverse = 1.0 / (lane_sum(widened, |v| v * v) / n + eps).sqrt();
                for ((o, v), w) in out.iter_mut().zip(widened.iter()).zip(weight) {
                    *o = H::narrow(v * inverse * w);
                }
            }
            HalfNorm::Layer { weight, bias, eps } => {
                let mean = lane_sum(widened, |v| v) / n;
                let variance = lane_sum(widened, |v| (v - mean) * (v - mean)) / n;
                let inverse = 1.0 / (variance + eps).sqrt();
                for (((o, v), w), b) in out.iter_mut().zip(widened.iter()).zip(weight).zip(bias) {
                    *o = H::narrow((v - mean) * inverse * w + b);
                }
            }
        }
    }

    fn normalize<H: Half>(&self, src: &[H], width: usize) -> Vec<H> {
        let mut out = vec![H::narrow(0.0); src.len()];
        if src.len() / width <= SEQUENTIAL_ROWS {
            let mut widened = vec![0f32; width];
            out.chunks_mut(width)
                .zip(src.chunks(width))
                .for_each(|(out, row)| self.normalize_row(row, &mut widened, out));
        } else {
            out.par_chunks_mut(width)
                .zip(src.par_chunks(width))
                .for_each_init(|| vec![0f32; width], |widened, (out, row)| self.normalize_row(row, widened, out));
        }
        out
    }
}

impl CustomOp1 for HalfNorm<'_> {
    fn name(&self) -> &'static str {
        "half-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("half-norm input is not contiguous");
        };
        let width = layout.dims().last().copied().unwrap_or(1).max(1);
        let parameters = match *self {
            HalfNorm::Rms { weight, .. } => [weight.len(), width],
            HalfNorm::Layer { weight, bias, .. } => [weight.len(), bias.len()],
        };
        if parameters != [width, width] {
            candle_core::bail!("half-norm parameters {parameters:?} for rows of {width}");
        }
        let out = match storage {
            CpuStorage::BF16(v) => CpuStorage::BF16(self.normalize(&v[start..end], width)),
            CpuStorage::F16(v) => CpuStorage::F16(self.normalize(&v[start..end], width)),
            _ => candle_core::bail!("half-norm takes bf16 or f16 tensors"),
        };
        Ok((out, layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// One pass gives what widening, candle's f32 norms and narrowing give.
    #[test]
    fn matches_the_f32_norms_rounded_once() -> Result<()> {
        let dev = Device::Cpu;
        let xs = (Tensor::randn(0f32, 3.0, (37, 24), &dev)? + 0.5)?;
        let weight = Tensor::randn(1f32, 0.3, 24, &dev)?;
        let bias = Tensor::randn(0f32, 0.3, 24, &dev)?;
        let (w, b) = (weight.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
        for dtype in [DType::BF16, DType::F16] {
            let x16 = xs.to_dtype(dtype)?;
            let x32 = x16.to_dtype(DType::F32)?;
            let cases = [
                (HalfNorm::Rms { weight: &w, eps: 1e-5 }, candle_nn::ops::rms_norm(&x32, &weight, 1e-5)?),
                (
                    HalfNorm::Layer {
                        weight: &w,
                        bias: &b,
                        eps: 1e-5,
                    },
                    candle_nn::ops::layer_norm(&x32, &weight, &bias, 1e-5)?,
                ),
            ];
            for (norm, want) in cases {
                let got = x16.apply_op1_no_bwd(&norm)?.to_dtype(DType::F32)?;
                let want = want.to_dtype(dtype)?.to_dtype(DType::F32)?;
                // At most one unit in the last place apart (summation order).
                let ulp = if dtype == DType::BF16 {
                    1.0 / 128.0
                } else {
                    1.0 / 1024.0
                };
                let diff = ((got - &want)?.abs()? / (want.abs()? + 1e-3)?)?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(diff <= ulp, "{dtype:?}: relative difference {diff}");
            }
        }
        Ok(())
    }
}
