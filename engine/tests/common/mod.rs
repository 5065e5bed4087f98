//! Shared by the integration tests: the shipped fixture and its reference outputs.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use nvembed_engine::{DType, Device, EmbedOptions, Embedder, MatmulBackend, ModelDtype, ModelSource};
use serde_json::Value;

/// The shipped fixture; `NVEMBED_GOLDENS_DIR` points elsewhere (the GPU check runs where the
/// source tree is not).
pub fn fixture_dir() -> PathBuf {
    match std::env::var_os("NVEMBED_GOLDENS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nvembed-tiny-a"),
    }
}

pub fn goldens() -> Value {
    let text = std::fs::read_to_string(fixture_dir().join("goldens.json")).expect("goldens.json");
    serde_json::from_str(&text).expect("valid goldens.json")
}

pub fn matrix_f32(value: &Value) -> Vec<Vec<f32>> {
    value
        .as_array()
        .expect("matrix")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect()
        })
        .collect()
}

pub fn matrix_u32(value: &Value) -> Vec<Vec<u32>> {
    value
        .as_array()
        .expect("matrix")
        .iter()
        .map(|row| {
            row.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_u64().expect("int") as u32)
                .collect()
        })
        .collect()
}

pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row count");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row width");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// A copy of the fixture in a fresh temporary directory, to break or rearrange.
pub fn fixture_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(fixture_dir()).expect("fixture dir") {
        let entry = entry.expect("entry");
        let target = dir.path().join(entry.file_name());
        std::fs::copy(entry.path(), &target).expect("copy");
        let mut perms = std::fs::metadata(&target).expect("meta").permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&target, perms).expect("chmod");
    }
    dir
}

pub fn load_with(dtype: impl Into<ModelDtype>, backend: MatmulBackend) -> Embedder {
    load_on(dtype, &Device::Cpu, backend)
}

pub fn load_on(dtype: impl Into<ModelDtype>, device: &Device, backend: MatmulBackend) -> Embedder {
    let files = ModelSource::Dir(fixture_dir()).resolve().expect("resolve fixture");
    Embedder::load_with(&files, dtype, device, backend).expect("load fixture")
}

pub struct Run<'a> {
    pub name: &'a str,
    pub instruction: String,
    pub texts: Vec<&'a str>,
    pub max_length: usize,
    pub value: &'a Value,
}

pub fn runs(g: &Value) -> Vec<Run<'_>> {
    g["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| Run {
            name: r["name"].as_str().expect("name"),
            instruction: g["instructions"][r["instruction"].as_str().expect("kind")]
                .as_str()
                .expect("instruction")
                .to_string(),
            texts: r["text_ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|id| g["texts"][id.as_str().expect("id")].as_str().expect("text"))
                .collect(),
            max_length: r["max_length"].as_u64().expect("max_length") as usize,
            value: r,
        })
        .collect()
}

pub fn is_nonfinite(run: &Run) -> bool {
    !run.value["nonfinite_rows"].as_array().expect("rows").is_empty()
}

/// One padded batch, as the reference ran it.
pub fn one_batch(max_length: usize) -> EmbedOptions {
    EmbedOptions {
        max_length,
        batch_tokens: usize::MAX,
    }
}

/// Checks every finite golden run in f32, as one padded batch and split into small batches:
/// each within 1e-5 of the reference. Returns the worst difference.
pub fn f32_golden_diff(embedder: &Embedder) -> f32 {
    let g = goldens();
    let mut worst = 0f32;
    let mut checked = 0;
    for run in runs(&g) {
        if is_nonfinite(&run) {
            continue;
        }
        let expected = matrix_f32(&run.value["embeddings"]);
        let got = embedder
            .embed(&run.instruction, &run.texts, &one_batch(run.max_length))
            .expect(run.name);
        let diff = max_abs_diff(&got, &expected);
        assert!(diff <= 1e-5, "{} ({}): max abs diff {diff}", run.name, embedder.matmul());
        // The same texts split into length-sorted batches of a few rows each.
        let split = EmbedOptions {
            max_length: run.max_length,
            batch_tokens: 64,
        };
        let got_split = embedder.embed(&run.instruction, &run.texts, &split).expect(run.name);
        assert!(max_abs_diff(&got_split, &expected) <= 1e-5, "{}: split batches", run.name);
        worst = worst.max(diff);
        checked += 1;
    }
    assert_eq!(checked, 52, "every finite run was checked");
    worst
}

