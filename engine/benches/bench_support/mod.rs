//! Shared by the benchmarks: the random checkpoint of the *medium* shape (≈188.5 M parameters),
//! generated once under `target/nvembed-bench/medium` with the fixture's real tokenizer, this
//! process' memory figures, the CPU's description, best-of timing and oneDNN's GEMM rate at a
//! model's shapes. Each benchmark uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{Module, Tensor};
use nvembed_engine::matmul::{Linear, Projections};
use nvembed_engine::random_checkpoint::Shape;
use nvembed_engine::{DType, Device, MatmulBackend, ModelDtype};

/// Threads every benchmark computes on: the cores of the machines these were first run on, so
/// that runs on bigger machines compare.
pub const THREADS: usize = 2;

/// Whether the configuration `name` (a dtype, a backend, `@` an ISA cap: `bf16`, `bf16@AVX2`,
/// `f32/candle`) is among those the environment variable `var` lists, comma-separated; every
/// configuration when it is unset.
pub fn selected(var: &str, name: &str) -> bool {
    std::env::var(var).map_or(true, |only| only.split(',').any(|o| o.trim() == name))
}

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/nvembed-bench/medium")
}

pub fn exists() -> bool {
    dir().join("model.safetensors").is_file() && dir().join("tokenizer.json").is_file()
}

pub fn generate() {
    Shape::medium().write(&dir()).expect("write medium checkpoint");
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nvembed-tiny-a/tokenizer.json");
    std::fs::copy(tokenizer, dir().join("tokenizer.json")).expect("copy tokenizer");
}

/// A `/proc/self/status` memory line (VmHWM = peak RSS, VmRSS = current), in bytes.
pub fn status_bytes(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The shortest of `runs` timed runs of `f`, after one untimed.
pub fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}


/// The decoder's four projections, (out, in), as a layer runs them (gate and up as one).
pub fn decoder_products(shape: &Shape) -> Vec<(usize, usize)> {
    let h = shape.hidden_size;
    let hd = h / shape.num_attention_heads;
    let qkv = (shape.num_attention_heads + 2 * shape.num_key_value_heads) * hd;
    vec![
        (qkv, h),
        (h, shape.num_attention_heads * hd),
        (2 * shape.intermediate_size, h),
        (h, shape.intermediate_size),
    ]
}

/// oneDNN's GEMM rate (GFLOP/s) with activations in `dtype` (and int8 weights if `int8`) at
/// `rows` rows over `products` (out, in), FLOP-weighted, best of `runs`. With `copies` = 1 each product is repeated on the same weights, which stay in cache
/// where they fit (the medium checkpoint's do; none of NV-Embed-v2's does); with `copies` = the
/// layer count every layer has weights of its own, read from memory once per round as a pass
/// reads them (what bounds a few-row pass such as one query).
pub fn gemm_rate(products: &[(usize, usize)], copies: usize, dtype: DType, int8: bool, rows: usize, runs: usize) -> f64 {
    let projections = Projections {
        backend: MatmulBackend::Onednn,
        int8: int8.then_some(dtype),
    };
    let mut products_run = Vec::new();
    let mut flops = 0.0;
    for _ in 0..copies {
        for &(n, k) in products {
            let weight = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu)
                .and_then(|w| w.to_dtype(dtype))
                .expect("weight");
            let linear = Linear::new(weight, None, projections).expect("oneDNN linear");
            let xs = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu)
                .and_then(|x| x.to_dtype(dtype))
                .expect("input");
            products_run.push((linear, xs));
            flops += 2.0 * (rows * n * k) as f64;
        }
    }
    let seconds: f64 = if copies == 1 {
        products_run.iter()
            .map(|(linear, xs)| {
                best_of(runs, || {
                    linear.forward(xs).expect("gemm");
                })
            })
            .sum()
    } else {
        best_of(runs, || {
            for (linear, xs) in &products_run {
                linear.forward(xs).expect("gemm");
            }
        })
    };
    flops / seconds / 1e9
}


/// `lscpu`'s model name, CPU count and vector flags.
pub fn cpu() -> String {
    let out = Command::new("lscpu")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let field = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map_or("", |(_, v)| v.trim())
            .to_string()
    };
    let flags: Vec<String> = field("Flags:")
        .split_whitespace()
        .filter(|f| f.starts_with("avx") || f.starts_with("amx") || *f == "f16c" || *f == "fma")
        .map(str::to_string)
        .collect();
    format!("{} ({} CPUs); flags: {}", field("Model name:"), field("CPU(s):"), flags.join(" "))
}


/// Bytes a model of `shape` holds in `precision` (activations in `activations`): int8 holds every
/// projection weight as one byte plus an f32 scale per output; the rest (embeddings, norms,
/// latents, biases) is in the activations' dtype. The latent block's to_kv weight is used once at
/// load and dropped; its per-head keys and values are held instead.
pub fn weight_bytes(shape: &Shape, precision: ModelDtype, activations: DType) -> f64 {
    let quantized = |name: &str| {
        ["_proj.weight", "to_q.weight", "to_out.weight", "net.0.weight", "net.2.weight"]
            .iter()
            .any(|end| name.ends_with(end))
    };
    let latent_keys_values = 2 * shape.num_latents * shape.num_cross_heads * shape.cross_dim_head;
    shape
        .tensor_shapes()
        .iter()
        .map(|(name, dims)| {
            let count: usize = dims.iter().product();
            match precision {
                _ if name.ends_with("to_kv.weight") => (latent_keys_values * activations.size_in_bytes()) as f64,
                ModelDtype::Int8 if quantized(name) => (count + 4 * dims[0]) as f64,
                _ => (count * activations.size_in_bytes()) as f64,
            }
        })
        .sum()
}
