//! Writes randomly initialised checkpoints with NV-Embed-v2's exact tensor names and file layout,
//! at any shape. Used by the tests (shapes other than the shipped fixture) and the benchmark;
//! useful to anyone who wants to exercise the pipeline without the 15–29 GB real weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::error::{Error, Result};

/// The sizes that define an NV-Embed-v2-shaped checkpoint.
#[derive(Debug, Clone)]
pub struct Shape {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rope_theta: f64,
    pub num_latents: usize,
    pub num_cross_heads: usize,
    pub cross_dim_head: usize,
}

impl Shape {
    /// The benchmark's *medium* shape (≈188.5 M parameters).
    pub fn medium() -> Self {
        Self {
            vocab_size: 32_000,
            hidden_size: 1024,
            intermediate_size: 3584,
            num_hidden_layers: 8,
            num_attention_heads: 16,
            num_key_value_heads: 4,
            rope_theta: 10_000.0,
            num_latents: 512,
            num_cross_heads: 8,
            cross_dim_head: 1024,
        }
    }

    /// NV-Embed-v2's own shape: Mistral-7B's decoder and the full-size latent block.
    pub fn nv_embed_v2() -> Self {
        Self {
            vocab_size: 32_000,
            hidden_size: 4096,
            intermediate_size: 14_336,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            rope_theta: 10_000.0,
            num_latents: 512,
            num_cross_heads: 8,
            cross_dim_head: 4096,
        }
    }

    /// Every tensor of the checkpoint with its shape, in the checkpoint's names.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, h, i) = (self.vocab_size, self.hidden_size, self.intermediate_size);
        let hd = h / self.num_attention_heads;
        let kv = self.num_key_value_heads * hd;
        let inner = self.num_cross_heads * self.cross_dim_head;
        let mut shapes = vec![("embedding_model.embed_tokens.weight".to_string(), vec![v, h])];
        for layer in 0..self.num_hidden_layers {
            let p = format!("embedding_model.layers.{layer}");
            shapes.extend([
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
                (format!("{p}.self_attn.q_proj.weight"), vec![h, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, h]),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
            ]);
        }
        let la = "latent_attention_model";
        let c = format!("{la}.cross_attend_blocks");
        shapes.extend([
            ("embedding_model.norm.weight".to_string(), vec![h]),
            (format!("{c}.0.fn.to_q.weight"), vec![inner, h]),
            (format!("{c}.0.fn.to_kv.weight"), vec![2 * inner, h]),
            (format!("{c}.0.fn.to_out.weight"), vec![h, inner]),
            (format!("{c}.0.norm.weight"), vec![h]),
            (format!("{c}.0.norm.bias"), vec![h]),
            (format!("{c}.0.norm_context.weight"), vec![h]),
            (format!("{c}.0.norm_context.bias"), vec![h]),
            (format!("{c}.1.fn.net.0.weight"), vec![8 * h, h]),
            (format!("{c}.1.fn.net.0.bias"), vec![8 * h]),
            (format!("{c}.1.fn.net.2.weight"), vec![h, 4 * h]),
            (format!("{c}.1.fn.net.2.bias"), vec![h]),
            (format!("{c}.1.norm.weight"), vec![h]),
            (format!("{c}.1.norm.bias"), vec![h]),
            (format!("{la}.latents"), vec![self.num_latents, h]),
        ]);
        shapes
    }

    pub fn parameter_count(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// config.json as `save_pretrained` writes it (latent keys at their defaults omitted).
    pub fn config_json(&self) -> serde_json::Value {
        let mut latent = serde_json::Map::new();
        latent.insert("model_type".into(), json!("latent_attention"));
        for (key, value, default) in [
            ("num_latents_value", self.num_latents, 512),
            ("num_cross_heads", self.num_cross_heads, 8),
            ("hidden_dim", self.hidden_size, 4096),
            ("latent_dim", self.hidden_size, 4096),
            ("cross_dim_head", self.cross_dim_head, 4096),
        ] {
            if value != default {
                latent.insert(key.into(), json!(value));
            }
        }
        json!({
            "architectures": ["NVEmbedModel"],
            "model_type": "nvembed",
            "is_mask_instruction": true,
            "padding_side": "right",
            "latent_attention_config": latent,
            "text_config": {
                "model_type": "bidir_mistral",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "rope_theta": self.rope_theta,
                "rms_norm_eps": 1e-5,
                "max_position_embeddings": 32768,
                "hidden_act": "silu",
                "sliding_window": 4096,
            },
        })
    }

    /// Writes `config.json` and a single `model.safetensors` of random f32 weights (norm scales
    /// 1, biases 0, matrices N(0, 0.02²)) into `dir`. Copy a `tokenizer.json` beside them.
    pub fn write(&self, dir: &Path) -> Result<()> {
        self.write_in(dir, DType::F32)
    }

    /// As `write`, with the weights stored in `dtype` (and `torch_dtype` saying so): NV-Embed-v2's
    /// own shape in 16 bits is ~15 GB, held in memory once while written.
    pub fn write_in(&self, dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let device = Device::Cpu;
        let mut tensors = HashMap::new();
        for (name, shape) in self.tensor_shapes() {
            let tensor = if name.ends_with("norm.weight") || name.ends_with("layernorm.weight") {
                Tensor::ones(shape, DType::F32, &device)?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape, DType::F32, &device)?
            } else {
                Tensor::randn(0f32, 0.02, shape, &device)?
            };
            tensors.insert(name, tensor.to_dtype(dtype)?);
        }
        let weights = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &weights)?;
        let config = dir.join("config.json");
        let mut json = self.config_json();
        json["torch_dtype"] = match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        }
        .into();
        std::fs::write(&config, serde_json::to_string_pretty(&json).expect("json")).map_err(|e| Error::io(&config, e))
    }
}
