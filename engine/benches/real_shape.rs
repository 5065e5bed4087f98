//! NV-Embed-v2 at its real widths on this CPU: a random checkpoint with the model's exact shapes
//! (hidden 4096, 32 query and 8 key/value heads, intermediate 14,336, the 512 × 4096 latent block,
//! the real vocabulary) but `LAYERS` of its 32 decoder layers: ~3 GB in bf16, more than any CPU
//! cache, so a query reads its weights from memory as NV-Embed-v2's does. Generated on first use
//! under `target/nvembed-bench/real-width`, never committed.
//!
//! Per configuration (own process, 2 threads, load excluded): the time of one decoder layer and of
//! the latent block for a 30-token query and for 16 passages of 512 tokens, stepping the engine's
//! pass one layer at a time; from those, NV-Embed-v2 itself (32 layers) projected: query latency,
//! passages/s and memory. Beside them, in the same run, a query layer's two bounds: memory (the
//! bytes it reads ÷ the machine's measured read bandwidth) and compute (its FLOPs ÷ oneDNN's GEMM
//! rate at 30 rows, every layer's weights read once per round), and the batch's efficiency
//! (FLOPs ÷ time ÷ oneDNN's GEMM rate at the decoder's shapes and 8,192 rows). CPUs without AVX-512 BF16 are simulated with `DNNL_MAX_CPU_ISA`.
//!
//! `cargo bench -p nvembed-engine --bench real_shape` (part of `make bench`; ~15 min on 2 cores;
//! `REAL_SHAPE_ONLY=int8,bf16@AVX2` runs only the configurations named).

mod bench_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use bench_support::{best_of, cpu, decoder_products, gemm_rate, selected, weight_bytes, THREADS};
use nvembed_engine::random_checkpoint::Shape;
use nvembed_engine::{
    choose_dtype, set_compute_threads, DType, Device, EmbedOptions, Embedder, EncodedInput, MatmulBackend, ModelDtype,
    ModelSource, PASSAGE_INSTRUCTION, QUERY_INSTRUCTION,
};
use rayon::prelude::*;
use serde_json::{json, Value};

/// Decoder layers in the benchmark's checkpoint (NV-Embed-v2 has 32): with the latent block and
/// the embeddings, ~1.5 G parameters, ~3 GB in bf16.
const LAYERS: usize = 3;
const QUERY_TOKENS: usize = 30;
const PASSAGES: usize = 16;
const PASSAGE_TOKENS: usize = 512;
const QUERY_RUNS: usize = 5;
/// Bytes summed to measure the memory read bandwidth (far beyond any cache).
const READ_BYTES: usize = 1 << 30;
/// Targets: a query within 1.25× of reading its weights once; int8's query at most 0.6× bf16's;
/// the bf16 batch at 75 % of oneDNN's GEMM rate at the decoder's shapes (on AMX); peak RSS at
/// most 1.15× the weights.
const TARGET_QUERY_BOUND: f64 = 1.25;
const TARGET_INT8_QUERY: f64 = 0.6;
const TARGET_BATCH_EFFICIENCY: f64 = 0.75;
const TARGET_RSS: f64 = 1.15;
/// (dtype, DNNL_MAX_CPU_ISA, whether the 16 × 512 batch is measured too): the batch takes minutes
/// per configuration, so the simulated CPUs run the query only.
const CONFIGS: [(&str, Option<&str>, bool); 7] = [
    ("bf16", None, true),
    ("int8", None, true),
    ("f32", None, true),
    ("bf16", Some("AVX512_CORE"), false),
    ("int8", Some("AVX512_CORE"), false),
    ("bf16", Some("AVX2"), false),
    ("int8", Some("AVX2"), false),
];

fn shape() -> Shape {
    Shape {
        num_hidden_layers: LAYERS,
        ..Shape::nv_embed_v2()
    }
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/nvembed-bench/real-width")
}

fn generate() {
    let dir = dir();
    shape().write_in(&dir, DType::BF16).expect("write the real-width checkpoint");
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nvembed-tiny-a/tokenizer.json");
    std::fs::copy(tokenizer, dir.join("tokenizer.json")).expect("copy tokenizer");
}

