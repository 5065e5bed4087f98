//! The model's projections (`y = x·Wᵀ + b`) on a matmul backend chosen at load time: oneDNN on
//! the CPU, candle's own matmul on the GPU and as the CPU fallback and comparison.
//!
//! `NVEMBED_MATMUL=candle` or `=onednn` overrides the choice (read once per load); oneDNN picks
//! its kernels by the CPU it runs on, and `DNNL_MAX_CPU_ISA` (e.g. `AVX2`) makes it behave as on
//! a smaller CPU.

#[cfg(feature = "onednn")]
mod onednn;

use candle_core::{DType, Device, Module, Result as CandleResult, Tensor, D};

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

enum Weights {
    Candle(candle_nn::Linear),
    #[cfg(feature = "onednn")]
    Packed(onednn::PackedMatmul),
    /// 16-bit weights (n, k) kept as loaded, widened per call.
    #[cfg(feature = "onednn")]
    Widened(Tensor),
}

/// One projection, with its weights in the backend's layout.
pub struct Linear {
    weights: Weights,
    bias: Option<Tensor>,
    /// The profile stage its time is charged to.
    stage: Stage,
}

impl Linear {
    /// `weight` (out, in) as stored by PyTorch; `bias` (out). The weight tensor is consumed: on
    /// the oneDNN path it is reordered and dropped, so no second copy stays in memory.
    pub fn new(weight: Tensor, bias: Option<Tensor>, backend: MatmulBackend) -> Result<Self> {
        // candle's Linear adds its own bias; the oneDNN paths add it after the matmul.
        let (weights, bias) = match backend {
            MatmulBackend::Candle => (Weights::Candle(candle_nn::Linear::new(weight, bias)), None),
            #[cfg(feature = "onednn")]
            MatmulBackend::Onednn => match onednn::PackedMatmul::new(&weight)? {
                Some(packed) => (Weights::Packed(packed), bias),
                None => (Weights::Widened(weight), bias),
            },
            #[cfg(not(feature = "onednn"))]
            MatmulBackend::Onednn => unreachable!("MatmulBackend::parse refuses onednn without the feature"),
        };
        Ok(Self {
            weights,
            bias,
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

    fn project(&self, xs: &Tensor) -> CandleResult<Tensor> {
        let dims = xs.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let rows = xs.elem_count() / k.max(1);
        let flat = || xs.reshape((rows, k))?.contiguous();
        let out = match &self.weights {
            Weights::Candle(linear) => return linear.forward(xs),
            #[cfg(feature = "onednn")]
            Weights::Packed(packed) => packed.forward(&flat()?)?,
            #[cfg(feature = "onednn")]
            Weights::Widened(weight) => {
                let x =
                    profile::time(Stage::Conversions, || xs.reshape((rows, k))?.to_dtype(DType::F32)?.contiguous())?;
                let y = onednn::widened_forward(&x, weight)?;
                profile::time(Stage::Conversions, || y.to_dtype(xs.dtype()))?
            }
        };
        let mut shape = dims;
        if let Some(last) = shape.last_mut() {
            *last = out.dim(D::Minus1)?;
        }
        let out = out.reshape(shape)?;
        match &self.bias {
            Some(bias) => out.broadcast_add(bias),
            None => Ok(out),
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> CandleResult<Tensor> {
        profile::time(self.stage, || self.project(xs))
    }
}
