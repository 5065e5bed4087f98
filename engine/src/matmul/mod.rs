//! The model's projections (`y = x·Wᵀ + b`) on a matmul backend chosen at load time: oneDNN on
//! the CPU, candle's own matmul on the GPU and as the CPU fallback and comparison.
//!
//! `NVEMBED_MATMUL=candle` or `=onednn` overrides the choice (read once per load); oneDNN picks
//! its kernels by the CPU it runs on, and `DNNL_MAX_CPU_ISA` (e.g. `AVX2`) makes it behave as on
//! a smaller CPU.

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
    /// otherwise 16-bit weights widened to f32 layer by layer.
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
    /// 16-bit weights (n, k) kept as loaded, widened per call; the rest by candle ops.
    #[cfg(feature = "onednn")]
    Widened(Tensor),
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
    /// `weight` (out, in) as stored by PyTorch; `bias` (out). The weight tensor is consumed: on
    /// the oneDNN path it is reordered and dropped, so no second copy stays in memory.
    pub fn new(weight: Tensor, bias: Option<Tensor>, backend: MatmulBackend) -> Result<Self> {
        Self::fused(weight, bias, Activation::None, Combine::None, backend)
    }

    /// As `new`, followed by `activation`, then `combine` with the operand `forward_with` takes.
    pub fn fused(
        weight: Tensor,
        bias: Option<Tensor>,
        activation: Activation,
        combine: Combine,
        backend: MatmulBackend,
    ) -> Result<Self> {
        let weights = match backend {
            MatmulBackend::Candle => Weights::Candle(candle_nn::Linear::new(weight, None)),
            #[cfg(feature = "onednn")]
            MatmulBackend::Onednn => match onednn::PackedMatmul::new(&weight, bias.as_ref(), activation, combine)? {
                Some(packed) => Weights::Packed(packed),
                None => Weights::Widened(weight),
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
        }
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
        let dims = xs.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let rows = xs.elem_count() / k.max(1);
        let out_shape = |n: usize| {
            let mut shape = dims.clone();
            if let Some(last) = shape.last_mut() {
                *last = n;
            }
            shape
        };
        let projected = match &self.weights {
            Weights::Candle(linear) => linear.forward(xs)?,
            #[cfg(feature = "onednn")]
            Weights::Packed(packed) => {
                let x = xs.reshape((rows, k))?.contiguous()?;
                let other = other
                    .map(|o| o.reshape((rows, o.elem_count() / rows.max(1)))?.contiguous())
                    .transpose()?;
                let out = packed.forward(&x, other.as_ref())?;
                return out.reshape(out_shape(out.dim(1)?));
            }
            #[cfg(feature = "onednn")]
            Weights::Widened(weight) => {
                let x =
                    profile::time(Stage::Conversions, || xs.reshape((rows, k))?.to_dtype(DType::F32)?.contiguous())?;
                let y = onednn::widened_forward(&x, weight)?;
                profile::time(Stage::Conversions, || y.to_dtype(xs.dtype())?.reshape(out_shape(y.dim(1)?)))?
            }
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

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> CandleResult<Tensor> {
        profile::time(self.stage, || self.project(xs, None))
    }
}
