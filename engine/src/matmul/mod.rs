//! The model's projections (`y = x·Wᵀ + b`) on a matmul backend chosen at load time: oneDNN on
//! the CPU, candle's own matmul on the GPU and as the CPU fallback and comparison.
//!
//! `NVEMBED_MATMUL=candle` or `=onednn` overrides the choice (read once per load); oneDNN picks
//! its kernels by the CPU it runs on, and `DNNL_MAX_CPU_ISA` (e.g. `AVX2`) makes it behave as on
//! a smaller CPU.

#[cfg(feature = "onednn")]
mod int8;
#[cfg(feature = "onednn")]
mod onednn;

use candle_core::{DType, Device, Module, Result as CandleResult, Tensor};

use crate::error::{Error, Result};
use crate::profile::{self, Stage};

/// Environment variable that overrides the matmul backend.
pub const MATMUL_ENV: &str = "NVEMBED_MATMUL";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulBackend {
    /// candle's matmul, in the model dtype.
    Candle,
    /// oneDNN: packed weights in the model dtype where the CPU has a native kernel for it,
    /// otherwise 16-bit weights packed as they are and widened to f32 inside the kernel (layer by
    /// layer into a buffer where oneDNN cannot).
    Onednn,
}

impl MatmulBackend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Candle => "candle",
            Self::Onednn => "onednn",
        }
    }

    /// oneDNN on the CPU when the engine was built with it, candle otherwise; `NVEMBED_MATMUL`
    /// overrides.
    pub fn for_device(device: &Device) -> Result<Self> {
        match std::env::var(MATMUL_ENV).ok().as_deref() {
            None | Some("") => Ok(if device.is_cpu() && cfg!(feature = "onednn") {
                Self::Onednn
            } else {
                Self::Candle
            }),
            Some(name) => Self::parse(name, device),
        }
    }

    /// `candle` or `onednn` (the latter only on the CPU, in a build with the `onednn` feature).
    pub fn parse(name: &str, device: &Device) -> Result<Self> {
        match name {
            "candle" => Ok(Self::Candle),
            "onednn" if device.is_cpu() && cfg!(feature = "onednn") => Ok(Self::Onednn),
            "onednn" => Err(Error::InvalidArgument(
                "the oneDNN matmul needs the CPU and an engine built with the `onednn` feature".into(),
            )),
            other => Err(Error::InvalidArgument(format!(
                "unknown matmul backend {other:?} in {MATMUL_ENV} (expected candle or onednn)"
            ))),
        }
    }
}

/// How a model's projections are built: on which backend, and whether their weights are held as
/// int8 (weight-only, with a scale per output; oneDNN only) with activations in the given dtype.
/// Otherwise the activations are in the dtype the weights are given in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Projections {
    pub backend: MatmulBackend,
    /// `Some(activations)`: int8 weights, quantized from the weights as given (in any float
    /// dtype: the checkpoint's values, best unrounded).
    pub int8: Option<DType>,
}

impl From<MatmulBackend> for Projections {
    fn from(backend: MatmulBackend) -> Self {
        Self { backend, int8: None }
    }
}

impl Projections {
    /// The dtype to load projection weights in for a model whose activations are `activations`:
    /// f32 for int8 (quantized from the checkpoint's values, not from a rounded copy).
    pub fn weight_dtype(&self, activations: DType) -> DType {
        if self.int8.is_some() {
            DType::F32
        } else {
            activations
        }
    }
}

/// The dtype int8 weights are best multiplied in on this CPU: bf16 where oneDNN decompresses them
/// into a native bf16 kernel (AVX-512 BF16, AMX), f32 elsewhere. An error where int8 weights do
/// not run at all (candle's matmul, the GPU).
pub fn int8_activation_dtype(backend: MatmulBackend) -> Result<DType> {
    match backend {
        #[cfg(feature = "onednn")]
        MatmulBackend::Onednn => {
            let probe = Tensor::ones((64, 64), DType::BF16, &Device::Cpu)?;
            let packed = onednn::PackedMatmul::int8(&int8::Int8Weights::quantize(&probe)?, DType::BF16, None, Activation::None, Combine::None)?;
            Ok(if packed.is_some() { DType::BF16 } else { DType::F32 })
        }
        _ => Err(int8_needs_onednn()),
    }
}

fn int8_needs_onednn() -> Error {
    Error::InvalidArgument(
        format!(
            "int8 weights run on the CPU with the oneDNN matmul (the default of a CPU build), not on candle's matmul \
             (the GPU's, or the CPU's with {MATMUL_ENV}=candle): choose another dtype there, or leave {MATMUL_ENV} unset"
        ),
    )
}