/// The least cosine a 16-bit model's vectors keep against the f32 goldens.
pub const HALF_PRECISION_COSINE: f64 = 0.999;
/// The least cosine an int8-weight model's vectors keep against the f32 goldens.
pub const INT8_COSINE: f64 = 0.995;

/// Cosine of a 16-bit (or int8) embedder's vectors against the f32 goldens, on every finite run:
/// each at least `HALF_PRECISION_COSINE` (`INT8_COSINE`). Returns the worst.
pub fn worst_golden_cosine(embedder: &Embedder) -> f64 {
    let int8 = nvembed_protocol::serves_dtype(&embedder.dtype_name(), ModelDtype::Int8.name());
    let least = if int8 { INT8_COSINE } else { HALF_PRECISION_COSINE };
    let g = goldens();
    let mut worst = 1f64;
    for run in runs(&g).iter().filter(|r| !is_nonfinite(r)) {
        let expected = matrix_f32(&run.value["embeddings"]);
        let got = embedder
            .embed(&run.instruction, &run.texts, &one_batch(run.max_length))
            .unwrap();
        for (row, (a, b)) in got.iter().zip(&expected).enumerate() {
            let c = cosine(a, b);
            assert!(c >= least, "{} {} row {row}: cosine {c}", embedder.dtype_name(), run.name);
            worst = worst.min(c);
        }
    }
    worst
}

/// What oneDNN does on a smaller CPU, simulated on this one with `DNNL_MAX_CPU_ISA` (read once,
/// at oneDNN's first call, so each cap runs in its own test binary): f32 matches the goldens on
/// the capped kernels; 16-bit models, for which the capped CPU has no native kernel, run with
/// their weights widened to f32 inside oneDNN's kernels (a projection whose width those cannot
/// tile, widened into a buffer first), within the half-precision tolerance; int8 weights are
/// decompressed into f32 inside oneDNN's native kernels, within the int8 tolerance.
pub fn check_under_isa_cap(cap: &str, forbidden_kernel: &str) {
    std::env::set_var("DNNL_MAX_CPU_ISA", cap);
    let f32_model = load_with(DType::F32, MatmulBackend::Onednn);
    let kernel = f32_model.matmul();
    assert!(!kernel.contains(forbidden_kernel), "{cap}: f32 ran on {kernel}");
    let worst = f32_golden_diff(&f32_model);
    eprintln!("{cap}: f32 on {kernel}: worst max abs diff {worst:e}");
    for dtype in [DType::BF16, DType::F16] {
        let embedder = load_with(dtype, MatmulBackend::Onednn);
        let kinds = embedder.matmul();
        let in_kernel = |kind: &str| kind.ends_with("16-bit weights widened to F32 in the kernel") && !kind.contains(forbidden_kernel);
        let buffered = format!("{dtype:?} widened to f32");
        let all_widened = kinds.split("; ").all(|kind| in_kernel(kind) || kind == buffered);
        assert!(all_widened && kinds.split("; ").any(in_kernel), "{cap}: {dtype:?} ran on {kinds}");
        let worst = worst_golden_cosine(&embedder);
        eprintln!("{cap}: {dtype:?} on {kinds}: worst cosine {worst:.6}");
    }
    let int8 = load_with(ModelDtype::Int8, MatmulBackend::Onednn);
    let kernel = int8.matmul();
    assert_eq!(int8.dtype(), DType::F32, "{cap}: int8 activations");
    // Every projection on one native kernel (`; ` would separate a second way, a fallback).
    let native = kernel.ends_with("int8 weights decompressed to F32") && !kernel.contains("; ");
    assert!(native && !kernel.contains(forbidden_kernel), "{cap}: {kernel}");
    let worst = worst_golden_cosine(&int8);
    eprintln!("{cap}: int8 on {kernel}: worst cosine {worst:.6}");
}
