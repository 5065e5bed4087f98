//! A pass advanced layer by layer, with rows dropped part-way (what the model server does when
//! a caller leaves), gives the kept rows exactly what a whole forward pass gives them.

mod common;

use common::*;
use nvembed_engine::{DType, Device, EmbedOptions, Embedder, ModelSource, PASSAGE_INSTRUCTION};

#[test]
fn dropping_rows_mid_pass_leaves_the_other_rows_unchanged() {
    let files = ModelSource::Dir(fixture_dir()).resolve().unwrap();
    let embedder = Embedder::load(&files, DType::F32, &Device::Cpu).unwrap();
    let long = "The lighthouse beam sweeps across the water. ".repeat(40);
    let texts = ["a short one", long.as_str(), "a middle-sized text about harbours and boats"];
    let inputs = embedder.encode(PASSAGE_INSTRUCTION, &texts, 32_768).unwrap();
    let members: Vec<_> = inputs.iter().collect();
    let mut pass = embedder.begin_pass(&members).unwrap();
    assert_eq!(pass.rows(), 3);
    assert_eq!(pass.padded_tokens(), 3 * inputs[1].ids.len());
    assert!(embedder.layer_count() >= 2);
    assert!(embedder.step_pass(&mut pass).unwrap());
    // Drop the longest row: the padding only it needed goes too.
    pass.retain(&[0, 2]).unwrap();
    assert_eq!(pass.padded_tokens(), 2 * inputs[2].ids.len());
    while embedder.step_pass(&mut pass).unwrap() {}
    let got = embedder.finish_pass(&pass).unwrap();
    for (row, text) in [(0, texts[0]), (1, texts[2])] {
        let want = embedder.embed(PASSAGE_INSTRUCTION, &[text], &EmbedOptions::default()).unwrap();
        let diff = got[row].iter().zip(&want[0]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff <= 1e-6, "{text}: {diff}");
    }
}