/// Threads for oneDNN's kernels (candle's follow `RAYON_NUM_THREADS`).
pub fn set_threads(threads: usize) {
    #[cfg(feature = "onednn")]
    onednn::set_threads(threads);
    #[cfg(not(feature = "onednn"))]
    let _ = threads;
}

/// An activation applied to a projection's result (fused into oneDNN's matmul).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None = 0,
    /// x·sigmoid(x): the decoder MLP's gate.
    Silu = 1,
    /// Exact (erf) GELU: the latent block's GEGLU gate.
    GeluErf = 2,
}

/// What a projection does with a second operand of its output's shape (fused into oneDNN's
/// matmul): the gated half of a GLU, or a residual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    None = 0,
    Mul = 1,
    Add = 2,
}

enum Weights {
    /// candle's matmul; bias, activation and operand applied by candle ops.
    Candle(candle_nn::Linear),
    /// Packed by oneDNN with bias, activation and operand fused.
    #[cfg(feature = "onednn")]
    Packed(onednn::PackedMatmul),
    /// 16-bit weights (n, k) kept as loaded, widened per call where oneDNN has no kernel that
    /// widens them itself; the rest by candle ops.
    #[cfg(feature = "onednn")]
    Widened(Tensor),
    /// Int8 weights on a CPU without a oneDNN kernel for them, widened per call likewise.
    #[cfg(feature = "onednn")]
    Int8Widened(int8::Int8Weights),
}

/// One projection `combine(activation(x·Wᵀ + b), other)`, with its weights in the backend's
/// layout.
pub struct Linear {
    weights: Weights,
    /// (out) in the model dtype, for the paths that add it with candle.
    bias: Option<Tensor>,
    activation: Activation,
    combine: Combine,
    /// The profile stage its time is charged to.
    stage: Stage,
}

impl Linear {
    /// `weight` (out, in) as stored by PyTorch, in the activations' dtype; `bias` (out). The
    /// weight tensor is consumed: on the oneDNN path it is reordered (or quantized) and dropped,
    /// so no second copy stays in memory.
    pub fn new(weight: Tensor, bias: Option<Tensor>, projections: impl Into<Projections>) -> Result<Self> {
        Self::fused(weight, bias, Activation::None, Combine::None, projections)
    }

    /// As `new`, followed by `activation`, then `combine` with the operand `forward_with` takes.
    pub fn fused(
        weight: Tensor,
        bias: Option<Tensor>,
        activation: Activation,
        combine: Combine,
        projections: impl Into<Projections>,
    ) -> Result<Self> {
        let projections = projections.into();
        let weights = match projections.backend {
            MatmulBackend::Candle if projections.int8.is_some() => return Err(int8_needs_onednn()),
            MatmulBackend::Candle => Weights::Candle(candle_nn::Linear::new(weight, None)),
            #[cfg(feature = "onednn")]
            MatmulBackend::Onednn if projections.int8.is_some() => {
                let activations = projections.int8.unwrap_or(DType::F32);
                let quantized = int8::Int8Weights::quantize(&weight)?;
                drop(weight);
                match onednn::PackedMatmul::int8(&quantized, activations, bias.as_ref(), activation, combine)? {
                    Some(packed) => Weights::Packed(packed),
                    None => Weights::Int8Widened(quantized),
                }
            }
            #[cfg(feature = "onednn")]
            MatmulBackend::Onednn => match onednn::PackedMatmul::new(&weight, bias.as_ref(), activation, combine)? {
                Some(packed) => Weights::Packed(packed),
                None => match onednn::PackedMatmul::widening(&weight, bias.as_ref(), activation, combine)? {
                    Some(packed) => Weights::Packed(packed),
                    None => Weights::Widened(weight),
                },
            },
            #[cfg(not(feature = "onednn"))]
            MatmulBackend::Onednn => unreachable!("MatmulBackend::parse refuses onednn without the feature"),
        };
        Ok(Self {
            weights,
            bias,
            activation,
            combine,
            stage: Stage::Projections,
        })
    }

    /// Charges this projection's time to `stage` instead of `Projections` (the latent block's
    /// attention is written as projections onto its constant keys and values).
    pub fn charged_to(mut self, stage: Stage) -> Self {
        self.stage = stage;
        self
    }

