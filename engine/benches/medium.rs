//! Engine benchmark on a random checkpoint of the *medium* shape (≈188.5 M parameters, f32):
//! 16 passages of exactly 128 tokens in one batch on 2 threads, best of 3; load time; peak RSS
//! over weight bytes. Run with `cargo bench -p nvembed-engine --bench medium`.
//!
//! The checkpoint is generated once (in a child process, so its allocation does not count
//! towards the measured peak RSS) under `target/nvembed-bench/medium`.

mod bench_support;

use std::process::Command;
use std::time::Instant;

use bench_support::THREADS;

use nvembed_engine::random_checkpoint::Shape;
use nvembed_engine::{DType, Device, EmbedOptions, Embedder, ModelSource, PASSAGE_INSTRUCTION};

const PASSAGES: usize = 16;
const TOKENS_PER_PASSAGE: usize = 128;
const RUNS: usize = 3;
/// What the original PyTorch reference (MKL, oneDNN) takes for the same work on this machine.
const REFERENCE_SECONDS: f64 = 21.4;
const TARGET_SECONDS: f64 = 8.5;
const TARGET_RSS_RATIO: f64 = 1.15;

/// A `/proc/self/status` memory line (VmHWM = peak RSS, VmRSS = current), in bytes.
fn main() {
    let dir = bench_support::dir();
    if std::env::args().any(|a| a == "--generate") {
        bench_support::generate();
        return;
    }
    if !bench_support::exists() {
        eprintln!("generating the medium checkpoint in {} ...", dir.display());
        let status = Command::new(std::env::current_exe().expect("exe"))
            .arg("--generate")
            .status()
            .expect("spawn generator");
        assert!(status.success(), "checkpoint generation failed");
    }
    // Set before any compute starts a thread pool.
    std::env::set_var("RAYON_NUM_THREADS", THREADS.to_string());

    let files = ModelSource::Dir(dir.clone()).resolve().expect("resolve");
    let load_start = Instant::now();
    let embedder = Embedder::load(&files, DType::F32, &Device::Cpu).expect("load");
    let load_seconds = load_start.elapsed().as_secs_f64();
    let (rss_after_load, peak_after_load) =
        (bench_support::status_bytes("VmRSS:"), bench_support::status_bytes("VmHWM:"));

    // Long passages cut at exactly TOKENS_PER_PASSAGE tokens; all differ.
    let base = "The harbour town wakes slowly on winter mornings while fishing boats rock against the stone quay and gulls argue over scraps near the lighthouse";
    let texts: Vec<String> = (0..PASSAGES)
        .map(|i| format!("Passage {i}. {base} {base} {base} {base} {base}"))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let options = EmbedOptions {
        max_length: TOKENS_PER_PASSAGE,
        batch_tokens: PASSAGES * TOKENS_PER_PASSAGE,
    };
    let inputs = embedder
        .encoder()
        .encode(PASSAGE_INSTRUCTION, &refs, options.max_length)
        .expect("encode");
    assert!(inputs.iter().all(|e| e.ids.len() == TOKENS_PER_PASSAGE));

    let mut best = f64::INFINITY;
    for _ in 0..RUNS {
        let start = Instant::now();
        let (vectors, stats) = embedder
            .embed_with_stats(PASSAGE_INSTRUCTION, &refs, &options)
            .expect("embed");
        best = best.min(start.elapsed().as_secs_f64());
        assert_eq!((vectors.len(), stats.batches), (PASSAGES, 1));
    }
    let weight_bytes = Shape::medium().parameter_count() * DType::F32.size_in_bytes();
    let ratio = |bytes: u64| bytes as f64 / weight_bytes as f64;
    let rss_ratio = ratio(bench_support::status_bytes("VmHWM:"));

    println!("| workload | measured | target |");
    println!("|---|---|---|");
    println!(
        "| embed {PASSAGES} × {TOKENS_PER_PASSAGE} tokens, 1 batch, {THREADS} threads, best of {RUNS} | {best:.2} s | ≤ {TARGET_SECONDS} s (PyTorch reference {REFERENCE_SECONDS} s) |"
    );
    println!(
        "| peak RSS ÷ weight bytes ({:.1} MB f32) | {rss_ratio:.3} | ≤ {TARGET_RSS_RATIO} |",
        weight_bytes as f64 / 1e6
    );
    println!(
        "| RSS after load ÷ weight bytes (peak during load) | {:.3} ({:.3}) | ≤ {TARGET_RSS_RATIO} |",
        ratio(rss_after_load),
        ratio(peak_after_load)
    );
    println!("| load time | {load_seconds:.2} s | — |");
}
