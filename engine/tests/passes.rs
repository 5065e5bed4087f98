//! A pass advanced layer by layer, with rows dropped part-way (what the model server does when
//! a caller leaves), gives the kept rows exactly what a whole forward pass gives them.

mod common;

use common::*;
use nvembed_engine::{DType, Device, EmbedOptions, Embedder, ModelSource, PASSAGE_INSTRUCTION};

fn embedder() -> Embedder {
    let files = ModelSource::Dir(fixture_dir()).resolve().unwrap();
    Embedder::load(&files, DType::F32, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn dropping_rows_mid_pass_leaves_the_other_rows_unchanged() {
    let embedder = embedder();
    let long = "The lighthouse beam sweeps across the water. ".repeat(40);
    let texts = [
        "a short one",
        long.as_str(),
        "a middle-sized text about harbours and boats",
    ];
    let inputs = embedder.encode(PASSAGE_INSTRUCTION, &texts, 32_768).unwrap();
    let members: Vec<_> = inputs.iter().collect();
    let want: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| {
            embedder
                .embed(PASSAGE_INSTRUCTION, &[*t], &EmbedOptions::default())
                .unwrap()
                .remove(0)
        })
        .collect();
    // Drop the longest row after the first layer (its padding goes too), and the short row at
    // the first step inside the latent block.
    let mut pass = embedder.begin_pass(&members).unwrap();
    assert_eq!((pass.rows(), pass.padded_tokens()), (3, 3 * inputs[1].ids.len()));
    let mut dropped_in_latent_block = false;
    for step in 1.. {
        if step == 2 {
            pass.retain(&[0, 2]).unwrap();
            assert_eq!((pass.rows(), pass.padded_tokens()), (2, 2 * inputs[2].ids.len()));
        }
        if !pass.in_decoder() && !dropped_in_latent_block {
            assert!(step > embedder.config().text_config.num_hidden_layers, "step {step}");
            pass.retain(&[1]).unwrap();
            assert_eq!(pass.rows(), 1);
            dropped_in_latent_block = true;
        }
        if !embedder.step_pass(&mut pass).unwrap() {
            break;
        }
    }
    assert!(dropped_in_latent_block);
    let got = embedder.finish_pass(&pass).unwrap();
    assert_eq!(got.len(), 1);
    assert!(max_abs_diff(&got[0], &want[2]) <= 1e-6, "{}", max_abs_diff(&got[0], &want[2]));
    // Without drops, a stepped pass gives every row its own single-text vector.
    let mut pass = embedder.begin_pass(&members).unwrap();
    while embedder.step_pass(&mut pass).unwrap() {}
    for (got, want) in embedder.finish_pass(&pass).unwrap().iter().zip(&want) {
        assert!(max_abs_diff(got, want) <= 1e-6);
    }
}