    /// How this projection runs, for logs and benchmarks: `candle`, the oneDNN implementation
    /// name, or `BF16 widened to f32`.
    pub fn describe(&self) -> String {
        match &self.weights {
            Weights::Candle(_) => "candle".into(),
            #[cfg(feature = "onednn")]
            Weights::Packed(packed) => packed.implementation().to_string(),
            #[cfg(feature = "onednn")]
            Weights::Widened(w) => format!("{:?} widened to f32", w.dtype()),
            #[cfg(feature = "onednn")]
            Weights::Int8Widened(_) => "int8 widened to f32".into(),
        }
    }

    /// Whether the projection runs packed on oneDNN in a native kernel with activations in
    /// `dtype` (weights in their own dtype, or int8 decompressed inside it), not with f32
    /// activations that the caller's would be converted to and from.
    pub fn runs_natively_in(&self, dtype: DType) -> bool {
        #[cfg(feature = "onednn")]
        if let Weights::Packed(packed) = &self.weights {
            return packed.dtype() == dtype;
        }
        let _ = dtype;
        false
    }

    /// `combine(activation(xs·Wᵀ + b), other)` for a projection made with a `Combine`; `other`
    /// has the output's shape.
    pub fn forward_with(&self, xs: &Tensor, other: &Tensor) -> CandleResult<Tensor> {
        profile::time(self.stage, || self.project(xs, Some(other)))
    }

    fn project(&self, xs: &Tensor, other: Option<&Tensor>) -> CandleResult<Tensor> {
        if (self.combine == Combine::None) != other.is_none() {
            return Err(candle_core::Error::Msg(format!("projection combines {:?}, given {other:?}", self.combine)));
        }
        let projected = match &self.weights {
            Weights::Candle(linear) => linear.forward(xs)?,
            #[cfg(feature = "onednn")]
            Weights::Packed(packed) => {
                // In the dtype the weights were packed for: f32 for 16-bit weights widened in
                // the kernel (the output rounded once to the model's dtype, as the native 16-bit
                // kernels round theirs).
                let into = packed.dtype();
                let rows = |t: &Tensor| -> CandleResult<Tensor> {
                    match t.dtype() == into {
                        true => as_rows(t),
                        false => profile::time(Stage::Conversions, || as_rows(&t.to_dtype(into)?)),
                    }
                };
                let other = other.map(rows).transpose()?;
                let out = packed.forward(&rows(xs)?, other.as_ref())?;
                let out = match out.dtype() == xs.dtype() {
                    true => out,
                    false => profile::time(Stage::Conversions, || out.to_dtype(xs.dtype()))?,
                };
                return out.reshape(with_width(xs, out.dim(1)?));
            }
            #[cfg(feature = "onednn")]
            Weights::Widened(weight) => {
                let (n, k) = weight.dims2()?;
                widened(xs, n, k, |dst| onednn::widen_16bit(weight, dst))?
            }
            #[cfg(feature = "onednn")]
            Weights::Int8Widened(weights) => widened(xs, weights.n, weights.k, |dst| weights.dequantize_into(dst))?,
        };
        self.finish(projected, other)
    }

    /// Bias, activation and operand by candle ops (the paths oneDNN does not fuse them into).
    fn finish(&self, projected: Tensor, other: Option<&Tensor>) -> CandleResult<Tensor> {
        profile::time(Stage::Elementwise, || {
            let mut out = match &self.bias {
                Some(bias) => projected.broadcast_add(bias)?,
                None => projected,
            };
            out = match self.activation {
                Activation::None => out,
                Activation::Silu => candle_nn::ops::silu(&out)?,
                Activation::GeluErf => out.gelu_erf()?,
            };
            match (self.combine, other) {
                (Combine::Mul, Some(other)) => out * other,
                (Combine::Add, Some(other)) => out + other,
                _ => Ok(out),
            }
        })
    }
}

/// softmax(scale · q·kᵀ + key_bias) · v, in f32: q (b, g, m, d); k, v (b or 1, g, n, d), a batch
/// of 1 shared by every row; key_bias (b, 1, 1, n) or none. On the oneDNN backend the scale and
/// the bias are fused into the first product and the softmax is oneDNN's.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
    scale: f64,
    backend: MatmulBackend,
) -> CandleResult<Tensor> {
    #[cfg(feature = "onednn")]
    if backend == MatmulBackend::Onednn && [q, k, v].iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu()) {
        let bias = match key_bias {
            Some(bias) => Some(bias.flatten_from(1)?.contiguous()?),
            None => None,
        };
        return onednn::attention_f32(
            &q.contiguous()?,
            &k.contiguous()?,
            &v.contiguous()?,
            bias.as_ref(),
            scale as f32,
        );
    }
    #[cfg(not(feature = "onednn"))]
    let _ = backend;
    let mut scores = (q * scale)?.broadcast_matmul(&k.t()?)?;
    if let Some(bias) = key_bias {
        scores = scores.broadcast_add(bias)?;
    }
    candle_nn::ops::softmax_last_dim(&scores)?.broadcast_matmul(v)
}

