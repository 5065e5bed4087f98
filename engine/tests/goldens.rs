//! Fidelity against the original reference implementation's outputs on the tiny fixture.

mod common;

use common::*;
use nvembed_engine::{DType, Embedder, Error, MatmulBackend, ModelDtype};

fn load(dtype: DType) -> Embedder {
    load_with(dtype, MatmulBackend::Onednn)
}

#[test]
fn token_ids_and_masks_match_the_reference() {
    let g = goldens();
    let embedder = load(DType::F32);
    let encoder = embedder.encoder();
    for run in runs(&g) {
        let inputs = encoder
            .encode(&run.instruction, &run.texts, run.max_length)
            .expect("encode");
        let refs: Vec<_> = inputs.iter().collect();
        let batch = encoder.pad(&refs);
        assert_eq!(batch.input_ids, matrix_u32(&run.value["input_ids"]), "{}: input_ids", run.name);
        assert_eq!(batch.attention_mask, matrix_u32(&run.value["attention_mask"]), "{}: attention_mask", run.name);
        assert_eq!(batch.pool_mask, matrix_u32(&run.value["pool_mask"]), "{}: pool_mask", run.name);
        assert_eq!(
            encoder.instruction_len(&run.instruction).unwrap() as u64,
            run.value["instruction_lens"].as_u64().unwrap(),
            "{}: instruction length",
            run.name
        );
    }
}

#[test]
fn f32_embeddings_match_every_reference_run() {
    for backend in [MatmulBackend::Onednn, MatmulBackend::Candle] {
        let worst = f32_golden_diff(&load_with(DType::F32, backend));
        eprintln!("f32 on {}: worst max abs diff = {worst:e}", backend.name());
    }
}

#[test]
fn batched_and_single_runs_agree() {
    let g = goldens();
    let embedder = load(DType::F32);
    for run in runs(&g)
        .iter()
        .filter(|r| r.name.starts_with("all_") && !is_nonfinite(r))
    {
        let batched = embedder
            .embed(&run.instruction, &run.texts, &one_batch(run.max_length))
            .unwrap();
        for (row, text) in run.texts.iter().enumerate() {
            let single = embedder
                .embed(&run.instruction, &[text], &one_batch(run.max_length))
                .unwrap();
            let diff = max_abs_diff(&single, &batched[row..=row]);
            assert!(diff <= 1e-6, "{} row {row}: batched vs single differ by {diff}", run.name);
        }
    }
}

#[test]
fn runs_with_nothing_to_pool_are_errors_not_nan() {
    let g = goldens();
    let embedder = load(DType::F32);
    let mut seen = 0;
    for run in runs(&g).iter().filter(|r| is_nonfinite(r)) {
        match embedder.embed(&run.instruction, &run.texts, &one_batch(run.max_length)) {
            Err(Error::NothingToPool { index, tokens }) => {
                assert_eq!((index, tokens), (0, run.max_length), "{}", run.name);
            }
            other => panic!("{}: expected NothingToPool, got {other:?}", run.name),
        }
        seen += 1;
    }
    assert_eq!(seen, 10);
}

#[test]
fn decoder_hidden_states_match_the_reference() {
    let g = goldens();
    let embedder = load(DType::F32);
    let run = runs(&g).into_iter().find(|r| r.name == "card_queries").unwrap();
    let expected: Vec<Vec<Vec<f32>>> = g["debug"]["card_queries_decoder_last_hidden_state"]
        .as_array()
        .unwrap()
        .iter()
        .map(matrix_f32)
        .collect();
    let hidden = embedder
        .decoder_hidden_states(&run.instruction, &run.texts, run.max_length)
        .unwrap();
    for (row, (got, want)) in hidden.iter().zip(&expected).enumerate() {
        let diff = max_abs_diff(got, want);
        assert!(diff <= 1e-4, "row {row}: decoder states differ by {diff}");
    }
}

#[test]
fn card_scores_match() {
    let g = goldens();
    let embedder = load(DType::F32);
    let all = runs(&g);
    let get = |name: &str| {
        let run = all.iter().find(|r| r.name == name).unwrap();
        embedder
            .embed(&run.instruction, &run.texts, &one_batch(run.max_length))
            .unwrap()
    };
    let (q, p) = (get("card_queries"), get("card_passages"));
    let expected = matrix_f32(&g["card_scores"]);
    for i in 0..2 {
        for j in 0..2 {
            let score: f32 = 100.0 * q[i].iter().zip(&p[j]).map(|(a, b)| a * b).sum::<f32>();
            assert!((score - expected[i][j]).abs() <= 1e-3, "score[{i}][{j}] = {score}, want {}", expected[i][j]);
        }
    }
}

fn half_precision_cosines(dtype: DType) {
    for backend in [MatmulBackend::Onednn, MatmulBackend::Candle] {
        let embedder = load_with(dtype, backend);
        let worst = worst_golden_cosine(&embedder);
        eprintln!(
            "{dtype:?} on {} ({}): worst cosine against the f32 goldens = {worst:.6}",
            backend.name(),
            embedder.matmul()
        );
    }
}

#[test]
fn f16_is_close_to_the_f32_goldens() {
    half_precision_cosines(DType::F16);
}

#[test]
fn bf16_is_close_to_the_f32_goldens() {
    half_precision_cosines(DType::BF16);
}

/// Weight-only int8 on this CPU's own kernels: every projection's weights decompressed inside
/// oneDNN's matmul (into bf16 where the CPU has native BF16, f32 elsewhere), each vector within
/// `INT8_COSINE` of the f32 reference; candle's matmul refuses int8 with a clear error.
#[test]
fn int8_weights_are_close_to_the_f32_goldens() {
    let embedder = load_with(ModelDtype::Int8, MatmulBackend::Onednn);
    let kernel = embedder.matmul();
    // Every projection on one native kernel: `; ` would separate a second way (a fallback).
    assert!(kernel.contains("int8 weights decompressed to") && !kernel.contains("; "), "{kernel}");
    assert_eq!(embedder.dtype_name(), format!("int8-{}", nvembed_engine::dtype_name(embedder.dtype())));
    let worst = worst_golden_cosine(&embedder);
    eprintln!("int8 ({kernel}): worst cosine against the f32 goldens = {worst:.6}");
    let files = nvembed_engine::ModelSource::Dir(fixture_dir()).resolve().unwrap();
    let err = Embedder::load_with(&files, ModelDtype::Int8, &nvembed_engine::Device::Cpu, MatmulBackend::Candle)
        .unwrap_err()
        .to_string();
    let says = ["int8 weights run on the CPU with the oneDNN matmul", "NVEMBED_MATMUL=candle", "choose another dtype"];
    assert!(says.iter().all(|s| err.contains(s)), "{err}");
}
