//! The GPU check (`scripts/gpu-check.sh` runs it on a machine with a GPU and nothing else):
//! the fixture's goldens on the device in f32 / bf16 / f16, then random checkpoints of the medium
//! shape and of NV-Embed-v2's own shape made there, each timed on 16 × 128- and 64 × 512-token
//! passage batches and a single 30-token query. Prints one Markdown table.
//!
//! Built with `--features cuda` for the GPU; runs on the CPU too (`--device cpu`), which is how
//! it is tested where there is no GPU.

#[path = "../tests/common/mod.rs"]
mod common;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use nvembed_engine::random_checkpoint::Shape;
use nvembed_engine::{
    dtype_name, DType, Device, EmbedOptions, Embedder, MatmulBackend, ModelSource, PASSAGE_INSTRUCTION,
    QUERY_INSTRUCTION,
};

/// Passage batches timed per shape: (rows, tokens per row).
const BATCHES: [(usize, usize); 2] = [(16, 128), (64, 512)];
const QUERY_TOKENS: usize = 30;

#[derive(Parser)]
struct Args {
    /// The nvembed-tiny-a fixture (goldens and the real tokenizer).
    #[arg(long)]
    fixture: PathBuf,
    /// `cuda` (device 0) or `cpu`.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Shapes to make and time: `medium`, `nv-embed-v2`.
    #[arg(long, value_delimiter = ',', default_value = "medium,nv-embed-v2")]
    shapes: Vec<String>,
    /// Dtype of the random checkpoints.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Where the random checkpoints are written (~15 GB for NV-Embed-v2's shape in 16 bits).
    #[arg(long, default_value = "/tmp/nvembed-gpu-check")]
    work: PathBuf,
}

/// Runs `f`, turning a failed assertion into its message (the table reports it, the run goes on).
fn checked<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

fn seconds(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

/// One row per golden dtype: worst difference (f32) or cosine (16-bit) on the device.
fn golden_rows(device: &Device) -> Vec<String> {
    [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .map(|dtype| {
            let result = checked(|| {
                let backend = MatmulBackend::for_device(device).expect("backend");
                let embedder = common::load_on(dtype, device, backend);
                if dtype == DType::F32 {
                    format!("worst max abs diff {:.2e} (≤ 1e-5)", common::f32_golden_diff(&embedder))
                } else {
                    format!("worst cosine {:.6} (≥ 0.999)", common::worst_golden_cosine(&embedder))
                }
            });
            let cell = result.unwrap_or_else(|e| format!("FAILED: {}", e.lines().next().unwrap_or("")));
            format!("| goldens | {} | {cell} |", dtype_name(dtype))
        })
        .collect()
}

/// Makes a random checkpoint of `shape` and times it: one row.
fn shape_row(name: &str, shape: &Shape, dtype: DType, args: &Args, device: &Device) -> Result<String, String> {
    let dir = args.work.join(name);
    let made = seconds(|| {
        shape.write_in(&dir, dtype).map_err(|e| e.to_string()).unwrap();
        std::fs::copy(args.fixture.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    });
    let files = ModelSource::Dir(dir.clone()).resolve().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let embedder = Embedder::load(&files, dtype, device).map_err(|e| e.to_string())?;
    let load = start.elapsed().as_secs_f64();
    let base = "The harbour town wakes slowly on winter mornings while fishing boats rock against the stone quay and gulls argue over scraps near the lighthouse. ";
    let mut cells = Vec::new();
    for (rows, tokens) in BATCHES {
        let text = base.repeat(tokens / 20 + 1);
        let texts: Vec<String> = (0..rows).map(|i| format!("Passage {i}. {text}")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let options = EmbedOptions {
            max_length: tokens,
            batch_tokens: rows * tokens,
        };
        // The first call pays for kernel compilation and allocation: timed separately.
        embedder
            .embed(PASSAGE_INSTRUCTION, &refs[..1], &options)
            .map_err(|e| e.to_string())?;
        let s = seconds(|| {
            embedder.embed(PASSAGE_INSTRUCTION, &refs, &options).unwrap();
        });
        cells.push(format!("{:.0}", (rows * tokens) as f64 / s));
    }
    let query = format!("which harbour town wakes slowly? {}", base.repeat(3));
    let options = EmbedOptions {
        max_length: QUERY_TOKENS,
        batch_tokens: QUERY_TOKENS,
    };
    let query_seconds = (0..5)
        .map(|_| seconds(|| drop(embedder.embed(QUERY_INSTRUCTION, &[query.as_str()], &options).unwrap())))
        .fold(f64::INFINITY, f64::min);
    drop(embedder);
    std::fs::remove_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(format!(
        "| {name} ({:.2} B params, {}) | made in {made:.0} s, loaded in {load:.1} s | {} | {} | {:.1} ms |",
        shape.parameter_count() as f64 / 1e9,
        dtype_name(dtype),
        cells[0],
        cells[1],
        1e3 * query_seconds
    ))
}

fn main() {
    let args = Args::parse();
    std::env::set_var("NVEMBED_GOLDENS_DIR", &args.fixture);
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        _ => Device::new_cuda(0).unwrap_or_else(|e| panic!("no CUDA device: {e}")),
    };
    let dtype = nvembed_engine::parse_dtype(&args.dtype).expect("dtype");
    println!("| check | dtype | result |");
    println!("|---|---|---|");
    for row in golden_rows(&device) {
        println!("{row}");
    }
    println!();
    println!("| shape | setup | 16×128 tokens/s | 64×512 tokens/s | 30-token query |");
    println!("|---|---|---|---|---|");
    for name in &args.shapes {
        let shape = match name.as_str() {
            "medium" => Shape::medium(),
            "nv-embed-v2" => Shape::nv_embed_v2(),
            other => panic!("unknown shape {other}"),
        };
        match checked(|| shape_row(name, &shape, dtype, &args, &device)) {
            Ok(Ok(row)) => println!("{row}"),
            Ok(Err(e)) | Err(e) => println!("| {name} | FAILED: {} | | | |", e.lines().next().unwrap_or("")),
        }
    }
}