/// Softmax over the last axis: oneDNN's on the oneDNN backend for CPU tensors (computed in f32,
/// rounded once to a 16-bit dtype), candle's otherwise.
pub fn softmax_last_dim(xs: &Tensor, backend: MatmulBackend) -> CandleResult<Tensor> {
    #[cfg(feature = "onednn")]
    if backend == MatmulBackend::Onednn && xs.device().is_cpu() {
        return onednn::softmax_last_dim(&xs.contiguous()?);
    }
    #[cfg(not(feature = "onednn"))]
    let _ = backend;
    candle_nn::ops::softmax_last_dim(xs)
}

/// `xs.to_dtype(dtype)?.contiguous()` for any strided view (slices, transposes): one oneDNN
/// reorder pass on the oneDNN backend for CPU tensors where oneDNN has a JIT kernel for the
/// conversion (not for bf16 on AVX2-only CPUs, nor for f16, whose reference kernel is slower than
/// candle's), candle's conversion and copy otherwise.
pub fn contiguous_as(xs: &Tensor, dtype: DType, backend: MatmulBackend) -> CandleResult<Tensor> {
    if xs.dtype() == dtype && xs.is_contiguous() {
        return Ok(xs.clone());
    }
    #[cfg(feature = "onednn")]
    if backend == MatmulBackend::Onednn
        && xs.device().is_cpu()
        && xs.rank() <= onednn::MAX_DIMS
        && onednn::reorder_implementation(xs.dtype(), dtype).is_ok_and(|name| name.starts_with("jit"))
    {
        return onednn::contiguous_as(xs, dtype);
    }
    #[cfg(not(feature = "onednn"))]
    let _ = backend;
    xs.to_dtype(dtype)?.contiguous()
}

/// `xs` times weights (n, k) that `widen` writes in f32, in f32, back in `xs`'s dtype and shape.
#[cfg(feature = "onednn")]
fn widened(
    xs: &Tensor,
    n: usize,
    k: usize,
    widen: impl FnOnce(&mut [f32]) -> CandleResult<()>,
) -> CandleResult<Tensor> {
    let x = profile::time(Stage::Conversions, || as_rows(&xs.to_dtype(DType::F32)?))?;
    let y = onednn::widened_forward(&x, n, k, widen)?;
    profile::time(Stage::Conversions, || y.to_dtype(xs.dtype())?.reshape(with_width(xs, n)))
}

/// `t` as contiguous (rows, last dimension).
#[cfg(feature = "onednn")]
fn as_rows(t: &Tensor) -> CandleResult<Tensor> {
    let width = t.dims().last().copied().unwrap_or(1).max(1);
    t.reshape((t.elem_count() / width, width))?.contiguous()
}

