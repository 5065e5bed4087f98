//! Shared by the integration tests: the shipped fixture and its reference outputs.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use serde_json::Value;

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nvembed-tiny-a")
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
        .map(|row| row.as_array().expect("row").iter().map(|x| x.as_f64().expect("number") as f32).collect())
        .collect()
}

pub fn matrix_u32(value: &Value) -> Vec<Vec<u32>> {
    value
        .as_array()
        .expect("matrix")
        .iter()
        .map(|row| row.as_array().expect("row").iter().map(|x| x.as_u64().expect("int") as u32).collect())
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
