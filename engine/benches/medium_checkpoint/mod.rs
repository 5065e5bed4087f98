//! The random checkpoint of the *medium* shape (≈188.5 M parameters) both benchmarks run on,
//! generated once under `target/nvembed-bench/medium` with the fixture's real tokenizer.

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