/// Bytes one pass reads of the weights of one decoder layer and of the latent block in
/// `precision`: every projection once, and the latent block's per-head keys and values (made
/// from the latents at load, kept in the activations' dtype, or f32 where oneDNN has no native
/// kernel for it).
fn bytes_read(shape: &Shape, precision: ModelDtype, activations: DType) -> (f64, f64) {
    let per_weight = |outputs: usize, inputs: usize| match precision {
        ModelDtype::Int8 => (outputs * inputs + 4 * outputs) as f64,
        ModelDtype::Float(dtype) => (outputs * inputs * dtype.size_in_bytes()) as f64,
    };
    let layer = decoder_products(shape).iter().map(|&(n, k)| per_weight(n, k)).sum();
    let (h, inner) = (shape.hidden_size, shape.num_cross_heads * shape.cross_dim_head);
    let latent_keys_values = (2 * inner * shape.num_latents * activations.size_in_bytes()) as f64;
    let latent = per_weight(inner, h) + per_weight(h, inner) + per_weight(8 * h, h) + per_weight(h, 4 * h);
    (layer, latent + latent_keys_values)
}

/// Useful FLOPs of one decoder layer for one text of `tokens` tokens: its projections, and
/// attention's two products (4·L·hidden per token).
fn layer_flops(shape: &Shape, tokens: usize) -> f64 {
    let projections: usize = decoder_products(shape).iter().map(|&(n, k)| 2 * n * k).sum();
    (tokens * (projections + 4 * tokens * shape.hidden_size)) as f64
}

/// GB/s summing `READ_BYTES` on `THREADS` threads, best of 5.
fn read_bandwidth() -> f64 {
    let data = vec![1u64; READ_BYTES / 8];
    let seconds = best_of(5, || {
        let sum: u64 = data
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .sum();
        std::hint::black_box(sum);
    });
    READ_BYTES as f64 / seconds / 1e9
}

/// (seconds of the fastest decoder layer, seconds of the latent block and pooling) of one pass
/// over `inputs`, stepped one layer at a time; the fastest of `runs`.
fn step_times(embedder: &Embedder, inputs: &[EncodedInput], runs: usize) -> (f64, f64) {
    let members: Vec<&EncodedInput> = inputs.iter().collect();
    let mut best = (f64::INFINITY, f64::INFINITY);
    for _ in 0..runs {
        let mut pass = embedder.begin_pass(&members).expect("begin");
        let mut latent = 0.0;
        loop {
            let in_decoder = pass.in_decoder();
            let start = Instant::now();
            let more = embedder.step_pass(&mut pass).expect("step");
            let seconds = start.elapsed().as_secs_f64();
            if in_decoder {
                best.0 = best.0.min(seconds);
            } else {
                latent += seconds;
            }
            if !more {
                break;
            }
        }
        let start = Instant::now();
        embedder.finish_pass(&pass).expect("finish");
        best.1 = best.1.min(latent + start.elapsed().as_secs_f64());
    }
    best
}

