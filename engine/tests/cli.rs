//! The `nvembed` CLI and the `nvembed_v2` example, run as the user runs them.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::*;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nvembed"))
}

/// `cargo test` builds the examples beside the binaries.
fn example() -> Command {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_nvembed"));
    let path = bin.parent().unwrap().join("examples/nvembed_v2");
    assert!(path.is_file(), "example not built at {}", path.display());
    Command::new(path)
}

fn run_with_stdin(mut command: Command, stdin: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The process may exit (bad arguments) before reading its input.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn parse_vectors(stdout: &[u8]) -> Vec<Vec<f32>> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn embeddings_of(run_name: &str) -> Vec<Vec<f32>> {
    let g = goldens();
    let run = g["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == run_name)
        .unwrap();
    matrix_f32(&run["embeddings"])
}

#[test]
fn cli_embeds_queries_and_passages_in_input_order() {
    let g = goldens();
    let texts: Vec<&str> = ["card_query_0", "card_query_1"]
        .iter()
        .map(|id| g["texts"][id].as_str().unwrap())
        .collect();
    let stdin: String = texts.iter().map(|t| serde_json::to_string(t).unwrap() + "\n").collect();
    for (flag, run) in [
        ("--query", "card_queries"),
        ("--passage", "single_passage_ml32768_card_query_0"),
    ] {
        let mut c = cli();
        c.args([
            "embed",
            "--model",
            fixture_dir().to_str().unwrap(),
            flag,
            "--threads",
            "1",
            "--batch-tokens",
            "16",
        ]);
        let out = run_with_stdin(c, &stdin);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got = parse_vectors(&out.stdout);
        assert_eq!(got.len(), 2);
        let want = embeddings_of(run);
        assert!(max_abs_diff(&got[..want.len()], &want) <= 1e-5, "{flag}");
        for v in &got {
            assert!((v.iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0).abs() < 1e-5);
        }
    }
}

#[test]
fn cli_bad_line_fails_naming_it_and_prints_nothing_after() {
    let mut c = cli();
    c.args(["embed", "--model", fixture_dir().to_str().unwrap(), "--passage"]);
    let out = run_with_stdin(c, "\"fine\"\n{\"not\": \"a string\"}\n\"later\"\n");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "printed: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn cli_reports_a_missing_model_and_bad_dtype() {
    let mut c = cli();
    c.args(["embed", "--model", "/nonexistent/model", "--query"]);
    let out = run_with_stdin(c, "\"x\"\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
    let mut c = cli();
    c.args([
        "embed",
        "--model",
        fixture_dir().to_str().unwrap(),
        "--query",
        "--dtype",
        "f8",
    ]);
    let out = run_with_stdin(c, "\"x\"\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("f8"));
}

#[test]
fn example_prints_the_card_scores() {
    let dir = fixture_dir();
    let files = format!(
        "{},{}",
        dir.join("model-00001-of-00002.safetensors").display(),
        dir.join("model-00002-of-00002.safetensors").display()
    );
    let out = example()
        .args([
            "--model-files",
            &files,
            "--tokenizer",
            dir.join("tokenizer.json").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("scores: "), "{stdout}");
    assert!(stdout.contains("Tensor[[2, 2], f32]"), "{stdout}");
    let numbers: Vec<f32> = stdout
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-'))
        .filter(|s| s.contains('.'))
        .map(|s| s.parse().unwrap())
        .collect();
    let want: Vec<f32> = matrix_f32(&goldens()["card_scores"]).concat();
    assert_eq!(numbers.len(), 4, "{stdout}");
    for (got, want) in numbers.iter().zip(&want) {
        assert!((got - want).abs() <= 1e-3, "{got} vs {want}\n{stdout}");
    }
}

#[test]
fn example_prompt_prints_one_embedding() {
    let out = example()
        .args([
            "--model-dir",
            fixture_dir().to_str().unwrap(),
            "--prompt",
            "Here is a test sentence",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Tensor[[1, 32], f32]"));
}

#[test]
fn example_without_files_or_network_fails_with_one_clear_line() {
    let home = tempfile::tempdir().unwrap();
    for offline in [false, true] {
        let mut c = example();
        c.env("HF_HOME", home.path())
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env_remove("RUST_BACKTRACE");
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        } else {
            c.env_remove("HF_HUB_OFFLINE");
        }
        let out = c.output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("--model-dir") && err.contains("--model-files") && err.contains("--tokenizer"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
