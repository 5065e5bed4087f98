//! Mistral's rotary position embeddings (the two halves of each head rotated), applied while the
//! heads are copied out of the fused q/k/v projection: on the CPU one pass reads the projection's
//! output once and writes q, k and v as the attention takes them, in f32.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use crate::matmul::{contiguous_as, MatmulBackend};

/// Up to this many token rows (a query's) are copied on the calling thread: waking the thread
/// pool costs more than the work, and its threads contend with oneDNN's for the cores.
const SEQUENTIAL_ROWS: usize = 32;

/// cos/sin tables, (len, head_dim / 2) in f32, for positions 0..len.
pub fn tables(head_dim: usize, theta: f64, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
        .collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), device)?;
    let positions = Tensor::arange(0u32, len as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((len, 1))?;
    let angles = positions.broadcast_mul(&inv_freq)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// From the fused projection's output `qkv` (b, l, heads + 2·kv_heads, head_dim): q as
/// (b, heads, l, head_dim) and k, v as (b, kv_heads, l, head_dim), in f32, with q and k rotated
/// by position (`cos`, `sin`: at least l rows of `tables`).
pub fn split_heads(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    cos: &Tensor,
    sin: &Tensor,
    backend: MatmulBackend,
) -> Result<(Tensor, Tensor, Tensor)> {
    if qkv.device().is_cpu() {
        return split_heads_cpu(qkv, heads, kv_heads, cos, sin);
    }
    // Elsewhere (the GPU): a copy per part, then candle's rope.
    let part = |start: usize, n: usize| contiguous_as(&qkv.narrow(2, start, n)?.transpose(1, 2)?, DType::F32, backend);
    let l = qkv.dim(1)?;
    let (cos, sin) = (cos.narrow(0, 0, l)?, sin.narrow(0, 0, l)?);
    let rope = |xs: Tensor| candle_nn::rotary_emb::rope(&xs, &cos, &sin);
    Ok((rope(part(0, heads)?)?, rope(part(heads, kv_heads)?)?, part(heads + kv_heads, kv_heads)?))
}

/// The shape of one split: batch rows, tokens, heads per token in the projection, head size.
#[derive(Clone, Copy)]
struct Geometry {
    b: usize,
    l: usize,
    total_heads: usize,
    d: usize,
}

fn split_heads_cpu(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, total_heads, d) = qkv.dims4()?;
    if total_heads != heads + 2 * kv_heads || d % 2 != 0 {
        candle_core::bail!("rotary split: {:?} is not (b, l, {heads} + 2·{kv_heads}, even head size)", qkv.shape());
    }
    for table in [cos, sin] {
        let (rows, half) = table.dims2()?;
        if rows < l || half != d / 2 || table.dtype() != DType::F32 {
            candle_core::bail!("rotary split: table {:?} {:?} for {l} tokens of {d}", table.shape(), table.dtype());
        }
    }
    let g = Geometry { b, l, total_heads, d };
    let (cos, sin) = (
        cos.narrow(0, 0, l)?.flatten_all()?.to_vec1::<f32>()?,
        sin.narrow(0, 0, l)?.flatten_all()?.to_vec1::<f32>()?,
    );
    let qkv = qkv.contiguous()?;
    let (storage, layout) = qkv.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        candle_core::bail!("rotary split: the projection output is not contiguous CPU storage");
    };
    let parts = match cpu {
        CpuStorage::F32(v) => split_parts(&v[start..end], |x| x, g, heads, kv_heads, &cos, &sin),
        CpuStorage::BF16(v) => split_parts(&v[start..end], |x| x.to_f32(), g, heads, kv_heads, &cos, &sin),
        CpuStorage::F16(v) => split_parts(&v[start..end], |x| x.to_f32(), g, heads, kv_heads, &cos, &sin),
        _ => candle_core::bail!("rotary split of {:?}", qkv.dtype()),
    };
    let [q, k, v] = parts;
    let device = qkv.device();
    Ok((
        Tensor::from_vec(q, (b, heads, l, d), device)?,
        Tensor::from_vec(k, (b, kv_heads, l, d), device)?,
        Tensor::from_vec(v, (b, kv_heads, l, d), device)?,
    ))
}

