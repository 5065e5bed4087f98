//! Loading: other shapes, config defaults, file layouts, and every way a checkpoint can be wrong.

mod common;

use common::*;
use nvembed_engine::random_checkpoint::Shape;
use nvembed_engine::{
    choose_dtype, parse_dtype, Config, DType, Device, EmbedOptions, Embedder, Error, ModelDtype, ModelSource, PASSAGE_INSTRUCTION,
    QUERY_INSTRUCTION,
};

fn load_dir(dir: &std::path::Path) -> nvembed_engine::Result<Embedder> {
    Embedder::load(&ModelSource::Dir(dir.to_path_buf()).resolve()?, DType::F32, &Device::Cpu)
}

fn small_shape() -> Shape {
    Shape {
        vocab_size: 32_000,
        hidden_size: 48,
        intermediate_size: 80,
        num_hidden_layers: 3,
        num_attention_heads: 6,
        num_key_value_heads: 3,
        rope_theta: 1_000_000.0,
        num_latents: 512,
        num_cross_heads: 8,
        cross_dim_head: 12,
    }
}

fn write_with_tokenizer(shape: &Shape) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    shape.write(dir.path()).unwrap();
    std::fs::copy(fixture_dir().join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    dir
}

fn unit_norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[test]
fn latent_defaults_apply_when_the_config_omits_them() {
    let config: Config = serde_json::from_str(
        r#"{"text_config": {"vocab_size": 10, "hidden_size": 4096, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 8}}"#,
    )
    .unwrap();
    let l = &config.latent_attention_config;
    assert_eq!((l.num_latents_value, l.num_cross_heads), (512, 8));
    assert_eq!((l.hidden_dim, l.latent_dim, l.cross_dim_head), (4096, 4096, 4096));
    assert!(l.output_normalize);
    assert_eq!(config.head_dim(), 128);
}

#[test]
fn another_shape_with_defaulted_latent_keys_loads_and_embeds() {
    let shape = small_shape();
    let dir = write_with_tokenizer(&shape);
    let config = shape.config_json();
    let latent = config["latent_attention_config"].as_object().unwrap();
    assert!(!latent.contains_key("num_latents_value") && !latent.contains_key("num_cross_heads"));
    let embedder = load_dir(dir.path()).unwrap();
    assert_eq!(embedder.embedding_dim(), 48);
    let texts = [
        "a short one",
        "a somewhat longer passage about harbours, boats and the sea",
    ];
    let got = embedder
        .embed(QUERY_INSTRUCTION, &texts, &EmbedOptions::default())
        .unwrap();
    for v in &got {
        assert_eq!(v.len(), 48);
        assert!((unit_norm(v) - 1.0).abs() < 1e-5);
    }
    let alone = embedder
        .embed(QUERY_INSTRUCTION, &texts[..1], &EmbedOptions::default())
        .unwrap();
    assert!(max_abs_diff(&alone, &got[..1]) <= 1e-6, "padding changed a result");
}

