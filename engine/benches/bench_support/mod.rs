//! Shared by both benchmarks: the random checkpoint of the *medium* shape (≈188.5 M parameters),
//! generated once under `target/nvembed-bench/medium` with the fixture's real tokenizer, and this
//! process' memory figures.

use std::path::{Path, PathBuf};

use nvembed_engine::random_checkpoint::Shape;

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
