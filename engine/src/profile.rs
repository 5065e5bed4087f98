//! Where a forward pass spends its time, by stage: off unless asked for (benchmarks).
//!
//! Each stage counts its own time only: a stage timed inside another (a dtype conversion inside
//! a projection) is subtracted from the outer one, so the stages add up to the timed work.
//! Candle's CPU ops and oneDNN's calls are synchronous, so wall time is each stage's cost.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Every `Linear`: the decoder's q/k/v, o, gate/up and down, the latent block's to_q,
    /// to_out and feed-forward.
    Projections,
    /// Scores, softmax and weighted sums of the decoder's self-attention.
    Attention,
    /// RMSNorm, LayerNorm and rotary embeddings, with the copy of q, k and v out of the fused
    /// projection that the embeddings are applied in (one pass on the CPU).
    NormsRope,
    /// SiLU gating and residual additions of the decoder.
    Elementwise,
    /// The latent block apart from its projections and norms: attention over the latents,
    /// GEGLU, residuals, and the masked mean.
    LatentBlock,
    /// Casts between the model dtype and f32 (attention runs in f32; widened weights).
    Conversions,
}

pub const STAGES: [Stage; 6] = [
    Stage::Projections,
    Stage::Attention,
    Stage::NormsRope,
    Stage::Elementwise,
    Stage::LatentBlock,
    Stage::Conversions,
];

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Projections => "projections",
            Stage::Attention => "attention",
            Stage::NormsRope => "norms+rope",
            Stage::Elementwise => "activations+residuals",
            Stage::LatentBlock => "latent block (non-projection)",
            Stage::Conversions => "dtype conversions",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; STAGES.len()] = [const { AtomicU64::new(0) }; STAGES.len()];

thread_local! {
    /// Time spent in stages nested inside the one running on this thread.
    static NESTED_NANOS: Cell<u64> = const { Cell::new(0) };
}

/// Turns stage timing on or off (off by default: it costs two clock reads per op).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Zeroes the counters.
pub fn reset() {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
}

/// Seconds per stage since the last reset, in `STAGES` order.
pub fn seconds() -> Vec<(Stage, f64)> {
    STAGES
        .iter()
        .map(|&s| (s, NANOS[s as usize].load(Ordering::Relaxed) as f64 * 1e-9))
        .collect()
}

/// Runs `f`, charging its time (less that of stages nested in it) to `stage`.
pub fn time<R>(stage: Stage, f: impl FnOnce() -> R) -> R {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let outer_nested = NESTED_NANOS.with(|n| n.replace(0));
    let started = Instant::now();
    let result = f();
    let total = started.elapsed().as_nanos() as u64;
    let nested = NESTED_NANOS.with(|n| n.replace(outer_nested + total));
    NANOS[stage as usize].fetch_add(total.saturating_sub(nested), Ordering::Relaxed);
    result
}