/// `t`'s shape with its last dimension replaced by `width`.
#[cfg(feature = "onednn")]
fn with_width(t: &Tensor, width: usize) -> Vec<usize> {
    let mut dims = t.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = width;
    }
    dims
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> CandleResult<Tensor> {
        profile::time(self.stage, || self.project(xs, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_by_name_and_unknown_ones_are_named_in_the_error() {
        assert_eq!(MatmulBackend::parse("candle", &Device::Cpu).unwrap(), MatmulBackend::Candle);
        #[cfg(feature = "onednn")]
        assert_eq!(MatmulBackend::parse("onednn", &Device::Cpu).unwrap(), MatmulBackend::Onednn);
        let err = MatmulBackend::parse("mkl", &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("\"mkl\"") && err.contains(MATMUL_ENV) && err.contains("candle or onednn"), "{err}");
    }

    /// Strided views copied and converted, and softmax, equal candle's on every backend.
    #[test]
    fn layout_copies_and_softmax_match_candles() -> CandleResult<()> {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 7, 6, 5), &dev)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> CandleResult<f32> {
            (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()
        };
        for backend in [MatmulBackend::Candle, MatmulBackend::for_device(&dev).unwrap()] {
            for (from, to) in [
                (DType::F32, DType::BF16),
                (DType::BF16, DType::F32),
                (DType::F16, DType::F16),
            ] {
                // A slice of heads, transposed: what attention reads out of a projection.
                let view = xs.to_dtype(from)?.narrow(2, 1, 3)?.transpose(1, 2)?;
                let copied = contiguous_as(&view, to, backend)?;
                assert!(copied.is_contiguous() && copied.dtype() == to && copied.dims() == [2, 3, 7, 5]);
                assert_eq!(max_diff(&copied, &view.to_dtype(to)?)?, 0.0, "{backend:?} {from:?} -> {to:?}");
            }
            let softmax = softmax_last_dim(&xs, backend)?;
            assert!(max_diff(&softmax, &candle_nn::ops::softmax_last_dim(&xs)?)? < 1e-6, "{backend:?}");
        }
        Ok(())
    }

    /// Mis-shaped inputs, operands and biases are errors on every path, never reads past a buffer.
    #[test]
    fn mis_shaped_arguments_are_errors() -> CandleResult<()> {
        let dev = Device::Cpu;
        for backend in [MatmulBackend::Candle, MatmulBackend::for_device(&dev).unwrap()] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let w = Tensor::zeros((48, 40), dtype, &dev)?;
                let linear = Linear::fused(w.clone(), None, Activation::None, Combine::Add, backend).unwrap();
                let narrow = Tensor::zeros((2, 30), dtype, &dev)?;
                let other = Tensor::zeros((2, 48), dtype, &dev)?;
                assert!(linear.forward_with(&narrow, &other).is_err(), "{backend:?} {dtype:?} input");
                let x = Tensor::zeros((2, 40), dtype, &dev)?;
                let short = Tensor::zeros((2, 47), dtype, &dev)?;
                assert!(linear.forward_with(&x, &short).is_err(), "{backend:?} {dtype:?} operand");
                assert!(linear.forward(&x).is_err(), "{backend:?} {dtype:?} missing operand");
                if backend == MatmulBackend::Onednn {
                    let bias = Some(Tensor::zeros(47, dtype, &dev)?);
                    assert!(Linear::fused(w, bias, Activation::None, Combine::None, backend).is_err());
                }
            }
        }
        Ok(())
    }

    /// Fused and unfused projections agree, on whichever path this CPU takes per dtype and
    /// width (on a CPU without native 16-bit kernels, oneDNN widens 16-bit weights inside its
    /// AVX2 kernels only for a multiple of 8 outputs: 44 takes the buffered widening).
    #[test]
    fn fused_activation_and_operand_match_candle_ops() -> CandleResult<()> {
        let dev = Device::Cpu;
        let max_abs = |t: &Tensor| t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>();
        for backend in [MatmulBackend::Candle, MatmulBackend::for_device(&dev).unwrap()] {
            for (dtype, outputs) in [(DType::F32, 48), (DType::BF16, 48), (DType::BF16, 44), (DType::F16, 48)] {
                // Inputs exactly representable in `dtype`, so that only the computation's own
                // rounding separates the paths: f32 accumulation, one rounding of the output in
                // bf16 (two where candle ops round the activation first).
                let input = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &dev)?.to_dtype(dtype);
                let (w, b) = (input(&[outputs, 40], 0.5)?, input(&[outputs], 0.5)?);
                let (x, other) = (input(&[2, 7, 40], 1.0)?, input(&[2, 7, outputs], 1.0)?);
                let f32s = |t: &Tensor| t.to_dtype(DType::F32);
                let plain = f32s(&x)?.broadcast_matmul(&f32s(&w)?.t()?)?.broadcast_add(&f32s(&b)?)?;
                let relative = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
                let cases = [
                    (Activation::Silu, Combine::Mul, (candle_nn::ops::silu(&plain)? * f32s(&other)?)?),
                    (Activation::GeluErf, Combine::Add, (plain.gelu_erf()? + f32s(&other)?)?),
                    (Activation::None, Combine::None, plain.clone()),
                ];
                for (activation, combine, want) in cases {
                    let linear = Linear::fused(w.clone(), Some(b.clone()), activation, combine, backend).unwrap();
                    let got = match combine {
                        Combine::None => linear.forward(&x)?,
                        _ => linear.forward_with(&x, &other)?,
                    };
                    assert_eq!((got.dims(), got.dtype()), (want.dims(), dtype));
                    let diff = max_abs(&(f32s(&got)? - &want)?)?;
                    let bound = relative * max_abs(&want)?;
                    let path = linear.describe();
                    assert!(diff <= bound, "{path} {dtype:?} ×{outputs} {activation:?} {combine:?}: {diff} > {bound}");
                }
            }
        }
        Ok(())
    }
}