/// q, k and v of `src` (the projection output's elements), each as (b, its heads, l, d) f32.
fn split_parts<T: Copy + Sync>(
    src: &[T],
    widen: impl Fn(T) -> f32 + Sync,
    g: Geometry,
    heads: usize,
    kv_heads: usize,
    cos: &[f32],
    sin: &[f32],
) -> [Vec<f32>; 3] {
    // (first head in the projection, heads, rotated)
    let parts = [
        (0, heads, true),
        (heads, kv_heads, true),
        (heads + kv_heads, kv_heads, false),
    ];
    parts.map(|(first, n, rotated)| {
        let mut out = vec![0f32; g.b * n * g.l * g.d];
        // One (batch row, head) block of l × d per task.
        let fill = |(block, dst): (usize, &mut [f32])| {
            let (row, head) = (block / n, first + block % n);
            for (t, dst) in dst.chunks_exact_mut(g.d).enumerate() {
                let at = ((row * g.l + t) * g.total_heads + head) * g.d;
                let src = &src[at..at + g.d];
                if rotated {
                    let half = g.d / 2;
                    let (cos, sin) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                    let (low, high) = dst.split_at_mut(half);
                    for i in 0..half {
                        let (x1, x2) = (widen(src[i]), widen(src[i + half]));
                        // The arithmetic of candle's rope, so both paths agree exactly.
                        low[i] = x1 * cos[i] - x2 * sin[i];
                        high[i] = x1 * sin[i] + x2 * cos[i];
                    }
                } else {
                    for (o, &x) in dst.iter_mut().zip(src) {
                        *o = widen(x);
                    }
                }
            }
        };
        let block = (g.l * g.d).max(1);
        if g.b * g.l <= SEQUENTIAL_ROWS {
            out.chunks_mut(block).enumerate().for_each(fill);
        } else {
            out.par_chunks_mut(block).enumerate().for_each(fill);
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass CPU split gives exactly what copying each part to f32 and applying candle's
    /// rope gives, for every dtype, above and below the sequential row count.
    #[test]
    fn one_pass_matches_copies_and_candles_rope() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv_heads, d) = (4, 2, 8);
        for (b, l) in [(1, 5), (3, 17)] {
            // Tables longer than the batch: a pass trimmed after its longest row left.
            let (cos, sin) = tables(d, 10_000.0, l + 3, &dev)?;
            let (cos_l, sin_l) = (cos.narrow(0, 0, l)?, sin.narrow(0, 0, l)?);
            let qkv = Tensor::randn(0f32, 1.0, (b, l, heads + 2 * kv_heads, d), &dev)?;
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let qkv = qkv.to_dtype(dtype)?;
                let part = |start: usize, n: usize| {
                    qkv.narrow(2, start, n)?
                        .transpose(1, 2)?
                        .to_dtype(DType::F32)?
                        .contiguous()
                };
                let rope = |xs: Tensor| candle_nn::rotary_emb::rope(&xs, &cos_l, &sin_l);
                let want = [
                    rope(part(0, heads)?)?,
                    rope(part(heads, kv_heads)?)?,
                    part(heads + kv_heads, kv_heads)?,
                ];
                let (q, k, v) = split_heads_cpu(&qkv, heads, kv_heads, &cos, &sin)?;
                for (got, want) in [q, k, v].into_iter().zip(want) {
                    assert_eq!(got.dims(), want.dims());
                    let diff = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    assert_eq!(diff, 0.0, "{dtype:?} b={b} l={l}");
                }
            }
        }
        Ok(())
    }
}
