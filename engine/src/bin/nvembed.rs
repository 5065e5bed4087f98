//! `nvembed embed`: JSON Lines of texts on stdin, one JSON array of floats per line on stdout.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use clap::{ArgGroup, Parser, Subcommand};
use nvembed_engine::{
    choose_dtype, task_instruction, Device, EmbedOptions, Embedder, ModelSource, DEFAULT_BATCH_TOKENS,
    DEFAULT_DTYPE, DEFAULT_HUB_MODEL, DEFAULT_MAX_LENGTH, PASSAGE_INSTRUCTION, QUERY_INSTRUCTION,
};

/// Texts embedded between two writes to stdout: output streams out while a long run goes on.
const TEXTS_PER_CHUNK: usize = 256;

#[derive(Parser)]
#[command(name = "nvembed", version, about = "NV-Embed-v2 text embeddings on the command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read JSON strings, one per line, on stdin; write one embedding (JSON array) per line.
    #[command(group(ArgGroup::new("kind").required(true).args(["query", "passage", "instruction", "task"])))]
    Embed {
        /// Model directory or Hugging Face hub id.
        #[arg(long, default_value = DEFAULT_HUB_MODEL)]
        model: String,
        /// Embed as retrieval queries (the standard query instruction).
        #[arg(long)]
        query: bool,
        /// Embed as passages (no instruction).
        #[arg(long)]
        passage: bool,
        /// Use this exact instruction prefix.
        #[arg(long)]
        instruction: Option<String>,
        /// Use the query instruction for a custom task: "Instruct: {task}\nQuery: ".
        #[arg(long)]
        task: Option<String>,
        #[arg(long, default_value_t = DEFAULT_MAX_LENGTH)]
        max_length: usize,
        /// `auto` (the checkpoint's own), `f32`, `f16`, `bf16`, or `int8` (weight-only, quantized at
        /// load; CPU).
        #[arg(long, default_value = DEFAULT_DTYPE)]
        dtype: String,
        /// Padded tokens per forward pass.
        #[arg(long, default_value_t = DEFAULT_BATCH_TOKENS)]
        batch_tokens: usize,
        /// Compute threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("nvembed: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Parses every line before any compute, so a bad line fails the run with nothing printed.
fn read_texts(input: impl BufRead) -> Result<Vec<String>, String> {
    input
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let line = line.map_err(|e| format!("line {}: {e}", i + 1))?;
            serde_json::from_str::<String>(&line)
                .map_err(|e| format!("line {}: expected a JSON string ({e})", i + 1))
        })
        .collect()
}

fn set_threads(threads: Option<usize>) -> Result<(), String> {
    threads.map_or(Ok(()), nvembed_engine::set_compute_threads).map_err(|e| e.to_string())
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Embed {
            model,
            query,
            passage,
            instruction,
            task,
            max_length,
            dtype,
            batch_tokens,
            threads,
        } => {
            set_threads(threads)?;
            let instruction = match (query, passage, instruction, task) {
                (true, ..) => QUERY_INSTRUCTION.to_string(),
                (_, true, ..) => PASSAGE_INSTRUCTION.to_string(),
                (_, _, Some(instruction), _) => instruction,
                (_, _, _, Some(task)) => task_instruction(&task),
                _ => unreachable!("clap requires one of --query, --passage, --instruction, --task"),
            };
            embed(&model, &instruction, &dtype, EmbedOptions { max_length, batch_tokens })
        }
    }
}

fn embed(model: &str, instruction: &str, dtype: &str, options: EmbedOptions) -> Result<(), String> {
    let texts = read_texts(std::io::stdin().lock())?;
    let files = ModelSource::parse(model).and_then(|source| source.resolve()).map_err(|e| e.to_string())?;
    let dtype = choose_dtype(dtype, &files).map_err(|e| e.to_string())?;
    let embedder = Embedder::load(&files, dtype, &Device::Cpu).map_err(|e| e.to_string())?;

    let show_progress = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    for (chunk_index, chunk) in texts.chunks(TEXTS_PER_CHUNK).enumerate() {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let vectors = embedder.embed(instruction, &refs, &options).map_err(|e| match e {
            nvembed_engine::Error::NothingToPool { index, .. } => {
                format!("line {}: {e}", chunk_index * TEXTS_PER_CHUNK + index + 1)
            }
            other => other.to_string(),
        })?;
        for vector in vectors {
            serde_json::to_writer(&mut stdout, &vector).map_err(|e| e.to_string())?;
            writeln!(stdout).map_err(|e| e.to_string())?;
        }
        stdout.flush().map_err(|e| e.to_string())?;
        if show_progress {
            let done = chunk_index * TEXTS_PER_CHUNK + chunk.len();
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
            eprint!("\rembedded {done}/{} texts ({rate:.1} texts/s)", texts.len());
        }
    }
    if show_progress {
        eprintln!();
    }
    Ok(())
}
