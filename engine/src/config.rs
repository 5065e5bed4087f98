//! `config.json` of an NV-Embed-v2 checkpoint (`NVEmbedConfig` as written by `save_pretrained`).
//!
//! `save_pretrained` omits every key equal to its default, so the latent-attention defaults of the
//! reference (`LatentAttentionConfig`) are reproduced here and apply when a key is absent.

use serde::Deserialize;

use crate::error::{Error, Result};

/// The bidirectional Mistral decoder (`text_config`, model_type `bidir_mistral`).
#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Newer transformers write it; 4.42 derives it as hidden_size / num_attention_heads.
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
}

/// The latent-attention pooling layer (`latent_attention_config`).
#[derive(Debug, Clone, Deserialize)]
pub struct LatentAttentionConfig {
    #[serde(default = "default_num_latents")]
    pub num_latents_value: usize,
    #[serde(default = "default_num_cross_heads")]
    pub num_cross_heads: usize,
    #[serde(default = "default_latent_width")]
    pub hidden_dim: usize,
    #[serde(default = "default_latent_width")]
    pub latent_dim: usize,
    #[serde(default = "default_latent_width")]
    pub cross_dim_head: usize,
    #[serde(default = "default_true")]
    pub output_normalize: bool,
}

impl Default for LatentAttentionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all latent-attention fields have defaults")
    }
}

/// The whole checkpoint configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub text_config: TextConfig,
    #[serde(default)]
    pub latent_attention_config: LatentAttentionConfig,
    /// Zero the instruction's positions in the pool mask (the reference default).
    #[serde(default = "default_true")]
    pub is_mask_instruction: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-5
}
fn default_max_position_embeddings() -> usize {
    32_768
}
fn default_hidden_act() -> String {
    "silu".to_string()
}
fn default_num_latents() -> usize {
    512
}
fn default_num_cross_heads() -> usize {
    8
}
fn default_latent_width() -> usize {
    4096
}
fn default_true() -> bool {
    true
}

impl Config {
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let config: Config = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        config.validate().map_err(|reason| Error::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    /// Per-head width of the decoder.
    pub fn head_dim(&self) -> usize {
        let t = &self.text_config;
        t.head_dim.unwrap_or(t.hidden_size / t.num_attention_heads.max(1))
    }

    /// Width of the returned embedding.
    pub fn embedding_dim(&self) -> usize {
        self.latent_attention_config.latent_dim
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let t = &self.text_config;
        let l = &self.latent_attention_config;
        let positive = [
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("latent_attention_config.num_latents_value", l.num_latents_value),
            ("latent_attention_config.num_cross_heads", l.num_cross_heads),
            ("latent_attention_config.cross_dim_head", l.cross_dim_head),
            ("latent_attention_config.latent_dim", l.latent_dim),
            ("latent_attention_config.hidden_dim", l.hidden_dim),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if t.num_attention_heads % t.num_key_value_heads != 0 {
            return Err(format!(
                "text_config.num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim()));
        }
        if t.hidden_act != "silu" {
            return Err(format!("text_config.hidden_act {:?} is not supported (only silu)", t.hidden_act));
        }
        // The reference feeds decoder states into LayerNorm(latent_dim) and the latents into
        // LayerNorm(hidden_dim): both widths must be the decoder's.
        if l.latent_dim != t.hidden_size || l.hidden_dim != t.hidden_size {
            return Err(format!(
                "latent_attention_config latent_dim ({}) and hidden_dim ({}) must equal text_config.hidden_size ({})",
                l.latent_dim, l.hidden_dim, t.hidden_size
            ));
        }
        Ok(())
    }
}