#[test]
fn single_file_and_sharded_checkpoints_give_identical_vectors() {
    let sharded = load_dir(&fixture_dir()).unwrap();
    // Merge the two shards into one model.safetensors.
    let files = ModelSource::Dir(fixture_dir()).resolve().unwrap();
    assert_eq!(files.weights.len(), 2);
    let mut all = std::collections::HashMap::new();
    for f in &files.weights {
        all.extend(candle_core::safetensors::load(f, &Device::Cpu).unwrap());
    }
    let dir = fixture_copy();
    for f in &files.weights {
        std::fs::remove_file(dir.path().join(f.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).unwrap();
    candle_core::safetensors::save(&all, dir.path().join("model.safetensors")).unwrap();
    let single = load_dir(dir.path()).unwrap();
    let texts = ["hello", "Crème brûlée à Paris"];
    let a = sharded
        .embed(PASSAGE_INSTRUCTION, &texts, &EmbedOptions::default())
        .unwrap();
    let b = single
        .embed(PASSAGE_INSTRUCTION, &texts, &EmbedOptions::default())
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn weights_stored_in_half_precision_load_into_any_dtype() {
    let files = ModelSource::Dir(fixture_dir()).resolve().unwrap();
    let dir = fixture_copy();
    for f in &files.weights {
        let tensors: std::collections::HashMap<_, _> = candle_core::safetensors::load(f, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    let reference = load_dir(&fixture_dir()).unwrap();
    let want = reference
        .embed(PASSAGE_INSTRUCTION, &["hello world"], &EmbedOptions::default())
        .unwrap();
    // int8 too: quantized at load from the checkpoint as stored (16-bit here, as published).
    let precisions = [DType::F32, DType::F16, DType::BF16].map(ModelDtype::Float);
    for dtype in precisions.into_iter().chain([ModelDtype::Int8]) {
        let files = ModelSource::Dir(dir.path().to_path_buf()).resolve().unwrap();
        let e = Embedder::load(&files, dtype, &Device::Cpu).unwrap();
        assert!(nvembed_protocol::serves_dtype(&e.dtype_name(), dtype.name()), "{}", e.dtype_name());
        let got = e
            .embed(PASSAGE_INSTRUCTION, &["hello world"], &EmbedOptions::default())
            .unwrap();
        assert!(cosine(&got[0], &want[0]) > 0.99, "{dtype:?}");
    }
    // `auto` is the config's torch_dtype (float32 here), else the stored one, as transformers
    // reads torch_dtype="auto".
    let files = ModelSource::Dir(dir.path().to_path_buf()).resolve().unwrap();
    assert_eq!(choose_dtype("auto", &files).unwrap(), ModelDtype::Float(DType::F32));
    assert_eq!(choose_dtype("f16", &files).unwrap(), ModelDtype::Float(DType::F16));
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["torch_dtype"] = "float16".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    assert_eq!(choose_dtype("AUTO", &files).unwrap(), ModelDtype::Float(DType::F16));
    config.as_object_mut().unwrap().remove("torch_dtype");
    std::fs::write(&config_path, config.to_string()).unwrap();
    assert_eq!(choose_dtype("auto", &files).unwrap(), ModelDtype::Float(DType::BF16));
    assert!(choose_dtype("f64", &files).unwrap_err().to_string().contains("auto, f32, f16, bf16, int8"));
    assert_eq!(choose_dtype("INT8", &files).unwrap(), ModelDtype::Int8);
}

#[test]
fn a_long_input_runs_in_bounded_attention_blocks_and_matches_padding_free_results() {
    // ~9000 tokens: the decoder's full score tensor (16 × L² bytes for this shape) would be
    // ~1.3 GB; the blocked attention keeps each block under ATTENTION_SCORE_BLOCK_BYTES.
    let embedder = load_dir(&fixture_dir()).unwrap();
    let sentence = "The lighthouse beam sweeps across the water in slow, steady circles. ";
    let long = sentence.repeat(600);
    let inputs = embedder
        .encoder()
        .encode(PASSAGE_INSTRUCTION, &[&long], 32_768)
        .unwrap();
    let tokens = inputs[0].ids.len();
    assert!(tokens > 9_000, "{tokens} tokens");
    let full_scores = 2 * 2 * tokens * tokens * 4;
    assert!(full_scores > 4 * nvembed_engine::nvembed_v2::ATTENTION_SCORE_BLOCK_BYTES);
    let options = EmbedOptions::default();
    let alone = embedder.embed(PASSAGE_INSTRUCTION, &[&long], &options).unwrap();
    assert!((unit_norm(&alone[0]) - 1.0).abs() < 1e-5);
    assert!(alone[0].iter().all(|x| x.is_finite()));
    // Same text padded next to an even longer one: padding must not change it.
    let longer = sentence.repeat(640);
    let together = embedder
        .embed(
            PASSAGE_INSTRUCTION,
            &[&long, &longer],
            &EmbedOptions {
                batch_tokens: usize::MAX,
                ..options
            },
        )
        .unwrap();
    assert!(max_abs_diff(&alone, &together[..1]) <= 1e-5);
    // Truncation: max_length caps the tokens.
    let cut = embedder.encoder().encode(PASSAGE_INSTRUCTION, &[&long], 100).unwrap();
    assert_eq!(cut[0].ids.len(), 100);
}

#[test]
fn missing_directory_is_named() {
    let err = load_dir(std::path::Path::new("/nonexistent/nvembed-model")).unwrap_err();
    assert!(matches!(err, Error::MissingFile(_)), "{err}");
    assert!(err.to_string().contains("/nonexistent/nvembed-model"));
}

#[test]
fn missing_tokenizer_config_and_shard_are_named() {
    for file in ["tokenizer.json", "config.json", "model-00002-of-00002.safetensors"] {
        let dir = fixture_copy();
        std::fs::remove_file(dir.path().join(file)).unwrap();
        let err = load_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains(file), "{file}: {err}");
    }
}

#[test]
fn corrupt_safetensors_is_an_error_naming_the_file() {
    let dir = fixture_copy();
    let shard = dir.path().join("model-00001-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Safetensors { .. }), "{err}");
    assert!(err.to_string().contains("model-00001-of-00002.safetensors"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = fixture_copy();
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let mut tensors = candle_core::safetensors::load(&shard, &Device::Cpu).unwrap();
    tensors.remove("embedding_model.layers.1.mlp.up_proj.weight").unwrap();
    candle_core::safetensors::save(&tensors, &shard).unwrap();
    let err = load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::MissingTensor { .. }), "{err}");
    assert!(err.to_string().contains("embedding_model.layers.1.mlp.up_proj.weight"), "{err}");
}

#[test]
fn mis_shaped_tensor_names_both_shapes() {
    let dir = fixture_copy();
    // The config claims the default 512 latents; the fixture has 16.
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["latent_attention_config"]
        .as_object_mut()
        .unwrap()
        .remove("num_latents_value");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let err = load_dir(dir.path()).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("latent_attention_model.latents"), "{message}");
    assert!(message.contains("[16, 32]") && message.contains("[512, 32]"), "{message}");
}

#[test]
fn invalid_config_is_rejected_with_its_path() {
    let dir = fixture_copy();
    std::fs::write(dir.path().join("config.json"), r#"{"text_config": {"hidden_size": 32}}"#).unwrap();
    let err = load_dir(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("config.json") && err.to_string().contains("vocab_size"), "{err}");
}

#[test]
fn explicit_files_work_like_a_directory() {
    let dir_files = ModelSource::Dir(fixture_dir()).resolve().unwrap();
    let explicit = ModelSource::Files(dir_files.clone()).resolve().unwrap();
    assert_eq!(explicit, dir_files);
}

#[test]
fn bad_arguments_are_errors() {
    assert!(parse_dtype("f8").is_err());
    assert_eq!(parse_dtype("BF16").unwrap(), DType::BF16);
    let embedder = load_dir(&fixture_dir()).unwrap();
    let zero = EmbedOptions {
        max_length: 0,
        ..EmbedOptions::default()
    };
    assert!(matches!(embedder.embed(PASSAGE_INSTRUCTION, &["x"], &zero), Err(Error::InvalidArgument(_))));
    let beyond = EmbedOptions {
        max_length: 32_769,
        ..EmbedOptions::default()
    };
    match embedder.embed(PASSAGE_INSTRUCTION, &["x"], &beyond) {
        Err(Error::InvalidArgument(message)) => assert!(message.contains("position limit"), "{message}"),
        other => panic!("{other:?}"),
    }
    // An instruction that fills max_length leaves nothing to pool: error naming the input index.
    let tight = EmbedOptions {
        max_length: 18,
        ..EmbedOptions::default()
    };
    match embedder.embed(QUERY_INSTRUCTION, &["fine", "also fine"], &tight) {
        Err(Error::NothingToPool { index: 0, tokens: 18 }) => {}
        other => panic!("{other:?}"),
    }
    // The empty passage is a valid input (the reference embeds `<s></s>`).
    let empty = embedder
        .embed(PASSAGE_INSTRUCTION, &[""], &EmbedOptions::default())
        .unwrap();
    assert!((unit_norm(&empty[0]) - 1.0).abs() < 1e-5);
}

#[test]
fn a_fingerprint_names_the_files_contents_not_their_place() {
    let shape = small_shape();
    let dir = write_with_tokenizer(&shape);
    let files = ModelSource::Dir(dir.path().to_path_buf()).resolve().unwrap();
    let fingerprint = files.fingerprint().unwrap();
    assert!(fingerprint.starts_with("sha256:") && fingerprint.len() == 7 + 16, "{fingerprint}");
    // The same files elsewhere: the same fingerprint.
    let copy = tempfile::tempdir().unwrap();
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(dir.path().join(name), copy.path().join(name)).unwrap();
    }
    let copied = ModelSource::Dir(copy.path().to_path_buf()).resolve().unwrap();
    assert_eq!(copied.fingerprint().unwrap(), fingerprint);
    // One weight changed (the first tensor's first byte after the header): another checkpoint.
    let weights = copy.path().join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    assert_ne!(copied.fingerprint().unwrap(), fingerprint);
    // So does another config with the same weights.
    std::fs::copy(dir.path().join("model.safetensors"), &weights).unwrap();
    assert_eq!(copied.fingerprint().unwrap(), fingerprint);
    std::fs::write(copy.path().join("config.json"), shape.config_json().to_string() + " ").unwrap();
    assert_ne!(copied.fingerprint().unwrap(), fingerprint);
}
