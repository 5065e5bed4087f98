//! Weight-only int8: a projection's weights rounded to int8 with one f32 scale per output
//! (symmetric, round to nearest: w ≈ q · scale, |q| ≤ 127), quantized at load from the
//! checkpoint as published. Halves the memory of 16-bit weights and the bytes a few-row pass
//! reads; the activations stay in floating point.

use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// The largest magnitude of a quantized weight: symmetric, so -128 is never used.
const Q_MAX: f32 = 127.0;

/// Int8 weights (n, k) row-major, a PyTorch Linear's layout, with a scale per output row.
pub struct Int8Weights {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
    pub n: usize,
    pub k: usize,
}

impl Int8Weights {
    /// Quantizes `weight` (n, k) of any float dtype. A non-finite weight is an error: it would
    /// turn its whole output row into NaN.
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        // Read in place: a weight already in f32 (as the loader gives them for int8) is not
        // copied, so loading holds one f32 weight at a time, not two.
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = weight.storage_and_layout();
        let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
            candle_core::bail!("int8 weights are quantized from contiguous CPU tensors");
        };
        let floats = &cpu.as_slice::<f32>()?[start..end];
        if let Some(bad) = floats.iter().position(|w| !w.is_finite()) {
            candle_core::bail!("weight ({}, {}) of a projection is {}", bad / k, bad % k, floats[bad]);
        }
        let mut values = vec![0i8; n * k];
        let mut scales = vec![0f32; n];
        values
            .par_chunks_mut(k.max(1))
            .zip(scales.par_iter_mut())
            .zip(floats.par_chunks(k.max(1)))
            .for_each(|((q, scale), w)| {
                let max = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                // An all-zero row keeps scale 1 (its values are 0 whatever the scale).
                *scale = if max > 0.0 { max / Q_MAX } else { 1.0 };
                // Q_MAX / max, not 1 / scale: that overflows for rows of tiny weights.
                let inverse = if max > 0.0 { Q_MAX / max } else { 0.0 };
                for (q, w) in q.iter_mut().zip(w) {
                    *q = (w * inverse).round().clamp(-Q_MAX, Q_MAX) as i8;
                }
            });
        Ok(Self { values, scales, n, k })
    }

    /// The weights back in f32 (q · scale) into `dst` (n·k elements).
    pub fn dequantize_into(&self, dst: &mut [f32]) -> Result<()> {
        if dst.len() != self.n * self.k {
            candle_core::bail!("{} elements for int8 weights ({}, {})", dst.len(), self.n, self.k);
        }
        dst.par_chunks_mut(self.k.max(1))
            .zip(self.values.par_chunks(self.k.max(1)))
            .zip(self.scales.par_iter())
            .for_each(|((d, q), scale)| {
                for (d, q) in d.iter_mut().zip(q) {
                    *d = f32::from(*q) * scale;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every weight comes back within half a step of its row's scale; the largest exactly.
    #[test]
    fn quantized_weights_round_to_the_nearest_step_of_their_row() -> Result<()> {
        let w = Tensor::randn(0f32, 0.02, (48, 40), &Device::Cpu)?;
        let w = Tensor::cat(&[w, Tensor::zeros((1, 40), DType::F32, &Device::Cpu)?], 0)?;
        let q = Int8Weights::quantize(&w)?;
        let mut back = vec![0f32; 49 * 40];
        q.dequantize_into(&mut back)?;
        let original = w.to_vec2::<f32>()?;
        for (row, scale) in q.scales.iter().enumerate() {
            let max = original[row].iter().fold(0f32, |m, x| m.max(x.abs()));
            for (col, w) in original[row].iter().enumerate() {
                let diff = (back[row * 40 + col] - w).abs();
                assert!(diff <= scale * 0.5 + 1e-9, "row {row} col {col}: {diff} > half of {scale}");
                if w.abs() == max && max > 0.0 {
                    assert_eq!(q.values[row * 40 + col].unsigned_abs(), 127);
                }
            }
        }
        assert_eq!((q.scales[48], &q.values[48 * 40..]), (1.0, &[0i8; 40][..]));
        let nan = Tensor::new(&[[0.5f32, f32::NAN]], &Device::Cpu)?;
        let err = Int8Weights::quantize(&nan).err().expect("NaN refused").to_string();
        assert!(err.contains("(0, 1)") && err.contains("NaN"), "{err}");
        Ok(())
    }
}
