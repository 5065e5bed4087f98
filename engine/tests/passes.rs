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
    // Drop the middle row after the first layer, and the short row once the latent block has
    // taken a step: the long row must end as it would alone.
    let layers = embedder.config().text_config.num_hidden_layers;
    let long_len = inputs[1].ids.len();
    let mut pass = embedder.begin_pass(&members).unwrap();
    assert_eq!((pass.rows(), pass.padded_tokens()), (3, 3 * long_len));
    let mut step = 0;
    loop {
        step += 1;
        assert_eq!(pass.in_decoder(), step <= layers, "step {step}");
        if step == 2 {
            pass.retain(&[0, 1]).unwrap();
            assert_eq!((pass.rows(), pass.padded_tokens()), (2, 2 * long_len));
        }
        if step == layers + 2 {
            pass.retain(&[1]).unwrap();
            assert_eq!(pass.rows(), 1);
        }
        if !embedder.step_pass(&mut pass).unwrap() {
            break;
        }
    }
    assert!(step >= layers + 2, "the latent block took {} step(s)", step - layers);
    let got = embedder.finish_pass(&pass).unwrap();
    assert_eq!(got.len(), 1);
    assert!(max_abs_diff(&got[0], &want[1]) <= 1e-6, "{}", max_abs_diff(&got[0], &want[1]));
    // Without drops, a stepped pass gives every row its own single-text vector.
    let mut pass = embedder.begin_pass(&members).unwrap();
    while embedder.step_pass(&mut pass).unwrap() {}
    for (got, want) in embedder.finish_pass(&pass).unwrap().iter().zip(&want) {
        assert!(max_abs_diff(got, want) <= 1e-6);
    }
}
