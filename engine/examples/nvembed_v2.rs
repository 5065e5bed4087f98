//! NV-Embed-v2 retrieval demo, after the model card: embeds two queries and two passages and
//! prints 100 × the query·passage scores. With `--prompt`, prints that text's embedding.
//!
//! ```text
//! cargo run --example nvembed_v2 --release
//! cargo run --example nvembed_v2 --release -- --prompt "Here is a test sentence"
//! cargo run --example nvembed_v2 --release -- --model-dir path/to/checkpoint
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nvembed_engine::{
    choose_dtype, Device, EmbedOptions, Embedder, ModelFiles, ModelSource, DEFAULT_BATCH_TOKENS, DEFAULT_HUB_MODEL,
    DEFAULT_DTYPE, DEFAULT_MAX_LENGTH, PASSAGE_INSTRUCTION, QUERY_INSTRUCTION,
};

#[derive(Parser)]
struct Args {
    /// Embed this text (passage style) and print its embedding instead of the retrieval demo.
    #[arg(long)]
    prompt: Option<String>,
    /// Hub repository to fetch when no local files are given.
    #[arg(long, default_value = DEFAULT_HUB_MODEL)]
    model_id: String,
    /// A local checkpoint directory (config.json, tokenizer.json, safetensors).
    #[arg(long, conflicts_with_all = ["model_files", "model_id"])]
    model_dir: Option<PathBuf>,
    /// Comma-separated safetensors files.
    #[arg(long, value_delimiter = ',', requires = "tokenizer")]
    model_files: Option<Vec<PathBuf>>,
    /// tokenizer.json to use with --model-files.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// config.json (default: beside the first model file).
    #[arg(long)]
    config: Option<PathBuf>,
    /// `auto` (the checkpoint's own), `f32`, `f16`, `bf16`, or `int8` (weight-only, quantized at
    /// load; CPU).
    #[arg(long, default_value = DEFAULT_DTYPE)]
    dtype: String,
    #[arg(long, default_value_t = DEFAULT_MAX_LENGTH)]
    max_length: usize,
}

const QUERIES: [&str; 2] = [
    "are judo throws allowed in wrestling?",
    "how to become a radiology technician in michigan?",
];
const PASSAGES: [&str; 2] = [
    "Since you're reading this, you are probably someone from a judo background or someone who is just wondering how judo techniques can be applied under wrestling rules. So without further ado, let's get to the question. Are Judo throws allowed in wrestling? Yes, judo throws are allowed in freestyle and folkstyle wrestling. You only need to be careful to follow the slam rules when executing judo throws. In wrestling, a slam is lifting and returning an opponent to the mat with unnecessary force.",
    "Below are the basic steps to becoming a radiologic technologist in Michigan:Earn a high school diploma. As with most careers in health care, a high school education is the first step to finding entry-level employment. Taking classes in math and science, such as anatomy, biology, chemistry, physiology, and physics, can help prepare students for their college studies and future careers.Earn an associate degree. Entry-level radiologic positions typically require at least an Associate of Applied Science. Before enrolling in one of these degree programs, students should make sure it has been properly accredited by the Joint Review Committee on Education in Radiologic Technology (JRCERT).Get licensed or certified in the state of Michigan.",
];

fn model_files(args: &Args) -> Result<ModelFiles, String> {
    if let Some(weights) = &args.model_files {
        let config = match &args.config {
            Some(config) => config.clone(),
            None => weights[0].with_file_name("config.json"),
        };
        let tokenizer = args.tokenizer.clone().expect("clap requires --tokenizer with --model-files");
        return Ok(ModelFiles {
            config,
            tokenizer,
            weights: weights.clone(),
        });
    }
    if let Some(dir) = &args.model_dir {
        return ModelSource::Dir(dir.clone()).resolve().map_err(|e| e.to_string());
    }
    ModelSource::parse(&args.model_id).and_then(|source| source.resolve()).map_err(|e| {
        format!(
            "cannot fetch {} from the Hugging Face hub ({e}); for local files pass --model-dir DIR, \
             or --model-files a.safetensors,b.safetensors --tokenizer tokenizer.json [--config config.json]",
            args.model_id
        )
    })
}

fn run(args: Args) -> Result<(), String> {
    let files = model_files(&args)?;
    let dtype = choose_dtype(&args.dtype, &files).map_err(|e| e.to_string())?;
    let embedder = Embedder::load(&files, dtype, &Device::Cpu).map_err(|e| e.to_string())?;
    let options = EmbedOptions {
        max_length: args.max_length,
        batch_tokens: DEFAULT_BATCH_TOKENS,
    };
    let as_tensor = |texts: &[&str], instruction: &str| -> Result<candle_core::Tensor, String> {
        let vectors = embedder.embed(instruction, texts, &options).map_err(|e| e.to_string())?;
        let dim = embedder.embedding_dim();
        let flat: Vec<f32> = vectors.into_iter().flatten().collect();
        candle_core::Tensor::from_vec(flat, (texts.len(), dim), &Device::Cpu).map_err(|e| e.to_string())
    };
    if let Some(prompt) = &args.prompt {
        let embedding = as_tensor(&[prompt.as_str()], PASSAGE_INSTRUCTION)?;
        println!("{embedding}");
        return Ok(());
    }
    let queries = as_tensor(&QUERIES, QUERY_INSTRUCTION)?;
    let passages = as_tensor(&PASSAGES, PASSAGE_INSTRUCTION)?;
    let scores = (queries.matmul(&passages.t().map_err(|e| e.to_string())?).map_err(|e| e.to_string())? * 100.0)
        .map_err(|e| e.to_string())?;
    println!("scores: {scores}");
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