/// One configuration, in this process: prints one JSON line.
fn child(dtype_name: &str, batch: bool) {
    set_compute_threads(THREADS).expect("threads");
    let files = ModelSource::Dir(dir()).resolve().expect("resolve");
    let precision = choose_dtype(dtype_name, &files).expect("dtype");
    let embedder = Embedder::load_with(&files, precision, &Device::Cpu, MatmulBackend::Onednn).expect("load");
    let (dtype, int8) = (embedder.dtype(), precision == ModelDtype::Int8);
    let shape = shape();
    let base = "The harbour town wakes slowly on winter mornings while fishing boats rock against the stone quay and gulls argue over scraps near the lighthouse";
    let long = format!("{base} ").repeat(PASSAGE_TOKENS / 20);
    let passages: Vec<String> = (0..PASSAGES).map(|i| format!("Passage {i}. {long}")).collect();
    let passages: Vec<&str> = passages.iter().map(String::as_str).collect();
    let query = format!("which harbour town wakes slowly? {base}");
    let query = embedder.encode(QUERY_INSTRUCTION, &[query.as_str()], QUERY_TOKENS).expect("encode");
    let passages = embedder.encode(PASSAGE_INSTRUCTION, &passages, PASSAGE_TOKENS).expect("encode");
    assert!(query[0].ids.len() == QUERY_TOKENS && passages.iter().all(|p| p.ids.len() == PASSAGE_TOKENS));
    // The whole pipeline once, as a user runs it, before the stepped runs.
    let options = EmbedOptions {
        max_length: QUERY_TOKENS,
        batch_tokens: QUERY_TOKENS,
    };
    embedder.embed(QUERY_INSTRUCTION, &["warm up"], &options).expect("embed");
    let (query_layer, query_latent) = step_times(&embedder, &query, QUERY_RUNS);
    let (batch_layer, batch_latent) = if batch { step_times(&embedder, &passages, 1) } else { (f64::NAN, f64::NAN) };
    // Peak RSS beyond the weights: activations, the encoded inputs, what loading holds for a
    // moment (one tensor before packing, the latent block's to_kv); it does not grow with the
    // layer count, so NV-Embed-v2's ratio is projected from it.
    let overhead = bench_support::status_bytes("VmHWM:") as f64 - weight_bytes(&shape, precision, dtype);
    let batch_rows = PASSAGES * PASSAGE_TOKENS;
    let line = json!({
        "matmul": embedder.matmul(),
        "activations": format!("{dtype:?}").to_lowercase(),
        "query_layer": query_layer,
        "query_latent": query_latent,
        "batch_layer": batch_layer,
        "batch_latent": batch_latent,
        "gemm_batch": if batch { gemm_rate(&decoder_products(&shape), 1, dtype, int8, batch_rows, 1) } else { f64::NAN },
        // A query's rows, every layer's weights read once per round as a pass reads them.
        "gemm_query": gemm_rate(&decoder_products(&shape), LAYERS, dtype, int8, QUERY_TOKENS, QUERY_RUNS),
        "rss_overhead": overhead,
    });
    println!("{line}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1], args[i + 2] == "batch");
        return;
    }
    if args.iter().any(|a| a == "--generate") {
        generate();
        return;
    }
    if !dir().join("model.safetensors").is_file() {
        eprintln!("generating the real-width checkpoint ({LAYERS} layers) in {} ...", dir().display());
        let status = Command::new(std::env::current_exe().expect("exe")).arg("--generate").status().expect("spawn");
        assert!(status.success(), "checkpoint generation failed");
    }
    rayon::ThreadPoolBuilder::new().num_threads(THREADS).build_global().expect("threads");
    let bandwidth = read_bandwidth();
    println!("CPU: {}", cpu());
    println!("Memory read bandwidth ({THREADS} threads, {} MiB summed, best of 5): {bandwidth:.1} GB/s", READ_BYTES >> 20);
    println!();
    println!("Measured on a {LAYERS}-layer checkpoint of NV-Embed-v2's exact widths; \"NV-Embed-v2\" columns = 32 × layer + latent block.");
    println!();
    println!("| dtype (activations) | matmul (oneDNN ISA cap) | query: layer | query: latent block | query layer's bounds: memory / compute | query layer ÷ larger bound | NV-Embed-v2 query | 16×512: layer | 16×512: latent block | batch efficiency vs oneDNN GEMM | NV-Embed-v2 passages/s (512 tokens) | NV-Embed-v2 weights | NV-Embed-v2 peak RSS ÷ weights |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let full = Shape::nv_embed_v2();
    let mut bf16_query = f64::NAN;
    // `REAL_SHAPE_ONLY=int8,bf16@AVX2` runs only those configurations (dtype, @ the ISA cap).
    let selected = |dtype: &str, isa: Option<&str>| {
        selected("REAL_SHAPE_ONLY", &isa.map_or(dtype.to_string(), |isa| format!("{dtype}@{isa}")))
    };
    for (dtype_name, isa, batch) in CONFIGS.into_iter().filter(|(d, i, _)| selected(d, *i)) {
        let mut command = Command::new(std::env::current_exe().expect("exe"));
        command
            .args(["--child", dtype_name, if batch { "batch" } else { "query" }])
            .env("OMP_NUM_THREADS", THREADS.to_string());
        if let Some(isa) = isa {
            command.env("DNNL_MAX_CPU_ISA", isa);
        }
        let output = command.output().expect("spawn configuration");
        let Ok(r) = serde_json::from_str::<Value>(String::from_utf8_lossy(&output.stdout).trim()) else {
            println!("| {dtype_name} | {isa:?} | failed: {} |", String::from_utf8_lossy(&output.stderr).trim());
            continue;
        };
        let f = |key: &str| r[key].as_f64().unwrap_or(f64::NAN);
        let activations = if r["activations"] == "bf16" { DType::BF16 } else { DType::F32 };
        let precision = if dtype_name == "int8" { ModelDtype::Int8 } else { ModelDtype::Float(activations) };
        let (layer_bytes, _) = bytes_read(&full, precision, activations);
        let memory_bound = layer_bytes / (bandwidth * 1e9);
        let compute_bound = layer_flops(&full, QUERY_TOKENS) / (f("gemm_query") * 1e9);
        let bound = memory_bound.max(compute_bound);
        let weights = weight_bytes(&full, precision, activations);
        let peak_rss = (weights + f("rss_overhead")) / weights;
        let query = full.num_hidden_layers as f64 * f("query_layer") + f("query_latent");
        let passages = PASSAGES as f64 / (full.num_hidden_layers as f64 * f("batch_layer") + f("batch_latent"));
        let efficiency = layer_flops(&full, PASSAGE_TOKENS) * PASSAGES as f64 / f("batch_layer") / 1e9 / f("gemm_batch");
        let native = isa.is_none();
        if native && dtype_name == "bf16" {
            bf16_query = query;
        }
        let mut notes = Vec::new();
        if f("query_layer") / memory_bound > TARGET_QUERY_BOUND {
            let bound_by = if compute_bound > memory_bound { "compute-bound on this CPU" } else { "slow" };
            notes.push(format!("query over {TARGET_QUERY_BOUND}× its memory bound ({bound_by})"));
        }
        if native && dtype_name == "int8" && query / bf16_query > TARGET_INT8_QUERY {
            notes.push(format!("int8 query {:.2}× bf16's (target ≤ {TARGET_INT8_QUERY})", query / bf16_query));
        }
        if native && dtype_name == "bf16" && efficiency < TARGET_BATCH_EFFICIENCY {
            notes.push(format!("batch under {:.0}% of GEMM", 100.0 * TARGET_BATCH_EFFICIENCY));
        }
        if peak_rss > TARGET_RSS {
            notes.push(format!("RSS over {TARGET_RSS}×"));
        }
        let ms = |s: f64| if s.is_nan() { "–".to_string() } else { format!("{:.0} ms", 1e3 * s) };
        println!(
            "| {dtype_name} ({}) | {}{} | {} | {} | {:.0} ms / {:.0} ms | {:.2}× | {:.2} s | {} | {} | {} | {} | {:.1} GB | {:.3} |{}",
            r["activations"].as_str().unwrap_or("?"),
            r["matmul"].as_str().unwrap_or("?"),
            isa.map_or(String::new(), |i| format!(" (cap {i})")),
            ms(f("query_layer")),
            ms(f("query_latent")),
            1e3 * memory_bound,
            1e3 * compute_bound,
            f("query_layer") / bound,
            query,
            ms(f("batch_layer")),
            ms(f("batch_latent")),
            if efficiency.is_nan() { "–".into() } else { format!("{:.0}% ({:.0} GFLOP/s)", 100.0 * efficiency, f("gemm_batch")) },
            if passages.is_nan() { "–".into() } else { format!("{passages:.3}") },
            weights / 1e9,
            peak_rss,
            if notes.is_empty() { String::new() } else { format!(" {}", notes.join("; ")) },
        );
    }
}
